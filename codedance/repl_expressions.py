"""Expressions typed at the REPL, checked and evaluated against the session's policy.

In: the text of an expression (`canary.p99 / stable.p99`, `avg(p99, 5m)`),
the session's policy and its text, its past evaluations and the values of
now. Out: a compiled policy holding the expression with the expression's
node in it, the policy state after an evaluation now, and the value as text
with its unit (`450ms`). Problems are `ReplError`s carrying diagnostics at
`<repl>`.

An expression is checked by the real parser and checker, as the condition of
a rule `TEXT -> continue` after the session's metric definitions, so it means
exactly what it would mean in a rule.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import dsl
from codedance.repl_commands import ReplError
from codedance.repl_policy import render_typed
from dsl import ast
from dsl.ast import Dim
from dsl.check import key_of
from dsl.compile import CompiledPolicy
from dsl.explain import show, value_of
from dsl.parser import parse
from dsl.runtime import PolicyState

if TYPE_CHECKING:
    from codedance.repl_values import Tick


def strip_comment(text: str) -> str:
    """The text before a `#` comment (expressions have no backtick queries to protect)."""
    return text.split("#", 1)[0].rstrip() if "`" not in text else text


def check(
    policy: CompiledPolicy, policy_text: str, text: str, entry: str | None = None, offset: int = 0
) -> tuple[CompiledPolicy, ast.Expr]:
    """Check `text` as an expression of `policy`; (a policy holding it, its node).

    It is checked as the condition of a rule, `TEXT -> continue`. A value that
    is not a condition is checked again as `(TEXT) >= 0`, which holds for every
    kind of number. `entry` is the whole line typed, `text` starting at
    `offset` in it, so diagnostics point into the line.
    """
    shown = entry if entry is not None else text
    tree, diagnostics = parse(f"{text} -> continue")
    if tree is None:
        if any(d.span.start >= len(text) for d in diagnostics):
            # the text itself ends too early: say so, not what the added `->` met
            diagnostics = parse(text)[1]
        raise ReplError(render_typed(diagnostics, shown, offset))
    if len(tree.statements) != 1 or not tree.rules:
        raise ReplError(f"`{text}` is not one expression")
    condition = tree.rules[0].condition.span
    prefix = "".join(
        policy_text[d.span.start : d.span.end] + "\n" for d in policy.checked.definitions
    )
    try:
        scratch = dsl.load(f"{prefix}{text} -> continue", "<repl>")
        return scratch, scratch.rules[0].node.condition
    except dsl.PolicyError as e:
        problems = [
            d
            for d in e.diagnostics
            if not (d.code == "E205" and d.span.start == len(prefix) + condition.start
                    and d.span.end == len(prefix) + condition.end)
        ]
    if problems:
        raise ReplError(render_typed(problems, shown, offset - len(prefix)))
    scratch = dsl.load(f"{prefix}({text}) >= 0 -> continue", "<repl>")
    node = scratch.rules[0].node.condition
    assert isinstance(node, ast.Binary)
    return scratch, node.left


def name_key(
    policy: CompiledPolicy, policy_text: str, text: str, entry: str | None = None, offset: int = 0
) -> tuple[str, Dim]:
    """The snapshot key and kind of a metric or context name (`p99` -> canary.p99)."""
    scratch, node = check(policy, policy_text, text, entry, offset)
    if not isinstance(node, ast.Ref):
        raise ReplError(f"`{text}` is not a metric or context name such as canary.p99")
    return key_of(node), scratch.checked.types[node]


def state_after(
    policy: CompiledPolicy,
    ticks: Sequence[Tick],
    now: float,
    snapshot: Mapping[str, float | None],
) -> PolicyState:
    """A policy's state after an evaluation at `now` that sees `snapshot`.

    Windows need the past: the past evaluations their horizon covers are
    replayed first, from the snapshots they recorded.
    """
    state = policy.new_state()
    past = [t for t in ticks if t.at < now]
    if policy.windows:
        seconds = sum(w.seconds or 0.0 for w in policy.windows)
        count = sum(w.last_n or 0 for w in policy.windows)
        recent = sum(1 for t in past if t.at > now - seconds)
        keep = max(recent, count)
        past = past[max(0, len(past) - keep) :] if keep else []
    else:
        past = []
    for t in past:
        policy.evaluate(t.at, t.snapshot, state)
    policy.evaluate(now, snapshot, state)
    return state


def value_text(
    policy: CompiledPolicy,
    node: ast.Expr,
    snapshot: Mapping[str, float | None],
    state: PolicyState,
) -> str:
    """The node's value with its unit, naming the metrics that have none when it is unknown."""
    value = value_of(policy, node, snapshot, state)
    shown = show(policy, node, value)
    if value is None:
        missing = sorted(k for k in policy.metric_keys if snapshot.get(k) is None)
        if missing:
            shown += f" (no value for {', '.join(missing)})"
    return shown
