"""The compiled evaluator agrees with the reference interpreter (`tests/dsl/oracle.py`).

The property: for any valid policy and any sequence of snapshots at a fixed
interval, `dsl.load(source).evaluate` and `Oracle(parse(source)).step` give the
same action, deciding rule, health score, condition of every rule and
`pending_since` of every rule, at every tick. The example tests pin the tricky
parts of LANGUAGE.md sections 4-5 on both evaluators with hand-computed
expectations: Kleene logic, `0/0`, window edges, `last N`, `increase` across
counter resets, `for` reset by an unknown, priority between firing rules.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dsl
from dsl import ast
from dsl.builtins import ACTIONS
from dsl.format import format_policy
from dsl.parser import parse
from tests.dsl.oracle import Oracle
from tests.dsl.strategies import policies, snapshots, thresholds

Snapshot = Mapping[str, float | None]


@dataclass(frozen=True)
class Tick:
    """What either evaluator decided at one tick, in comparable form."""

    action: str
    rule: str | None
    health: float
    conditions: tuple[bool | None, ...]
    pending_since: tuple[float | None, ...]


def run_oracle(source: str, times: Sequence[float], snaps: Sequence[Snapshot]) -> list[Tick]:
    tree, diagnostics = parse(source)
    assert tree is not None, diagnostics
    oracle = Oracle(tree)
    out = []
    for now, snapshot in zip(times, snaps, strict=True):
        v = oracle.step(now, snapshot)
        out.append(Tick(v.action, v.rule, v.health, tuple(v.conditions), tuple(v.pending_since)))
    return out


def run_compiled(source: str, times: Sequence[float], snaps: Sequence[Snapshot]) -> list[Tick]:
    policy = dsl.load(source)
    state = policy.new_state()
    out = []
    for now, snapshot in zip(times, snaps, strict=True):
        v = policy.evaluate(now, snapshot, state)
        statuses = v.rules
        out.append(
            Tick(
                v.action.value,
                v.rule,
                v.health,
                tuple(s.condition for s in statuses),
                tuple(s.pending_since for s in statuses),
            )
        )
    return out


EVALUATORS: dict[str, Callable[[str, Sequence[float], Sequence[Snapshot]], list[Tick]]] = {
    "oracle": run_oracle,
    "compiled": run_compiled,
}


def assert_agree(source: str, times: Sequence[float], snaps: Sequence[Snapshot]) -> None:
    expected = run_oracle(source, times, snaps)
    got = run_compiled(source, times, snaps)
    for i, (want, have) in enumerate(zip(expected, got, strict=True)):
        # Health is a share; how the division is written may move the last bit.
        same = _exact(want) == _exact(have) and have.health == pytest.approx(want.health, abs=1e-9)
        assert same, (
            f"tick {i} (t={times[i]}) of\n{source}\n"
            f"snapshots so far: {list(snaps[: i + 1])}\n"
            f"oracle:   {want}\ncompiled: {have}"
        )


def _exact(tick: Tick) -> tuple[object, ...]:
    return (tick.action, tick.rule, tick.conditions, tick.pending_since)


# --- generated policies and snapshot runs -------------------------------------------


@st.composite
def snapshot_runs(
    draw: st.DrawFn, keys: frozenset[str], levels: tuple[float, ...]
) -> list[dict[str, float | None]]:
    """1-40 snapshots. Per key, a fresh value at every tick, or at about one tick in
    two or in four (so conditions hold long enough for `for` and windows to matter);
    an unknown value is sometimes a missing key instead of None."""
    calm = {k: draw(st.sampled_from([1, 2, 4])) for k in sorted(keys)}
    current: dict[str, float | None] = {}
    out = []
    for i in range(draw(st.integers(1, 40))):
        fresh = draw(snapshots(keys, levels))
        for k in calm:
            if i == 0 or draw(st.integers(0, calm[k] - 1)) == 0:
                current[k] = fresh[k]
        gone = {k for k, v in current.items() if v is None and draw(st.booleans())}
        out.append({k: v for k, v in current.items() if k not in gone})
    return out


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), tree=policies())
def test_compiled_policy_agrees_with_oracle(data: st.DataObject, tree: ast.Policy) -> None:
    source = format_policy(tree)
    policy = dsl.load(source)
    keys = policy.metric_keys | policy.context_keys
    runs = data.draw(snapshot_runs(keys, thresholds(tree)), label="snapshots")
    interval = data.draw(st.sampled_from([10.0, 30.0]), label="interval")
    start = data.draw(st.sampled_from([0.0, 1_700_000_000.0]), label="start")
    times = [start + i * interval for i in range(len(runs))]
    assert_agree(source, times, runs)


# Short windows and `for`s of a few ticks, so that window edges, `last N`, unknown
# values inside a window and counter resets decide outcomes often; the shared
# strategy draws windows up to a day, which mostly hold every tick of a run.
DURATION, RATIO, COUNT, NUMBER = "duration", "ratio", "count", "number"
REFS = {
    DURATION: ["p99", "canary.p99", "stable.p99", "p50", "stable.p90", "elapsed"],
    RATIO: ["error_rate", "stable.error_rate", "success_rate"],
    COUNT: ["restarts", "failed_pods", "stable.ready_pods"],
    NUMBER: ["weight", "step"],
}
LITERALS = {
    DURATION: ["100ms", "250ms", "300ms", "500ms", "1s", "30s"],
    RATIO: ["0.5%", "1%", "5%", "50%", "99.9%"],
    COUNT: ["0", "1", "2", "3", "5"],
    NUMBER: ["0", "1", "10", "50", "100"],
}
WINDOWS = ["10s", "25s", "30s", "1m", "1m30s", "last 1", "last 2", "last 3", "last 5"]
FOR = ["10s", "20s", "25s", "30s", "1m", "1m30s"]
COMPARE = [">", ">=", "<", "<=", "==", "!="]


def short_window_conditions() -> st.SearchStrategy[str]:
    kind = st.sampled_from([DURATION, RATIO, COUNT, NUMBER])
    windowed = kind.flatmap(
        lambda k: st.builds(
            lambda f, a, w, op, b: f"{f}({a}, {w}) {op} {b}",
            st.sampled_from(["avg", "min", "max", "delta"] + ["increase"] * (k == COUNT)),
            st.sampled_from(REFS[k]),
            st.sampled_from(WINDOWS),
            st.sampled_from(COMPARE),
            st.sampled_from(LITERALS[k]),
        )
    )
    counted = kind.flatmap(
        lambda k: st.builds(
            lambda a, op, b, w, n: f"count({a} {op} {b}, {w}) >= {n}",
            st.sampled_from(REFS[k]),
            st.sampled_from(COMPARE),
            st.sampled_from(LITERALS[k]),
            st.sampled_from(WINDOWS),
            st.sampled_from(["1", "2", "3"]),
        )
    )
    increase = st.builds(
        lambda a, w, op, b: f"increase({a}, {w}) {op} {b}",
        st.sampled_from(REFS[COUNT]),
        st.sampled_from(WINDOWS),
        st.sampled_from(COMPARE),
        st.sampled_from(LITERALS[COUNT]),
    )
    leaf = windowed | counted | increase
    joined = st.builds(
        lambda a, op, b: f"({a}) {op} ({b})", leaf, st.sampled_from(["and", "or"]), leaf
    )
    return leaf | joined | leaf.map(lambda a: f"not ({a})")


@st.composite
def short_window_policies(draw: st.DrawFn) -> str:
    lines = []
    for i in range(draw(st.integers(1, 4))):
        head = f"r{i}: " if draw(st.booleans()) else ""
        hold = draw(st.none() | st.sampled_from(FOR))
        tail = f" for {hold}" if hold else ""
        action = draw(st.sampled_from(sorted(ACTIONS)))
        lines.append(f"{head}{draw(short_window_conditions())}{tail} -> {action}")
    return "\n".join(lines) + "\n"


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), source=short_window_policies())
def test_short_windows_agree_with_oracle(data: st.DataObject, source: str) -> None:
    tree, diagnostics = parse(source)
    assert tree is not None, diagnostics
    assert not dsl.check_source(source), source
    policy = dsl.load(source)
    keys = policy.metric_keys | policy.context_keys
    runs = data.draw(snapshot_runs(keys, thresholds(tree)), label="snapshots")
    interval = data.draw(st.sampled_from([10.0, 30.0]), label="interval")
    times = [i * interval for i in range(len(runs))]
    assert_agree(source, times, runs)


# --- example-based: the tricky semantics, on both evaluators ----------------------

T, F, U = True, False, None


def ticks(values: Sequence[Snapshot], interval: float = 10.0) -> tuple[list[float], list[Snapshot]]:
    return [i * interval for i in range(len(values))], list(values)


@pytest.fixture(params=sorted(EVALUATORS))
def run(request: pytest.FixtureRequest) -> Callable[..., list[Tick]]:
    return EVALUATORS[request.param]


def _truth_snapshot(a: bool | None, b: bool | None) -> dict[str, float]:
    snap: dict[str, float] = {}
    if a is not None:
        snap["canary.p99"] = 0.5 if a else 0.1
    if b is not None:
        snap["canary.error_rate"] = 0.05 if b else 0.0
    return snap


KLEENE = [
    # a, b, a and b, a or b, not a
    (T, T, T, T, F),
    (T, F, F, T, F),
    (T, U, U, T, F),
    (F, T, F, T, T),
    (F, F, F, F, T),
    (F, U, F, U, T),
    (U, T, U, T, U),
    (U, F, F, U, U),
    (U, U, U, U, U),
]


@pytest.mark.parametrize(("a", "b", "conj", "disj", "neg"), KLEENE)
def test_kleene_logic(
    run: Callable[..., list[Tick]],
    a: bool | None,
    b: bool | None,
    conj: bool | None,
    disj: bool | None,
    neg: bool | None,
) -> None:
    source = (
        "p99 > 300ms and error_rate > 1% -> pause\n"
        "p99 > 300ms or error_rate > 1% -> pause\n"
        "not p99 > 300ms -> pause\n"
    )
    (tick,) = run(source, *ticks([_truth_snapshot(a, b)]))
    assert tick.conditions == (conj, disj, neg)
    assert tick.health == pytest.approx(100 * [conj, disj, neg].count(False) / 3)


@pytest.mark.parametrize(
    ("canary", "stable", "expected"),
    [(0.0, 0.0, None), (0.3, 0.0, None), (0.3, 0.2, True), (0.2, 0.2, False), (0.0, 0.2, False)],
)
def test_division_by_zero_is_unknown(
    run: Callable[..., list[Tick]], canary: float, stable: float, expected: bool | None
) -> None:
    source = "p99 / stable.p99 > 1.2 -> rollback\nabsent(p99 / stable.p99) -> pause\n"
    (tick,) = run(source, *ticks([{"canary.p99": canary, "stable.p99": stable}]))
    assert tick.conditions == (expected, expected is None)
    assert tick.action == ("pause" if expected is None else "rollback" if expected else "continue")


def test_window_edge_at_t_minus_w_is_excluded(run: Callable[..., list[Tick]]) -> None:
    # p99 is high only at t=0; a 30s window at t=30 is (0, 30], without it.
    values = [{"canary.p99": 0.5}] + [{"canary.p99": 0.1}] * 4
    result = run("max(p99, 30s) > 300ms -> pause\n", *ticks(values))
    assert [t.conditions[0] for t in result] == [T, T, T, F, F]


def test_window_average_over_known_values(run: Callable[..., list[Tick]]) -> None:
    values: list[Snapshot] = [
        {"canary.p99": 0.6},
        {"canary.p99": None},
        {},
        {"canary.p99": 0.0},
        {"canary.p99": 0.0},
    ]
    # known values in (t-20s, t]: {0.6} {0.6} {} {0.0} {0.0, 0.0}
    result = run("avg(p99, 20s) >= 300ms -> pause\n", *ticks(values))
    assert [t.conditions[0] for t in result] == [T, T, U, F, F]


def test_last_n_counts_evaluations(run: Callable[..., list[Tick]]) -> None:
    highs = [T, T, F, U, T, T, F]
    values = [{"canary.p99": 0.5} if h else {"canary.p99": 0.1} if h is F else {} for h in highs]
    result = run("count(p99 > 300ms, last 3) >= 2 -> pause\n", *ticks(values, 30.0))
    # trues in the last three evaluations: 1 2 2 1 1 2 2
    assert [t.conditions[0] for t in result] == [F, T, T, F, F, T, T]


def test_increase_counts_counter_resets(run: Callable[..., list[Tick]]) -> None:
    restarts: list[float | None] = [5, 6, None, 2, 3]
    values = [{"canary.restarts": r} for r in restarts]
    source = "increase(restarts, 1m) >= 4 -> rollback\nincrease(restarts, 1m) >= 3 -> pause\n"
    result = run(source, *ticks(values))
    # increase so far: unknown, 1, 1 (the unknown is skipped), 1 + 2, 1 + 2 + 1
    assert [t.conditions for t in result] == [(U, U), (F, F), (F, F), (F, T), (T, T)]
    assert [t.action for t in result] == ["continue", "continue", "continue", "pause", "rollback"]


def test_delta_needs_two_known_values(run: Callable[..., list[Tick]]) -> None:
    values: list[Snapshot] = [{}, {"canary.p99": 0.2}, {}, {"canary.p99": 0.5}]
    result = run("delta(p99, 1m) > 250ms -> pause\n", *ticks(values))
    assert [t.conditions[0] for t in result] == [U, U, U, T]


def test_for_is_reset_by_unknown(run: Callable[..., list[Tick]]) -> None:
    high: Snapshot = {"canary.p99": 0.5}
    low: Snapshot = {"canary.p99": 0.1}
    gone: Snapshot = {"canary.p99": None}
    values = [high, high, gone, high, high, high, high, low, high]
    result = run("latency: p99 > 300ms for 30s -> rollback\n", *ticks(values))
    assert [t.pending_since[0] for t in result] == [0, 0, None, 30, 30, 30, 30, None, 80]
    assert [t.action for t in result] == ["continue"] * 6 + ["rollback", "continue", "continue"]
    assert [t.rule for t in result][6] == "latency"


def test_for_not_a_multiple_of_the_interval(run: Callable[..., list[Tick]]) -> None:
    result = run("p99 > 300ms for 25s -> rollback\n", *ticks([{"canary.p99": 0.5}] * 4))
    # true for 0, 10, 20, 30 seconds: 25s is first reached at t=30
    assert [t.action for t in result] == ["continue", "continue", "continue", "rollback"]
    assert [t.rule for t in result] == [None, None, None, "line 1"]


def test_without_for_fires_at_first_true(run: Callable[..., list[Tick]]) -> None:
    values = [{"canary.p99": 0.1}, {"canary.p99": 0.5}]
    result = run("p99 > 300ms -> pause\n", *ticks(values))
    assert [t.action for t in result] == ["continue", "pause"]


def test_priority_between_firing_rules(run: Callable[..., list[Tick]]) -> None:
    source = (
        "first_promote: weight >= 50 -> promote\n"
        "first_pause: p99 > 300ms -> pause\n"
        "first_rollback: error_rate > 1% -> rollback\n"
        "second_rollback: p99 > 300ms -> rollback\n"
        "second_promote: weight >= 10 -> promote\n"
    )
    snaps: list[Snapshot] = [
        {"weight": 50.0, "canary.p99": 0.5, "canary.error_rate": 0.05},
        {"weight": 50.0, "canary.p99": 0.5, "canary.error_rate": 0.0},
        {"weight": 50.0, "canary.p99": 0.1, "canary.error_rate": 0.0},
        {"weight": 20.0, "canary.p99": 0.1, "canary.error_rate": 0.0},
        {"weight": 0.0, "canary.p99": 0.1, "canary.error_rate": 0.0},
    ]
    result = run(source, *ticks(snaps))
    assert [(t.action, t.rule) for t in result] == [
        ("rollback", "first_rollback"),
        ("rollback", "second_rollback"),
        ("promote", "first_promote"),
        ("promote", "second_promote"),
        ("continue", None),
    ]
    # three guard rules (pause, rollback, rollback): false ones count as healthy
    assert [t.health for t in result] == pytest.approx([0.0, 100 / 3, 100.0, 100.0, 100.0])


def test_health_counts_unknown_and_pending_against(run: Callable[..., list[Tick]]) -> None:
    source = "a: p99 > 300ms for 1m -> rollback\nb: error_rate > 1% -> pause\nc: true -> promote\n"
    snaps: list[Snapshot] = [{"canary.p99": 0.5, "canary.error_rate": 0.0}, {"canary.p99": 0.1}]
    result = run(source, *ticks(snaps))
    assert [t.health for t in result] == [50.0, 50.0]
    assert [t.action for t in result] == ["promote", "promote"]
    assert run("c: true -> promote\n", *ticks(snaps))[0].health == 100.0


def test_absent_is_never_unknown(run: Callable[..., list[Tick]]) -> None:
    snaps: list[Snapshot] = [{}, {"canary.p99": None}, {"canary.p99": 0.0}]
    result = run("absent(p99) -> pause\nnot absent(stable.p99) -> pause\n", *ticks(snaps))
    assert [t.conditions for t in result] == [(T, F), (T, F), (F, F)]
