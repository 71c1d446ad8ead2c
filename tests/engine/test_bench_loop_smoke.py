"""The benchmark `bench/loop.py` still runs, and its checks still catch what they are for.

Every figure is taken on tiny sizes (a few rollouts, a couple of ticks, short
intervals for the real-time ones): this checks that the code runs and prints
what the README says, not how fast anything is. The query count is exact at
any size, so it is checked against the policy's metrics here too.
"""

from __future__ import annotations

import re

import pytest

from bench import loop as bench
from dsl.promql import escape_regex

ROLLOUTS = 12


@pytest.mark.parametrize("resume", [True, False], ids=["resumed", "started"])
def test_loop_overhead_runs_on_fake_time(resume: bool) -> None:
    figure = bench.bench_loop_overhead(rollouts=ROLLOUTS, ticks=2, warmup=3, resume=resume)
    assert figure.name == "loop_overhead"
    assert figure.value > 0 and figure.text == f"{figure.value:.2f}x"
    assert any("per rollout-tick" in line for line in figure.details)


def test_evaluate_alone_is_checked_against_the_engines_verdicts() -> None:
    policy = bench.load_policy()
    state = policy.new_state()
    capture = bench.Capture()
    evaluate = capture.wrap(policy.evaluate)
    series = bench.make_series(5)
    for i in range(5):
        snap = {key: values[i] for key, values in series.items()}
        evaluate(bench.EPOCH + i * bench.INTERVAL, {**snap, "weight": 5.0}, state)
    bench.verify_alone(policy, capture)  # the same calls give the same verdicts
    # a different snapshot at one call gives another verdict: the check must notice
    key, now, seen = capture.calls[2]
    capture.calls[2] = (key, now, {**seen, "canary.p99": None})
    capture.states = {k: policy.new_state() for k in capture.states}
    with pytest.raises(bench.BenchError, match="disagrees with the engine at call 2"):
        bench.verify_alone(policy, capture)


def test_tick_lag_runs_on_a_real_loop() -> None:
    figure = bench.bench_tick_lag(rollouts=ROLLOUTS, ticks=2, interval=0.4)
    assert figure.name == "tick_lag_p99_ms"
    assert 0 <= figure.value < 200  # checked below half the interval by the benchmark
    assert any("real time" in line for line in figure.details)


def test_memory_is_traced_per_rollout() -> None:
    figure = bench.bench_memory(rollouts=ROLLOUTS, ticks=2, top=3)
    assert figure.name == "memory_per_rollout_kb"
    assert 1 < figure.value < 1000  # a rollout holds kilobytes, not bytes or megabytes
    assert sum(line.startswith("  ") for line in figure.details) == 3


def test_the_prometheus_source_sends_one_query_per_metric_per_tick() -> None:
    queries, metrics = bench.bench_queries(rollouts=ROLLOUTS, ticks=2, interval=0.4)
    assert queries.name == "queries_per_tick" and metrics.name == "metrics_in_policy"
    assert metrics.value == len(bench.metrics_of(bench.load_policy())) == 6
    assert queries.value == metrics.value


def test_the_double_reads_the_alternations_the_source_writes() -> None:
    assert bench._alternatives("svc-00001") == ["svc-00001"]
    names = ["a", "b.c", "svc-2-canary"]
    assert bench._alternatives("(?:" + "|".join(escape_regex(n) for n in names) + ")") == names
    specs = bench.make_specs(3)
    double = bench.PrometheusDouble(specs)
    assert double.namespace_of[specs[1].canary_name] == specs[1].namespace


def test_percentile_is_a_value_that_was_seen() -> None:
    values = [float(v) for v in range(1, 101)]
    assert bench.percentile(values, 99) == 99.0
    assert bench.percentile(values, 50) == 50.0
    assert bench.percentile([3.0], 99) == 3.0


def test_report_notes_exactly_the_missed_goals() -> None:
    figures = [
        bench.Figure("loop_overhead", 2.5, "2.50x"),
        bench.Figure("tick_lag_p99_ms", 100.0, "100.0"),
        bench.Figure("memory_per_rollout_kb", 50.0, "50.0"),
        bench.Figure("queries_per_tick", 7.0, "7"),
        bench.Figure("metrics_in_policy", 6.0, "6"),
    ]
    assert bench.report(figures) == [
        "loop_overhead 2.50x",
        "tick_lag_p99_ms 100.0",
        "memory_per_rollout_kb 50.0",
        "queries_per_tick 7",
        "metrics_in_policy 6",
        "tick_lag_p99_ms: goal < 100: missed (100.0)",
        "queries_per_tick: goal <= metrics_in_policy (6): missed (7)",
    ]


def test_main_prints_one_line_per_figure_then_the_notes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["--rollouts", str(ROLLOUTS), "--ticks", "2", "--lag-ticks", "1"]
    argv += ["--interval", "0.4", "--prometheus-rollouts", "5", "--prometheus-interval", "0.4"]
    assert bench.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    names = ["loop_overhead", "tick_lag_p99_ms", "memory_per_rollout_kb"]
    names += ["queries_per_tick", "metrics_in_policy"]
    assert [line.split()[0] for line in lines[: len(names)]] == names
    assert all(re.fullmatch(r"[a-z_0-9]+ \d+(\.\d+)?x?", line) for line in lines[: len(names)])
    assert all(re.fullmatch(r"[a-z_0-9]+: goal .+: missed \(.+\)", n) for n in lines[len(names) :])
