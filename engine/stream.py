"""Metric streams: fetched samples in, snapshots at tick t out.

One `MetricStream` per rollout keeps timestamped samples per snapshot key
(`canary.p99`, `stable.error_rate`), bounded by the longest window of the
policy so memory stays flat however long a rollout runs. A failed or empty
query is recorded as None at its tick: the snapshot shows unknown, never the
previous value or a default number. The same history feeds a restarted
controller (backfilled from a range query and replayed through the policy)
and the status display.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping


class MetricStream:
    __slots__ = ("horizon", "samples")

    def __init__(self, keys: Iterable[str], horizon: float) -> None:
        self.horizon = horizon
        self.samples: dict[str, deque[tuple[float, float | None]]] = {k: deque() for k in keys}

    def record(self, t: float, values: Mapping[str, float | None]) -> None:
        """Record one tick: every key of the stream gets a sample, None if it has no value."""
        cutoff = t - self.horizon
        for key, samples in self.samples.items():
            samples.append((t, values.get(key)))
            while samples[0][0] < cutoff:
                samples.popleft()

    def snapshot(self, t: float) -> dict[str, float | None]:
        """The values recorded at tick t; a key with no sample at t is unknown."""
        out: dict[str, float | None] = {}
        for key, samples in self.samples.items():
            out[key] = samples[-1][1] if samples and samples[-1][0] == t else None
        return out

    def history(self, key: str) -> list[tuple[float, float | None]]:
        return list(self.samples.get(key, ()))

    def ticks(self) -> list[float]:
        """Every tick time recorded, oldest first."""
        times: set[float] = set()
        for samples in self.samples.values():
            times.update(t for t, _ in samples)
        return sorted(times)
