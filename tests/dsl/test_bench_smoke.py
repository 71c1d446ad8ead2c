"""The benchmark `bench/dsl.py` still runs, and its comparisons stay honest.

A ratio means something only when both sides compute the same thing, so the
hand-written evaluator must give the compiled policy's verdict at every tick
(and the agreement check must be able to catch a difference). The figures are
run on tiny sizes: this checks that the code runs and prints what the README
says, not how fast anything is.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest

from bench import dsl as bench

TICKS = 400  # enough for every window to fill and several `for` rules to fire


@pytest.fixture(scope="module")
def series() -> bench.Series:
    return bench.make_series(TICKS)


def test_handwritten_gives_the_compiled_verdict_at_every_tick(series: bench.Series) -> None:
    policy = bench.load_policy()
    compiled = bench.run_compiled(policy, series)
    hand = bench.run_handwritten(series)
    assert len(compiled) == len(hand) == TICKS
    for v, h in zip(compiled, hand, strict=True):
        assert (v.action, v.rule, v.health) == (h.action, h.rule, h.health), v.at
        assert (v.pending_since, v.firing, v.conditions) == (
            h.pending_since,
            h.firing,
            h.conditions,
        ), v.at
    bench.verify_handwritten(policy, series)  # the benchmark's own check agrees


def test_the_agreement_check_catches_a_different_policy(series: bench.Series) -> None:
    # One threshold moved by 10ms: the hand-written function no longer matches.
    changed = bench.POLICY.replace("p99 > 300ms for 2m", "p99 > 290ms for 2m")
    assert changed != bench.POLICY
    with pytest.raises(bench.BenchError, match="disagree at tick"):
        bench.verify_handwritten(bench.load_policy(changed), series)


def test_the_interpreter_gives_the_compiled_verdict(series: bench.Series) -> None:
    bench.verify_interpreter(bench.load_policy(), bench.POLICY, series)


def test_the_series_exercises_the_policy(series: bench.Series) -> None:
    verdicts = bench.run_compiled(bench.load_policy(), series)
    deciders = {v.rule for v in verdicts}
    assert {"rollback", "pause", "continue"} <= {v.action.value for v in verdicts}
    assert len(deciders - {None}) >= 5
    # Rules go pending without firing, and unknown values occur.
    assert any(
        since is not None and not firing
        for v in verdicts
        for since, firing in zip(v.pending_since, v.firing, strict=True)
    )
    assert any(value is None for _, snap in series for value in snap.values())
    assert any("canary.p99" not in snap for _, snap in series)


def test_the_generated_rules_file_loads_with_every_rule() -> None:
    text = bench.make_rules_file(120)
    policy = bench.load_policy(text)
    assert len(policy.rules) == 120
    assert any(r.label.startswith("line ") for r in policy.rules)  # some rules are unnamed
    assert text == bench.make_rules_file(120)  # deterministic: every run times the same file


def test_rounds_interleave_the_variants_in_rotating_order() -> None:
    calls: list[str] = []
    times = bench.measure({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3)
    assert calls == ["a", "b", "b", "a", "a", "b"]
    assert [len(t) for t in times.values()] == [3, 3]
    assert all(ns >= 0 for t in times.values() for ns in t)


@pytest.mark.parametrize(
    "run",
    [
        lambda: bench.bench_eval_vs_handwritten(ticks=60, rounds=2),
        lambda: bench.bench_eval_vs_interpreter(ticks=60, rounds=1),
        lambda: bench.bench_compile_vs_parse(rules=15, rounds=1),
    ],
    ids=["eval_vs_handwritten", "eval_vs_interpreter", "compile_vs_parse"],
)
def test_each_figure_runs_on_tiny_sizes(run: Callable[[], bench.Figure]) -> None:
    figure = run()
    assert isinstance(figure, bench.Figure)
    assert figure.name in bench.GOALS
    assert figure.ratio > 0
    assert figure.details


def test_main_prints_one_line_per_figure_then_details_and_notes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert bench.main(["--ticks", "40", "--rules", "10", "--rounds", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    heads = [line for line in lines if not line.startswith(" ")]
    figures = [h for h in heads if re.fullmatch(r"[a-z_]+ \d+\.\d\dx", h)]
    assert [f.split()[0] for f in figures] == list(bench.GOALS)
    notes = heads[len(figures) :]
    assert heads[: len(figures)] == figures  # figures first, then the notes
    assert all(re.fullmatch(r"[a-z_]+: goal <= [\d.]+x: missed", n) for n in notes)


def test_report_notes_exactly_the_missed_goals() -> None:
    met = bench.Figure("eval_vs_handwritten", 1.2, ("detail",))
    missed = bench.Figure("compile_vs_parse", 2.5, ())
    assert bench.report([met, missed]) == [
        "eval_vs_handwritten 1.20x",
        "    detail",
        "compile_vs_parse 2.50x",
        "compile_vs_parse: goal <= 2x: missed",
    ]
