"""dsl.check: names, units and argument kinds, each problem with its code, span and help."""

from __future__ import annotations

import pytest

import dsl
from dsl.diagnostics import render
from tests.policies import REALISTIC_RULES


def problems(text: str) -> list[str]:
    return [render(d, text, "p.rules") for d in dsl.check_source(text)]


def one(text: str, code: str) -> tuple[str, str, str]:
    """The single diagnostic: (header, caret text under the source, help)."""
    (out,) = problems(text)
    lines = out.splitlines()
    assert f"error[{code}]" in lines[0], out
    source, caret = lines[1], lines[2]
    start = caret.index("^")
    width = len(caret[start:].split(" ")[0])
    marked = source[start : start + width]
    help = next((x.split("= help: ")[1] for x in lines if "= help: " in x), "")
    return lines[0], marked, help


def test_the_realistic_policy_of_the_language_brief_is_clean() -> None:
    assert problems(REALISTIC_RULES) == []


def test_the_fixed_example_diagnostic() -> None:
    text = "latency: p99 > 5% for 2m -> rollback"
    (out,) = problems(text)
    assert out.splitlines() == [
        "p.rules:1:16: error[E201]: a percentage cannot be compared with a duration (p99)",
        "   1 | latency: p99 > 5% for 2m -> rollback",
        "     |                ^^ a percentage cannot be compared with a duration (p99)",
        "     = help: write a duration such as 300ms",
    ]


@pytest.mark.parametrize(
    ("text", "code", "marked", "help"),
    [
        ("p98 > 300ms -> rollback", "E101", "p98", "did you mean `p99`?"),
        ("canary.latency > 300ms -> rollback", "E101", "latency", ""),
        ("avgg(p99, 5m) > 1s -> pause", "E102", "avgg", "did you mean `avg`?"),
        ("p99 > 1s -> rolback", "E103", "rolback", "did you mean `rollback`?"),
        ("baseline.p99 > 1s -> pause", "E104", "baseline", ""),
        ("canary.weight > 50 -> pause", "E105", "canary.weight", "write `weight`"),
        ("p99 > 5% -> pause", "E201", "5%", "write a duration such as 300ms"),
        ("p99 > 3 -> pause", "E201", "3", "write a duration such as 3s or 3ms"),
        ("cpu > 500m -> pause", "E201", "500m", "cpu is in cores"),
        ("p99 + error_rate > 1s -> pause", "E202", "+", ""),
        ("error_rate > 5 -> rollback", "E203", "5", "write a percentage such as 5%"),
        ("weight >= 50% -> promote", "E204", "50%", "write `50`"),
        ("p99 for 2m -> pause", "E205", "p99", "compare it with a threshold"),
        ("p99 > 1s and error_rate -> pause", "E205", "error_rate", ""),
        ("avg(p99) > 1s -> pause", "E206", "avg(p99)", "write avg(x, window)"),
        ("count(p99, 5m) > 3 -> pause", "E207", "p99", "write a condition"),
        ("avg(p99 > 1s, 5m) > 1 -> pause", "E207", "p99 > 1s", ""),
        ("a: p99 > 1s -> pause\na: p90 > 1s -> pause", "E301", "a", "first used on line 1"),
        ("p99 > 1s for 2 -> pause", "E302", "2", "such as 2s or 2m"),
        ("p99 > 1s for 0s -> pause", "E302", "0s", ""),
        ("avg(p99, 5) > 1s -> pause", "E303", "5", ""),
        ("avg(p99, last 0) > 1s -> pause", "E303", "0", ""),
        ("avg(p99, last 2.5) > 1s -> pause", "E303", "2.5", ""),
        ("avg(p99, 30d) > 1s -> pause", "E304", "30d", "at most 1d"),
        ("avg(p99, last 1000000) > 1s -> pause", "E304", "last 1000000", ""),
    ],
)
def test_each_problem_has_its_code_span_and_help(
    text: str, code: str, marked: str, help: str
) -> None:
    _, got_marked, got_help = one(text, code)
    assert got_marked == marked
    assert help in got_help


def test_ratio_accepts_percentages_and_plain_fractions() -> None:
    assert problems("error_rate > 1% -> rollback") == []
    assert problems("error_rate > 0.01 -> rollback") == []
    assert problems("success_rate < 1 -> rollback") == []


def test_plain_numbers_fit_counts_rates_cores_and_the_weight() -> None:
    ok = [
        "failed_pods > 0 -> rollback",
        "request_rate < 5 -> pause",
        "cpu > 0.5 -> pause",
        "weight >= 50 -> promote",
        "step >= 2 and elapsed > 10m -> promote",
        "memory > 512Mi -> pause",
        "canary.p99 / stable.p99 > 1.5 -> pause",
        "canary.error_rate - stable.error_rate > 1% -> rollback",
        "p99 > 0 -> pause",
        "absent(p99) == true -> pause",
        "increase(restarts, last 5) >= 3 -> rollback",
        "abs(delta(p99, 5m)) > 100ms -> pause",
    ]
    for text in ok:
        assert problems(text) == [], text


def test_several_problems_are_reported_in_source_order() -> None:
    out = problems("a: p98 > 1s -> rolback\nb: error_rate > 7 -> pause\n")
    codes = [o.split("error[")[1][:4] for o in out]
    assert codes == ["E101", "E103", "E203"]


def test_bare_function_name_used_as_a_metric() -> None:
    _, marked, help = one("avg > 1s -> pause", "E101")
    assert marked == "avg" and "avg(x, window)" in help


def test_metric_definitions_add_names_with_their_unit() -> None:
    text = (
        'metric queue_wait = promql `avg(wait_seconds{namespace="{{namespace}}"})` as duration\n'
        "queue_wait > 2s for 1m -> pause\n"
        "stable.queue_wait > 5% -> pause\n"
    )
    (out,) = problems(text)
    assert "error[E201]" in out and "(stable.queue_wait)" in out


def test_builtin_names_cannot_be_redefined() -> None:
    _, marked, _ = one('metric p99 = promql `x{a="{{workload}}"}` as duration', "E404")
    assert marked == "p99"
