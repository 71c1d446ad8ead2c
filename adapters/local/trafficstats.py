"""What a local proxy saw, per track, as the engine's `MetricSource`.

In: one record per proxied request attempt (when it completed, its track,
its latency in seconds, its status code or None when the upstream could not
be reached), from the built-in proxy or from nginx's access log. Out:
`fetch(at, requests)` answering p50, p90, p99, success_rate, error_rate and
request_rate of a track over the request's window ending at `at`: the view a
service mesh's sidecars give a cluster, here shared by both local routers.

Quantiles are exact sample quantiles of the latencies recorded in the window
(linear interpolation between the two nearest order statistics, numpy's
default and `statistics.quantiles(..., method="inclusive")`), not the bucket
interpolation Prometheus' `histogram_quantile` does. Attempts that never
reached the upstream have no latency worth ranking (a refused connection is
instant) and count only in the ratios.

A window without a single record answers None (unknown) for every metric: a
ratio of nothing is not 0, and a track that saw no traffic is not known to be
healthy. Metrics the proxy cannot see (pods, CPU, a policy's own PromQL) are
left out of the answer, so another source or "unknown" covers them. Answers
depend on the track alone: one `TrafficStats` belongs to one proxied service.

Records older than `horizon` seconds are dropped as new ones arrive, so memory
is bounded by horizon times the request rate; a window reaching further back
than the horizon sees the horizon only (keep the horizon at least as long as
the longest window a policy uses).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from engine.ports import MetricRequest, MetricValues, range_times

TRACKS = ("canary", "stable")

QUANTILES = {"p50": 0.5, "p90": 0.9, "p99": 0.99}
RATIOS = ("success_rate", "error_rate", "request_rate")
SERVED = frozenset(QUANTILES) | frozenset(RATIOS)


class Now(Protocol):
    """The part of the engine's `Clock` the stats read: seconds, never going back."""

    def now(self) -> float: ...


@dataclass(slots=True)
class _Track:
    """Records of one track, ordered by completion time (parallel lists for bisect)."""

    times: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    statuses: list[int | None] = field(default_factory=list)

    def add(self, at: float, latency: float, status: int | None) -> None:
        if not self.times or at >= self.times[-1]:
            i = len(self.times)
        else:
            # an access log line can land a hair after a newer one; keep the order
            i = bisect.bisect_right(self.times, at)
        self.times.insert(i, at)
        self.latencies.insert(i, latency)
        self.statuses.insert(i, status)

    def drop_before(self, t: float) -> None:
        i = bisect.bisect_left(self.times, t)
        if i:
            del self.times[:i], self.latencies[:i], self.statuses[:i]

    def span(self, start: float, end: float) -> slice:
        """The records completed in (start, end]."""
        return slice(bisect.bisect_right(self.times, start), bisect.bisect_right(self.times, end))


def sample_quantile(values: Sequence[float], q: float) -> float:
    """The q-quantile of `values` (sorted), interpolating linearly between order statistics."""
    if not values:
        raise ValueError("the quantile of no values")
    pos = q * (len(values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


class TrafficStats:
    """Per-track request records and the metrics computed from them.

    Usage::

        stats = TrafficStats(clock)
        stats.record("canary", latency=0.012, status=200)
        values = await stats.fetch(clock.now(), requests)
    """

    def __init__(self, clock: Now, horizon: float = 300.0) -> None:
        if not horizon > 0:
            raise ValueError(f"the horizon must be positive, not {horizon}")
        self.clock = clock
        self.horizon = horizon
        self._tracks = {track: _Track() for track in TRACKS}

    def record(
        self, track: str, latency: float, status: int | None, at: float | None = None
    ) -> None:
        """One request attempt of `track` that completed at `at` (default: now).

        `status` is the HTTP status code, or None when the upstream could not be
        reached or dropped the connection before answering.
        """
        if track not in self._tracks:
            raise ValueError(f"unknown track {track!r} (tracks: {', '.join(TRACKS)})")
        now = self.clock.now()
        when = now if at is None else at
        records = self._tracks[track]
        records.add(when, max(0.0, latency), status)
        # trim in batches (a quarter horizon at a time), not one record per request
        if records.times[0] < now - 1.25 * self.horizon:
            records.drop_before(now - self.horizon)

    def count(self, track: str) -> int:
        """Records of `track` still held (within the horizon)."""
        return len(self._tracks[track].times)

    def value(self, track: str, metric: str, window: float, at: float) -> float | None:
        """`metric` of `track` over (at - window, at]; None when no request completed then."""
        records = self._tracks.get(track)
        if records is None or metric not in SERVED or not window > 0:
            return None
        # records past the horizon may or may not be trimmed yet: never count them
        span = records.span(max(at - window, self.clock.now() - self.horizon), at)
        statuses = records.statuses[span]
        total = len(statuses)
        if total == 0:
            return None
        if metric == "request_rate":
            return total / window
        if metric == "success_rate":
            return sum(1 for s in statuses if s is not None and 200 <= s < 300) / total
        if metric == "error_rate":
            return sum(1 for s in statuses if s is None or s >= 500) / total
        answered = sorted(
            lat for lat, s in zip(records.latencies[span], statuses, strict=True) if s is not None
        )
        if not answered:
            return None
        return sample_quantile(answered, QUANTILES[metric])

    @staticmethod
    def serves(request: MetricRequest) -> bool:
        """True for a built-in metric of a known track, the ones a proxy can measure."""
        return (
            request.template is None and request.metric in SERVED and request.target.track in TRACKS
        )

    async def fetch(self, at: float, requests: Sequence[MetricRequest]) -> MetricValues:
        return {
            req: self.value(req.target.track, req.metric, req.window, at)
            for req in requests
            if self.serves(req)
        }

    async def fetch_range(
        self, start: float, end: float, step: float, requests: Sequence[MetricRequest]
    ) -> Mapping[MetricRequest, list[tuple[float, float | None]]]:
        times = range_times(start, end, step)
        return {
            req: [(t, self.value(req.target.track, req.metric, req.window, t)) for t in times]
            for req in requests
            if self.serves(req)
        }
