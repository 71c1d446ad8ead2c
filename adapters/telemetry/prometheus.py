"""The engine's measurements as Prometheus metrics, on a registry of their own.

In: the engine's `Telemetry` calls (tick lag, verdicts, phase counts, metric
query timings, failed policy reloads). Out: metrics in a `CollectorRegistry`
that `adapters.telemetry.http` serves on `/metrics`:

    codedance_rollouts{phase}                        gauge, every phase, 0 when none
    codedance_verdicts_total{action,rule}            counter, rule "" when no rule decided
    codedance_tick_lag_seconds                       histogram
    codedance_metric_query_seconds                   histogram, failed queries included
    codedance_metric_query_errors_total              counter
    codedance_policy_reload_failures_total{policy}   counter
    codedance_build_info{version}                    gauge, always 1

Usage:

    telemetry = PrometheusTelemetry()
    engine = Engine(..., telemetry=telemetry)
    HealthServer(telemetry, ready=...)

Nothing is registered in prometheus_client's global registry, so two
instances (two tests, two engines) never collide.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib import metadata

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from engine.model import Phase

# A tick is normally late by a millisecond or two; ten seconds late means the
# loop was blocked, which is what the top buckets are for.
TICK_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# One batched query to a metric source: tens of milliseconds when healthy, up
# to the source's timeout when not.
QUERY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# The label value that stands for every rule or policy name beyond the limit.
OTHER = "_other"


class _BoundedLabels:
    """Label values as given, until `limit` distinct ones were seen; then `OTHER`.

    Rule labels and policy names come from files a person edits, and a
    controller runs for weeks through many edits (and `line N` labels move
    with every edit). Each distinct value is a time series kept forever, so
    the number of them is capped rather than trusted.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._seen: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        if len(self._seen) >= self._limit:
            return OTHER
        self._seen.add(value)
        return value


def _installed_version() -> str:
    try:
        return metadata.version("codedance")
    except metadata.PackageNotFoundError:
        return "unknown"


class PrometheusTelemetry:
    """`engine.ports.Telemetry` exported with prometheus_client.

    `registry` is where the metrics live (a new one by default); `version`
    goes into `codedance_build_info` (the installed package's by default);
    `max_labels` caps the distinct rule labels and policy names kept.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        version: str | None = None,
        max_labels: int = 500,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        reg = self.registry
        self._rollouts = Gauge("codedance_rollouts", "Rollouts by phase.", ["phase"], registry=reg)
        self._verdicts = Counter(
            "codedance_verdicts_total",
            "Policy verdicts by action and deciding rule (empty when no rule decided).",
            ["action", "rule"],
            registry=reg,
        )
        self._tick_lag = Histogram(
            "codedance_tick_lag_seconds",
            "How late a scheduled tick started.",
            buckets=TICK_LAG_BUCKETS,
            registry=reg,
        )
        self._query_seconds = Histogram(
            "codedance_metric_query_seconds",
            "Duration of one batched metric source query, failed ones included.",
            buckets=QUERY_BUCKETS,
            registry=reg,
        )
        self._query_errors = Counter(
            "codedance_metric_query_errors_total",
            "Metric source queries that failed.",
            registry=reg,
        )
        self._reload_failures = Counter(
            "codedance_policy_reload_failures_total",
            "Policy files that changed but did not load; the last good policy stays.",
            ["policy"],
            registry=reg,
        )
        build = Gauge(
            "codedance_build_info", "The running version; always 1.", ["version"], registry=reg
        )
        build.labels(version=version or _installed_version()).set(1)
        self._rule_label = _BoundedLabels(max_labels)
        self._policy_label = _BoundedLabels(max_labels)
        # every phase is a series from the start, so a dashboard sums to the
        # number of rollouts and an alert on a phase never sees "no data"
        self.phases({})

    def tick_lag(self, seconds: float) -> None:
        self._tick_lag.observe(max(seconds, 0.0))

    def verdict(self, action: str, rule: str | None) -> None:
        self._verdicts.labels(action=action, rule=self._rule_label(rule or "")).inc()

    def phases(self, counts: Mapping[str, int]) -> None:
        """Set every phase's gauge: the count given, 0 for a phase not in `counts`.

        Keys that are not a phase are ignored; the label set stays the enum's.
        """
        for phase in Phase:
            self._rollouts.labels(phase=phase.value).set(counts.get(phase.value, 0))

    def query(self, seconds: float, ok: bool) -> None:
        self._query_seconds.observe(max(seconds, 0.0))
        if not ok:
            self._query_errors.inc()

    def policy_reload_failed(self, name: str) -> None:
        self._reload_failures.labels(policy=self._policy_label(name)).inc()
