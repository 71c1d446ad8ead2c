"""adapters.local.service: the sample service as a real process, over real HTTP on 127.0.0.1.

Each test starts `python -m adapters.local.service --port 0 ...`, reads the
READY line for the port, and talks to it with an aiohttp client; the process
is killed when the test ends, whatever happened.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from adapters.metrics.catalog import BUILTIN

pytestmark = pytest.mark.asyncio

READY = re.compile(rb"READY port=(\d+) pid=(\d+)\n")


@dataclass
class Running:
    proc: asyncio.subprocess.Process
    port: int
    ready_at: float  # time.monotonic() when READY was read
    session: aiohttp.ClientSession

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def get(self, path: str = "/") -> tuple[int, str, dict[str, str]]:
        async with self.session.get(self.url(path)) as response:
            return response.status, await response.text(), dict(response.headers)

    async def stats(self) -> dict[str, object]:
        status, text, _ = await self.get("/stats")
        assert status == 200
        return dict(json.loads(text))

    async def stderr(self) -> str:
        assert self.proc.stderr is not None
        return (await self.proc.stderr.read()).decode()


async def spawn(*args: str, stdin: int | None = None) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "adapters.local.service", *args,
        stdin=stdin if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )


@asynccontextmanager
async def service(*args: str, stdin: int | None = None) -> AsyncIterator[Running]:
    proc = await spawn("--port", "0", *args, stdin=stdin)
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 10)
        ready_at = time.monotonic()
        match = READY.fullmatch(line)
        assert match, f"expected a READY line first, got {line!r}"
        assert int(match.group(2)) == proc.pid
        async with aiohttp.ClientSession() as session:
            yield Running(proc, int(match.group(1)), ready_at, session)
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def test_it_answers_with_its_version_and_track_on_any_path() -> None:
    async with service("--version", "v2", "--track", "canary") as svc:
        assert svc.port > 0
        for path in ("/", "/checkout/42"):
            status, text, headers = await svc.get(path)
            assert status == 200
            assert "v2" in text
            assert headers["X-Codedance-Version"] == "v2"
            assert headers["X-Codedance-Track"] == "canary"
        status, text, _ = await svc.get("/healthz")
        assert (status, text.strip()) == (200, "ok")
        stats = await svc.stats()
        # the special paths are not requests of the service's own
        assert stats["version"] == "v2"
        assert stats["requests"] == 2
        assert stats["errors"] == 0
        assert stats["faulty_since"] is None


async def test_the_error_share_is_exact_and_spread_as_documented() -> None:
    async with service("--version", "v2", "--error-share", "0.3") as svc:
        statuses = [(await svc.get(f"/{i}"))[0] for i in range(1, 21)]
        failed = [i for i, status in enumerate(statuses, start=1) if status == 500]
        # floor(n * 0.3) > floor((n - 1) * 0.3)
        assert failed == [4, 7, 10, 14, 17, 20]
        assert set(statuses) == {200, 500}
        stats = await svc.stats()
        assert stats["requests"] == 20
        assert stats["errors"] == 6
        assert stats["faulty_since"] is not None


async def test_metrics_carry_the_labels_the_plain_catalog_matches_on() -> None:
    identity = ("--namespace", "shop", "--workload", "web-canary", "--track", "canary")
    async with service("--version", "v2", "--error-share", "0.5", *identity) as svc:
        for _ in range(4):
            await svc.get("/")
        status, text, headers = await svc.get("/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    samples = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    labels = {"namespace": "shop", "workload": "web-canary", "track": "canary"}

    def value(name: str, **extra: str) -> float | None:
        return samples.get((name, frozenset({**labels, **extra}.items())))

    assert value("http_requests_total", code="200") == 2
    assert value("http_requests_total", code="500") == 2
    assert value("http_request_duration_seconds_count") == 4
    assert value("http_request_duration_seconds_bucket", le="+Inf") == 4
    plain = BUILTIN["plain"]
    uses = (("error_rate", "http_requests_total"), ("p99", "http_request_duration_seconds_bucket"))
    for metric, series in uses:
        entry = plain[metric]
        assert series in entry.template
        assert {entry.namespace_label, entry.workload_label} <= set(labels)
        assert any(name == series for name, _ in samples)


async def test_latency_and_jitter_delay_every_request() -> None:
    async with service("--version", "v2", "--latency", "0.3", "--jitter", "0.05") as svc:
        for _ in range(3):
            began = time.monotonic()
            status, _, _ = await svc.get("/")
            took = time.monotonic() - began
            assert status == 200
            assert 0.3 <= took < 0.35 + 0.15
    async with service("--version", "v1") as healthy:
        began = time.monotonic()
        await healthy.get("/")
        assert time.monotonic() - began < 0.2


async def test_faults_start_only_after_bad_after() -> None:
    args = ("--version", "v2", "--bad-after", "0.8", "--error-share", "1", "--latency", "0.2")
    async with service(*args) as svc:
        began = time.monotonic()
        status, _, _ = await svc.get("/")
        assert status == 200
        assert time.monotonic() - began < 0.2
        assert (await svc.stats())["faulty_since"] is None

        await asyncio.sleep(max(0.0, svc.ready_at + 0.9 - time.monotonic()))
        began = time.monotonic()
        status, _, _ = await svc.get("/")
        assert status == 500
        assert time.monotonic() - began >= 0.2
        stats = await svc.stats()
        assert isinstance(stats["faulty_since"], float)
        assert stats["faulty_since"] == pytest.approx(float(str(stats["started"])) + 0.8)
        assert stats["errors"] == 1


async def test_crash_after_exits_abruptly_after_the_faults_start() -> None:
    args = ("--version", "v2", "--bad-after", "0.5", "--crash-after", "0.5")
    async with service(*args) as svc:
        await asyncio.sleep(0.6)
        status, _, _ = await svc.get("/")  # faulty, not yet crashed
        assert status == 200
        code = await asyncio.wait_for(svc.proc.wait(), 5)
        lived = time.monotonic() - svc.ready_at
        assert code == 3
        assert lived >= 0.95
        assert "crash" in await svc.stderr()


async def test_sigterm_drains_the_request_in_flight_and_refuses_new_ones() -> None:
    async with service("--version", "v1", "--latency", "1.0") as svc:
        slow = asyncio.ensure_future(svc.get("/slow"))
        await asyncio.sleep(0.3)
        svc.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.2)
        with pytest.raises(aiohttp.ClientConnectionError):
            async with aiohttp.ClientSession() as fresh, fresh.get(svc.url("/late")):
                pass
        status, text, _ = await slow
        assert (status, "v1" in text) == (200, True)
        assert await asyncio.wait_for(svc.proc.wait(), 5) == 0


async def test_it_exits_when_its_stdin_closes_if_asked() -> None:
    args = ("--version", "v1", "--exit-on-stdin-close")
    async with service(*args, stdin=asyncio.subprocess.PIPE) as svc:
        assert (await svc.get("/"))[0] == 200
        assert svc.proc.stdin is not None
        svc.proc.stdin.close()
        assert await asyncio.wait_for(svc.proc.wait(), 5) == 0


async def test_bad_flags_and_a_taken_port_are_readable_errors() -> None:
    proc = await spawn("--port", "0", "--version", "v2", "--error-share", "1.5")
    _, err = await proc.communicate()
    assert proc.returncode == 2
    assert b"--error-share" in err and b"between 0 and 1" in err

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = await spawn("--port", str(port), "--version", "v2")
        out, err = await proc.communicate()
    assert proc.returncode == 1
    assert out == b""  # never READY
    assert f"cannot listen on 127.0.0.1:{port}".encode() in err
