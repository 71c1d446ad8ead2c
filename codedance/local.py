"""The local platform: a real canary release on one machine, wired from local adapters.

In: a `RolloutSpec`, a compiled policy, a scenario (how the canary misbehaves)
and the router to use. Out: a `Summary` of what happened.

What runs: the sample service as a stable (v1) and a canary (v2) process on
loopback, a router in front of them (the builtin weighted proxy, real nginx,
or any router a package registers in `codedance.traffic`), a load generator
at a steady rate, the traffic statistics the router records per track (as a
mesh proxy does) or a real Prometheus, the pod status of the processes, and
the engine itself with a real clock. `codedance demo` and `codedance run
--local` both drive this.

Metrics come from the router by default. With `prometheus="auto"` a
Prometheus of our own (`adapters.local.prometheus`) runs in the work
directory and scrapes the two services' `/metrics`: their addresses go into
its targets file once the stable runs (the canary's port is fixed up front,
so its target is written before it starts, and is scraped as down until
then), and again when a promotion moves the stable to a new port. The
release starts once Prometheus has scraped both, which takes about five
seconds: Prometheus applies a new target list at most that often. With
`prometheus=URL` the metrics are read from that Prometheus, which cannot
know the ports: the same targets file is written to the work directory, and
one line on stderr says where it is and which scrape job reads it.

Routers are looked up by name in the registry and built with the `LocalSite`
when they take a `site` argument (ours do), with no argument otherwise. A
router that serves no traffic itself (a package's router for some other
platform) is driven as in a real release, while the builtin proxy carries the
demo's requests at the weight that router reads back.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp

from adapters.local.loadgen import LoadGenerator
from adapters.local.memory import MemoryStore
from adapters.local.prometheus import LocalPrometheus, ScrapeTargets
from adapters.local.trafficstats import TrafficStats
from adapters.local.workloads import PodStatusSource, ProcessWorkloads, ServiceConfig
from dsl.compile import CompiledPolicy
from engine import registry
from engine.audit import JsonLinesAudit, MemoryAudit
from engine.loop import Engine, LoopClock
from engine.model import AuditEntry, Phase, RolloutSpec, RolloutStatus
from engine.ports import MetricSource, RolloutRef, TrafficRouter

POD_METRICS = ("ready_pods", "not_ready_pods", "failed_pods", "restarts")
AUTO = "auto"  # `prometheus=AUTO`: run a Prometheus of our own


@dataclass(frozen=True)
class Scenario:
    """How the canary behaves; `bad_after` seconds after it starts, it turns bad."""

    name: str
    latency: float = 0.0
    error_share: float = 0.0
    crash_after: float | None = None
    bad_after: float = 0.0
    description: str = ""


SCENARIOS = {
    "healthy": Scenario("healthy", description="the canary behaves like stable"),
    "slow": Scenario(
        "slow", latency=0.16, bad_after=9.0, description="the canary answers in 160ms from 9s on"
    ),
    "errors": Scenario(
        "errors", error_share=0.3, bad_after=9.0,
        description="30% of the canary's responses are 500 from 9s on",
    ),
    "crash": Scenario(
        "crash", crash_after=0.0, bad_after=9.0, description="the canary process crashes at 9s"
    ),
}


@dataclass(frozen=True)
class LocalSite:
    """What a router on this machine is built from: where it works and the two tracks."""

    workdir: Path
    stable_url: str
    canary_url: str
    stats: TrafficStats


def builtin_router(site: LocalSite) -> Any:
    """The `builtin` router: the in-process weighted proxy on a free port."""
    from adapters.local.proxy import BuiltinRouter

    return BuiltinRouter("127.0.0.1", 0, site.stable_url, site.canary_url, site.stats)


def nginx_router(site: LocalSite) -> Any:
    """The `nginx` router: a real nginx under the site's work directory, on a free port."""
    from adapters.local.nginx import NginxRouter

    return NginxRouter(site.workdir / "nginx", 0, site.stable_url, site.canary_url, site.stats)


def local_router(name: str, site: LocalSite) -> Any:
    """The router registered as `name`, in front of the site's two tracks (not started yet)."""
    factory = registry.load(registry.TRAFFIC, name)
    kwargs: dict[str, Any] = {"site": site} if _takes(factory, "site") else {}
    router = registry.create(registry.TRAFFIC, name, **kwargs)
    if all(hasattr(router, a) for a in ("url", "start", "stop", "set_stable")):
        return router
    return ProxiedRouter(router, builtin_router(site))


class ProxiedRouter:
    """A router that serves no traffic, with the builtin proxy carrying it at its weight."""

    def __init__(self, router: TrafficRouter, proxy: Any) -> None:
        self.router = router
        self.proxy = proxy

    @property
    def url(self) -> str:
        return str(self.proxy.url)

    async def start(self) -> None:
        await self.proxy.start()

    async def stop(self) -> None:
        await self.proxy.stop()

    async def set_stable(self, url: str) -> None:
        await self.proxy.set_stable(url)

    async def set_weight(self, rollout: RolloutRef, weight: int) -> None:
        await self.router.set_weight(rollout, weight)
        # traffic follows what the router reports, so a router that misreports shows
        await self.proxy.set_weight(rollout, await self.router.get_weight(rollout))

    async def get_weight(self, rollout: RolloutRef) -> int:
        return await self.router.get_weight(rollout)


class Policies:
    """A fixed set of compiled policies by name."""

    def __init__(self, policies: dict[str, CompiledPolicy]) -> None:
        self.policies = policies

    def get(self, name: str) -> CompiledPolicy | None:
        return self.policies.get(name)


class ConfirmedWeights:
    """Wraps a router and notes when each weight was confirmed by a read-back."""

    def __init__(self, router: TrafficRouter, clock: LoopClock) -> None:
        self.router = router
        self.clock = clock
        self.confirmed: list[tuple[float, int]] = []
        self.writes = 0

    async def set_weight(self, rollout: RolloutRef, weight: int) -> None:
        self.writes += 1
        await self.router.set_weight(rollout, weight)

    async def get_weight(self, rollout: RolloutRef) -> int:
        weight = await self.router.get_weight(rollout)
        if not self.confirmed or self.confirmed[-1][1] != weight:
            self.confirmed.append((self.clock.now(), weight))
        return weight


@dataclass
class Summary:
    phase: str
    duration: float
    transitions: list[dict[str, Any]]
    requests_sent: int
    requests_failed: int
    canary_errors: int
    reaction_seconds: float | None
    final_weight: int
    per_track: dict[str, int] = field(default_factory=dict)
    after_rollback: dict[str, int] = field(default_factory=dict)
    audit_log: str = ""
    metrics_source: str = "router"

    def to_json(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "duration_seconds": round(self.duration, 3),
            "transitions": self.transitions,
            "requests_sent": self.requests_sent,
            "requests_failed": self.requests_failed,
            "canary_injected_errors": self.canary_errors,
            "reaction_seconds": None
            if self.reaction_seconds is None
            else round(self.reaction_seconds, 3),
            "final_weight": self.final_weight,
            "requests_by_track": self.per_track,
            "requests_after_rollback_by_track": self.after_rollback,
            "audit_log": self.audit_log,
            "metrics_source": self.metrics_source,
        }


class LocalPlatform:
    """Starts everything a local release needs, runs it, and stops it all."""

    def __init__(
        self,
        spec: RolloutSpec,
        policy: CompiledPolicy,
        scenario: Scenario,
        *,
        router: str = "builtin",
        rate: float = 100.0,
        prometheus: str | None = None,
        workdir: Path | None = None,
        bad_after: float | None = None,
    ) -> None:
        if bad_after is not None:
            scenario = replace(scenario, bad_after=bad_after)
        self.spec = spec
        self.policy = policy
        self.scenario = scenario
        self.router_kind = router
        # an unknown or broken router is a usage error before anything starts
        self._router_factory = registry.load(registry.TRAFFIC, router)
        self.rate = rate
        self.prometheus = prometheus
        # kept after the run: the audit log and nginx's logs are there to read
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="codedance-demo-"))
        self.clock = LoopClock()
        self.audit = MemoryAudit()
        self.engine: Engine | None = None
        self._prometheus: LocalPrometheus | None = None

    async def run(
        self, on_tick: Callable[[LocalPlatform], Awaitable[None]] | None = None
    ) -> Summary:
        started = time.time()
        sc = self.scenario
        stable = ServiceConfig(
            version="v1", namespace=self.spec.namespace, workload=self.spec.stable
        )
        canary = ServiceConfig(
            version="v2", namespace=self.spec.namespace, workload=self.spec.canary_name,
            latency=sc.latency, error_share=sc.error_share,
            crash_after=sc.crash_after, bad_after=sc.bad_after if sc.name != "healthy" else None,
        )
        self.stats = TrafficStats(self.clock)
        async with contextlib.AsyncExitStack() as stack:
            workloads = ProcessWorkloads(stable=stable, canary=canary)
            stack.push_async_callback(workloads.stop_all)
            # Prometheus first: it takes seconds to apply its first targets (below)
            targets = await self._scrape_targets(stack)
            await workloads.start_stable()
            router = await self._router(stack, workloads)

            async def stable_moved(url: str) -> None:
                await router.set_stable(url)
                if targets is not None:
                    targets.write(_targets(stable, canary, url, workloads.canary_url))

            workloads.on_stable_moved = stable_moved
            if targets is not None:
                targets.write(
                    _targets(stable, canary, workloads.stable_url, workloads.canary_url)
                )
            await self._await_scrapes(targets)
            confirmed = ConfirmedWeights(router, self.clock)
            sources = await self._sources(stack, workloads)
            audit_path = self.workdir / "audit.jsonl"
            file_audit = JsonLinesAudit(audit_path)
            self.engine = Engine(
                policies=Policies({self.spec.policy: self.policy}),
                metrics=sources,
                router=confirmed,
                workloads=workloads,
                store=MemoryStore(),
                audit=_Tee(self.audit, file_audit),
                clock=self.clock,
                # The router sees every request, so a one-second window already holds
                # dozens of samples at 100 requests/s, and a fault shows within ~0.2s.
                # Prometheus needs two scrapes in a window: 5s there.
                metrics_window=1.0 if self.metrics_url is None else 5.0,
            )
            load = LoadGenerator(router.url, self.rate)
            load.start()
            stack.push_async_callback(load.stop)
            runner = asyncio.create_task(self.engine.run())
            await self.engine.add(self.spec)
            finished = asyncio.create_task(self.engine.wait_finished(self.spec.key))
            watcher = _FaultWatch(workloads.canary_url)
            crashed_at: float | None = None  # kept here: a retired canary's record goes
            while not finished.done():
                if on_tick is not None:
                    await on_tick(self)
                await watcher.poll()
                crashed_at = crashed_at or workloads.exited_at("canary")
                await asyncio.wait({finished}, timeout=0.1)
            status = finished.result()
            crashed_at = crashed_at or workloads.exited_at("canary")
            if on_tick is not None:
                await on_tick(self)
            end_time = time.time()
            await asyncio.sleep(1.0)  # traffic after the end shows where requests go now
            await load.stop()
            await self.engine.stop()
            await runner
            await watcher.close()
            bad_since = min(
                (t for t in (watcher.faulty_since, crashed_at) if t is not None),
                default=None,
            )
            return self._summary(
                status, started, load, confirmed, bad_since, end_time, str(audit_path)
            )

    @property
    def metrics_url(self) -> str | None:
        """The Prometheus the traffic metrics are read from; None: the router's statistics."""
        if self._prometheus is not None:
            return self._prometheus.url
        return None if self.prometheus in (None, AUTO) else self.prometheus

    async def _scrape_targets(self, stack: contextlib.AsyncExitStack) -> ScrapeTargets | None:
        """Where the services' addresses go: our Prometheus, a file for another one, nowhere."""
        if not self.prometheus:
            return None
        if self.prometheus != AUTO:
            return ScrapeTargets(self.workdir / "prometheus-targets.json")
        self._prometheus = LocalPrometheus(self.workdir / "prometheus")
        stack.push_async_callback(self._prometheus.stop)
        await self._prometheus.start()  # launched only: it gets ready while the rest starts
        return self._prometheus.targets

    async def _await_scrapes(self, targets: ScrapeTargets | None) -> None:
        """Our Prometheus: until it scraped both services. Another: say how to scrape them."""
        if self._prometheus is not None:
            await self._prometheus.wait_ready()
        elif targets is not None:
            print(
                f"codedance: scrape targets for {self.prometheus} written to {targets.path}; "
                f"add this job to its scrape_configs: {targets.snippet()}",
                file=sys.stderr, flush=True,
            )

    async def _router(self, stack: contextlib.AsyncExitStack, workloads: ProcessWorkloads) -> Any:
        site = LocalSite(self.workdir, workloads.stable_url, workloads.canary_url, self.stats)
        router = local_router(self.router_kind, site)
        await router.start()
        stack.push_async_callback(router.stop)
        return router

    async def _sources(
        self, stack: contextlib.AsyncExitStack, workloads: ProcessWorkloads
    ) -> dict[str, MetricSource]:
        pods = PodStatusSource(workloads)
        traffic: MetricSource = self.stats
        if self.metrics_url is not None:
            from adapters.metrics.catalog import catalog_for
            from adapters.metrics.prometheus import PrometheusSource

            traffic = await stack.enter_async_context(
                PrometheusSource(self.metrics_url, catalog_for("plain"))
            )
        sources: dict[str, MetricSource] = {"*": traffic}
        for metric in POD_METRICS:
            sources[metric] = pods
        return sources

    def _summary(
        self,
        status: RolloutStatus,
        started: float,
        load: LoadGenerator,
        confirmed: ConfirmedWeights,
        faulty_since: float | None,
        end_time: float,
        audit_path: str,
    ) -> Summary:
        transitions = [_transition(e) for e in self.audit.entries]
        reaction = None
        if faulty_since is not None and status.phase is Phase.ROLLED_BACK:
            back = [t for t, w in confirmed.confirmed if w == 0 and t >= faulty_since]
            reaction = back[0] - faulty_since if back else None
        records = list(load.records)
        per_track = dict(Counter(r.track or "none" for r in records))
        after = dict(Counter(r.track or "none" for r in records if r.sent_at >= end_time))
        return Summary(
            phase=status.phase.value,
            duration=time.time() - started,
            transitions=transitions,
            requests_sent=load.sent,
            requests_failed=load.failed,
            canary_errors=sum(1 for r in records if r.injected and r.track == "canary"),
            reaction_seconds=reaction,
            final_weight=status.weight,
            per_track=per_track,
            after_rollback=after if status.phase is Phase.ROLLED_BACK else {},
            audit_log=audit_path,
            metrics_source="router" if self.metrics_url is None else "prometheus",
        )


class _FaultWatch:
    """Asks the canary (over HTTP, as a person would) when it started to misbehave."""

    def __init__(self, canary_url: str) -> None:
        self.url = canary_url + "/stats"
        self.faulty_since: float | None = None
        self._session: aiohttp.ClientSession | None = None

    async def poll(self) -> None:
        if self.faulty_since is not None:
            return
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0))
        try:
            async with self._session.get(self.url) as response:
                data = await response.json()
            self.faulty_since = data.get("faulty_since")
        except (aiohttp.ClientError, TimeoutError, ValueError):
            pass  # not up yet, or gone (retired, crashed): nothing to learn

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


class _Tee:
    def __init__(self, *sinks: Any) -> None:
        self.sinks = sinks

    async def record(self, entry: AuditEntry) -> None:
        for sink in self.sinks:
            await sink.record(entry)


def _targets(
    stable: ServiceConfig, canary: ServiceConfig, stable_url: str, canary_url: str
) -> list[tuple[str, dict[str, str]]]:
    """The two services as scrape targets, labelled as the `plain` metric catalog reads them."""
    return [
        (stable_url, {"namespace": stable.namespace, "workload": stable.workload,
                      "track": "stable"}),
        (canary_url, {"namespace": canary.namespace, "workload": canary.workload,
                      "track": "canary"}),
    ]


def _takes(factory: object, parameter: str) -> bool:
    """Whether a router's class or factory has a parameter of that name."""
    if not callable(factory):
        return False
    try:
        return parameter in inspect.signature(factory).parameters
    except (TypeError, ValueError):  # no signature to read
        return False


def _transition(e: AuditEntry) -> dict[str, Any]:
    return {
        "at": e.time,
        "from": e.from_phase.value,
        "to": e.to_phase.value,
        "action": e.action,
        "actor": e.actor,
        "rule": e.rule,
        "explanation": e.explanation,
        "weight": e.weight,
    }
