"""adapters.local.loadgen: steady real traffic against the sample service on 127.0.0.1.

The services run as processes under `ProcessWorkloads` (stable and canary
configured per test); the load generator talks to them directly.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import statistics
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import pytest

from adapters.local.loadgen import LoadGenerator
from adapters.local.workloads import ProcessWorkloads, ServiceConfig
from engine.ports import RolloutRef

pytestmark = pytest.mark.asyncio

REF = RolloutRef("default", "web", "web", "web-canary")


@asynccontextmanager
async def services(
    stable: ServiceConfig, canary: ServiceConfig | None = None
) -> AsyncIterator[ProcessWorkloads]:
    async with ProcessWorkloads(stable=stable, canary=canary or ServiceConfig("v2")) as w:
        await w.start_stable()
        if canary is not None:
            await w.bring_up(REF)
        yield w


async def run(load: LoadGenerator, seconds: float) -> None:
    load.start()
    await asyncio.sleep(seconds)
    await load.stop()


async def stats(url: str) -> dict[str, object]:
    async with aiohttp.ClientSession() as session, session.get(url + "/stats") as response:
        return dict(json.loads(await response.text()))


async def test_it_sends_at_the_rate_asked_for() -> None:
    async with services(ServiceConfig("v1")) as w:
        load = LoadGenerator(w.stable_url + "/", 50)
        await run(load, 2.0)
        served = await stats(w.stable_url)
    assert 97 <= load.sent <= 103
    assert load.failed == 0
    assert load.in_flight == 0 and load.completed == load.sent
    assert len(load.records) == load.sent == served["requests"]
    assert load.by_track == {"stable": load.sent}
    assert load.by_version == {"v1": load.sent}
    ordered = sorted(load.records, key=lambda r: r.sent_at)
    gaps = [b.sent_at - a.sent_at for a, b in itertools.pairwise(ordered)]
    assert statistics.median(gaps) == pytest.approx(0.02, abs=0.005)


async def test_slow_answers_do_not_lower_the_rate() -> None:
    # scheduled on absolute times: with 0.3 s answers, 20 rps still sends 20 a second
    async with services(ServiceConfig("v1", latency=0.3)) as w:
        load = LoadGenerator(w.stable_url, 20)
        await run(load, 1.0)
    assert 19 <= load.sent <= 22
    assert load.failed == 0 and load.skipped == 0
    assert load.max_seen_in_flight >= 4
    assert min(r.latency for r in load.records) >= 0.3


async def test_in_flight_is_bounded_and_timeouts_fail() -> None:
    async with services(ServiceConfig("v1", latency=0.6)) as w:
        load = LoadGenerator(w.stable_url, 20, max_in_flight=3, timeout=0.3)
        await run(load, 1.0)
    assert load.max_seen_in_flight == 3
    assert load.skipped > 0
    assert load.sent + load.skipped in range(19, 23)
    assert load.failed == load.sent > 0
    assert all(r.status is None and r.error and "Timeout" in r.error for r in load.records)
    assert all(r.latency < 0.6 for r in load.records)


async def test_it_counts_the_errors_of_a_service_with_an_error_share() -> None:
    async with services(ServiceConfig("v1"), ServiceConfig("v2", error_share=0.25)) as w:
        load = LoadGenerator(w.canary_url + "/", 40)
        await run(load, 1.0)
        served = await stats(w.canary_url)
    assert load.sent == served["requests"]
    # the service fails exactly floor(n / 4) of n requests
    assert load.failed == served["errors"] == load.sent // 4
    statuses = [r.status for r in load.records]
    assert statuses.count(500) == load.failed
    assert statuses.count(200) == load.sent - load.failed
    assert load.by_track == {"canary": load.sent}


async def test_refused_connections_are_failures_without_a_track() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    load = LoadGenerator(f"http://127.0.0.1:{port}/", 20)
    await run(load, 0.5)
    assert load.sent >= 9
    assert load.failed == load.sent
    assert all(r.status is None and r.error for r in load.records)
    assert not load.by_track


class ShiftedClock:
    """Wall time moved an hour ahead: records must carry the clock's times."""

    def now(self) -> float:
        return time.time() + 3600.0

    async def sleep_until(self, t: float) -> None:
        await asyncio.sleep(max(0.0, t - self.now()))


async def test_records_since_uses_the_given_clock() -> None:
    clock = ShiftedClock()
    async with services(ServiceConfig("v1")) as w:
        load = LoadGenerator(w.stable_url, 40, clock=clock)
        load.start()
        await asyncio.sleep(0.5)
        middle = clock.now()
        await asyncio.sleep(0.5)
        await load.stop()
    later = load.records_since(middle)
    assert all(r.sent_at >= middle for r in later)
    assert 15 <= len(later) <= 25
    assert len(load.records_since(middle + 10)) == 0
    assert len(load.records_since(time.time())) == load.sent  # every time is an hour ahead
