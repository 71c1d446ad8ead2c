"""`codedance backtest`: a policy and past metrics in, the verdicts it would have given out.

    codedance backtest POLICY --recording FILE [--step D] [--to D] [--weight N]
    codedance backtest POLICY --prometheus URL --rollout NAMESPACE/NAME
                       [--from T] [--to T] [--step 30s] [--window 1m]
                       [--catalog plain|istio|nginx] [--weight N]
    ... [--json] [--output TEST.yaml]

Where the series come from: a recording (the YAML of a policy test's series,
`interval` and `input_series`, read by `ReplaySource.from_recording`), or a
Prometheus, asked with `SyncPrometheus` (the live loop's catalog and query
templates) for a range of every metric the policy reads, the stable track
being the workload NAME and the canary NAME-canary. Either way the series go
through `engine.timeline`, the one replay of the live loop's evaluator, so a
backtest decides exactly as `codedance test` and the controller do.

What comes out: a timeline (each rule going pending, firing and clearing,
and each verdict that differs from the one before, at times from the start
and, for Prometheus, absolute), a text chart of the deciding metric against
its threshold; or, with `--json`, the changing verdicts as data; and with
`--output`, a policy test file that pins today's verdicts, which `codedance
test` passes as written.

Exit 0 when the backtest ran, whatever it decided; 2 for bad input (a policy
with errors, an unreadable recording, an unreachable Prometheus, a range
with no data, a time that is not one), with a one-line reason.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

import dsl
from codedance.policy_files import FileProblem, UsageError, load_yaml, read_text
from dsl import ast
from dsl.ast import Action, Dim
from dsl.compile import CompiledPolicy
from dsl.explain import text_of, value_of
from dsl.runtime import PolicyState, Snapshot, Value, Verdict
from dsl.units import UnitError, format_duration, format_value, parse_quantity
from engine.timeline import iter_replay

# Prometheus answers at most 11,000 points per series in a range query.
MAX_POINTS = 11_000
# A recording replays every tick; a typo such as `--to 400d` must not run for minutes.
MAX_EVALUATIONS = 1_000_000
TIME_FORMATS = (
    "write RFC 3339 (2024-05-01T12:00:00Z), epoch seconds (1714564800) "
    "or a time relative to now (-30m, now-2h, now)"
)
CHART_WIDTH = 60
CHART_HEIGHT = 10
_MARKS = {Action.CONTINUE: ".", Action.PROMOTE: "+", Action.PAUSE: "P", Action.ROLLBACK: "R"}


def add_command(commands: Any) -> None:
    p = commands.add_parser(
        "backtest", help="replay past metrics through a policy",
        description="Replay a recording or a Prometheus range through a policy and show "
        "what it would have decided.",
    )
    p.add_argument("policy", metavar="POLICY", help="the .rules file")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--recording", metavar="FILE", help="series in the test-file format")
    source.add_argument("--prometheus", metavar="URL", help="a Prometheus to ask for ranges")
    p.add_argument("--rollout", metavar="NAMESPACE/NAME",
                   help="with --prometheus: stable is NAME, canary NAME-canary")
    p.add_argument("--from", dest="start", metavar="T", default=None,
                   help="start of the range (default -1h); a recording starts at its first sample")
    p.add_argument("--to", dest="end", metavar="T", default=None,
                   help="end of the range (default now); for a recording, a time from its "
                   "start such as 10m (default its last sample)")
    p.add_argument("--step", metavar="DURATION", default=None,
                   help="evaluation interval (default 30s; a recording's own interval)")
    p.add_argument("--window", metavar="DURATION", default="1m",
                   help="range of rate() and quantile queries (default 1m)")
    p.add_argument("--catalog", choices=["plain", "istio", "nginx"], default="plain",
                   help="which metric names the queries use (default plain)")
    p.add_argument("--weight", type=float, default=None, metavar="N",
                   help="the canary weight the policy sees (default 0)")
    p.add_argument("--json", action="store_true", help="print the verdicts as JSON")
    p.add_argument("--output", metavar="TEST.yaml", help="write a test file pinning the verdicts")
    # `--from -30m` would otherwise read as an unknown option: let a leading
    # minus followed by a digit be a value, as argparse does for negative numbers.
    if hasattr(p, "_negative_number_matcher"):
        p._negative_number_matcher = re.compile(r"^-\d[\d.]*[a-z]*(?:\d[\d.]*[a-z]+)*$")
    p.set_defaults(run=run)


# ---------------------------------------------------------------- the series


@dataclass
class History:
    """What to replay: samples by snapshot key, their spacing, and the ticks to evaluate."""

    series: dict[str, list[float | None]]
    interval: float  # spacing of the samples
    step: float  # evaluation interval
    until: float  # the last tick, from the start
    described: str  # where the series come from, for the header
    start: float | None = None  # epoch time of t = 0, when there is one
    context: dict[str, float] = field(default_factory=dict)


def run(args: argparse.Namespace) -> int:
    policy = _load_policy(args.policy)
    if args.recording is not None:
        history = _from_recording(args, policy)
    else:
        history = _from_prometheus(args, policy)
    if args.weight is not None:
        history.context["weight"] = args.weight
    result = replay(policy, history)
    if args.output is not None:
        _write_test(args.output, args.policy, policy, history, result)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print(render(policy, history, result, args.policy))
    if args.output is not None:
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


def _load_policy(path: str) -> CompiledPolicy:
    try:
        source = read_text(path)
    except FileProblem as e:
        raise UsageError(str(e)) from None
    try:
        return dsl.load(source, path)
    except dsl.PolicyError as e:
        print(e.render(), file=sys.stderr)
        raise UsageError(f"{path} has errors") from None


def _from_recording(args: argparse.Namespace, policy: CompiledPolicy) -> History:
    from adapters.metrics.replay import ReplaySource

    if args.start is not None or args.rollout is not None:
        raise UsageError("--from and --rollout go with --prometheus; a recording is replayed "
                         "from its first sample")
    try:
        data = load_yaml(args.recording).data
        recording = ReplaySource.from_recording(data if data is not None else {})
    except FileProblem as e:
        raise UsageError(str(e)) from None
    except (ValueError, TypeError) as e:
        raise UsageError(f"{args.recording}: {e}") from None
    series: dict[str, list[float | None]] = {
        f"{track}.{metric}": samples for (track, metric), samples in recording.series.items()
    }
    series.update(recording.context)
    readable = policy.metric_keys | policy.context_keys
    for name in sorted(set(series) - readable):
        print(f"note: {policy.path} does not read `{name}`; it is ignored", file=sys.stderr)
    interval = recording.interval
    step = _duration("--step", args.step) if args.step is not None else interval
    longest = max((len(s) for s in series.values()), default=1)
    until = _duration("--to", args.end) if args.end is not None else (longest - 1) * interval
    if until / step >= MAX_EVALUATIONS:
        raise UsageError(f"{format_duration(until)} every {format_duration(step)} is more than "
                         f"{MAX_EVALUATIONS} evaluations; use a larger --step or a shorter --to")
    kept = {k: v for k, v in series.items() if k in readable}
    return History(kept, interval, step, until, f"recording {args.recording}")


def _from_prometheus(args: argparse.Namespace, policy: CompiledPolicy) -> History:
    from adapters.metrics.catalog import catalog_for
    from adapters.metrics.prometheus import PrometheusError, SyncPrometheus
    from engine.ports import MetricRequest, Target

    namespace, name = _rollout(args.rollout)
    url = args.prometheus
    if not re.match(r"https?://[^/\s]", url):
        raise UsageError(f"--prometheus `{url}` is not a URL; write one such as "
                         "http://localhost:9090")
    now = time.time()
    end = parse_time("--to", args.end, now) if args.end is not None else now
    start = parse_time("--from", args.start, now) if args.start is not None else end - 3600
    step = _duration("--step", args.step) if args.step is not None else 30.0
    window = _duration("--window", args.window)
    if start >= end:
        raise UsageError(f"--from ({_when(start)}) must be before --to ({_when(end)})")
    points = math.floor((end - start) / step + 1e-9) + 1
    if points > MAX_POINTS:
        raise UsageError(f"{format_duration(end - start)} every {format_duration(step)} is "
                         f"{points} evaluations; Prometheus answers at most {MAX_POINTS}: use a "
                         "larger --step or a shorter range")
    defined = {d.name: d.template for d in policy.checked.definitions}
    requests: dict[str, MetricRequest] = {}
    for key in sorted(policy.metric_keys):
        track, metric = key.split(".", 1)
        workload = name if track == "stable" else f"{name}-canary"
        requests[key] = MetricRequest(
            Target(namespace, workload, track), metric, max(window, step), defined.get(metric)
        )
    try:
        prom = SyncPrometheus(url, catalog_for(args.catalog), evaluation_interval=step)
    except ValueError as e:
        raise UsageError(f"--prometheus: {e}") from None
    try:
        try:
            prom.query("vector(1)", end)
        except PrometheusError as e:
            raise UsageError(f"cannot query Prometheus at {url}: {_reason(str(e))}") from None
        with _query_failures() as failures:
            got = prom.fetch_range(start, end, step, list(requests.values()))
    finally:
        prom.close()
    series = {key: [v for _, v in got[req]] for key, req in requests.items()}
    span = f"from {_when(start)} to {_when(end)}"
    empty = [key for key, values in series.items() if all(v is None for v in values)]
    if series and len(empty) == len(series):
        why = f" ({failures[0]})" if failures else ""
        raise UsageError(f"no data for {', '.join(empty)} of {namespace}/{name} {span}"
                         f"{why}; check --rollout, --catalog and the range")
    for key in empty:
        print(f"note: no data for {key} {span}; it is unknown at every evaluation",
              file=sys.stderr)
    described = f"{url}, rollout {namespace}/{name} ({args.catalog} catalog)"
    return History(series, step, step, (points - 1) * step, described, start=start)


def _reason(message: str) -> str:
    """The heart of a client error: `connection refused`, not three lines of urllib3 repr."""
    lowered = message.lower()
    if "resolve" in lowered:
        return "cannot resolve its host name"
    if "timed out" in lowered or "timeout" in lowered:
        return "no answer in time"
    errno = re.search(r"\[Errno -?\d+\] ([^'\")]+)", message)
    if errno is not None:
        return errno.group(1).strip().lower()
    return message.splitlines()[0] if message else "no answer"


@contextmanager
def _query_failures() -> Iterator[list[str]]:
    """The warnings of failed queries while the block runs, to say why a range came back empty."""
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    logger = logging.getLogger("codedance.adapters.prometheus")
    handler = Keep(logging.WARNING)
    logger.addHandler(handler)
    try:
        yield seen
    finally:
        logger.removeHandler(handler)


def _rollout(text: str | None) -> tuple[str, str]:
    if text is None:
        raise UsageError("--prometheus needs --rollout NAMESPACE/NAME (the stable workload)")
    namespace, slash, name = text.partition("/")
    if not slash or not namespace or not name or "/" in name:
        raise UsageError(f"--rollout `{text}` is not NAMESPACE/NAME, such as shop/checkout")
    return namespace, name


def _duration(option: str, text: str) -> float:
    """A positive duration such as 30s or 1m30s (or plain seconds)."""
    try:
        seconds = float(text)
    except ValueError:
        try:
            seconds, dim, _ = parse_quantity(text.strip())
        except UnitError:
            dim = Dim.NUMBER
            seconds = math.nan
        if dim is not Dim.DURATION:
            seconds = math.nan
    if not math.isfinite(seconds) or seconds < 0 or (seconds == 0 and option != "--to"):
        raise UsageError(f"{option} `{text}` is not a duration; write one such as 30s or 1m30s")
    return seconds


def parse_time(option: str, text: str, now: float) -> float:
    """Epoch seconds from RFC 3339, epoch seconds, `now`, `-30m` or `now-30m`."""
    word = text.strip()
    if word == "now":
        return now
    relative = re.fullmatch(r"(?:now)?\s*-\s*(\S+)", word)
    if relative is not None:
        try:
            seconds, dim, _ = parse_quantity(relative.group(1))
        except UnitError:
            dim = Dim.NUMBER
        if dim is Dim.DURATION:
            return now - seconds
        raise UsageError(f"{option} `{text}` is not a time; {TIME_FORMATS}")
    try:
        epoch = float(word)
    except ValueError:
        pass
    else:
        if not math.isfinite(epoch) or epoch < 0:
            raise UsageError(f"{option} `{text}` is not a time; {TIME_FORMATS}")
        if epoch > 1e11:
            raise UsageError(f"{option} `{text}` looks like milliseconds; epoch times are "
                             "in seconds")
        return epoch
    try:
        parsed = datetime.fromisoformat(word)
    except ValueError:
        raise UsageError(f"{option} `{text}` is not a time; {TIME_FORMATS}") from None
    if parsed.tzinfo is None:
        raise UsageError(f"{option} `{text}` has no time zone; write it as RFC 3339 with Z or "
                         "an offset, such as 2024-05-01T12:00:00Z")
    return parsed.timestamp()


def _when(epoch: float) -> str:
    """An epoch time as RFC 3339 in UTC: `2024-05-01T12:00:00Z`."""
    moment = datetime.fromtimestamp(epoch, tz=UTC)
    spec = "seconds" if moment.microsecond == 0 else "milliseconds"
    return moment.isoformat(timespec=spec).replace("+00:00", "Z")


# ---------------------------------------------------------------- the replay


@dataclass(frozen=True, slots=True)
class Side:
    """What a rule's chart draws: an expression, and the literal or expression it meets."""

    node: ast.Expr
    op: str | None = None  # how `node` compares with its bound when the rule fires
    threshold: ast.Number | None = None
    against: ast.Expr | None = None


@dataclass(frozen=True, slots=True)
class ChartLine:
    """One rule's chart: its side, the side's value at every tick and its bound's (if moving)."""

    rule: str
    side: Side
    values: tuple[Value, ...]
    bound: tuple[Value, ...] = ()


@dataclass(frozen=True, slots=True)
class Result:
    verdicts: tuple[Verdict, ...]
    lines: tuple[ChartLine, ...]  # one per rule that has something to draw

    def changes(self) -> list[Verdict]:
        """The first verdict and each one whose action or rule differs from the one before."""
        out: list[Verdict] = []
        for v in self.verdicts:
            if not out or (v.action, v.rule) != (out[-1].action, out[-1].rule):
                out.append(v)
        return out

    def first_non_continue(self) -> Verdict | None:
        return next((v for v in self.verdicts if v.action is not Action.CONTINUE), None)

    def to_json(self) -> dict[str, Any]:
        first = self.first_non_continue()
        return {
            "verdicts": [_verdict_json(v) for v in self.changes()],
            "first_non_continue": None if first is None else _verdict_json(first),
        }


def _verdict_json(v: Verdict) -> dict[str, Any]:
    return {"at": v.at, "action": v.action.value, "rule": v.rule, "explanation": v.explanation}


class _Observed:
    """The policy as the timeline replays it, noting after each evaluation what the chart draws.

    It only watches: every evaluation is the policy's own, and the values come
    from `dsl.explain.value_of` on the snapshot and state of that evaluation,
    so a windowed expression shows the aggregate the rule compared.
    """

    def __init__(self, policy: CompiledPolicy, nodes: Sequence[ast.Expr]) -> None:
        self.policy = policy
        self.metric_keys = policy.metric_keys
        self.context_keys = policy.context_keys
        self.nodes = nodes
        self.values: list[list[Value]] = [[] for _ in nodes]

    def new_state(self) -> PolicyState:
        return self.policy.new_state()

    def evaluate(self, now: float, snapshot: Snapshot, state: PolicyState) -> Verdict:
        verdict = self.policy.evaluate(now, snapshot, state)
        for column, node in zip(self.values, self.nodes, strict=True):
            column.append(value_of(self.policy, node, snapshot, state))
        return verdict


def replay(policy: CompiledPolicy, history: History) -> Result:
    """Every verdict of the history, through `engine.timeline`, and what each rule's chart draws."""
    sides = [(r.label, chart_side(r.node.condition)) for r in policy.rules]
    drawn = [(label, side) for label, side in sides if side is not None]
    nodes: list[ast.Expr] = []
    for _, side in drawn:
        nodes += [side.node] if side.against is None else [side.node, side.against]
    observed = _Observed(policy, nodes)
    verdicts = tuple(
        iter_replay(
            cast(CompiledPolicy, observed), history.series, history.interval, history.step,
            history.until, history.context,
        )
    )
    columns = iter(observed.values)
    lines = []
    for label, side in drawn:
        values = tuple(next(columns))
        bound = tuple(next(columns)) if side.against is not None else ()
        lines.append(ChartLine(label, side, values, bound))
    return Result(verdicts, tuple(lines))


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
    from dsl.builtins import CONTEXT

    return any(
        isinstance(n, ast.Ref) and not (n.track is None and n.name in CONTEXT) for n in _walk(node)
    )


def _is_guard(node: ast.Expr) -> bool:
    return isinstance(node, ast.Ref) and node.name == "request_rate"


# ---------------------------------------------------------------- the text


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
        + (f" ({_when(history.start)} to {_when(history.start + history.until)})"
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
            when += f"  {_when(history.start + at)}"
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


def _write_test(
    output: str, policy_path: str, policy: CompiledPolicy, history: History, result: Result
) -> None:
    """A policy test of the history whose expectations are the verdicts the backtest gave."""
    base = os.path.dirname(os.path.abspath(output))
    rule_file = os.path.relpath(os.path.abspath(policy_path), base)
    verdicts = result.verdicts
    changes = result.changes()
    # Pin each change, the tick before it (so it cannot come earlier), and the last tick.
    expected: dict[int, str] = {}
    for v in changes:
        i = _index(history, v.at)
        expected[i] = "changes"
        if i > 0:
            expected.setdefault(i - 1, "the last tick before the change")
    expected.setdefault(len(verdicts) - 1, "the last tick")
    lines = [f"# Written by `codedance backtest` on {_when(round(time.time()))},"]
    lines.append(f"# from {history.described}.")
    if history.start is not None:
        end = history.start + history.until
        lines.append(f"# ({_when(history.start)} to {_when(end)}; t = 0 is the first time).")
    lines += [
        f"# The expectations are the verdicts {policy_path} gave on these series. Rename",
        "# the test, and trim the series and expectations to the regression to keep.",
        f"rule_files: [{json.dumps(rule_file)}]",
        f"evaluation_interval: {_duration_text(history.step)}",
        "tests:",
        f"  - name: {json.dumps('backtest of ' + history.described)}",
        f"    interval: {_duration_text(history.interval)}",
    ]
    context = {k: v for k, v in history.context.items() if k in policy.context_keys}
    if context:
        pairs = ", ".join(f"{k}: {_sample_text(v)}" for k, v in sorted(context.items()))
        lines.append(f"    context: {{{pairs}}}")
    lines.append("    input_series:")
    for key, samples in sorted(history.series.items()):
        lines.append(f"      - {{series: {key}, values: {json.dumps(series_text(samples))}}}")
    if not history.series:
        lines[-1] = "    input_series: []"
    lines.append("    expect:")
    for i in sorted(expected):
        v = verdicts[i]
        entry = f"at: {_duration_text(v.at)}, action: {v.action.value}"
        if v.rule is not None:
            entry += f", rule: {json.dumps(v.rule)}"
        lines.append(f"      - {{{entry}}}   # {v.explanation}")
    try:
        with open(output, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    except OSError as e:
        raise UsageError(f"{output}: cannot write: {e.strerror or e}") from None


def _index(history: History, at: float) -> int:
    return round(at / history.step)


def series_text(samples: Sequence[float | None]) -> str:
    """Samples in promtool's notation, runs of one value written once: `0.1x3 _ 0.5`."""
    words: list[str] = []
    i = 0
    while i < len(samples):
        j = i
        while j + 1 < len(samples) and samples[j + 1] == samples[i]:
            j += 1
        word = "_" if samples[i] is None else _sample_text(cast(float, samples[i]))
        words.append(word if j == i else f"{word}x{j - i}")
        i = j + 1
    return " ".join(words)


def _sample_text(value: float) -> str:
    """The exact float as text: `20`, `0.1`, `1e-05` (repr round-trips)."""
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def _duration_text(seconds: float) -> str:
    """A duration the test file reads back as the same tick: `2m30s`, or exact seconds."""
    text = format_duration(seconds)
    try:
        back, _, _ = parse_quantity(text)
    except UnitError:
        back = math.nan
    if abs(back - seconds) <= 1e-9 * max(1.0, seconds):
        return text
    return f"{_sample_text(seconds)}s"
