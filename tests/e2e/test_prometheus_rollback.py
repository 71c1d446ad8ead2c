"""A slow canary rolled back end to end: real apps, a real Prometheus, the real engine.

Two aiohttp apps on loopback play one service: the stable `web` and the
canary `web-canary`, each exporting prometheus-client metrics from its own
registry (the `http_request_duration_seconds` histogram and the
`http_requests_total{code}` counter). Prometheus (the Debian package) scrapes
both every second and labels them with `namespace` and `workload` through
`static_configs`, as the `plain` catalog expects. A load generator sends 40
requests a second to each, at a fixed rate however slowly they answer.

The `Engine` runs on real time (`LoopClock()`) with `PrometheusSource`, a
5-second metrics window and a 1-second interval, on one rule:
`latency: p99 > 300ms for 10s -> rollback`. Once the rollout is Progressing
and its verdicts have been healthy on known values for a few ticks, every
canary response is made 450 ms slower at time T. The rollout must end
RolledBack by `latency` within the `for` window (10 s) plus two scrape
intervals (2 s) plus 3 s for a busy machine, with no rule pending before T,
and all traffic back on stable. The measured reaction time is printed and
recorded as the test's `reaction_seconds` property.

Skipped when Prometheus is not installed, except in CI (CI=true), where it
fails instead.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

import dsl
from adapters.local.memory import MemoryRouter, MemoryStore, NoopWorkloads
from adapters.metrics.catalog import catalog_for
from adapters.metrics.prometheus import PrometheusSource
from dsl.ast import Action
from dsl.compile import CompiledPolicy
from dsl.runtime import PolicyState, Snapshot, Verdict
from engine.audit import MemoryAudit
from engine.loop import Engine, LoopClock
from engine.model import Phase, RolloutSpec
from tests.services import start_prometheus, which_or_skip

NAMESPACE = "shop"
STABLE, CANARY = "web", "web-canary"
KEY = f"{NAMESPACE}/{STABLE}"
POLICY = "latency: p99 > 300ms for 10s -> rollback\n"

RPS = 40.0  # requests a second to each app
BASE_DELAY = 0.01  # seconds every request takes
SLOWDOWN = 0.45  # seconds the canary adds from T on
INTERVAL = 1.0  # the engine's evaluation interval, and Prometheus' scrape interval
METRICS_WINDOW = 5.0  # the rate window: five scrapes, so p99 follows the breach in seconds
FOR_WINDOW = 10.0
SCRAPES = 2 * INTERVAL
MARGIN = 3.0  # a shared 2-core machine: late ticks, slow scrapes
REACTION_LIMIT = FOR_WINDOW + SCRAPES + MARGIN
HEALTHY_TICKS = 3  # healthy verdicts on known values before the canary turns slow
WARMUP_DEADLINE = 25.0  # seconds for the rollout to get there
MAX_IN_FLIGHT = 200  # per app; 40 rps at 460 ms needs about 20


class App:
    """One instance of the service: `/work` does the work, `/metrics` exports it."""

    def __init__(self) -> None:
        self.extra = 0.0  # added to every request that starts after it is set
        self.served = 0
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "http_request_duration_seconds", "Request latency.", registry=self.registry
        )
        self.requests = Counter(
            "http_requests", "Requests by status code.", ["code"], registry=self.registry
        )
        self.requests.labels(code="200")
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def work(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        await asyncio.sleep(BASE_DELAY + self.extra)
        self.served += 1
        self.requests.labels(code="200").inc()
        self.latency.observe(time.perf_counter() - started)
        return web.Response(text="done")

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry), content_type="text/plain")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/work", self.work)
        app.router.add_get("/metrics", self.metrics)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = self.runner.addresses[0][1]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


class Load:
    """Open-loop traffic: `rps` requests a second to each app, whatever their latency.

    A closed loop (send, wait, send) would send fewer requests to a slow
    canary; a fixed rate keeps the p99's sample size the same before and
    after the slowdown. A stalled event loop does not make it burst to catch up.
    """

    def __init__(self, apps: Sequence[App], rps: float) -> None:
        self.apps = apps
        self.period = 1.0 / rps
        self.sent = 0
        self.failed = 0
        self.stopping = asyncio.Event()

    async def _one(self, session: aiohttp.ClientSession, port: int) -> None:
        try:
            async with session.get(f"http://127.0.0.1:{port}/work") as response:
                await response.read()
                if response.status != 200:
                    self.failed += 1
        except (aiohttp.ClientError, TimeoutError):
            self.failed += 1

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        in_flight: dict[int, set[asyncio.Task[None]]] = {app.port: set() for app in self.apps}
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=5.0)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            next_at = loop.time()
            while not self.stopping.is_set():
                for port, tasks in in_flight.items():
                    if len(tasks) < MAX_IN_FLIGHT:
                        task = asyncio.create_task(self._one(session, port))
                        tasks.add(task)
                        task.add_done_callback(tasks.discard)
                        self.sent += 1
                next_at += self.period
                now = loop.time()
                next_at = max(next_at, now - 1.0)
                await asyncio.sleep(max(0.0, next_at - now))
            await asyncio.gather(*(t for ts in in_flight.values() for t in ts))


@dataclass(frozen=True, slots=True)
class Tick:
    """One evaluation: the verdict and the canary p99 (from Prometheus) it was made on."""

    verdict: Verdict
    p99: float | None

    @property
    def pending(self) -> bool:
        return any(since is not None for since in self.verdict.pending_since)

    @property
    def healthy(self) -> bool:
        return self.p99 is not None and self.verdict.action is Action.CONTINUE and not self.pending

    def describe(self) -> str:
        p99 = "unknown" if self.p99 is None else f"{self.p99 * 1000:.0f}ms"
        return f"t={self.verdict.at:.2f} p99={p99} {self.verdict.explanation}"


class RecordingPolicy(CompiledPolicy):
    """The compiled policy, keeping every tick it evaluates.

    Every verdict is kept, not just the engine's latest: a verdict the test
    polled for too late must not hide a rule that was briefly pending.
    """

    def __init__(self, compiled: CompiledPolicy) -> None:
        # The same policy, not a recompiled one: its attributes are the whole of it.
        self.__dict__.update(compiled.__dict__)
        self.ticks: list[Tick] = []

    def evaluate(self, now: float, snapshot: Snapshot, state: PolicyState) -> Verdict:
        verdict = super().evaluate(now, snapshot, state)
        self.ticks.append(Tick(verdict, snapshot.get("canary.p99")))
        return verdict


class Policies:
    def __init__(self, policy: RecordingPolicy) -> None:
        self.policy = policy

    def get(self, name: str) -> CompiledPolicy | None:
        return self.policy if name == "latency" else None


@pytest_asyncio.fixture
async def apps() -> AsyncIterator[Mapping[str, App]]:
    which_or_skip("prometheus", "apt-get install prometheus")
    instances = {STABLE: App(), CANARY: App()}
    for app in instances.values():
        await app.start()
    yield instances
    for app in instances.values():
        await app.stop()


async def poll(condition: Callable[[], bool], seconds: float) -> bool:
    """Whether `condition` became true within `seconds` (checked every 50 ms)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not condition():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def history(ticks: Sequence[Tick], last: int = 20) -> str:
    return "\n".join(t.describe() for t in ticks[-last:])


@pytest.mark.asyncio
@pytest.mark.timeout(90)
async def test_a_slow_canary_is_rolled_back_through_real_prometheus_queries(
    apps: Mapping[str, App], tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    scrape = {
        "job_name": "web",
        "scrape_interval": f"{INTERVAL:g}s",
        "static_configs": [
            {
                "targets": [f"127.0.0.1:{app.port}"],
                "labels": {"namespace": NAMESPACE, "workload": workload},
            }
            for workload, app in apps.items()
        ],
    }
    policy = RecordingPolicy(dsl.load(POLICY, "latency.rules"))
    router = MemoryRouter()
    workloads = NoopWorkloads()
    audit = MemoryAudit()
    spec = RolloutSpec.model_validate(
        {
            "name": STABLE,
            "namespace": NAMESPACE,
            "stable": STABLE,
            "policy": "latency",
            "interval": INTERVAL,
            # far longer than the test: the rollout stays at its first step
            "strategy": {"type": "linear", "step_duration": "1h"},
        }
    )
    load = Load(list(apps.values()), RPS)
    canary = apps[CANARY]

    async with AsyncExitStack() as stack:
        load_task = asyncio.create_task(load.run())

        async def stop_load() -> None:
            load.stopping.set()
            await load_task

        stack.push_async_callback(stop_load)
        # start_prometheus blocks until both apps were scraped, which needs this loop free
        running = start_prometheus(tmp_path, [scrape])
        base_url = await asyncio.to_thread(running.__enter__)
        stack.push_async_callback(asyncio.to_thread, running.__exit__, None, None, None)
        source = await stack.enter_async_context(
            PrometheusSource(base_url, catalog_for("plain"), evaluation_interval=INTERVAL)
        )
        # LoopClock takes the wall time when built and starts advancing at its first
        # `now()`; built and read here, it agrees with the wall time Prometheus
        # stamps samples with, so a tick's query asks for the latest scrapes.
        clock = LoopClock()
        assert abs(clock.now() - time.time()) < 0.5
        engine = Engine(
            policies=Policies(policy),
            metrics=source,
            router=router,
            workloads=workloads,
            store=MemoryStore(),
            audit=audit,
            clock=clock,
            metrics_window=METRICS_WINDOW,
        )
        engine_task = asyncio.create_task(engine.run())

        async def stop_engine() -> None:
            await engine.stop()
            await asyncio.wait_for(engine_task, 10.0)

        stack.push_async_callback(stop_engine)
        await engine.add(spec)

        def warmed_up() -> bool:
            recent = policy.ticks[-HEALTHY_TICKS:]
            return (
                engine.status(KEY).phase is Phase.PROGRESSING
                and len(recent) == HEALTHY_TICKS
                and all(t.healthy for t in recent)
            )

        assert await poll(warmed_up, WARMUP_DEADLINE), (
            f"no {HEALTHY_TICKS} healthy ticks in a row within {WARMUP_DEADLINE:.0f}s; "
            f"phase {engine.status(KEY).phase.value}, load sent {load.sent} "
            f"failed {load.failed}:\n{history(policy.ticks)}"
        )
        weight_before = router.weights.get(KEY)
        ticks_before = len(policy.ticks)

        canary.extra = SLOWDOWN
        breach_at = clock.now()  # T, on the clock the verdicts are stamped with

        try:
            await asyncio.wait_for(engine.wait_finished(KEY), REACTION_LIMIT + 10.0)
        except TimeoutError:
            pytest.fail(
                f"still {engine.status(KEY).phase.value} {clock.now() - breach_at:.1f}s after "
                f"the slowdown:\n{history(policy.ticks)}"
            )
        status = engine.status(KEY)

    ticks = policy.ticks
    trail = history(ticks)
    assert weight_before is not None and weight_before > 0  # the canary had traffic
    assert status.phase is Phase.ROLLED_BACK, f"{status}\n{trail}"
    assert router.weights[KEY] == 0
    assert ("retire", STABLE) in workloads.calls
    rolled_back = [e for e in audit.entries if e.to_phase is Phase.ROLLED_BACK]
    assert len(rolled_back) == 1

    # every tick before the slowdown saw a healthy canary: no false positive
    before, after = ticks[:ticks_before], ticks[ticks_before:]
    assert all(t.verdict.at < breach_at and not t.pending for t in before), trail
    first_bad = next(t for t in ticks if t.pending or t.verdict.action is not Action.CONTINUE)
    assert first_bad.verdict.at > breach_at, trail
    since = first_bad.verdict.pending_since[0]
    assert since is not None and since > breach_at, trail

    # the rollback came from the latency rule, on a p99 Prometheus measured above 300ms
    fired = next(t for t in after if t.verdict.action is Action.ROLLBACK)
    assert fired.verdict.rule == "latency", trail
    assert fired.verdict.explanation.startswith("rollback: latency: canary.p99 = "), trail
    assert fired.p99 is not None and fired.p99 > 0.3, trail
    assert source.http_requests >= len(ticks)
    assert status.last_verdict is not None and status.last_verdict.rule == "latency"

    reaction = fired.verdict.at - breach_at
    detection = since - breach_at
    print(
        f"\nreaction {reaction:.2f}s after the slowdown (p99 true after {detection:.2f}s, "
        f"`for 10s` then fired; limit {REACTION_LIMIT:.0f}s); {load.sent} requests sent, "
        f"{load.failed} failed"
    )
    record_property("reaction_seconds", round(reaction, 3))
    record_property("detection_seconds", round(detection, 3))
    # not before the rule has held for its whole `for` window, and not much after
    assert FOR_WINDOW <= reaction <= REACTION_LIMIT, trail
