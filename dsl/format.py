"""Formatting: a `Policy` tree in, its one canonical text out.

`format_policy` writes every statement on one line with single spaces, aligns
the conditions of consecutive named rules, keeps every comment and at most one
blank line where the author left one or more, and ends the file with exactly
one newline. `format_expr` writes an expression with parentheses only where the
grammar's precedence needs them, so `parse(format_policy(tree))` gives back an
equal tree (spans aside): the property tests in `tests/dsl/test_format.py`
hold the formatter to that.

Numbers and names come out exactly as written (`0.50`, `1m30s`, `p99` stays
bare, `canary.p99` stays qualified): the formatter fixes layout, never meaning
or spelling.

Where blank lines and comments go is read from line numbers: each statement's
`.line` and each comment's `.line`. A tree holds no end line, so a statement is
taken to end on its first line (plus the lines inside a multi-line query, and
any line holding one of its trailing comments); pass `source` to know exactly
where a statement that the author split over several lines inside parentheses
ends.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass, field

from dsl.ast import (
    Binary,
    Bool,
    Call,
    Comment,
    Expr,
    LastN,
    MetricDef,
    Number,
    Policy,
    Ref,
    Rule,
    Statement,
    Unary,
)

# Binding strength, loosest first, as in grammar.lark.
_OR, _AND, _NOT, _COMPARE, _SUM, _PRODUCT, _NEGATE, _ATOM = range(1, 9)

_BINARY_LEVEL: dict[str, int] = {
    "or": _OR,
    "and": _AND,
    ">": _COMPARE,
    ">=": _COMPARE,
    "<": _COMPARE,
    "<=": _COMPARE,
    "==": _COMPARE,
    "!=": _COMPARE,
    "+": _SUM,
    "-": _SUM,
    "*": _PRODUCT,
    "/": _PRODUCT,
}


def format_expr(expr: Expr | LastN) -> str:
    """The canonical text of an expression: `avg(p99, 5m) > 300ms and not absent(p99)`."""
    if isinstance(expr, Number):
        return expr.text
    if isinstance(expr, Bool):
        return "true" if expr.value else "false"
    if isinstance(expr, Ref):
        return expr.text
    if isinstance(expr, LastN):
        return f"last {expr.count.text}"
    if isinstance(expr, Call):
        return f"{expr.func}({', '.join(format_expr(a) for a in expr.args)})"
    if isinstance(expr, Unary):
        if expr.op == "not":
            return "not " + _operand(expr.operand, _NOT)
        return expr.op + _operand(expr.operand, _NEGATE)
    level = _level(expr)
    # Comparisons do not chain, so a comparison on either side needs parentheses;
    # the other operators are left-associative, so only the right side does.
    left_min = level + 1 if level == _COMPARE else level
    left = _operand(expr.left, left_min)
    right = _operand(expr.right, level + 1)
    return f"{left} {expr.op} {right}"


def _level(expr: Expr) -> int:
    if isinstance(expr, Binary):
        return _BINARY_LEVEL.get(expr.op, _COMPARE)
    if isinstance(expr, Unary):
        return _NOT if expr.op == "not" else _NEGATE
    return _ATOM


def _operand(expr: Expr, minimum: int) -> str:
    """An operand that must bind at least as tightly as `minimum`, parenthesised if not."""
    text = format_expr(expr)
    return text if _level(expr) >= minimum else f"({text})"


def format_statement(statement: Statement, name_width: int = 0) -> str:
    """One statement on one line; a rule's `name:` is padded to `name_width` characters."""
    if isinstance(statement, MetricDef):
        return f"metric {statement.name} = promql `{statement.template}` as {statement.unit}"
    head = "" if statement.name is None else f"{statement.name}:".ljust(name_width) + " "
    tail = "" if statement.for_ is None else f" for {statement.for_.text}"
    return f"{head}{format_expr(statement.condition)}{tail} -> {statement.action}"


@dataclass
class _Block:
    """A statement with the comments that go with it, or an own-line comment alone."""

    first: int
    last: int
    statement: Statement | None = None
    before: list[str] = field(default_factory=list)
    trailing: list[str] = field(default_factory=list)
    comment: str = ""
    blank_before: bool = False
    name_width: int = 0


def format_policy(policy: Policy, source: str | None = None) -> str:
    """The canonical text of a whole policy; "" for an empty one.

    `source`, the text the policy was parsed from, is optional: with it, a
    statement the author split over several lines is known to end where it
    does, so no blank line is invented after it.
    """
    blocks = _blocks(policy, source)
    _align(blocks)
    lines: list[str] = []
    for block in blocks:
        if block.blank_before and lines:
            lines.append("")
        if block.statement is None:
            lines.append(block.comment)
            continue
        lines.extend(block.before)
        text = format_statement(block.statement, block.name_width)
        lines.append("  ".join([text, *block.trailing]))
    return "".join(line + "\n" for line in lines)


def _blocks(policy: Policy, source: str | None) -> list[_Block]:
    """Statements and free comments in source order, each knowing if a blank line preceded it."""
    statements = list(policy.statements)
    firsts = [s.line for s in statements]
    if any(b <= a for a, b in itertools.pairwise(firsts)):
        # Not a tree the parser built (lines unset or out of order): number the
        # statements ourselves so that comments still find a place.
        firsts = list(range(1, len(statements) + 1))
    lasts = [_last_line(s, first, source) for s, first in zip(statements, firsts, strict=True)]
    blocks = [_Block(f, la, s) for s, f, la in zip(statements, firsts, lasts, strict=True)]
    free: list[_Block] = []
    for comment in policy.comments:
        owner = _owner(comment, firsts, lasts)
        if owner is None:
            free.append(_Block(comment.line, comment.line, comment=comment.text))
            continue
        block = blocks[owner]
        if comment.own_line:  # inside a statement split over lines: put it just above
            block.before.append(comment.text)
        else:
            block.trailing.append(comment.text)
            block.last = max(block.last, comment.line)
    merged = sorted(free + blocks, key=lambda b: (b.first, b.statement is not None))
    previous_last: int | None = None
    for block in merged:
        block.blank_before = previous_last is not None and block.first > previous_last + 1
        previous_last = block.last if previous_last is None else max(previous_last, block.last)
    return merged


def _last_line(statement: Statement, first: int, source: str | None) -> int:
    if source is not None and statement.span.end > statement.span.start:
        return source.count("\n", 0, statement.span.end - 1) + 1
    if isinstance(statement, MetricDef):
        return first + statement.template.count("\n")
    return first


def _owner(comment: Comment, firsts: list[int], lasts: list[int]) -> int | None:
    """The statement whose lines hold the comment, if any.

    A trailing comment always sits on a line of the statement before it, even
    when that statement's last line is not known exactly.
    """
    i = bisect.bisect_right(firsts, comment.line) - 1
    if i < 0:
        return None
    if comment.line <= lasts[i]:
        return i
    if not comment.own_line:
        return i
    return None


def _align(blocks: list[_Block]) -> None:
    """Set the width of `name:` of each named rule: the widest in its run of named rules.

    A run ends at a blank line, a metric definition or a rule without a name;
    own-line comments between rules do not end it.
    """
    run: list[_Block] = []

    def close() -> None:
        width = max((len(_name(b)) + 1 for b in run), default=0)
        for b in run:
            b.name_width = width
        run.clear()

    for block in blocks:
        if block.blank_before:
            close()
        if block.statement is None:
            continue
        if isinstance(block.statement, Rule) and block.statement.name is not None:
            run.append(block)
        else:
            close()
    close()


def _name(block: _Block) -> str:
    statement = block.statement
    if isinstance(statement, Rule) and statement.name is not None:
        return statement.name
    return ""
