"""TrafficStats: quantiles and rates per track from known request records.

A hand-driven clock places every record; the expected values are computed by
hand from the inputs (linear-interpolation sample quantiles).
"""

from __future__ import annotations

import pytest

from adapters.local.trafficstats import TrafficStats, sample_quantile
from engine.ports import MetricRequest, Target


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def now(self) -> float:
        return self.t


def req(metric: str, track: str = "canary", window: float = 60.0) -> MetricRequest:
    return MetricRequest(Target("shop", "checkout", track), metric, window)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def stats(clock: FakeClock) -> TrafficStats:
    return TrafficStats(clock, horizon=300.0)


@pytest.mark.asyncio
async def test_quantiles_are_exact_sample_quantiles(stats: TrafficStats, clock: FakeClock) -> None:
    # 1 ms .. 100 ms, recorded in a shuffled order over the last 50 s
    for i, ms in enumerate([37, *range(1, 37), *range(38, 101)]):
        stats.record("canary", ms / 1000, 200, at=clock.t - 50 + i * 0.5)
    got = await stats.fetch(clock.t, [req("p50"), req("p90"), req("p99")])
    assert got[req("p50")] == pytest.approx(0.0505)
    assert got[req("p90")] == pytest.approx(0.0901)
    assert got[req("p99")] == pytest.approx(0.09901)


@pytest.mark.asyncio
async def test_rates_count_2xx_5xx_and_connection_failures(
    stats: TrafficStats, clock: FakeClock
) -> None:
    statuses: list[int | None] = [200, 201, 204, 200, 200, 200, 200, 404, 503, None]
    for status in statuses:
        stats.record("canary", 0.01, status)
    stats.record("stable", 0.01, 200)
    got = await stats.fetch(
        clock.t,
        [
            req("success_rate"),
            req("error_rate"),
            req("request_rate", window=20.0),
            req("error_rate", track="stable"),
        ],
    )
    assert got[req("success_rate")] == pytest.approx(0.7)
    assert got[req("error_rate")] == pytest.approx(0.2)
    assert got[req("request_rate", window=20.0)] == pytest.approx(10 / 20)
    assert got[req("error_rate", track="stable")] == 0.0


@pytest.mark.asyncio
async def test_connection_failures_have_no_latency_to_rank(
    stats: TrafficStats, clock: FakeClock
) -> None:
    stats.record("canary", 0.200, 200)
    stats.record("canary", 0.0001, None)
    stats.record("canary", 0.0001, None)
    got = await stats.fetch(clock.t, [req("p50")])
    assert got[req("p50")] == pytest.approx(0.200)


@pytest.mark.asyncio
async def test_no_requests_in_the_window_is_unknown_never_zero(
    stats: TrafficStats, clock: FakeClock
) -> None:
    stats.record("canary", 0.01, 500, at=clock.t - 120)  # outside a 60 s window
    metrics = ["p50", "p90", "p99", "success_rate", "error_rate", "request_rate"]
    got = await stats.fetch(clock.t, [req(m) for m in metrics])
    assert got == {req(m): None for m in metrics}
    only_failures = TrafficStats(clock)
    only_failures.record("canary", 0.01, None)
    assert (await only_failures.fetch(clock.t, [req("p99")]))[req("p99")] is None
    assert (await only_failures.fetch(clock.t, [req("error_rate")]))[req("error_rate")] == 1.0


@pytest.mark.asyncio
async def test_the_window_ends_at_the_requested_time(stats: TrafficStats, clock: FakeClock) -> None:
    stats.record("canary", 0.1, 200, at=clock.t - 30)
    stats.record("canary", 0.9, 500, at=clock.t - 5)
    at = clock.t - 10
    got = await stats.fetch(at, [req("p99", window=60), req("error_rate", window=60)])
    assert got[req("p99", window=60)] == pytest.approx(0.1)
    assert got[req("error_rate", window=60)] == 0.0
    # (at - window, at]: a record exactly at the start is outside, one at the end inside
    assert stats.value("canary", "request_rate", 20.0, clock.t - 10) is None
    assert stats.value("canary", "request_rate", 25.0, clock.t - 5) == pytest.approx(1 / 25)


@pytest.mark.asyncio
async def test_metrics_it_cannot_see_are_left_out(stats: TrafficStats, clock: FakeClock) -> None:
    stats.record("canary", 0.01, 200)
    custom = MetricRequest(Target("shop", "checkout", "canary"), "p99", 60.0, template="up")
    got = await stats.fetch(clock.t, [req("p99"), req("cpu"), req("restarts"), custom])
    assert set(got) == {req("p99")}


@pytest.mark.asyncio
async def test_memory_is_bounded_by_the_horizon(clock: FakeClock) -> None:
    stats = TrafficStats(clock, horizon=10.0)
    for _ in range(2000):
        stats.record("canary", 0.01, 200)
        clock.t += 0.05  # 20 requests a second for 100 s
    # at most 1.25 horizons kept: 250 records, whatever the run's length
    assert stats.count("canary") <= 250
    # a window longer than the horizon sees the horizon only
    assert stats.value("canary", "request_rate", 60.0, clock.t) == pytest.approx(200 / 60, rel=0.02)


@pytest.mark.asyncio
async def test_fetch_range_answers_on_the_grid(stats: TrafficStats, clock: FakeClock) -> None:
    stats.record("stable", 0.05, 200, at=clock.t - 25)
    stats.record("stable", 0.05, 503, at=clock.t - 5)
    r = req("error_rate", track="stable", window=10)
    got = await stats.fetch_range(clock.t - 30, clock.t, 10, [r, req("cpu")])
    assert list(got) == [r]
    assert got[r] == [
        (clock.t - 30, None),
        (clock.t - 20, 0.0),
        (clock.t - 10, None),
        (clock.t, 1.0),
    ]


def test_unknown_track_is_an_error(stats: TrafficStats) -> None:
    with pytest.raises(ValueError, match="unknown track"):
        stats.record("preview", 0.01, 200)


def test_sample_quantile_of_one_and_two_values() -> None:
    assert sample_quantile([0.3], 0.99) == 0.3
    assert sample_quantile([0.1, 0.3], 0.5) == pytest.approx(0.2)
    assert sample_quantile([0.1, 0.3], 1.0) == 0.3
