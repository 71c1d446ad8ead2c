"""The names a policy can use without defining them (LANGUAGE.md sections 2-4).

In: nothing. Out: tables the checker, compiler, formatter and tools read, so
that one place knows every built-in metric, context value, function, action
and track.
"""

from __future__ import annotations

from dataclasses import dataclass

from dsl.ast import Action, Dim

TRACKS = ("canary", "stable")
DEFAULT_TRACK = "canary"


@dataclass(frozen=True, slots=True)
class MetricInfo:
    dim: Dim
    meaning: str


METRICS: dict[str, MetricInfo] = {
    "p50": MetricInfo(Dim.DURATION, "median request latency"),
    "p90": MetricInfo(Dim.DURATION, "90th percentile request latency"),
    "p99": MetricInfo(Dim.DURATION, "99th percentile request latency"),
    "success_rate": MetricInfo(Dim.RATIO, "share of 2xx responses"),
    "error_rate": MetricInfo(Dim.RATIO, "share of 5xx responses"),
    "request_rate": MetricInfo(Dim.RATE, "requests per second"),
    "ready_pods": MetricInfo(Dim.COUNT, "ready pods of the track"),
    "not_ready_pods": MetricInfo(Dim.COUNT, "pods of the track that are not ready"),
    "failed_pods": MetricInfo(Dim.COUNT, "failed pods of the track"),
    "restarts": MetricInfo(Dim.COUNT, "container restarts so far (use increase)"),
    "cpu": MetricInfo(Dim.CORES, "CPU usage in cores"),
    "memory": MetricInfo(Dim.BYTES, "working-set memory"),
}

CONTEXT: dict[str, MetricInfo] = {
    "weight": MetricInfo(Dim.NUMBER, "current canary weight, 0 to 100"),
    "step": MetricInfo(Dim.NUMBER, "index of the current step, 0-based"),
    "elapsed": MetricInfo(Dim.DURATION, "time since the rollout started"),
    "step_elapsed": MetricInfo(Dim.DURATION, "time since the current step started"),
}

# Units a `metric NAME = promql `...` as UNIT` definition may declare.
UNIT_NAMES: dict[str, Dim] = {
    "duration": Dim.DURATION,
    "ratio": Dim.RATIO,
    "count": Dim.COUNT,
    "per_second": Dim.RATE,
    "bytes": Dim.BYTES,
    "cores": Dim.CORES,
    "number": Dim.NUMBER,
}


@dataclass(frozen=True, slots=True)
class FunctionInfo:
    """`windowed` functions take (value, window); `count` takes a condition."""

    arity: int
    windowed: bool
    takes_condition: bool
    signature: str
    meaning: str


FUNCTIONS: dict[str, FunctionInfo] = {
    "avg": FunctionInfo(2, True, False, "avg(x, window)", "mean of the known values"),
    "min": FunctionInfo(2, True, False, "min(x, window)", "smallest known value"),
    "max": FunctionInfo(2, True, False, "max(x, window)", "largest known value"),
    "delta": FunctionInfo(2, True, False, "delta(x, window)", "newest minus oldest known value"),
    "increase": FunctionInfo(
        2, True, False, "increase(x, window)", "rise of a counter, counting resets"
    ),
    "count": FunctionInfo(
        2, True, True, "count(condition, window)", "evaluations where the condition was true"
    ),
    "absent": FunctionInfo(1, False, False, "absent(x)", "true when x has no value"),
    "abs": FunctionInfo(1, False, False, "abs(x)", "absolute value"),
}

ACTIONS: dict[str, Action] = {a.value: a for a in Action}

# Windows are kept in memory per rollout; these bounds keep that memory small.
MAX_WINDOW_SECONDS = 24 * 3600.0
MAX_LAST_N = 10_000
