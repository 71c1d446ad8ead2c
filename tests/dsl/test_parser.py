"""dsl.parser: the tree it builds, and syntax errors in the author's words."""

from __future__ import annotations

import re

import pytest

from dsl import ast
from dsl.diagnostics import render
from dsl.parser import MAX_DEPTH, parse


def errors(text: str) -> list[str]:
    tree, diagnostics = parse(text)
    assert tree is None
    return [render(d, text, "p.rules") for d in diagnostics]


def test_rule_parts_and_line_numbers() -> None:
    tree, diags = parse("\n# comment\nlatency: p99 > 300ms for 2m -> rollback\np99 > 1s -> pause\n")
    assert diags == [] and tree is not None
    first, second = tree.rules
    assert first.name == "latency" and first.line == 3 and first.action == "rollback"
    assert first.for_ is not None and first.for_.value == 120.0
    assert second.name is None and second.label == "line 4"
    assert tree.comments[0].text == "# comment" and tree.comments[0].line == 2


def test_precedence_loosest_first() -> None:
    tree, _ = parse("a or b and not c > 1 + 2 * -3 -> pause")
    assert tree is not None
    cond = tree.rules[0].condition
    assert isinstance(cond, ast.Binary) and cond.op == "or"
    right = cond.right
    assert isinstance(right, ast.Binary) and right.op == "and"
    negated = right.right
    assert isinstance(negated, ast.Unary) and negated.op == "not"
    cmp = negated.operand
    assert isinstance(cmp, ast.Binary) and cmp.op == ">"
    total = cmp.right
    assert isinstance(total, ast.Binary) and total.op == "+"
    product = total.right
    assert isinstance(product, ast.Binary) and product.op == "*"
    assert isinstance(product.right, ast.Unary) and product.right.op == "-"


def test_arithmetic_is_left_associative() -> None:
    tree, _ = parse("a - b - c > 0 -> pause")
    assert tree is not None
    cmp = tree.rules[0].condition
    assert isinstance(cmp, ast.Binary)
    left = cmp.left
    assert isinstance(left, ast.Binary) and isinstance(left.left, ast.Binary)


def test_newlines_inside_parentheses_continue_the_rule() -> None:
    tree, diags = parse("slow: (p99 > 300ms\n   and p90 > 200ms) for 1m -> rollback\n")
    assert diags == [] and tree is not None and len(tree.rules) == 1


def test_spans_point_at_the_written_text() -> None:
    text = "latency: canary.p99 > 300ms -> rollback"
    tree, _ = parse(text)
    assert tree is not None
    cmp = tree.rules[0].condition
    assert isinstance(cmp, ast.Binary)
    assert text[cmp.left.span.start : cmp.left.span.end] == "canary.p99"
    assert text[cmp.right.span.start : cmp.right.span.end] == "300ms"
    assert text[cmp.op_span.start : cmp.op_span.end] == ">"


@pytest.mark.parametrize(
    ("text", "position", "words"),
    [
        ("p99 > 300ms for", "1:16", "expected a duration such as 2m, found the end of the input"),
        ("p99 > 300ms for 2m", "1:19", "expected `->` and an action"),
        ("p99 > 300ms ->\n", "1:15", "expected an action: rollback, pause, promote or continue"),
        ("latency: p99 >", "1:15", "expected a value"),
        ("p99 > 300ms -> rollback now", "1:25", "expected the end of the line, found `now`"),
        ("p99 >> 3 -> pause", "1:6", "expected a value"),
        ("avg(p99, last) > 1s -> pause", "1:14", "expected a number of evaluations such as 5"),
    ],
)
def test_syntax_errors_say_what_was_expected(text: str, position: str, words: str) -> None:
    (out,) = errors(text)
    assert out.startswith(f"p.rules:{position}: error[E00")
    assert words in out.splitlines()[0]


def test_an_early_end_points_just_past_the_last_character() -> None:
    (out,) = errors("latency: p99 > 300ms for\n\n")
    header, source, caret = out.splitlines()[:3]
    assert header.startswith("p.rules:1:25: error[E002]")
    assert caret.index("^") == source.index("for") + len("for")


def test_no_lark_internals_in_messages() -> None:
    for text in ["p99 > 300ms for 2m", "(p99", "p99 > 300ms -> ", "metric = 3", "p99 $ 3"]:
        for out in errors(text):
            assert not re.search(r"__ANON|QUANTITY|NAME|_NL|\$END|LPAR|Token\(", out), out


def test_every_broken_line_is_reported() -> None:
    out = errors("p99 > -> rollback\nok: p99 > 1s -> pause\nerror_rate > 1% for -> pause\n")
    assert [o.split(":")[1] for o in out] == ["1", "3"]


def test_unknown_unit_and_huge_numbers() -> None:
    (unit,) = errors("p99 > 300mss -> rollback")
    assert "error[E003]: unknown unit `mss`" in unit and "did you mean `ms`?" in unit
    (huge,) = errors("p99 > 1e999s -> rollback")
    assert "error[E004]" in huge


def test_operators_from_other_languages_get_a_hint() -> None:
    (out,) = errors("p99 > 1s && p90 > 1s -> pause")
    assert "unexpected character `&`" in out and "help: write `and`" in out


def test_a_number_and_its_unit_must_touch() -> None:
    (out,) = errors("p99 > 300 ms -> rollback")
    assert "without a space" in out


def test_deep_nesting_is_a_diagnostic_not_a_recursion_error() -> None:
    text = "x" + " + x" * 100_000 + " > 1 -> pause"
    (out,) = errors(text)
    assert f"nested more than {MAX_DEPTH} levels" in out
    # parentheses alone do not nest the tree
    tree, diags = parse("(" * 5000 + "p99" + ")" * 5000 + " > 1s -> pause")
    assert diags == [] and tree is not None


def test_oversized_input_is_refused() -> None:
    (out,) = errors("# " + "x" * (1 << 20) + "\n")
    assert "error[E005]" in out
