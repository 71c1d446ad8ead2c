"""dsl.compile and dsl.runtime: the FIXED evaluation semantics of LANGUAGE.md section 5."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

import dsl
from dsl.ast import Action
from dsl.runtime import Verdict


def run(text: str, ticks: list[tuple[float, Mapping[str, float | None]]]) -> list[Verdict]:
    policy = dsl.load(text)
    state = policy.new_state()
    return [policy.evaluate(t, snap, state) for t, snap in ticks]


def series(key: str, values: list[float | None], interval: float = 30.0) -> list[
    tuple[float, Mapping[str, float | None]]
]:
    return [(i * interval, {key: v}) for i, v in enumerate(values)]


def test_the_explanation_names_the_rule_the_values_and_the_time() -> None:
    ticks = [(float(t), {"canary.p99": 0.412}) for t in range(0, 131, 10)]
    last = run("latency: p99 > 300ms for 2m -> rollback", ticks)[-1]
    assert last.explanation == "rollback: latency: canary.p99 = 412ms > 300ms, true for 2m10s"
    assert last.action is Action.ROLLBACK and last.rule == "latency"
    assert last.true_for == 130.0
    assert last.values == (("canary.p99", "412ms"),)


def test_for_fires_at_the_first_tick_where_it_has_held_long_enough() -> None:
    verdicts = run("p99 > 300ms for 1m -> rollback", series("canary.p99", [0.1, 0.5, 0.5, 0.5]))
    assert [v.action.value for v in verdicts] == ["continue", "continue", "continue", "rollback"]
    assert verdicts[1].rules[0].state == "pending"
    assert verdicts[1].rules[0].pending_since == 30.0
    assert verdicts[3].rule == "line 1"


@pytest.mark.parametrize("gap", [0.1, None])
def test_a_false_or_unknown_condition_resets_for(gap: float | None) -> None:
    values = [0.5, 0.5, gap, 0.5, 0.5, 0.5]
    verdicts = run("p99 > 300ms for 1m -> rollback", series("canary.p99", values))
    assert [v.action.value for v in verdicts].index("rollback") == 5


def test_without_for_a_rule_fires_at_the_first_true_evaluation() -> None:
    verdicts = run("p99 > 300ms -> rollback", series("canary.p99", [0.1, 0.4]))
    assert [v.action for v in verdicts] == [Action.CONTINUE, Action.ROLLBACK]


@pytest.mark.parametrize(
    ("a", "b", "and_", "or_"),
    [
        (True, None, None, True),
        (False, None, False, None),
        (None, None, None, None),
        (True, False, False, True),
    ],
)
def test_kleene_logic(a: bool | None, b: bool | None, and_: bool | None, or_: bool | None) -> None:
    def snap(x: bool | None) -> float | None:
        return None if x is None else (1.0 if x else 0.0)

    snapshot = {"canary.failed_pods": snap(a), "stable.failed_pods": snap(b)}
    text = (
        "a: canary.failed_pods > 0 and stable.failed_pods > 0 -> rollback\n"
        "o: canary.failed_pods > 0 or stable.failed_pods > 0 -> pause\n"
        "n: not (canary.failed_pods > 0 and stable.failed_pods > 0) -> promote\n"
    )
    (v,) = run(text, [(0.0, snapshot)])
    conds = v.conditions
    assert conds[0] is and_ and conds[1] is or_
    assert conds[2] is (None if and_ is None else not and_)


def test_division_by_zero_is_unknown_and_never_fires() -> None:
    text = (
        "r: canary.p99 / stable.p99 > 1.5 -> rollback\n"
        "z: not (canary.p99 / stable.p99 > 1.5) -> pause"
    )
    (v,) = run(text, [(0.0, {"canary.p99": 0.0, "stable.p99": 0.0})])
    assert v.conditions == (None, None) and v.action is Action.CONTINUE
    assert v.health == 0.0


def test_priority_then_order_decides() -> None:
    text = "p1: p99 > 1s -> pause\nr1: p99 > 1s -> rollback\nr2: p99 > 1s -> rollback\n"
    (v,) = run(text, [(0.0, {"canary.p99": 2.0})])
    assert (v.action, v.rule) == (Action.ROLLBACK, "r1")


def test_health_counts_rollback_and_pause_rules_that_are_false() -> None:
    text = (
        "a: p99 > 1s -> rollback\n"
        "b: error_rate > 1% -> pause\n"
        "c: p90 > 1s for 5m -> rollback\n"
        "d: weight > 10 -> promote\n"
    )
    (v,) = run(text, [(0.0, {"canary.p99": 0.1, "canary.p90": 2.0, "weight": 50.0})])
    # a false; b unknown; c pending; the promote rule does not count
    assert v.health == pytest.approx(100 / 3)
    (clean,) = run("p: weight > 10 -> promote", [(0.0, {})])
    assert clean.health == 100.0


def test_duration_windows_hold_t_minus_w_exclusive_to_t_inclusive() -> None:
    # samples every 30s; a 1m window at t=60 holds t=30 and t=60, not t=0
    verdicts = run("max(p99, 1m) > 300ms -> pause", series("canary.p99", [0.9, 0.1, 0.1]))
    assert [v.action.value for v in verdicts] == ["pause", "pause", "continue"]


def test_last_n_counts_evaluations() -> None:
    verdicts = run(
        "count(p99 > 300ms, last 3) >= 2 -> pause",
        series("canary.p99", [0.5, 0.1, 0.5, 0.1, 0.1]),
    )
    actions = [v.action.value for v in verdicts]
    assert actions == ["continue", "continue", "pause", "continue", "continue"]


def test_windows_skip_unknown_values() -> None:
    policy = dsl.load("avg(p99, 5m) > 1s -> pause\ndelta(p99, 5m) > 1s -> pause")
    state = policy.new_state()
    for t, v in enumerate([0.2, None, 0.4]):
        verdict = policy.evaluate(t * 30.0, {"canary.p99": v}, state)
    assert state.window_values == [pytest.approx(0.3), pytest.approx(0.2)]
    assert verdict.conditions == (False, False)


def test_increase_counts_counter_resets_like_prometheus() -> None:
    policy = dsl.load("increase(restarts, 10m) >= 4 -> rollback")
    state = policy.new_state()
    verdicts = [
        policy.evaluate(i * 30.0, {"canary.restarts": v}, state)
        for i, v in enumerate([5.0, 6.0, 2.0, 3.0])
    ]
    assert state.window_values == [4.0]
    assert verdicts[-1].action is Action.ROLLBACK


def test_windows_see_every_tick_even_behind_a_false_and() -> None:
    # `weight > 50` is false for the first ticks; the count must still have recorded them
    text = "weight > 50 and count(p99 > 300ms, 10m) >= 3 -> pause"
    ticks = [(i * 30.0, {"canary.p99": 0.5, "weight": 10.0 if i < 3 else 60.0}) for i in range(4)]
    assert run(text, ticks)[-1].action is Action.PAUSE


def test_absent_is_true_only_without_a_value() -> None:
    verdicts = run("absent(p99) for 1m -> pause", series("canary.p99", [None, None, None, 0.1]))
    assert [v.action.value for v in verdicts] == ["continue", "continue", "pause", "continue"]
    assert verdicts[2].explanation == "pause: line 1: canary.p99 has no value, true for 1m"


def test_context_values_come_from_the_snapshot() -> None:
    ticks = [(0.0, {"weight": 25.0, "step": 1.0}), (30.0, {"weight": 50.0, "step": 2.0})]
    verdicts = run("weight >= 50 and step >= 2 -> promote", ticks)
    assert [v.action for v in verdicts] == [Action.CONTINUE, Action.PROMOTE]


def test_identical_windows_share_one_history() -> None:
    policy = dsl.load("a: avg(p99, 5m) > 1s -> pause\nb: avg(p99, 5m) > 2s -> rollback")
    assert len(policy.windows) == 1


def test_ticks_must_increase() -> None:
    policy = dsl.load("p99 > 1s -> pause")
    state = policy.new_state()
    policy.evaluate(10.0, {}, state)
    with pytest.raises(ValueError, match="ticks must increase"):
        policy.evaluate(10.0, {}, state)


def test_copied_state_branches_independently() -> None:
    policy = dsl.load("p99 > 300ms for 1m -> rollback")
    state = policy.new_state()
    policy.evaluate(0.0, {"canary.p99": 0.5}, state)
    branch = state.copy()
    assert policy.evaluate(60.0, {"canary.p99": 0.5}, state).action is Action.ROLLBACK
    assert policy.evaluate(60.0, {"canary.p99": 0.1}, branch).action is Action.CONTINUE


def test_no_policy_text_reaches_the_generated_code() -> None:
    text = (
        "sneaky_name_xyz: canary.error_rate > 12.3456% for 7m -> rollback\n"
        "other_rule_abc: count(p99 > 250ms, last 7) >= 5 -> pause"
    )
    policy = dsl.load(text)
    source = policy.generated_source
    for fragment in ("sneaky", "error_rate", "other_rule", "0.123456", "p99", "420"):
        assert fragment not in source
