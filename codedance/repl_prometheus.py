"""`:query` and `:pull`: the REPL asking the Prometheus it was started with.

In: the session (its `prometheus`, its `rollout` and `canary` workloads, its
wall `clock`, its policy and interval) and the command's arguments. Out:
`:query PROMQL` prints each series of an instant query with its labels and
value; `:pull KEY RANGE` asks for the last RANGE of a metric, with the query
the live loop would make (the catalog's, or the policy's own `metric`
definition), one sample every interval, and makes it the metric's series
from the next evaluation on. A server that cannot be reached or refuses is
one line naming the URL and the reason.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

from codedance.repl_commands import ReplError, count, duration
from codedance.repl_values import SeriesInput
from dsl.ast import Dim
from dsl.builtins import CONTEXT
from dsl.units import format_duration, format_value

if TYPE_CHECKING:
    from adapters.metrics.prometheus import SyncPrometheus
    from codedance.repl_session import Session
    from engine.ports import Target

MAX_PULL_SAMPLES = 11_000  # Prometheus refuses longer ranges
_SHOWN_SERIES = 50


def query(session: Session, args: str) -> str:
    """`:query PROMQL`: an instant query now, one line per series."""
    from adapters.metrics.prometheus import PrometheusError

    prom = _prometheus(session, ":query")
    if not args:
        raise ReplError("write `:query PROMQL`, such as `:query up`")
    try:
        series = prom.query(args, session.clock())
    except PrometheusError as e:
        raise ReplError(_problem(prom, e)) from None
    if not series:
        return "no series"
    lines = []
    for s in series[:_SHOWN_SERIES]:
        labels = ", ".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
        value = s.points[-1][1] if s.points else None
        lines.append(f"{{{labels}}}  {format_value(value, Dim.NUMBER)}")
    if len(series) > _SHOWN_SERIES:
        lines.append(f"... and {len(series) - _SHOWN_SERIES} more series")
    return "\n".join(lines)


def pull(session: Session, args: str) -> str:
    """`:pull KEY RANGE`: the last RANGE of a metric becomes its series."""
    given = args.split()
    if len(given) != 2:
        raise ReplError("write `:pull KEY RANGE`, such as `:pull canary.p99 30m`")
    key, _ = session.key(given[0])
    if key in CONTEXT:
        raise ReplError(f"`{key}` is a value of the rollout, not a metric; set it with `=`")
    seconds = duration(given[1], "a range")
    step = session.interval
    if seconds / step + 1 > MAX_PULL_SAMPLES:
        raise ReplError(
            f"{given[1]} every {format_duration(step)} is more than {MAX_PULL_SAMPLES} "
            "samples; pull a shorter range or set a longer `:interval`"
        )
    prom = _prometheus(session, ":pull")
    samples, query_text = _samples(session, prom, key, seconds, step)
    if all(v is None for v in samples):
        raise ReplError(
            f"Prometheus has no samples of {key} in the last {given[1]} ({query_text})"
        )
    start = session.next_time()
    session.inputs[key] = SeriesInput(tuple(samples), start, f"Prometheus, last {given[1]}")
    missing = sum(v is None for v in samples)
    return (
        f"{key}: {count(len(samples), 'sample')} every {format_duration(step)} from "
        f"Prometheus ({missing} missing), from t={format_duration(start)}"
    )


def _prometheus(session: Session, command: str) -> SyncPrometheus:
    if session.prometheus is None:
        raise ReplError(f"`{command}` needs a Prometheus: start the REPL with --prometheus URL")
    return session.prometheus


def _samples(
    session: Session, prom: SyncPrometheus, key: str, seconds: float, step: float
) -> tuple[list[float | None], str]:
    """One sample (or None) every step over the last `seconds`, and the query that asked."""
    from adapters.metrics.prometheus import PrometheusError, distribute
    from engine.ports import MetricRequest, range_times

    track, metric = key.split(".", 1)
    defined = {d.name: d.template for d in session.policy.checked.definitions}
    if metric not in defined and metric not in prom.planner.catalog:
        raise ReplError(f"the metric catalog has no query for `{metric}`")
    request = MetricRequest(_target(session, track), metric, max(60.0, step), defined.get(metric))
    plan = prom.planner.plan([request], interval=step)
    if not plan.queries:
        raise ReplError(f"no query can be made for {key} of {request.target.workload}")
    planned = plan.queries[0]
    end = math.floor(session.clock() / step) * step
    times = range_times(end - seconds, end, step)
    try:
        series = prom.query_range(planned.text, times[0], times[-1], step)
    except PrometheusError as e:
        raise ReplError(_problem(prom, e)) from None
    by_index: dict[int, float | None] = {}
    for t, v in distribute(planned, series).get(request, ()):
        i = round((t - times[0]) / step)
        if 0 <= i < len(times) and abs(times[i] - t) <= 0.002:  # Prometheus keeps ms
            by_index[i] = v
    return [by_index.get(i) for i in range(len(times))], _one_line(planned.text)[:160]


def _target(session: Session, track: str) -> Target:
    from engine.ports import Target

    if session.rollout is None:
        raise ReplError("`:pull` needs the workload: start the REPL with --rollout NS/NAME")
    namespace, workload = session.rollout
    if track == "canary":
        return Target(namespace, session.canary or f"{workload}-canary", "canary")
    return Target(namespace, workload, "stable")


def _problem(prom: SyncPrometheus, error: Exception) -> str:
    """One line: the connection's reason without the HTTP library's wrapping, or the server's."""
    text = " ".join(str(error).split())
    prefix = "cannot reach Prometheus: "
    if not text.startswith(prefix):
        return f"Prometheus: {text[:200]}"
    m = re.search(r"\[Errno -?\d+\] ([^\"')]+)", text) or re.search(r"(\w+ timed out)", text)
    if m is not None:
        reason = m.group(1).strip()
    elif "Pool(" not in text:
        reason = text[len(prefix) :][:120]
    else:
        reason = "no connection"
    return f"cannot reach Prometheus at {prom.base_url}: {reason}"


def _one_line(text: str) -> str:
    return " ".join(text.split())[:300]
