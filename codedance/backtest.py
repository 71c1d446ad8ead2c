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
test` passes as written. This module reads the sources and replays them;
`backtest_report` turns the `Result` into that text.

Exit 0 when the backtest ran, whatever it decided; 2 for bad input (a policy
with errors, an unreadable recording, an unreachable Prometheus, a range
with no data, a time that is not one), with a one-line reason.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

from codedance.backtest_report import Side, chart_side, pinning_test, render, rfc3339
from codedance.policy_files import FileProblem, UsageError, load_policy, load_yaml
from dsl import ast
from dsl.ast import Action, Dim
from dsl.compile import CompiledPolicy
from dsl.explain import value_of
from dsl.runtime import PolicyState, Snapshot, Value, Verdict
from dsl.units import UnitError, format_duration, parse_quantity
from engine.timeline import iter_replay

# Prometheus answers at most 11,000 points per series in a range query.
MAX_POINTS = 11_000
# A recording replays every tick; a typo such as `--to 400d` must not run for minutes.
MAX_EVALUATIONS = 1_000_000
TIME_FORMATS = (
    "write RFC 3339 (2024-05-01T12:00:00Z), epoch seconds (1714564800) "
    "or a time relative to now (-30m, now-2h, now)"
)


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
    return load_policy(path)


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
        raise UsageError(f"--from ({rfc3339(start)}) must be before --to ({rfc3339(end)})")
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
    span = f"from {rfc3339(start)} to {rfc3339(end)}"
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
        literal = _literal_seconds(text.strip())
        seconds = math.nan if literal is None else literal
    if not math.isfinite(seconds) or seconds < 0 or (seconds == 0 and option != "--to"):
        raise UsageError(f"{option} `{text}` is not a duration; write one such as 30s or 1m30s")
    return seconds


def _literal_seconds(text: str) -> float | None:
    """The seconds of a duration literal of the language (`30s`, `1m30s`); None for another."""
    try:
        seconds, dim, _ = parse_quantity(text)
    except UnitError:
        return None
    return seconds if dim is Dim.DURATION else None


def parse_time(option: str, text: str, now: float) -> float:
    """Epoch seconds from RFC 3339, epoch seconds, `now`, `-30m` or `now-30m`."""
    word = text.strip()
    if word == "now":
        return now
    relative = re.fullmatch(r"(?:now)?\s*-\s*(\S+)", word)
    if relative is not None:
        seconds = _literal_seconds(relative.group(1))
        if seconds is not None:
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


# ---------------------------------------------------------------- the replay


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


def _write_test(
    output: str, policy_path: str, policy: CompiledPolicy, history: History, result: Result
) -> None:
    """A policy test of the history whose expectations are the verdicts the backtest gave."""
    text = pinning_test(output, policy_path, policy, history, result)
    try:
        with open(output, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as e:
        raise UsageError(f"{output}: cannot write: {e.strerror or e}") from None
