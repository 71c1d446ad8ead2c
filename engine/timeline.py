"""Replaying recorded series through a policy: series in, one verdict per tick out.

In: a `CompiledPolicy`, series of samples keyed by name (`canary.p99`,
`stable.error_rate`, a bare `p99` for `canary.p99`, or a context name such as
`weight`), the spacing of their samples, the evaluation interval and the last
time to evaluate. Out: the verdicts of the evaluations at 0, ei, 2ei, ...

This is the one place that turns recorded series into verdicts, so that a
policy test, a backtest and a replayed rollout decide alike. It is pure: no
clock, no I/O; the policy's state lives and dies inside one call.

At each tick t the snapshot holds each series' value at t (`dsl.series.value_at`),
`None` for every metric the policy reads that has no series (unknown, as a
failed query would be), and the context values: weight 0, step 0, elapsed =
step_elapsed = t unless `context` or a series of that name says otherwise
(a series wins over a constant).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

from dsl.builtins import CONTEXT, DEFAULT_TRACK
from dsl.compile import CompiledPolicy
from dsl.runtime import Verdict
from dsl.series import value_at

Series = Sequence[float | None]


def series_key(name: str) -> str:
    """The snapshot key a series name stands for: `p99` -> `canary.p99`, `weight` -> `weight`."""
    if name in CONTEXT or "." in name:
        return name
    return f"{DEFAULT_TRACK}.{name}"


def tick_times(evaluation_interval: float, until: float) -> list[float]:
    """The evaluation times 0, ei, 2ei, ... up to and including `until`.

    Each time is k * ei from an integer k (never a running sum, whose error
    grows with every tick), and `until` is reached within a hair, so that
    `until = 0.3` with `ei = 0.1` includes the tick 0.30000000000000004.
    """
    if not evaluation_interval > 0:
        raise ValueError(f"the evaluation interval must be positive, not {evaluation_interval}")
    if until < 0:
        return []
    q = until / evaluation_interval
    last = math.floor(q + 1e-9 * max(1.0, q))
    return [k * evaluation_interval for k in range(last + 1)]


def snapshot_at(
    policy: CompiledPolicy,
    series: Mapping[str, Series],
    interval: float,
    t: float,
    context: Mapping[str, float] | None = None,
) -> dict[str, float | None]:
    """What the policy sees at time t: metric and context values, `None` for unknown."""
    snapshot: dict[str, float | None] = dict.fromkeys(policy.metric_keys)
    snapshot.update({"weight": 0.0, "step": 0.0, "elapsed": t, "step_elapsed": t})
    if context:
        snapshot.update(context)
    for name, samples in series.items():
        snapshot[series_key(name)] = value_at(samples, interval, t)
    return snapshot


def iter_replay(
    policy: CompiledPolicy,
    series: Mapping[str, Series],
    interval: float,
    evaluation_interval: float,
    until: float,
    context: Mapping[str, float] | None = None,
) -> Iterator[Verdict]:
    """The verdicts one by one, for callers that stop early or replay long ranges."""
    _check_keys(series)
    state = policy.new_state()
    for t in tick_times(evaluation_interval, until):
        yield policy.evaluate(t, snapshot_at(policy, series, interval, t, context), state)


def replay(
    policy: CompiledPolicy,
    series: Mapping[str, Series],
    interval: float,
    evaluation_interval: float,
    until: float,
    context: Mapping[str, float] | None = None,
) -> list[Verdict]:
    """The verdict of every evaluation at 0, ei, 2ei, ... <= until."""
    return list(iter_replay(policy, series, interval, evaluation_interval, until, context))


def _check_keys(series: Mapping[str, Series]) -> None:
    """Two names for one key (`p99` and `canary.p99`) would silently shadow each other."""
    seen: dict[str, str] = {}
    for name in series:
        key = series_key(name)
        if key in seen:
            raise ValueError(f"the series `{seen[key]}` and `{name}` are both {key}")
        seen[key] = name
