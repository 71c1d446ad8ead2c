"""What the REPL shows of its policy: evaluations, `:explain` and `:rules`, as text.

In: the session (its policy, its text and where each statement came from,
its evaluations and the values of now). Out: text to print:

- `tick_text` and `report`: each evaluation's verdict with every rule's
  state below it, a long run folding the evaluations that changed nothing;
- `explain`: every sub-expression of a rule with its value now and its kind,
  and the rule's state at the last evaluation;
- `rules_text`: each statement of the policy, where it was written, and the
  state of each rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from codedance.repl_commands import ReplError, count
from dsl import ast
from dsl.ast import Dim
from dsl.compile import CompiledPolicy, CompiledRule
from dsl.explain import explain_tree
from dsl.runtime import RuleStatus, Verdict
from dsl.units import closest, format_duration

if TYPE_CHECKING:
    from codedance.repl_session import Session
    from codedance.repl_values import Tick


def tick_text(tick: Tick) -> str:
    """`t=2m30s  rollback: latency: ...  (health 0)` and each rule's state below it."""
    v = tick.verdict
    head = f"t={format_duration(tick.at)}  {v.explanation}  (health {v.health:.0f})"
    trace = v.trace()
    return head + "".join(f"\n    {line}" for line in trace.splitlines())


def report(history: Sequence[Tick], new: int) -> str:
    """The last `new` evaluations of `history`; a long run folds the unchanged ones."""
    ticks = history[len(history) - new :]
    lines: list[str] = []
    before = len(history) - len(ticks) - 1
    previous = _signature(history[before].verdict) if before >= 0 else None
    folded = 0
    for i, tick in enumerate(ticks):
        signature = _signature(tick.verdict)
        if signature == previous and 0 < i < len(ticks) - 1:
            folded += 1
            continue
        if folded:
            lines.append(f"  ... {count(folded, 'evaluation')} without change")
            folded = 0
        lines.append(tick_text(tick))
        previous = signature
    return "\n".join(lines)


def _signature(v: Verdict) -> tuple[object, ...]:
    return (v.action, v.rule, tuple((r.state, r.condition) for r in v.rules))


def state_text(verdict: Verdict, status: RuleStatus) -> str:
    """`pending since t=1m30s (true for 1m)`, or `inactive (condition false)`."""
    cond = {True: "true", False: "false", None: "unknown"}[status.condition]
    if status.pending_since is None:
        return f"inactive (condition {cond})"
    held = format_duration(verdict.at - status.pending_since)
    since = format_duration(status.pending_since)
    return f"{status.state} since t={since} (true for {held})"


def find_rule(session: Session, label: str) -> CompiledRule:
    """The rule of this label; with none, the rule that decided the last evaluation."""
    if not label:
        deciding = session.ticks[-1].verdict.rule if session.ticks else None
        if deciding is None:
            names = ", ".join(session.rule_labels()) or "none yet"
            raise ReplError(f"name a rule: `:explain RULE` (rules: {names})")
        label = deciding
    for rule in session.policy.rules:
        if rule.label == label:
            return rule
    labels = session.rule_labels()
    hint = closest(label, labels)
    mean = f"; did you mean `{hint}`?" if hint else ""
    raise ReplError(f"no rule `{label}`{mean} (rules: {', '.join(labels) or 'none yet'})")


def explain(session: Session, label: str) -> str:
    """`:explain [RULE]`: the rule's tree of sub-expressions with their values now."""
    policy = session.policy
    rule = find_rule(session, label)
    snapshot, state = session.what_if(policy)
    condition = rule.node.condition
    rows = explain_tree(policy, condition, snapshot, state)
    kinds = [_kind(policy, n) for n in _depth_first(condition)]
    texts = ["  " * depth + text for depth, text, _ in rows]
    width = min(max(map(len, texts)), 60)
    value_width = max(len(v) for _, _, v in rows)
    head = session.composed.text[rule.node.span.start : rule.node.span.end]
    lines = [f"{head}    (values at t={format_duration(session.now)})"]
    if session.ticks:
        verdict = session.ticks[-1].verdict
        status = verdict.rules[policy.rules.index(rule)]
        at = format_duration(verdict.at)
        lines.append(f"state at t={at}: {state_text(verdict, status)}")
    for text, (_, _, value), kind in zip(texts, rows, kinds, strict=True):
        lines.append(f"  {text.ljust(width)}  {value.rjust(value_width)}  {kind}".rstrip())
    return "\n".join(lines)


def _depth_first(node: ast.Expr) -> list[ast.Expr]:
    """The nodes in the order `explain_tree` lists them."""
    out = [node]
    for child in ast.children(node):
        if not isinstance(child, ast.LastN):
            out.extend(_depth_first(child))
    return out


def _kind(policy: CompiledPolicy, node: ast.Expr) -> str:
    dim = policy.checked.types.get(node)
    if dim is None:
        return ""
    return "condition" if dim is Dim.BOOL else dim.value


def rules_text(session: Session) -> str:
    """`:rules`: each statement, the file line or `<repl>` it came from, each rule's state."""
    composed = session.composed
    statements = session.policy.checked.policy.statements
    if not statements:
        return "no rules: `:load FILE`, or type one such as `p99 > 300ms for 2m -> rollback`"
    verdict = session.ticks[-1].verdict if session.ticks else None
    states = {s.rule: state_text(verdict, s) for s in verdict.rules} if verdict else {}
    rows = []
    for s in statements:
        text = composed.text[s.span.start : s.span.end]
        label = s.label if isinstance(s, ast.Rule) else ""
        rows.append((text, composed.origin_of(s.span.start), states.get(label, "")))
    width = min(max(len(r[0]) for r in rows), 70)
    origin_width = max(len(r[1]) for r in rows)
    return "\n".join(
        f"{text.ljust(width)}  {origin.ljust(origin_width)}  {state}".rstrip()
        for text, origin, state in rows
    )
