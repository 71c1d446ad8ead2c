"""The ports: how the engine reaches the outside world, as Protocols it owns.

In: nothing. Out: the interfaces a concrete adapter implements (Prometheus,
a traffic router, the Kubernetes API, a file) and the small value types that
cross them. The engine depends on these alone; the composition root
(`codedance/`) picks the adapters. That is what lets the same loop run a
release on a cluster, on one machine, and on fake time in a test.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from dsl.compile import CompiledPolicy
from engine.model import AuditEntry, RolloutStatus


@dataclass(frozen=True, slots=True)
class Target:
    """One track of one rollout: what a metric query is about."""

    namespace: str
    workload: str
    track: str
    service: str = ""
    pod_regex: str = ""
    # Requests are dictionary keys at every tick of every rollout: hash them once.
    _hash: int = field(default=0, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        fields = (self.namespace, self.workload, self.track, self.service, self.pod_regex)
        object.__setattr__(self, "_hash", hash(fields))

    def __hash__(self) -> int:
        return self._hash


@dataclass(frozen=True, slots=True)
class MetricRequest:
    """One value to fetch: a metric of a target, from the catalog or a policy template.

    `template` is the PromQL text of a metric the policy defines itself
    (`metric NAME = promql ...`), None for a built-in metric, whose query
    comes from the source's catalog. `window` is the range, in seconds, that
    rate-like queries use.
    """

    target: Target
    metric: str
    window: float
    template: str | None = None
    _hash: int = field(default=0, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        fields = (self.target, self.metric, self.window, self.template)
        object.__setattr__(self, "_hash", hash(fields))

    def __hash__(self) -> int:
        return self._hash


MetricValues = Mapping[MetricRequest, float | None]


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


@runtime_checkable
class MetricSource(Protocol):
    """Metric values for many requests at once.

    A source gets every request of every rollout due at the same tick in one
    call, so it can serve rollouts that share a query with one round trip.
    A request whose query failed or matched nothing maps to None (unknown);
    a source never invents a number.
    """

    async def fetch(self, at: float, requests: Sequence[MetricRequest]) -> MetricValues: ...

    async def fetch_range(
        self, start: float, end: float, step: float, requests: Sequence[MetricRequest]
    ) -> Mapping[MetricRequest, list[tuple[float, float | None]]]: ...


@dataclass(frozen=True, slots=True)
class RolloutRef:
    """What adapters need to find a rollout's objects."""

    namespace: str
    name: str
    stable: str
    canary: str
    service: str = ""
    route: str = ""


@runtime_checkable
class TrafficRouter(Protocol):
    """Moves a share of requests to the canary and reads it back."""

    async def set_weight(self, rollout: RolloutRef, weight: int) -> None: ...

    async def get_weight(self, rollout: RolloutRef) -> int: ...


@runtime_checkable
class RouteCleanup(Protocol):
    """A router that keeps an object of its own per rollout (a canary Ingress, a
    backendRef) and removes it once the rollout has ended."""

    async def remove(self, rollout: RolloutRef) -> None: ...


@runtime_checkable
class WorkloadManager(Protocol):
    """Brings up the canary, makes it the new stable, and removes it."""

    async def bring_up(self, rollout: RolloutRef) -> None: ...

    async def promote(self, rollout: RolloutRef) -> None: ...

    async def retire(self, rollout: RolloutRef) -> None: ...


class ObjectGone(Exception):
    """The object an adapter works on does not exist (any more).

    A traffic router's error when its routing object is gone, say: the
    controller then knows there is nothing of it to restore, whatever the
    adapter, without importing the adapter.
    """


class WorkloadFailed(Exception):
    """A workload will not become ready without a person: retrying the call is pointless.

    `WorkloadManager.promote` raises it when the stable workload gave up on
    the new version (Kubernetes' progress deadline, or the manager's own
    timeout), after putting the stable's previous version back. The engine
    then rolls the release back instead of retrying the promotion. Any other
    exception is taken as transient and retried.
    """


@runtime_checkable
class PromotionUndo(Protocol):
    """A workload manager that can put back the stable version a promotion replaced.

    `restore_stable` is idempotent and does nothing when no promotion of this
    rollout is under way; it returns once the stable runs its previous
    version again. A rollback calls it before moving traffic to stable, so a
    rollback that follows a half-done promotion never sends requests to a
    stable that is half the new version.
    """

    async def restore_stable(self, rollout: RolloutRef) -> None: ...


@runtime_checkable
class RolloutStore(Protocol):
    """Durable rollout state: a restarted controller resumes from it."""

    async def load(self, key: str) -> RolloutStatus | None: ...

    async def save(self, key: str, status: RolloutStatus) -> None: ...


@runtime_checkable
class AuditSink(Protocol):
    async def record(self, entry: AuditEntry) -> None: ...


@runtime_checkable
class Clock(Protocol):
    """Wall-clock seconds that never go backwards, and a way to wait for one."""

    def now(self) -> float: ...

    async def sleep_until(self, t: float) -> None: ...


@runtime_checkable
class Telemetry(Protocol):
    """The engine's own measurements; the composition root exports them."""

    def tick_lag(self, seconds: float) -> None: ...

    def verdict(self, action: str, rule: str | None) -> None: ...

    def phases(self, counts: Mapping[str, int]) -> None: ...

    def query(self, seconds: float, ok: bool) -> None: ...

    def policy_reload_failed(self, name: str) -> None: ...


class NoTelemetry:
    """Telemetry that measures nothing, for tools and tests."""

    def tick_lag(self, seconds: float) -> None:
        pass

    def verdict(self, action: str, rule: str | None) -> None:
        pass

    def phases(self, counts: Mapping[str, int]) -> None:
        pass

    def query(self, seconds: float, ok: bool) -> None:
        pass

    def policy_reload_failed(self, name: str) -> None:
        pass


@runtime_checkable
class PolicyProvider(Protocol):
    """Compiled policies by name; the policy store is the usual one."""

    def get(self, name: str) -> CompiledPolicy | None: ...
