"""Metric sources: the engine's `MetricSource` port over the outside world.

- `catalog`: the built-in metrics' PromQL templates per traffic provider
  (Istio, NGINX Ingress, plain instrumentation), with operator overrides.
- `prometheus`: the one Prometheus module, an asyncio source that batches the
  requests of every rollout due at a tick into one query per metric, and a
  small synchronous facade for the tools.
- `replay`: recorded series (promtool notation) as a source, for local runs,
  demos and tests.

`range_times` is the one definition of the time grid a range fetch answers
on, so every source hands the loop the same timestamps for the same range.
"""

from __future__ import annotations

import math


def range_times(start: float, end: float, step: float) -> list[float]:
    """The times start, start + step, ... up to end (within a hair), as a range query has them.

    When start is a whole number of steps, each time is computed as k * step
    (never a running sum), the same floats the engine's tick times are.
    """
    if not step > 0 or not math.isfinite(step):
        raise ValueError(f"the step of a range must be a positive number, not {step}")
    start, end, step = float(start), float(end), float(step)
    if end < start:
        return []
    count = math.floor((end - start) / step + 1e-9) + 1
    first = start / step
    if abs(first - round(first)) <= 1e-9 * max(1.0, abs(first)):
        k0 = round(first)
        return [(k0 + i) * step for i in range(count)]
    return [start + i * step for i in range(count)]
