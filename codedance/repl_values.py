"""The values a REPL session feeds its policy, and the evaluations that saw them.

In: a value typed with `=` (`canary.p99 = 350ms`, `p99 = _`), a `:series`
in promtool notation, or a range pulled from Prometheus. Out: the session's
inputs (`Constant`, `SeriesInput`) by snapshot key, the snapshot the policy
sees at a time (`snapshot_at`), and each evaluation as a `Tick`, which keeps
that snapshot so `:save` can write it and a changed policy can replay it.
A value holds from now on; a series starts at the next evaluation, its
samples spaced by the interval, its first sample standing before that.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from codedance.repl_commands import ReplError, count
from codedance.repl_expressions import strip_comment
from dsl.ast import Dim, Span
from dsl.diagnostics import Diagnostic, render
from dsl.explain import value_of
from dsl.runtime import Verdict
from dsl.series import SeriesError, parse_series, value_at
from dsl.units import format_duration, format_value

if TYPE_CHECKING:
    from codedance.repl_session import Session

# `KEY = VALUE`, not `==`: the key is a name, or a track and a name
ASSIGN = re.compile(
    r"\s*(?P<lhs>[A-Za-z_][A-Za-z0-9_]*(?:\s*\.\s*[A-Za-z_][A-Za-z0-9_]*)?)\s*=(?!=)\s*(?P<rhs>.*)",
    re.DOTALL,
)
UNKNOWN_WORDS = frozenset({"_", "unknown", "stale"})
_EXAMPLES = {
    Dim.DURATION: "a duration such as 350ms",
    Dim.RATIO: "a percentage such as 1.5% (or a ratio such as 0.015)",
    Dim.BYTES: "a size such as 512Mi",
    Dim.RATE: "a number of requests per second such as 50",
    Dim.COUNT: "a count such as 3",
    Dim.CORES: "a number of cores such as 0.5",
    Dim.NUMBER: "a plain number such as 25",
    Dim.BOOL: "a value",
}


@dataclass(frozen=True, slots=True)
class Constant:
    """A value typed with `=`: it holds from now on (None is unknown)."""

    value: float | None

    def at(self, t: float, interval: float) -> float | None:
        return self.value

    def describe(self, dim: Dim) -> str:
        return "set with `=`"


@dataclass(frozen=True, slots=True)
class SeriesInput:
    """Samples spaced by the interval, the first standing at `start` (and before it)."""

    samples: tuple[float | None, ...]
    start: float
    origin: str

    def at(self, t: float, interval: float) -> float | None:
        return value_at(self.samples, interval, max(0.0, t - self.start))

    def describe(self, dim: Dim) -> str:
        return f"{len(self.samples)} samples from t={format_duration(self.start)} ({self.origin})"


Input = Constant | SeriesInput


@dataclass(slots=True)
class Tick:
    """One evaluation: when, what the policy saw, and its verdict."""

    at: float
    snapshot: dict[str, float | None]
    verdict: Verdict


def snapshot_at(
    metric_keys: frozenset[str], inputs: Mapping[str, Input], interval: float, t: float
) -> dict[str, float | None]:
    """What the policy sees at t: the inputs, and context defaults as in a test file."""
    snapshot: dict[str, float | None] = dict.fromkeys(metric_keys)
    snapshot.update({"weight": 0.0, "step": 0.0, "elapsed": t, "step_elapsed": t})
    for key, source in inputs.items():
        snapshot[key] = source.at(t, interval)
    return snapshot


def assign(session: Session, entry: str, m: re.Match[str]) -> str:
    """`KEY = VALUE` (an `ASSIGN` match of `entry`): the value holds from now on."""
    key, dim = session.key(m.group("lhs"), entry, m.start("lhs"))
    rhs = strip_comment(m.group("rhs").strip())
    if not rhs:
        raise ReplError(f"write a value after `=`: {_EXAMPLES[dim]}")
    if rhs in UNKNOWN_WORDS:
        session.inputs[key] = Constant(None)
        return f"{key} = unknown"
    policy, node = session.expression(rhs, entry, m.start("rhs"))
    given = policy.checked.types[node]
    where = Span(m.start("rhs"), m.start("rhs") + len(rhs))
    if given is Dim.BOOL:
        diag = Diagnostic("E205", f"`{key}` takes a number, not a condition", where,
                          help=f"write {_EXAMPLES[dim]}")
        raise ReplError(render(diag, entry, "<repl>"))
    if given is not dim and given is not Dim.NUMBER:
        if key == "weight" and given is Dim.RATIO:
            diag = Diagnostic("E204", "the weight is a number from 0 to 100, not a percentage",
                              where, help="write a plain number such as 25")
        else:
            diag = Diagnostic("E201", f"`{key}` is a {dim.value}, not a {given.value}", where,
                              help=f"write {_EXAMPLES[dim]} (plain numbers are in base units)")
        raise ReplError(render(diag, entry, "<repl>"))
    snapshot, state = session.what_if(policy)
    value = value_of(policy, node, snapshot, state)
    if isinstance(value, bool) or (value is not None and not math.isfinite(value)):
        raise ReplError(f"`{rhs}` is too large to be a value")
    session.inputs[key] = Constant(value)
    return f"{key} = {format_value(value, dim)}"


def series(session: Session, args: str) -> str:
    """`:series KEY VALUES`: samples from the next evaluation, spaced by the interval."""
    name, _, values = args.partition(" ")
    if not name or not values.strip():
        raise ReplError("write `:series KEY VALUES`, such as `:series canary.p99 0.1x3 0.5x10`")
    key, _ = session.key(name)
    try:
        samples = parse_series(values)
    except SeriesError as e:
        raise ReplError(f"`:series {key}`: column {e.column}: {e.message}") from None
    if not samples:
        raise ReplError("the series has no samples")
    start = session.next_time()
    session.inputs[key] = SeriesInput(tuple(samples), start, "series")
    last = start + (len(samples) - 1) * session.interval
    return (
        f"{key}: {count(len(samples), 'sample')} every {format_duration(session.interval)}, "
        f"t={format_duration(start)} to t={format_duration(last)}"
    )


def values_text(session: Session) -> str:
    """`:values`: each input's key, its value now and where it comes from."""
    if not session.inputs:
        return "no values set: `canary.p99 = 350ms`, `:series canary.p99 0.1x3 0.5x10`"
    width = max(map(len, session.inputs))
    lines = []
    for key, source in sorted(session.inputs.items()):
        dim = session.metric_dim(key.split(".")[-1]) or Dim.NUMBER
        now = format_value(source.at(session.now, session.interval), dim)
        lines.append(f"{key.ljust(width)}  {now:>8}  {source.describe(dim)}")
    return "\n".join(lines)
