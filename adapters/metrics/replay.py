"""Recorded series as a metric source, for local runs, demos, backtests of a recording and tests.

In: series by name in promtool's notation (`canary.p99: "0.1x3 0.5x10"`; a
bare `p99` means `canary.p99`, as in a policy), the spacing of their samples,
and the epoch time at which sample 0 sits. Out: the engine's `MetricSource`:
`fetch(at, requests)` answers each request with its track's series at
`at - start` (`dsl.series.value_at`: the newest sample at or before then, None
after a `_` or before the first sample), `fetch_range` the same at every step.

Answers depend on a request's track and metric only, so any number of
rollouts can share one source and see the same recording. To give one
workload a series of its own, pass `workloads={(namespace, workload): {metric:
values}}`; its series win over the shared ones for that workload's requests.

`ReplaySource.from_recording(data)` reads the recording format, the YAML of a
policy test's series::

    interval: 30s
    input_series:
      - {series: canary.p99, values: "0.1x3 0.5x10"}
      - {series: stable.p99, values: "0.1x13"}

Context series of a test (`weight`, `step`, ...) are kept in `context`: the
loop takes those from the rollout, never from a metric source.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dsl.builtins import CONTEXT, DEFAULT_TRACK, TRACKS
from dsl.series import SeriesError, parse_series, value_at
from dsl.units import closest
from engine.policytest import InputSeries, PositiveDuration
from engine.ports import MetricRequest, MetricValues, range_times

Samples = list[float | None]
SeriesValues = str | Sequence[float | None]

_METRIC = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class Recording(BaseModel):
    """The recording format: a sample interval and promtool-notation series."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = None
    interval: PositiveDuration = Field(default=60.0, description="spacing of the samples")
    input_series: list[InputSeries] = Field(default_factory=list)


def _samples(name: str, values: SeriesValues) -> Samples:
    if isinstance(values, str):
        try:
            return parse_series(values)
        except SeriesError as e:
            raise ValueError(f"series `{name}`: {e}") from None
    return [None if v is None else float(v) for v in values]


def _metric_name(name: str, where: str) -> str:
    if not _METRIC.fullmatch(name):
        raise ValueError(f"{where}`{name}` is not a metric name")
    return name


def _key(name: str) -> tuple[str, str]:
    """`canary.p99` -> ("canary", "p99"); a bare `p99` is the canary's."""
    track, dot, metric = name.rpartition(".")
    if not dot:
        return DEFAULT_TRACK, _metric_name(name, "")
    if track not in TRACKS:
        near = closest(track, TRACKS)
        hint = f"; did you mean `{near}.{metric}`?" if near else f" (tracks: {', '.join(TRACKS)})"
        raise ValueError(f"`{name}` names no track{hint}")
    return track, _metric_name(metric, f"in `{name}`, ")


_UNSEEN: Any = object()


class ReplaySource:
    """A MetricSource that plays back recorded series.

    source = ReplaySource({"canary.p99": "0.1x3 0.5x10", "stable.p99": "0.1x13"},
                          interval=30, start=1_700_000_000)
    await source.fetch(1_700_000_090, requests)   # canary.p99 -> 0.1, then 0.5 from +120s
    """

    def __init__(
        self,
        series: Mapping[str, SeriesValues],
        interval: float,
        start: float = 0.0,
        *,
        workloads: Mapping[tuple[str, str], Mapping[str, SeriesValues]] | None = None,
    ) -> None:
        if not interval > 0:
            raise ValueError(f"the sample interval must be positive, not {interval}")
        self.interval = float(interval)
        self.start = float(start)
        # which series answers a request: requests repeat every tick, so remember it
        self._memo: dict[MetricRequest, Sequence[float | None] | None] = {}
        self.series: dict[tuple[str, str], Samples] = {}
        self.context: dict[str, Samples] = {}
        seen: dict[tuple[str, str], str] = {}
        for name, values in series.items():
            if name in CONTEXT:
                self.context[name] = _samples(name, values)
                continue
            key = _key(name)
            if key in seen:
                raise ValueError(f"`{name}` is the same series as `{seen[key]}`")
            seen[key] = name
            self.series[key] = _samples(name, values)
        self.workloads: dict[tuple[str, str], dict[str, Samples]] = {
            (namespace, workload): {
                _metric_name(metric, f"for {namespace}/{workload}, "): _samples(metric, values)
                for metric, values in by_metric.items()
            }
            for (namespace, workload), by_metric in (workloads or {}).items()
        }

    @classmethod
    def from_recording(cls, data: Mapping[str, Any], start: float = 0.0) -> ReplaySource:
        """A source from the YAML-decoded recording format; ValueError saying what is wrong."""
        try:
            recording = Recording.model_validate(data)
        except ValidationError as e:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'recording'}: {err['msg']}"
                for err in e.errors()
            )
            raise ValueError(f"not a recording: {problems}") from None
        return cls({s.series: s.values for s in recording.input_series}, recording.interval, start)

    def __repr__(self) -> str:
        names = sorted(f"{track}.{metric}" for track, metric in self.series)
        return f"ReplaySource({names}, interval={self.interval:g}, start={self.start:g})"

    def _samples(self, request: MetricRequest) -> Sequence[float | None] | None:
        target = request.target
        own = self.workloads.get((target.namespace, target.workload))
        samples = own.get(request.metric) if own is not None else None
        if samples is None:
            samples = self.series.get((target.track, request.metric))
        return samples

    def value(self, request: MetricRequest, at: float) -> float | None:
        """The recorded value for `request` at epoch time `at`, None when there is none."""
        samples = self._samples(request)
        if samples is None:
            return None
        return value_at(samples, self.interval, at - self.start)

    async def fetch(self, at: float, requests: Sequence[MetricRequest]) -> MetricValues:
        # Many rollouts read the same recorded series: look each one up once per tick.
        seen: dict[int, float | None] = {}
        out: dict[MetricRequest, float | None] = {}
        memo = self._memo
        for req in requests:
            samples = memo.get(req, _UNSEEN)
            if samples is _UNSEEN:
                samples = memo[req] = self._samples(req)
            if samples is None:
                out[req] = None
                continue
            key = id(samples)
            if key not in seen:
                seen[key] = value_at(samples, self.interval, at - self.start)
            out[req] = seen[key]
        return out

    async def fetch_range(
        self, start: float, end: float, step: float, requests: Sequence[MetricRequest]
    ) -> Mapping[MetricRequest, list[tuple[float, float | None]]]:
        times = range_times(start, end, step)
        return {req: [(t, self.value(req, t)) for t in times] for req in requests}
