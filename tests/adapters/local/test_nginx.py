"""NginxRouter against the real nginx: split, reloads under load, a crashing canary,
read-back from the running process, a rejected config, and the access log feeding stats.

nginx runs as a plain process under the test's tmp_path, in front of two small
aiohttp apps on 127.0.0.1 that answer with their name. Skipped when nginx is
not installed, except in CI (CI=true), where it fails instead. The access-log
parsing test needs no nginx.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from adapters.local import nginx as nginx_module
from adapters.local.nginx import NginxConfigError, NginxError, NginxRouter
from adapters.local.trafficstats import TrafficStats
from engine.loop import LoopClock
from tests.adapters.local.test_proxy import (
    REF,
    Upstream,
    canary,
    check_in_flight_finishes,
    check_status_comes_back,
    count_answers,
    run_load,
    stable,
)
from tests.services import which_or_skip

__all__ = ["canary", "stable"]  # fixtures shared with the proxy tests


@pytest.fixture
def nginx_bin() -> str:
    return which_or_skip("nginx", "apt-get install nginx")


@pytest_asyncio.fixture
async def router(
    tmp_path: Path, nginx_bin: str, stable: Upstream, canary: Upstream
) -> AsyncIterator[NginxRouter]:
    stats = TrafficStats(LoopClock())
    proxy = NginxRouter(tmp_path / "nginx", 0, stable.url, canary.url, stats, nginx=nginx_bin)
    await proxy.start()
    yield proxy
    await proxy.stop()


def group_alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.asyncio
@pytest.mark.parametrize("weight", [0, 5, 25, 100])
async def test_exact_split(router: NginxRouter, weight: int) -> None:
    await router.set_weight(REF, weight)
    assert await router.get_weight(REF) == weight
    answers = await count_answers(router.url + "/", 200)
    assert answers["canary"] == 2 * weight
    assert answers["stable"] == 200 - 2 * weight
    # the access log saw the same split
    router.flush_log()
    assert router.stats.count("canary") == 2 * weight
    assert router.stats.count("stable") == 200 - 2 * weight


@pytest.mark.asyncio
async def test_the_config_leaves_out_a_zero_weight_server(router: NginxRouter) -> None:
    stable_addr = router.urls["stable"].removeprefix("http://")
    canary_addr = router.urls["canary"].removeprefix("http://")
    expected = {
        0: [f"server {stable_addr} weight=100 "],
        30: [f"server {stable_addr} weight=70 ", f"server {canary_addr} weight=30 "],
        100: [f"server {canary_addr} weight=100 "],
    }
    for weight, servers in expected.items():
        await router.set_weight(REF, weight)
        listed = [
            line.strip() + " "
            for line in router.config_path.read_text().splitlines()
            if line.strip().startswith("server 1")
        ]
        assert [s.split("max_fails")[0] for s in listed] == servers


@pytest.mark.asyncio
async def test_weight_changes_and_reloads_under_load_lose_no_request(router: NginxRouter) -> None:
    weights = (10, 50, 0, 90, 25, 100, 5, 60, 0, 30)

    async def change() -> None:
        for weight in weights:
            await router.set_weight(REF, weight)
            assert await router.get_weight(REF) == weight
            await asyncio.sleep(0.05)

    load = await run_load(router.url + "/", 100, change)
    assert load.failures == []
    assert load.total >= 100
    assert load.answers["canary"] > 0 and load.answers["stable"] > 0
    # ten reloads, each a new worker
    log = router.error_log.read_text()
    assert log.count("signal 1 (SIGHUP) received") >= len(weights)


@pytest.mark.asyncio
async def test_a_crashed_canary_is_retried_on_stable_and_counted(
    router: NginxRouter, canary: Upstream
) -> None:
    await router.set_weight(REF, 50)

    async def crash() -> None:
        await asyncio.sleep(0.3)
        await canary.stop()
        await asyncio.sleep(0.5)

    load = await run_load(router.url + "/", 100, crash)
    assert load.failures == []
    assert load.answers["canary"] > 0  # served before the crash
    router.flush_log()
    now = router.stats.clock.now()
    error_rate = router.stats.value("canary", "error_rate", 60, now)
    assert error_rate is not None and error_rate > 0.2
    assert router.stats.value("stable", "error_rate", 60, now) == 0.0


@pytest.mark.asyncio
async def test_read_back_comes_from_the_running_nginx(router: NginxRouter) -> None:
    await router.set_weight(REF, 30)
    # the file on disk says 70, but nginx has not loaded it: the read-back says 30
    text = router.config_path.read_text()
    router.config_path.write_text(text.replace('return 200 "30"', 'return 200 "70"'))
    assert await router.get_weight(REF) == 30
    # once nginx loads it, the read-back follows
    assert router.pid is not None
    os.kill(router.pid, signal.SIGHUP)
    deadline = time.monotonic() + 5
    while await router.get_weight(REF) != 70:
        assert time.monotonic() < deadline, "nginx did not load the edited config"
        await asyncio.sleep(0.05)


@pytest.mark.asyncio
async def test_a_rejected_config_keeps_the_old_one_serving(
    router: NginxRouter, monkeypatch: pytest.MonkeyPatch
) -> None:
    await router.set_weight(REF, 20)
    serving = router.config_path.read_text()
    render = nginx_module.render_config

    def broken(*args: Any, **kwargs: Any) -> str:
        return render(*args, **kwargs).replace("keepalive 32;", "keepalive 32; bogus_directive on;")

    monkeypatch.setattr(nginx_module, "render_config", broken)
    with pytest.raises(NginxConfigError) as raised:
        await router.set_weight(REF, 60)
    message = str(raised.value)
    assert str(router.candidate_path) in message
    assert "bogus_directive" in message
    assert "still serving" in message
    assert router.config_path.read_text() == serving
    assert router.running
    assert await router.get_weight(REF) == 20
    answers = await count_answers(router.url + "/", 100)
    assert answers["canary"] == 20
    # once the config is good again, changes go through
    monkeypatch.setattr(nginx_module, "render_config", render)
    await router.set_weight(REF, 60)
    assert await router.get_weight(REF) == 60


@pytest.mark.asyncio
async def test_a_bad_upstream_url_changes_nothing(router: NginxRouter) -> None:
    await router.set_weight(REF, 40)
    for url in ("http://127.0.0.1:notaport", "ftp://127.0.0.1:21", "http://:8080"):
        with pytest.raises(ValueError, match="stable URL"):
            await router.set_stable(url)
    assert await router.get_weight(REF) == 40
    assert (await count_answers(router.url + "/", 100))["canary"] == 40


@pytest.mark.asyncio
async def test_set_stable_points_stable_at_the_new_process(router: NginxRouter) -> None:
    replacement = Upstream("stable-v2")
    await replacement.start()
    try:
        await router.set_weight(REF, 100)
        await router.set_stable(replacement.url)
        await router.set_weight(REF, 0)
        assert await count_answers(router.url + "/", 20) == Counter({"stable-v2": 20})
        router.flush_log()
        # requests to the new address are stable's
        assert router.stats.count("stable") == 20
        assert router.stats.count("canary") == 0
    finally:
        await replacement.stop()


@pytest.mark.asyncio
async def test_the_upstream_status_comes_back(router: NginxRouter) -> None:
    await check_status_comes_back(router.url, router.stats, flush=router.flush_log)


@pytest.mark.asyncio
async def test_requests_in_flight_finish_across_a_reload(router: NginxRouter) -> None:
    await check_in_flight_finishes(router, router.url)


@pytest.mark.asyncio
async def test_stop_leaves_no_nginx_process(router: NginxRouter) -> None:
    pid = router.pid
    assert pid is not None and group_alive(pid)
    await router.stop()
    assert not group_alive(pid)
    assert router.pid is None
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", router.port), 1):
        pass


@pytest.mark.asyncio
async def test_a_taken_port_fails_start_clearly(
    tmp_path: Path, nginx_bin: str, stable: Upstream, canary: Upstream
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        stats = TrafficStats(LoopClock())
        proxy = NginxRouter(tmp_path / "nginx", port, stable.url, canary.url, stats, nginx_bin)
        with pytest.raises(NginxError, match="Address already in use"):
            await proxy.start()
        assert not proxy.running


@pytest.mark.asyncio
async def test_the_access_log_feeds_the_stats_by_upstream_address(tmp_path: Path) -> None:
    stats = TrafficStats(LoopClock())
    proxy = NginxRouter(
        tmp_path, 0, "http://127.0.0.1:8001", "http://127.0.0.1:8002", stats, nginx="nginx"
    )
    now = time.time()

    def line(up: str, status: str, urt: str, rt: str = "0.050") -> str:
        entry = {"t": f"{now:.3f}", "up": up, "status": status, "rt": rt, "urt": urt}
        return json.dumps(entry)

    lines = [
        line("127.0.0.1:8001", "200", "0.010"),
        line("127.0.0.1:8002", "503", "0.020"),
        # the canary refused the connection, stable answered
        line("127.0.0.1:8002, 127.0.0.1:8001", "200", "0.000, 0.030"),
        line("-", "400", "-"),  # answered by nginx itself
        line("127.0.0.1:9999", "200", "0.010"),  # not one of ours
    ]
    proxy.access_log.write_text("\n".join(lines) + "\n" + line("127.0.0.1:8001", "200", "0.5"))
    assert proxy.flush_log() == 4  # the last line is not finished yet
    clock_now = stats.clock.now()
    assert stats.count("stable") == 2
    assert stats.count("canary") == 2
    assert stats.value("canary", "error_rate", 60, clock_now) == 1.0
    assert stats.value("stable", "p99", 60, clock_now) == pytest.approx(0.0298)
    with proxy.access_log.open("a") as f:
        f.write("\n")
    assert proxy.flush_log() == 1
    assert stats.count("stable") == 3
