"""What `codedance backtest` prints and writes: a replay's verdicts in, text out.

In: the compiled policy, the `History` replayed and the `Result` of the
replay (every verdict, and for each rule the values of what its chart draws).
Out:

- `render`: the timeline (each rule going pending, firing and clearing, and
  each verdict that differs from the one before, at times from the start
  and, for Prometheus, absolute), the first verdict that is not `continue`,
  and a terminal chart of the deciding rule's metric against its threshold;
- `pinning_test`: a policy test file (LANGUAGE.md section 8) of the same
  series whose expectations pin the verdicts the backtest gave;
- `chart_side`: what a rule's chart draws, which the replay then observes.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from codedance.policytest_text import duration_text, number_text, series_text
from dsl import ast
from dsl.ast import Action, Dim
from dsl.builtins import CONTEXT
from dsl.compile import CompiledPolicy
from dsl.explain import text_of
from dsl.runtime import Value, Verdict
from dsl.units import format_duration, format_value

if TYPE_CHECKING:
    from codedance.backtest import ChartLine, History, Result

CHART_WIDTH = 60
CHART_HEIGHT = 10
_MARKS = {Action.CONTINUE: ".", Action.PROMOTE: "+", Action.PAUSE: "P", Action.ROLLBACK: "R"}


def rfc3339(epoch: float) -> str:
    """An epoch time as RFC 3339 in UTC: `2024-05-01T12:00:00Z`."""
    moment = datetime.fromtimestamp(epoch, tz=UTC)
    spec = "seconds" if moment.microsecond == 0 else "milliseconds"
    return moment.isoformat(timespec=spec).replace("+00:00", "Z")


# ---------------------------------------------------------------- what a chart draws


@dataclass(frozen=True, slots=True)
class Side:
    """What a rule's chart draws: an expression, and the literal or expression it meets."""

    node: ast.Expr
    op: str | None = None  # how `node` compares with its bound when the rule fires
    threshold: ast.Number | None = None
    against: ast.Expr | None = None


def chart_side(condition: ast.Expr) -> Side | None:
    """What to chart for a rule.

    The first comparison of a metric with a literal, the literal being the
    threshold. A comparison of `request_rate` is taken only when there is no
    other: in a rule such as `error_rate > 1% and request_rate >= 1` it is a
    traffic guard, not what the rule watches. Else the first comparison of
    two expressions that read metrics (`canary.p99 > stable.p99 * 1.5`), the
    right one a moving threshold; else the first metric the rule reads.
    """
    literal: list[Side] = []
    moving: list[Side] = []
    for node in _walk(condition):
        if not (isinstance(node, ast.Binary) and node.op in ast.COMPARISON):
            continue
        left, right = node.left, node.right
        if isinstance(right, ast.Number) and _reads_metric(left):
            literal.append(Side(left, node.op, threshold=right))
        elif isinstance(left, ast.Number) and _reads_metric(right):
            literal.append(Side(right, _MIRROR[node.op], threshold=left))
        elif _reads_metric(left) and _reads_metric(right):
            moving.append(Side(left, node.op, against=right))
    watched = [s for s in literal if not _is_guard(s.node)]
    for candidates in (watched, moving, literal):
        if candidates:
            return candidates[0]
    for node in _walk(condition):
        if isinstance(node, ast.Ref) and _reads_metric(node):
            return Side(node)
    return None


_MIRROR = {">": "<", ">=": "<=", "<": ">", "<=": ">=", "==": "==", "!=": "!="}


def _walk(node: ast.Expr | ast.LastN) -> Iterator[ast.Expr]:
    """Every sub-expression, depth first, left to right."""
    if not isinstance(node, ast.LastN):
        yield node
    for child in ast.children(node):
        yield from _walk(child)


def _reads_metric(node: ast.Expr) -> bool:
    return any(
        isinstance(n, ast.Ref) and not (n.track is None and n.name in CONTEXT) for n in _walk(node)
    )


def _is_guard(node: ast.Expr) -> bool:
    return isinstance(node, ast.Ref) and node.name == "request_rate"


# ---------------------------------------------------------------- the timeline


@dataclass(frozen=True, slots=True)
class Event:
    at: float
    text: str


def rule_events(verdicts: Sequence[Verdict]) -> list[Event]:
    """Each rule going pending, firing, and back to inactive, in the order they happened."""
    events: list[Event] = []
    before: dict[str, str] = {}
    for v in verdicts:
        for r in v.rules:
            was = before.get(r.rule, "inactive")
            if r.state != was:
                cond = {True: "true", False: "false", None: "unknown"}[r.condition]
                if r.state == "pending":
                    text = f"{r.rule} pending (-> {r.action.value})"
                elif r.state == "firing":
                    held = v.at - r.pending_since if r.pending_since is not None else 0.0
                    after = f" after {format_duration(held)}" if held else ""
                    text = f"{r.rule} fired{after} (-> {r.action.value})"
                elif was == "firing":
                    text = f"{r.rule} cleared (condition {cond})"
                else:
                    text = f"{r.rule} reset before firing (condition {cond})"
                events.append(Event(v.at, text))
            before[r.rule] = r.state
    return events


def render(policy: CompiledPolicy, history: History, result: Result, path: str) -> str:
    """The timeline and the chart, as plain text."""
    n = len(result.verdicts)
    head = [
        f"backtest of {path} on {history.described}",
        f"{n} evaluation{'s' if n != 1 else ''} every {format_duration(history.step)}, "
        f"from +0s to +{format_duration(history.until)}"
        + (f" ({rfc3339(history.start)} to {rfc3339(history.start + history.until)})"
           if history.start is not None else ""),
        "",
        "timeline:",
    ]
    rows: list[tuple[float, int, str]] = []
    for e in rule_events(result.verdicts):
        rows.append((e.at, 0, e.text))
    for v in result.changes():
        rows.append((v.at, 1, f"verdict {v.explanation}"))
    rows.sort(key=lambda row: (row[0], row[1]))
    width = max((len(_relative(at)) for at, _, _ in rows), default=3)
    for at, _, text in rows:
        when = _relative(at).ljust(width)
        if history.start is not None:
            when += f"  {rfc3339(history.start + at)}"
        head.append(f"  {when}  {text}")
    first = result.first_non_continue()
    head.append("")
    if first is None:
        head.append("every verdict was continue")
    else:
        head.append(f"first non-continue verdict at {_relative(first.at)}: {first.explanation}")
    line = deciding_line(result)
    if line is not None:
        head += ["", *chart(policy, line, result.verdicts)]
    return "\n".join(head)


def _relative(at: float) -> str:
    return f"+{format_duration(at)}"


# ---------------------------------------------------------------- the chart


def deciding_line(result: Result) -> ChartLine | None:
    """The chart of the first rule that fires, else of the first rule that has one."""
    fired = next((v.rule for v in result.verdicts if v.rule is not None), None)
    for line in result.lines:
        if line.rule == fired:
            return line
    return result.lines[0] if result.lines else None


def chart(policy: CompiledPolicy, line: ChartLine, verdicts: Sequence[Verdict]) -> list[str]:
    """A text chart: the expression's values (`*`), its threshold (`-`), the verdicts below."""
    side = line.side
    dim = policy.checked.types.get(side.node, Dim.NUMBER)
    n = len(verdicts)
    width = min(n, CHART_WIDTH)
    columns = [range(c * n // width, (c + 1) * n // width) for c in range(width)]
    # In a column of several ticks show the one nearest to firing (the highest
    # for `>`, the lowest for `<`), so a short breach stays visible.
    lowest = side.op in ("<", "<=")
    points = [_column(line.values, ticks, lowest) for ticks in columns]
    if side.threshold is not None:
        bounds: list[float | None] = [side.threshold.value] * width
    else:
        bounds = [_column(line.bound, ticks, not lowest) for ticks in columns]
    numbers = [p for p in points if p is not None]
    extent = numbers + [b for b in bounds if b is not None]
    title = f"chart: {text_of(side.node)} (rule {line.rule})"
    bound_text = (side.threshold.text if side.threshold is not None
                  else text_of(side.against) if side.against is not None else None)
    if bound_text is not None:
        title = (f"chart: {text_of(side.node)} against {bound_text} "
                 f"(rule {line.rule}: fires while {side.op} {bound_text})")
    if not numbers:
        return [title, "  (no known values in the range)"]
    lo, hi = min(0.0, *extent), max(extent)
    if hi <= lo:
        hi = lo + 1.0

    def row_of(value: float) -> int:
        return CHART_HEIGHT - 1 - round((value - lo) / (hi - lo) * (CHART_HEIGHT - 1))

    grid = [[" "] * width for _ in range(CHART_HEIGHT)]
    for c, (p, b) in enumerate(zip(points, bounds, strict=True)):
        if b is not None:
            grid[row_of(b)][c] = "-"
        if p is not None:
            grid[row_of(p)][c] = "*"
    labels = {0: format_value(hi, dim), CHART_HEIGHT - 1: format_value(lo, dim)}
    if side.threshold is not None:
        labels[row_of(side.threshold.value)] = format_value(side.threshold.value, dim)
    pad = max(len("verdict"), *(len(text) for text in labels.values()))
    out = [title]
    for r, cells in enumerate(grid):
        out.append(f"  {labels.get(r, '').rjust(pad)} |{''.join(cells)}".rstrip())
    out.append(f"  {' ' * pad} +{'-' * width}")
    start, end = "+0s", _relative(verdicts[-1].at)
    out.append(f"  {' ' * pad}  {start}{end.rjust(max(1, width - len(start)))}")
    marks = ""
    for ticks in columns:
        strongest = min((verdicts[i].action for i in ticks), key=lambda a: a.priority)
        marks += _MARKS[strongest]
    out.append(f"  {'verdict'.rjust(pad)}  {marks}")
    legend = f"* {text_of(side.node)}"
    if bound_text is not None:
        legend += f"   - {bound_text}"
    out.append(f"  {' ' * pad}  {legend}")
    out.append(f"  {' ' * pad}  verdicts: . continue  + promote  P pause  R rollback  "
               "(blank: unknown)")
    return out


def _column(values: Sequence[Value], ticks: range, lowest: bool) -> float | None:
    known = [v for v in (values[i] for i in ticks) if not isinstance(v, bool) and v is not None]
    if not known:
        return None
    return min(known) if lowest else max(known)


# ---------------------------------------------------------------- --output


def pinning_test(
    output: str, policy_path: str, policy: CompiledPolicy, history: History, result: Result
) -> str:
    """The text of a policy test at `output` of the history, expecting the verdicts it gave."""
    base = os.path.dirname(os.path.abspath(output))
    rule_file = os.path.relpath(os.path.abspath(policy_path), base)
    verdicts = result.verdicts
    changes = result.changes()
    # Pin each change, the tick before it (so it cannot come earlier), and the last tick.
    expected: dict[int, str] = {}
    for v in changes:
        i = round(v.at / history.step)
        expected[i] = "changes"
        if i > 0:
            expected.setdefault(i - 1, "the last tick before the change")
    expected.setdefault(len(verdicts) - 1, "the last tick")
    lines = [f"# Written by `codedance backtest` on {rfc3339(round(time.time()))},"]
    lines.append(f"# from {history.described}.")
    if history.start is not None:
        end = history.start + history.until
        lines.append(f"# ({rfc3339(history.start)} to {rfc3339(end)}; t = 0 is the first time).")
    lines += [
        f"# The expectations are the verdicts {policy_path} gave on these series. Rename",
        "# the test, and trim the series and expectations to the regression to keep.",
        f"rule_files: [{json.dumps(rule_file)}]",
        f"evaluation_interval: {duration_text(history.step)}",
        "tests:",
        f"  - name: {json.dumps('backtest of ' + history.described)}",
        f"    interval: {duration_text(history.interval)}",
    ]
    context = {k: v for k, v in history.context.items() if k in policy.context_keys}
    if context:
        pairs = ", ".join(f"{k}: {number_text(v)}" for k, v in sorted(context.items()))
        lines.append(f"    context: {{{pairs}}}")
    lines.append("    input_series:")
    for key, samples in sorted(history.series.items()):
        lines.append(f"      - {{series: {key}, values: {json.dumps(series_text(samples))}}}")
    if not history.series:
        lines[-1] = "    input_series: []"
    lines.append("    expect:")
    for i in sorted(expected):
        v = verdicts[i]
        entry = f"at: {duration_text(v.at)}, action: {v.action.value}"
        if v.rule is not None:
            entry += f", rule: {json.dumps(v.rule)}"
        lines.append(f"      - {{{entry}}}   # {v.explanation}")
    return "\n".join(lines) + "\n"
