"""Explanations: why a rule decided, in one line, from the values it saw.

In: a compiled policy, an expression of it, the tick's snapshot and the state
the evaluator just advanced. Out: the value of any sub-expression (`value_of`)
and a sentence such as `canary.p99 = 412ms > 300ms`, or the whole tree of
values (`explain_tree`) for the REPL.

Windowed calls are not recomputed here: their aggregates were stored in the
state by the tick that produced the verdict, so an explanation always shows
what the evaluator saw. This runs only when a rule decides or a person asks;
the tick itself never pays for it.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from dsl import ast
from dsl.ast import Dim
from dsl.builtins import CONTEXT, DEFAULT_TRACK
from dsl.check import key_of
from dsl.runtime import PolicyState, Snapshot, Value
from dsl.units import format_value

if TYPE_CHECKING:
    from dsl.compile import CompiledPolicy


def value_of(
    policy: CompiledPolicy, node: ast.Expr, snapshot: Snapshot, state: PolicyState
) -> Value:
    """The value of an expression at the tick `state` last saw (None is unknown)."""
    if isinstance(node, ast.Number | ast.Bool):
        return node.value
    if isinstance(node, ast.Ref):
        return snapshot.get(key_of(node))
    if isinstance(node, ast.Call):
        index = policy.window_index.get(node)
        if index is not None:
            return state.window_values[index]
        arg = node.args[0]
        assert not isinstance(arg, ast.LastN)
        x = value_of(policy, arg, snapshot, state)
        if node.func == "absent":
            return x is None
        return None if x is None else abs(x)
    if isinstance(node, ast.Unary):
        x = value_of(policy, node.operand, snapshot, state)
        if x is None:
            return None
        return (not x) if node.op == "not" else -x
    a = value_of(policy, node.left, snapshot, state)
    if node.op in ("and", "or"):
        stop = node.op == "or"
        if a is stop:
            return stop
        b = value_of(policy, node.right, snapshot, state)
        if b is stop:
            return stop
        return None if a is None or b is None else not stop
    b = value_of(policy, node.right, snapshot, state)
    if a is None or b is None:
        return None
    op = node.op
    if op == "/":
        return None if b == 0 else a / b
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    return {
        ">": a > b, ">=": a >= b, "<": a < b, "<=": a <= b, "==": a == b, "!=": a != b
    }[op]


def qualified(node: ast.Expr) -> ast.Expr:
    """The expression with every bare metric written with its track (`canary.p99`)."""
    if isinstance(node, ast.Ref):
        if node.track is None and node.name not in CONTEXT:
            return replace(node, track=DEFAULT_TRACK)
        return node
    if isinstance(node, ast.Call):
        args = tuple(a if isinstance(a, ast.LastN) else qualified(a) for a in node.args)
        return replace(node, args=args)
    if isinstance(node, ast.Unary):
        return replace(node, operand=qualified(node.operand))
    if isinstance(node, ast.Binary):
        return replace(node, left=qualified(node.left), right=qualified(node.right))
    return node


def text_of(node: ast.Expr) -> str:
    from dsl.format import format_expr

    return format_expr(qualified(node))


def show(policy: CompiledPolicy, node: ast.Expr, value: Value) -> str:
    """A value with the unit of its expression: `412ms`, `1.2%`, `true`."""
    dim = policy.checked.types.get(node, Dim.NUMBER)
    return format_value(value, dim)


def explain_rule(
    policy: CompiledPolicy, condition: ast.Expr, snapshot: Snapshot, state: PolicyState
) -> tuple[tuple[tuple[str, str], ...], str]:
    """(the values the condition saw, a sentence saying why it holds)."""
    values: list[tuple[str, str]] = []
    text = _because(policy, condition, snapshot, state, values)
    unique = {name: shown for name, shown in values}
    return tuple(unique.items()), text


def _because(
    policy: CompiledPolicy,
    node: ast.Expr,
    snapshot: Snapshot,
    state: PolicyState,
    values: list[tuple[str, str]],
) -> str:
    if isinstance(node, ast.Binary) and node.op in ("and", "or"):
        parts = [
            _because(policy, side, snapshot, state, values)
            for side in (node.left, node.right)
            if node.op == "and" or value_of(policy, side, snapshot, state) is True
        ]
        return f" {node.op} ".join(parts)
    if isinstance(node, ast.Binary) and node.op in ast.COMPARISON:
        left = _side(policy, node.left, snapshot, state, values)
        right = _side(policy, node.right, snapshot, state, values)
        return f"{left} {node.op} {right}"
    if isinstance(node, ast.Call) and node.func == "absent":
        arg = node.args[0]
        assert not isinstance(arg, ast.LastN)
        return f"{text_of(arg)} has no value"
    if isinstance(node, ast.Unary) and node.op == "not":
        inner = _because(policy, node.operand, snapshot, state, values)
        return f"not ({inner})"
    return _side(policy, node, snapshot, state, values)


def _side(
    policy: CompiledPolicy,
    node: ast.Expr,
    snapshot: Snapshot,
    state: PolicyState,
    values: list[tuple[str, str]],
) -> str:
    text = text_of(node)
    if isinstance(node, ast.Number | ast.Bool):
        return text
    shown = show(policy, node, value_of(policy, node, snapshot, state))
    values.append((text, shown))
    return f"{text} = {shown}"


def explain_tree(
    policy: CompiledPolicy, node: ast.Expr, snapshot: Snapshot, state: PolicyState
) -> list[tuple[int, str, str]]:
    """Every sub-expression with its value, depth first: (depth, text, value)."""
    out: list[tuple[int, str, str]] = []

    def walk(n: ast.Expr, depth: int) -> None:
        out.append((depth, text_of(n), show(policy, n, value_of(policy, n, snapshot, state))))
        for child in ast.children(n):
            if not isinstance(child, ast.LastN):
                walk(child, depth + 1)

    walk(node, 0)
    return out
