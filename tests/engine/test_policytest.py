"""engine.policytest (and the replay under it, engine.timeline): policy test files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import dsl
import engine.policytest
from dsl.ast import Action
from engine.policytest import TestFileResult, run_test_file
from engine.timeline import replay, series_key, tick_times
from tests.policies import REALISTIC

# LANGUAGE.md section 1, the realistic policy.
CHECKOUT = REALISTIC

# LANGUAGE.md section 8, the example test file, as the YAML parser hands it over.
SECTION_8: dict[str, Any] = {
    "rule_files": ["checkout.rules"],
    "evaluation_interval": "30s",
    "tests": [
        {
            "name": "slow canary is rolled back",
            "interval": "30s",
            "context": {"weight": 25},
            "input_series": [
                {"series": "canary.p99", "values": "0.1x3 0.5x10"},
                {"series": "stable.p99", "values": "0.1x13"},
            ],
            "expect": [
                {"at": "1m30s", "action": "continue"},
                {"at": "4m", "action": "rollback", "rule": "latency"},
            ],
        }
    ],
}


def run(tmp_path: Path, rules: str, data: dict[str, Any]) -> TestFileResult:
    (tmp_path / "policy.rules").write_text(rules)
    return run_test_file(tmp_path / "policy_test.yaml", {"rule_files": ["policy.rules"], **data})


def one_test(
    expect: list[dict[str, Any]],
    series: dict[str, str] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    case: dict[str, Any] = {"name": "t", "expect": expect, **extra}
    case["input_series"] = [{"series": k, "values": v} for k, v in (series or {}).items()]
    return {"tests": [case]}


def messages(result: TestFileResult) -> str:
    problems = [*result.problems, *(p for c in result.cases for p in c.problems)]
    return "\n".join(p.describe() for p in problems)


# ---------------------------------------------------------------- the fixed example


def test_the_language_example_passes(tmp_path: Path) -> None:
    (tmp_path / "checkout.rules").write_text(CHECKOUT)
    result = run_test_file(tmp_path / "checkout_test.yaml", SECTION_8)
    assert result.status == "passed", messages(result)
    assert [(c.name, c.status) for c in result.cases] == [("slow canary is rolled back", "passed")]


def test_the_language_example_fails_one_tick_early(tmp_path: Path) -> None:
    (tmp_path / "checkout.rules").write_text(CHECKOUT)
    data = {**SECTION_8, "tests": [{**SECTION_8["tests"][0]}]}
    data["tests"][0]["expect"] = [{"at": "3m30s", "action": "rollback", "rule": "latency"}]
    result = run_test_file(tmp_path / "checkout_test.yaml", data)
    assert result.status == "failed"
    (failure,) = result.cases[0].failures
    assert failure.expected is Action.ROLLBACK
    assert failure.got.action is Action.CONTINUE
    text = failure.describe()
    assert text.startswith("at 3m30s: expected rollback (rule latency), got continue")
    assert "latency -> rollback: condition true, pending" in text
    assert failure.got.explanation in text


# ---------------------------------------------------------------- `at`


def test_at_reads_the_last_tick_at_or_before_it(tmp_path: Path) -> None:
    # Samples every 30s, evaluations every minute: the 0.5 at 30s is never evaluated.
    data = one_test(
        [
            {"at": "0s", "action": "continue"},
            {"at": "59s", "action": "continue"},
            {"at": "1m", "action": "rollback"},
            {"at": "1m59s", "action": "rollback"},
        ],
        {"p99": "0.1 0.1 0.5"},
        interval="30s",
    )
    result = run(tmp_path, "p99 > 300ms -> rollback", data)
    assert result.status == "passed", messages(result)


def test_a_failure_between_ticks_names_the_tick_evaluated(tmp_path: Path) -> None:
    data = one_test([{"at": "1m30s", "action": "continue"}], {"p99": "0.1 0.5"})
    result = run(tmp_path, "slow: p99 > 300ms -> rollback", data)
    (failure,) = result.cases[0].failures
    assert failure.tick == 60.0
    assert failure.headline() == (
        "at 1m30s (evaluated at 1m): expected continue, got rollback (rule slow)"
    )


def test_expected_rule_must_match_too(tmp_path: Path) -> None:
    rules = "a: p99 > 1s -> rollback\nb: p99 > 300ms -> rollback\n"
    data = one_test([{"at": "0s", "action": "rollback", "rule": "a"}], {"p99": "0.5"})
    (failure,) = run(tmp_path, rules, data).cases[0].failures
    assert failure.headline() == "at 0s: expected rollback (rule a), got rollback (rule b)"


def test_verdicts_are_computed_once_per_test(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def counting_replay(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return replay(*args, **kwargs)

    monkeypatch.setattr(engine.policytest, "replay", counting_replay)
    expect = [{"at": f"{m}m", "action": "rollback"} for m in range(5)]
    result = run(tmp_path, "p99 > 300ms -> rollback", one_test(expect, {"p99": "0.5"}))
    assert result.status == "passed", messages(result)
    assert len(calls) == 1
    assert calls[0][4] == 240.0  # replayed up to the latest `at`, once


# ---------------------------------------------------------------- gaps and unknowns


def test_a_gap_is_unknown_until_the_next_sample(tmp_path: Path) -> None:
    rules = "slow: p99 > 300ms -> rollback\nmissing: absent(p99) -> pause\n"
    expect = [
        {"at": "0s", "action": "rollback"},
        {"at": "1m", "action": "pause", "rule": "missing"},
        {"at": "2m", "action": "pause"},
        {"at": "3m", "action": "rollback"},
        {"at": "10m", "action": "rollback"},  # the last sample holds
    ]
    result = run(tmp_path, rules, one_test(expect, {"p99": "0.5 _ stale 0.5"}))
    assert result.status == "passed", messages(result)


def test_a_gap_resets_a_pending_for(tmp_path: Path) -> None:
    expect = [{"at": "2m", "action": "continue"}, {"at": "5m", "action": "rollback"}]
    data = one_test(expect, {"p99": "0.5x1 _ 0.5x3"})
    result = run(tmp_path, "p99 > 300ms for 2m -> rollback", data)
    assert result.status == "passed", messages(result)


def test_a_trailing_gap_stays_unknown(tmp_path: Path) -> None:
    expect = [{"at": "1m", "action": "pause"}, {"at": "10m", "action": "pause"}]
    result = run(tmp_path, "absent(p99) -> pause", one_test(expect, {"p99": "1 _"}))
    assert result.status == "passed", messages(result)


def test_a_metric_without_series_is_unknown(tmp_path: Path) -> None:
    rules = "errors: error_rate > 1% -> rollback\nquiet: absent(error_rate) -> pause\n"
    expect = [{"at": "0s", "action": "pause", "rule": "quiet"}, {"at": "5m", "action": "pause"}]
    result = run(tmp_path, rules, one_test(expect))
    assert result.status == "passed", messages(result)


# ---------------------------------------------------------------- context


def test_context_defaults(tmp_path: Path) -> None:
    rules = "a: weight > 0 -> rollback\nb: step > 0 -> rollback\nc: elapsed >= 2m -> promote\n"
    expect = [{"at": "1m", "action": "continue"}, {"at": "2m", "action": "promote"}]
    result = run(tmp_path, rules, one_test(expect))
    assert result.status == "passed", messages(result)


def test_context_values_override_the_defaults(tmp_path: Path) -> None:
    rules = "big: weight >= 50 and step_elapsed > 10m -> promote\n"
    expect = [{"at": "0s", "action": "promote"}]
    data = one_test(expect, context={"weight": 50, "step_elapsed": "1h"})
    assert run(tmp_path, rules, data).status == "passed"
    data = one_test(expect, context={"weight": 49, "step_elapsed": "1h"})
    assert run(tmp_path, rules, data).status == "failed"


def test_a_context_value_may_be_a_series(tmp_path: Path) -> None:
    expect = [{"at": "0s", "action": "continue"}, {"at": "1m", "action": "promote"}]
    data = one_test(expect, {"weight": "25 50"})
    result = run(tmp_path, "weight >= 50 -> promote", data)
    assert result.status == "passed", messages(result)


# ---------------------------------------------------------------- several rule files


def test_several_rule_files_give_the_strongest_verdict(tmp_path: Path) -> None:
    (tmp_path / "a.rules").write_text("fast: p99 < 1s -> promote\n")
    (tmp_path / "b.rules").write_text("slow: p99 > 300ms -> rollback\n")
    data = {
        "rule_files": ["a.rules", "b.rules"],
        **one_test(
            [{"at": "0s", "action": "promote"}, {"at": "1m", "action": "pause"}],
            {"p99": "0.1 0.5"},
        ),
    }
    result = run_test_file(tmp_path / "x_test.yaml", data)
    (failure,) = result.cases[0].failures  # the promote at 0s holds
    assert failure.at == 60.0
    assert failure.got.action is Action.ROLLBACK
    assert failure.got.rule == "slow"
    assert "a.rules: fast -> promote" in failure.describe()
    assert "b.rules: slow -> rollback" in failure.describe()


# ---------------------------------------------------------------- problems


def test_a_series_the_policy_does_not_read_is_an_error(tmp_path: Path) -> None:
    data = one_test([{"at": "0s", "action": "continue"}], {"canary.p98": "1"})
    result = run(tmp_path, "p99 > 300ms -> rollback", data)
    assert result.status == "error"
    (problem,) = result.cases[0].problems
    assert problem.loc == ("tests", 0, "input_series", 0, "series")
    assert "does not read `canary.p98`" in problem.message
    assert "did you mean `canary.p99`?" in problem.message


def test_the_same_series_twice_is_an_error(tmp_path: Path) -> None:
    data = one_test([{"at": "0s", "action": "continue"}], {"p99": "1", "canary.p99": "2"})
    assert "same series" in messages(run(tmp_path, "p99 > 300ms -> rollback", data))


def test_bad_values_name_the_column(tmp_path: Path) -> None:
    data = one_test([{"at": "0s", "action": "continue"}], {"p99": "0.1 0.2y"})
    result = run(tmp_path, "p99 > 300ms -> rollback", data)
    (problem,) = result.cases[0].problems
    assert problem.loc[-1] == "values"
    assert problem.message.startswith("column 5: `0.2y`")


def test_an_unknown_rule_name_is_an_error(tmp_path: Path) -> None:
    data = one_test([{"at": "0s", "action": "rollback", "rule": "latncy"}], {"p99": "1"})
    result = run(tmp_path, "latency: p99 > 300ms -> rollback", data)
    assert "no rule `latncy`; did you mean `latency`?" in messages(result)


@pytest.mark.parametrize(
    ("expectation", "words"),
    [
        ({"at": "90", "action": "pause"}, "`90` is not a duration"),
        ({"at": 90, "action": "pause"}, "`90` needs a unit"),
        ({"at": "5%", "action": "pause"}, "`5%` is not a duration"),
        ({"at": "-1m", "action": "pause"}, "`-1m` is not a duration"),
        ({"at": "1m", "action": "rollbak"}, "unknown action `rollbak`; did you mean `rollback`?"),
        ({"at": "1m", "action": "pause", "rul": "x"}, "unknown key `rul` (did you mean `rule`?)"),
        ({"action": "pause"}, "`at` is required"),
    ],
)
def test_malformed_expectations(tmp_path: Path, expectation: dict[str, Any], words: str) -> None:
    result = run(tmp_path, "p99 > 300ms -> rollback", one_test([expectation]))
    assert result.status == "error"
    assert words in messages(result)
    assert result.problems[0].loc[:3] == ("tests", 0, "expect")


@pytest.mark.parametrize(
    ("data", "words"),
    [
        ({"evaluation_interval": "0s", "tests": []}, "positive duration"),
        ({"tests": []}, "needs at least one entry"),
        ({"tests": [{"name": "x", "expect": []}]}, "needs at least one entry"),
        ({"test": []}, "unknown key `test` (did you mean `tests`?)"),
        (one_test([{"at": "0s", "action": "pause"}], context={"wieght": 1}), "`weight`?"),
        (one_test([{"at": "0s", "action": "pause"}], context={"weight": "50%"}), "not a number"),
    ],
)
def test_malformed_files(tmp_path: Path, data: dict[str, Any], words: str) -> None:
    result = run(tmp_path, "p99 > 300ms -> rollback", data)
    assert result.status == "error"
    assert words in messages(result)


def test_data_that_is_not_a_mapping(tmp_path: Path) -> None:
    result = run_test_file(tmp_path / "x_test.yaml", ["rule_files"])
    assert result.status == "error"
    assert "a test file is a mapping" in messages(result)


def test_a_missing_rule_file_is_an_error(tmp_path: Path) -> None:
    data = {"rule_files": ["nowhere.rules"], **one_test([{"at": "0s", "action": "pause"}])}
    result = run_test_file(tmp_path / "x_test.yaml", data)
    assert result.status == "error"
    assert f"cannot read `{tmp_path / 'nowhere.rules'}`" in messages(result)


def test_a_rule_file_with_errors_shows_its_diagnostics(tmp_path: Path) -> None:
    data = one_test([{"at": "0s", "action": "pause"}])
    result = run(tmp_path, "latency: p99 > 5% for 2m -> rollback\n", data)
    assert result.status == "error"
    (problem,) = result.problems
    assert problem.loc == ("rule_files", 0)
    assert f"{tmp_path / 'policy.rules'}:1:16: error[E201]" in problem.detail
    assert "^^" in problem.detail


def test_an_at_far_beyond_the_series_is_refused(tmp_path: Path) -> None:
    data = {"evaluation_interval": "1s", **one_test([{"at": "400d", "action": "pause"}])}
    assert "more than" in messages(run(tmp_path, "p99 > 300ms -> rollback", data))


# ---------------------------------------------------------------- the timeline itself


def test_tick_times_are_exact_multiples() -> None:
    assert tick_times(0.1, 0.3) == [0.0, 0.1, 0.2, 0.1 * 3]
    assert tick_times(30, 89.9) == [0.0, 30.0, 60.0]
    assert tick_times(30, -1) == []
    with pytest.raises(ValueError, match="positive"):
        tick_times(0, 10)


def test_series_keys() -> None:
    assert series_key("p99") == "canary.p99"
    assert series_key("stable.p99") == "stable.p99"
    assert series_key("weight") == "weight"


def test_replay_gives_one_verdict_per_tick() -> None:
    policy = dsl.load("p99 > 300ms -> rollback")
    verdicts = replay(policy, {"p99": [0.1, 0.5]}, 30, 15, 60)
    assert [v.at for v in verdicts] == [0, 15, 30, 45, 60]
    assert [v.action.value for v in verdicts] == ["continue"] * 2 + ["rollback"] * 3


def test_replay_refuses_two_names_for_one_series() -> None:
    policy = dsl.load("p99 > 300ms -> rollback")
    with pytest.raises(ValueError, match=r"both canary\.p99"):
        replay(policy, {"p99": [0.1], "canary.p99": [0.5]}, 30, 30, 60)
