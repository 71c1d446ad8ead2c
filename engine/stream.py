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
    """The snapshots of one rollout's recent ticks, oldest first.

    One entry per tick (not per key), so recording costs the same however many
    metrics the policy reads.
    """

    __slots__ = ("horizon", "keys", "ticks_")

    def __init__(self, keys: Iterable[str], horizon: float) -> None:
        self.horizon = horizon
        self.keys = tuple(keys)
        self.ticks_: deque[tuple[float, Mapping[str, float | None]]] = deque()

    def record(self, t: float, values: Mapping[str, float | None]) -> None:
        """Record one tick's values; a key without a value is unknown at that tick."""
        ticks = self.ticks_
        ticks.append((t, values))
        cutoff = t - self.horizon
        while ticks[0][0] < cutoff:
            ticks.popleft()

    def snapshot(self, t: float) -> dict[str, float | None]:
        """The values recorded at tick t; every key is unknown at a tick not recorded."""
        if self.ticks_ and self.ticks_[-1][0] == t:
            values = self.ticks_[-1][1]
            return {k: values.get(k) for k in self.keys}
        return dict.fromkeys(self.keys)

    def history(self, key: str) -> list[tuple[float, float | None]]:
        return [(t, values.get(key)) for t, values in self.ticks_]

    def ticks(self) -> list[float]:
        """Every tick time recorded, oldest first."""
        return [t for t, _ in self.ticks_]
