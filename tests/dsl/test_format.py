"""The canonical formatter (`dsl/format.py`).

Laws, over generated policies: formatting then parsing gives back the same
tree, formatting is idempotent, comments survive, and every generated policy is
one the checker accepts (so the generator tests what users can write). Example
tests pin the layout: aligned rule names, comments and blank lines, minimal
parentheses. The shipped `.rules` files must already be formatted.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

import dsl
from dsl import ast
from dsl.ast import Binary, Ref, Unary
from dsl.format import format_expr, format_policy
from dsl.parser import MAX_DEPTH, parse
from tests.dsl.strategies import policies, raw_expressions, snapshots, thresholds
from tests.policies import REALISTIC as SHARED_REALISTIC

RULES_DIR = Path(__file__).resolve().parents[2] / "rules"


# Generating a policy takes tens of milliseconds; these counts keep the file
# within seconds while still reaching every kind of node many times.
def examples(n: int) -> settings:
    return settings(max_examples=n, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def parsed(source: str) -> ast.Policy:
    tree, diagnostics = parse(source)
    assert tree is not None, diagnostics
    return tree


def fmt(source: str) -> str:
    return format_policy(parsed(source), source)


def condition_text(condition: str) -> str:
    rule = parsed(f"{condition} -> pause\n").rules[0]
    return format_expr(rule.condition)


# --- laws ----------------------------------------------------------------------------


@examples(100)
@given(policies())
def test_format_then_parse_gives_the_same_tree(policy: ast.Policy) -> None:
    assert parsed(format_policy(policy)) == policy


@examples(60)
@given(policies())
def test_formatting_is_idempotent(policy: ast.Policy) -> None:
    text = format_policy(policy)
    assert format_policy(parsed(text)) == text
    assert fmt(text) == text


@examples(40)
@given(policies())
def test_comments_survive_in_order(policy: ast.Policy) -> None:
    again = parsed(format_policy(policy))
    assert [c.text for c in again.comments] == [c.text for c in policy.comments]


@examples(150)
@given(raw_expressions())
def test_any_parsed_expression_round_trips(condition: ast.Expr) -> None:
    policy = ast.Policy((ast.Rule("r", condition, "pause"),))
    text = format_policy(policy)
    assert parsed(text) == policy


@examples(40)
@given(policies())
def test_generated_policies_pass_the_checker(policy: ast.Policy) -> None:
    source = format_policy(policy)
    errors = [d for d in dsl.check_source(source) if d.severity == "error"]
    assert errors == [], "\n".join(dsl.render(d, source, "generated.rules") for d in errors)


@examples(40)
@given(policies())
def test_generated_trees_are_shallow_with_unique_names(policy: ast.Policy) -> None:
    assert all(r.condition.depth < MAX_DEPTH // 4 for r in policy.rules)
    names = [r.name for r in policy.rules if r.name is not None]
    assert len(names) == len(set(names))


KEYS = frozenset({"canary.p99", "stable.error_rate", "weight", "canary.queue_depth"})


@examples(40)
@given(snapshots(KEYS, (0.3, 0.01, 50.0)))
def test_snapshots_give_every_key_a_value_or_none(snapshot: dict[str, float | None]) -> None:
    assert set(snapshot) == KEYS
    assert all(v is None or isinstance(v, float) for v in snapshot.values())


def test_thresholds_are_the_literals_of_the_conditions() -> None:
    policy = parsed("a: p99 > 300ms and error_rate > 1% for 2m -> pause\nweight >= 50 -> promote\n")
    assert thresholds(policy) == (0.01, 0.3, 50.0)


# --- layout ------------------------------------------------------------------------------

REALISTIC_UNFORMATTED = """\
# checkout service: what a healthy canary looks like
latency: p99>300ms for 2m -> rollback
errors: error_rate > 1%   for 1m -> rollback
relative: canary.p99 > (stable.p99 * 1.5) and canary.p99 > 100ms for 3m -> pause
crashing: failed_pods > 0 or increase( restarts,5m ) >= 3 -> rollback
flapping: count(p99 > 250ms, 10m) >= 5 -> pause
no_data: absent(p99) for 5m -> pause
early_win: (weight >= 50) and success_rate >= 99.9% for 10m -> promote
"""

REALISTIC = SHARED_REALISTIC


def test_realistic_policy_gets_aligned_names() -> None:
    assert fmt(REALISTIC_UNFORMATTED) == REALISTIC
    assert fmt(REALISTIC) == REALISTIC


def test_comments_and_blank_lines_survive() -> None:
    source = (
        "\n\n# latency\n"
        "slow: p99 > 300ms -> rollback    # the SLO\n"
        "\n\n\n"
        "# errors, then a rule without a name\n"
        "bad: error_rate > 1% -> rollback\n"
        "absent(p99)   for 5m ->pause\n"
        "  # the end\n\n"
    )
    assert fmt(source) == (
        "# latency\n"
        "slow: p99 > 300ms -> rollback  # the SLO\n"
        "\n"
        "# errors, then a rule without a name\n"
        "bad: error_rate > 1% -> rollback\n"
        "absent(p99) for 5m -> pause\n"
        "# the end\n"
    )


def test_a_blank_line_starts_a_new_alignment_block() -> None:
    source = "a: p99 > 1s -> pause\nlonger_name: p99 > 2s -> pause\n\nb: p99 > 3s -> pause\n"
    assert fmt(source) == (
        "a:           p99 > 1s -> pause\nlonger_name: p99 > 2s -> pause\n\nb: p99 > 3s -> pause\n"
    )


def test_trailing_comment_stays_on_its_line() -> None:
    out = fmt("x: p99 > 1s -> pause\ny: p50>1s->pause # why\nz: p90 > 1s -> pause\n")
    assert out.splitlines()[1] == "y: p50 > 1s -> pause  # why"


def test_statement_split_over_lines_becomes_one_line() -> None:
    source = "a: (p99 >\n   300ms) -> rollback  # slow\nb: p50 > 1s -> pause\n"
    assert fmt(source) == "a: p99 > 300ms -> rollback  # slow\nb: p50 > 1s -> pause\n"
    split = "a: (p99 >\n   300ms) -> rollback\nb: p50 > 1s -> pause\n"
    assert fmt(split) == "a: p99 > 300ms -> rollback\nb: p50 > 1s -> pause\n"


def test_metric_definitions_keep_their_query() -> None:
    source = (
        'metric   queue =promql `max(q{ns="{{namespace}}"}) # not a comment` as  count\n'
        "queue > 10 -> pause\n"
    )
    assert fmt(source) == (
        'metric queue = promql `max(q{ns="{{namespace}}"}) # not a comment` as count\n'
        "queue > 10 -> pause\n"
    )


def test_empty_policy_formats_to_nothing_or_its_comments() -> None:
    assert fmt("") == ""
    assert fmt("\n\n  \n") == ""
    assert fmt("\n# only a comment\n\n\n# and another") == "# only a comment\n\n# and another\n"


@pytest.mark.parametrize(
    ("written", "canonical"),
    [
        ("(a + b) * c > 1", "(a + b) * c > 1"),
        ("a + (b * c) > 1", "a + b * c > 1"),
        ("a - (b - c) > 1", "a - (b - c) > 1"),
        ("(a - b) - c > 1", "a - b - c > 1"),
        ("a / (b / c) > 1", "a / (b / c) > 1"),
        ("-(a + b) > 1", "-(a + b) > 1"),
        ("- - a > 1", "--a > 1"),
        ("not (a and b)", "not (a and b)"),
        ("not (a > 1)", "not a > 1"),
        ("(a and b) or c", "a and b or c"),
        ("a and (b or c)", "a and (b or c)"),
        ("a or (b or c)", "a or (b or c)"),
        ("(a > 1) == (b > 1)", "(a > 1) == (b > 1)"),
        ("(not a) == b", "(not a) == b"),
        ("((p99)) > ((300ms))", "p99 > 300ms"),
        ("avg( (p99) , last   5 ) >= 0.50", "avg(p99, last 5) >= 0.50"),
        ("canary.p99>stable.p99*1.5", "canary.p99 > stable.p99 * 1.5"),
        ("f() > 1m30s", "f() > 1m30s"),
        ("true or false", "true or false"),
    ],
)
def test_parentheses_only_where_precedence_needs_them(written: str, canonical: str) -> None:
    assert condition_text(written) == canonical


def test_right_operand_of_the_same_level_keeps_its_parentheses() -> None:
    a, b, c = Ref("a"), Ref("b"), Ref("c")
    assert format_expr(Binary("-", a, Binary("-", b, c))) == "a - (b - c)"
    assert format_expr(Binary("-", Binary("-", a, b), c)) == "a - b - c"
    assert format_expr(Binary("*", Binary("+", a, b), c)) == "(a + b) * c"
    assert format_expr(Unary("not", Binary("and", a, b))) == "not (a and b)"


def test_deepest_parsable_expression_formats() -> None:
    source = "x: " + " + ".join(["p99"] * (MAX_DEPTH - 1)) + " > 1s -> pause\n"
    assert fmt(source) == source


# --- the shipped policies ----------------------------------------------------------------

SHIPPED = sorted(RULES_DIR.rglob("*.rules")) if RULES_DIR.is_dir() else []


@pytest.mark.skipif(not SHIPPED, reason="no .rules files under rules/ yet")
@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(RULES_DIR)))
def test_shipped_policies_are_formatted(path: Path) -> None:
    source = path.read_text()
    assert fmt(source) == source, f"run `codedance fmt {path}`"
