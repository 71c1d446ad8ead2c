"""adapters.local.workloads: canaries as real processes, and the pod counts read from them.

Every test runs real service processes on 127.0.0.1 and ends by checking
that none of the processes the manager ever started is still alive.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable

import aiohttp
import pytest

from adapters.local.workloads import (
    PodStatusSource,
    ProcessWorkloads,
    ServiceConfig,
    WorkloadError,
)
from engine.ports import MetricRequest, MetricSource, RolloutRef, Target, WorkloadManager

pytestmark = pytest.mark.asyncio

REF = RolloutRef("default", "web", "web", "web-canary")


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie waiting for a reaper that never comes does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def assert_none_alive(workloads: ProcessWorkloads) -> None:
    assert workloads.spawned_pids, "the test started no process"
    survivors = [pid for pid in workloads.spawned_pids if alive(pid)]
    assert survivors == []


async def answer(url: str) -> tuple[int, str | None, str | None]:
    """Status, version and track of `GET url`."""
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        await response.read()
        h = response.headers
        return response.status, h.get("X-Codedance-Version"), h.get("X-Codedance-Track")


async def refused(url: str) -> bool:
    try:
        await answer(url)
    except aiohttp.ClientConnectionError:
        return True
    return False


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "the condition did not become true in time"
        await asyncio.sleep(0.05)


def requests(*metrics: str, track: str = "canary") -> list[MetricRequest]:
    return [MetricRequest(Target("default", "web-canary", track), m, 60.0) for m in metrics]


async def test_bring_up_and_retire_a_canary_beside_stable() -> None:
    workloads = ProcessWorkloads(
        stable=ServiceConfig("v1"), canary=ServiceConfig("v2", workload="web-canary")
    )
    assert isinstance(workloads, WorkloadManager)
    async with workloads:
        stable_url = await workloads.start_stable()
        assert stable_url == workloads.stable_url
        assert await answer(stable_url) == (200, "v1", "stable")
        canary_url = workloads.canary_url  # known before any canary runs
        assert await refused(canary_url)

        await workloads.bring_up(REF)
        assert await answer(canary_url) == (200, "v2", "canary")
        assert workloads.status("canary").ready_pods == 1
        assert workloads.status("stable").ready_pods == 1
        [canary_pid] = workloads.pids("canary")

        await workloads.retire(REF)
        assert not alive(canary_pid)
        assert workloads.status("canary").ready_pods == 0
        assert await refused(canary_url)
        await workloads.retire(REF)  # retiring twice is harmless

        await workloads.bring_up(REF)  # a second canary comes up at the same address
        assert await answer(canary_url) == (200, "v2", "canary")
    assert_none_alive(workloads)


async def test_promote_starts_the_canary_version_as_stable_and_moves_the_router() -> None:
    moved: list[str] = []

    async def on_stable_moved(url: str) -> None:
        # the new stable answers before the router is told about it
        assert await answer(url) == (200, "v2", "stable")
        moved.append(url)

    workloads = ProcessWorkloads(
        stable=ServiceConfig("v1"),
        canary=ServiceConfig("v2", workload="web-canary", jitter=0.001),
        on_stable_moved=on_stable_moved,
    )
    async with workloads:
        old_url = await workloads.start_stable()
        [old_pid] = workloads.pids("stable")
        await workloads.bring_up(REF)

        await workloads.promote(REF)
        assert len(moved) == 1 and moved[0] != old_url
        assert workloads.stable_url == moved[0]
        assert not alive(old_pid)
        assert await refused(old_url)
        assert workloads.status("stable").ready_pods == 1

        await workloads.promote(REF)  # a retried promotion changes nothing
        assert len(moved) == 1

        await workloads.retire(REF)
        assert await answer(workloads.stable_url) == (200, "v2", "stable")
    assert_none_alive(workloads)


async def test_a_canary_that_cannot_start_says_why() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        workloads = ProcessWorkloads(
            stable=ServiceConfig("v1"), canary=ServiceConfig("v2", port=port)
        )
        async with workloads:
            with pytest.raises(WorkloadError) as caught:
                await workloads.bring_up(REF)
    message = str(caught.value)
    assert message.startswith("the canary v2 (web) exited with code 1 before it was ready")
    assert f"cannot listen on 127.0.0.1:{port}" in message
    assert caught.value.stderr  # the lines the message quotes
    assert workloads.status("canary").ready_pods == 0
    assert_none_alive(workloads)


async def test_a_canary_that_is_too_slow_to_start_times_out() -> None:
    workloads = ProcessWorkloads(
        stable=ServiceConfig("v1"), canary=ServiceConfig("v2"), ready_timeout=0.05
    )
    async with workloads:
        with pytest.raises(WorkloadError, match=r"^the canary v2 \(web\) was not ready within"):
            await workloads.bring_up(REF)
        assert workloads.pids("canary") == []
    assert_none_alive(workloads)


async def test_pod_status_counts_a_crashed_canary() -> None:
    workloads = ProcessWorkloads(
        stable=ServiceConfig("v1"), canary=ServiceConfig("v2", crash_after=0.4)
    )
    source = PodStatusSource(workloads)
    assert isinstance(source, MetricSource)
    pods = requests("ready_pods", "not_ready_pods", "failed_pods", "restarts")
    stable_ready = requests("ready_pods", track="stable")[0]
    async with workloads:
        await workloads.start_stable()
        await workloads.bring_up(REF)
        before = await source.fetch(0.0, [*pods, stable_ready])
        assert [before[r] for r in pods] == [1.0, 0.0, 0.0, 0.0]

        async def crashed() -> bool:
            return (await source.fetch(0.0, pods))[pods[2]] == 1.0

        await eventually(crashed)
        after = await source.fetch(0.0, [*pods, stable_ready])
        assert [after[r] for r in pods] == [0.0, 0.0, 1.0, 0.0]
        assert after[stable_ready] == 1.0
        assert any("crashing now" in line for line in workloads.last_stderr("canary"))

        # metrics it does not serve are left out; it has no history
        p99, weird = requests("p99")[0], requests("ready_pods", track="blue")[0]
        assert await source.fetch(0.0, [p99, weird, pods[0]]) == {pods[0]: 0.0}
        assert await source.fetch_range(0.0, 60.0, 30.0, [p99, pods[0]]) == {pods[0]: []}

        await workloads.retire(REF)  # a crashed canary retires cleanly
        assert (await source.fetch(0.0, pods))[pods[2]] == 0.0
    assert_none_alive(workloads)


async def test_a_crashed_canary_is_restarted_at_the_same_address_when_asked() -> None:
    workloads = ProcessWorkloads(
        stable=ServiceConfig("v1"),
        canary=ServiceConfig("v2", crash_after=0.5),
        restart_crashed=True,
        restart_backoff=0.1,
    )
    async with workloads:
        await workloads.bring_up(REF)
        [first] = workloads.pids("canary")

        async def restarted() -> bool:
            s = workloads.status("canary")
            return s.restarts >= 1 and s.ready_pods == 1

        await eventually(restarted)
        status = workloads.status("canary")
        assert status.failed_pods == 0
        [second] = workloads.pids("canary")
        assert second != first
        assert await answer(workloads.canary_url) == (200, "v2", "canary")
    assert len(workloads.spawned_pids) >= 2
    assert_none_alive(workloads)


async def test_services_die_with_a_parent_that_is_killed() -> None:
    script = textwrap.dedent(
        """
        import asyncio, sys
        from adapters.local.workloads import ProcessWorkloads, ServiceConfig

        async def main():
            w = ProcessWorkloads(stable=ServiceConfig("v1"), canary=ServiceConfig("v2"))
            await w.start_stable()
            print(w.pids("stable")[0], flush=True)
            await asyncio.sleep(60)

        asyncio.run(main())
        """
    )
    parent = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE, start_new_session=True
    )
    child: int | None = None
    try:
        assert parent.stdout is not None
        child = int(await asyncio.wait_for(parent.stdout.readline(), 10))
        assert alive(child)
        parent.kill()  # SIGKILL: no cleanup code runs
        await parent.wait()

        async def gone() -> bool:
            return not alive(child)

        await eventually(gone)
    finally:
        if parent.returncode is None:
            parent.kill()
            await parent.wait()
        if child is not None and alive(child):
            os.kill(child, signal.SIGKILL)
