"""Recorded series as a metric source (adapters/metrics/replay.py)."""

from __future__ import annotations

import pytest

import dsl
from adapters.metrics.replay import ReplaySource
from dsl.series import parse_series
from engine.ports import MetricRequest, MetricSource, Target
from engine.timeline import snapshot_at, tick_times

START = 1_700_000_000.0


def req(workload: str, metric: str, track: str | None = None, ns: str = "shop") -> MetricRequest:
    track = track or ("canary" if workload.endswith("canary") else "stable")
    return MetricRequest(Target(ns, workload, track), metric, 60.0)


def test_a_replay_source_is_a_metric_source() -> None:
    assert isinstance(ReplaySource({}, 30.0), MetricSource)


@pytest.mark.asyncio
async def test_each_track_reads_its_own_series_over_time() -> None:
    source = ReplaySource(
        {"p99": "0.1x3 0.5x2", "stable.p99": "0.1 _ 0.2", "stable.error_rate": "0.01"},
        interval=30.0,
        start=START,
    )
    canary, stable = req("web-canary", "p99"), req("web", "p99")
    errors = req("web", "error_rate")
    seen = [await source.fetch(START + t, [canary, stable, errors]) for t in (0, 45, 90, 150, 900)]
    assert [v[canary] for v in seen] == [0.1, 0.1, 0.1, 0.5, 0.5]
    assert [v[stable] for v in seen] == [0.1, None, 0.2, 0.2, 0.2]  # `_` is unknown
    assert [v[errors] for v in seen] == [0.01] * 5
    before = await source.fetch(START - 1, [canary])
    assert before == {canary: None}


@pytest.mark.asyncio
async def test_rollouts_share_a_recording_and_a_workload_may_have_its_own() -> None:
    source = ReplaySource(
        {"canary.p99": "0.2", "stable.p99": "0.1"},
        interval=10.0,
        workloads={("shop", "cart-canary"): {"p99": "0.9"}},
    )
    reqs = [
        req("web-canary", "p99"),
        req("api-canary", "p99", ns="other"),
        req("cart-canary", "p99"),
        req("cart", "p99"),
        req("web-canary", "cpu"),  # no series: unknown
    ]
    got = await source.fetch(5.0, reqs)
    assert [got[r] for r in reqs] == [0.2, 0.2, 0.9, 0.1, None]


@pytest.mark.asyncio
async def test_a_range_answers_every_step() -> None:
    source = ReplaySource({"p99": "1+1x5"}, interval=60.0, start=START)
    r = req("web-canary", "p99")
    got = await source.fetch_range(START + 60, START + 180, 30.0, [r])
    assert got[r] == [
        (START + 60, 2.0),
        (START + 90, 2.0),
        (START + 120, 3.0),
        (START + 150, 3.0),
        (START + 180, 4.0),
    ]


@pytest.mark.asyncio
async def test_a_recording_reads_like_a_policy_test_and_agrees_with_it() -> None:
    recording = {
        "interval": "30s",
        "input_series": [
            {"series": "canary.p99", "values": "0.1x3 0.5x10"},
            {"series": "stable.p99", "values": "0.1x2 _x2 0.1"},
            {"series": "error_rate", "values": 0.02},
        ],
    }
    source = ReplaySource.from_recording(recording, start=START)
    assert source.interval == 30.0
    policy = dsl.load("p99 > 2 * stable.p99 -> rollback\nerror_rate > 1% -> pause")
    series = {
        "canary.p99": parse_series("0.1x3 0.5x10"),
        "stable.p99": parse_series("0.1x2 _x2 0.1"),
        "error_rate": parse_series("0.02"),
    }
    keys = {"canary.p99": req("web-canary", "p99"), "stable.p99": req("web", "p99")}
    keys["canary.error_rate"] = req("web-canary", "error_rate")
    for t in tick_times(15.0, 300.0):
        expected = snapshot_at(policy, series, 30.0, t)
        got = await source.fetch(START + t, list(keys.values()))
        assert {k: got[r] for k, r in keys.items()} == {k: expected[k] for k in keys}, t


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"interval": "30s", "input_serie": []}, "input_serie"),
        ({"interval": "5%", "input_series": []}, "interval"),
        ({"interval": "0s", "input_series": []}, "positive"),
        ({"input_series": [{"series": "p99", "values": "0.1y3"}]}, "series `p99`: column 1"),
        ({"input_series": [{"series": "canery.p99", "values": "1"}]}, "did you mean `canary.p99`"),
        (
            {
                "input_series": [
                    {"series": "p99", "values": "1"},
                    {"series": "canary.p99", "values": "2"},
                ]
            },
            "`canary.p99` is the same series as `p99`",
        ),
        ({"input_series": [{"series": "canary.p-99", "values": "1"}]}, "not a metric name"),
    ],
)
def test_a_bad_recording_is_an_error_saying_what_is_wrong(
    data: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=None) as raised:
        ReplaySource.from_recording(data)
    assert message in str(raised.value)


def test_context_series_are_kept_apart() -> None:
    source = ReplaySource.from_recording(
        {"interval": "1m", "input_series": [{"series": "weight", "values": "0 25 50"}]}
    )
    assert source.context == {"weight": [0.0, 25.0, 50.0]}
    assert source.series == {}
    assert source.interval == 60.0
