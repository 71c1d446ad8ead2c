"""engine.loop on fake time: whole rollouts in milliseconds, decisions at exact ticks.

The event loop's clock is faked with looptime, so `for 2m` and five-minute
outages take no real time while every timer still fires in order. Metrics
come from a source whose values are a function of the query time (a stand-in
for Prometheus, the outside world); traffic goes to the in-memory router,
which records every write.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence

import pytest

import dsl
from adapters.local.memory import MemoryRouter, MemoryStore, NoopWorkloads
from dsl.compile import CompiledPolicy
from engine.audit import MemoryAudit
from engine.loop import Engine, LoopClock
from engine.model import Phase, RolloutSpec
from engine.ports import MetricRequest, RolloutRef

pytestmark = [pytest.mark.asyncio, pytest.mark.looptime]

Values = Callable[[float, MetricRequest], float | None]


class FunctionSource:
    """Metric values as a function of (time, request); `down(t)` makes every query fail."""

    def __init__(self, values: Values, down: Callable[[float], bool] = lambda t: False) -> None:
        self.values = values
        self.down = down
        self.calls: list[float] = []

    async def fetch(
        self, at: float, requests: Sequence[MetricRequest]
    ) -> Mapping[MetricRequest, float | None]:
        self.calls.append(at)
        if self.down(at):
            raise ConnectionError("prometheus is unreachable")
        return {r: self.values(at, r) for r in requests}

    async def fetch_range(
        self, start: float, end: float, step: float, requests: Sequence[MetricRequest]
    ) -> Mapping[MetricRequest, list[tuple[float, float | None]]]:
        n = round((end - start) / step)
        times = [start + i * step for i in range(n + 1)]
        return {r: [(t, self.values(t, r)) for t in times] for r in requests}


class Policies:
    def __init__(self, **policies: str) -> None:
        self.compiled = {name: dsl.load(text, f"{name}.rules") for name, text in policies.items()}

    def get(self, name: str) -> CompiledPolicy | None:
        return self.compiled.get(name)


POLICY = """\
latency: p99 > 300ms for 1m -> rollback
no_data: absent(p99) for 1m -> pause
"""


class Rig:
    def __init__(self, source: FunctionSource, **policies: str) -> None:
        self.clock = LoopClock(epoch=0.0)
        self.router = MemoryRouter()
        self.audit = MemoryAudit()
        self.store = MemoryStore()
        self.engine = Engine(
            policies=Policies(**(policies or {"default": POLICY})),
            metrics=source,
            router=self.router,
            workloads=NoopWorkloads(),
            store=self.store,
            audit=self.audit,
            clock=self.clock,
        )
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Rig:
        self.task = asyncio.create_task(self.engine.run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.engine.stop()
        assert self.task is not None
        await self.task

    def weights(self) -> list[int]:
        return [w for _, w in self.router.writes]

    def transitions(self) -> list[tuple[float, str, str, int]]:
        return [(e.time, e.to_phase.value, e.action, e.weight) for e in self.audit.entries]


def spec(**overrides: object) -> RolloutSpec:
    data: dict[str, object] = {
        "name": "web",
        "stable": "web",
        "policy": "default",
        "interval": "10s",
        "strategy": {"type": "linear", "step_duration": "1m"},
    }
    data.update(overrides)
    return RolloutSpec.model_validate(data)


def healthy(t: float, r: MetricRequest) -> float | None:
    return 0.1


@pytest.mark.parametrize(
    ("strategy", "weights"),
    [("linear", [5, 10, 25, 50, 75, 100]), ("exponential", [1, 5, 10, 25, 50, 100])],
)
async def test_a_healthy_canary_walks_every_step_to_succeeded(
    strategy: str, weights: list[int]
) -> None:
    async with Rig(FunctionSource(healthy)) as rig:
        await rig.engine.add(spec(strategy={"type": strategy, "step_duration": "1m"}))
        status = await rig.engine.wait_finished("default/web")
    assert status.phase is Phase.SUCCEEDED
    steps = [(t, w) for t, phase, action, w in rig.transitions() if action == "step"]
    # step k starts at k minutes: the first at once, each next one when the minute is up
    assert steps == [(60.0 * k, w) for k, w in enumerate(weights)]
    # promotion: canary takes all traffic, stable is updated, traffic returns to stable
    assert rig.weights() == [0, *weights, 100, 0]
    assert rig.transitions()[-1][1:3] == ("Succeeded", "promoted")


async def test_a_latency_breach_rolls_back_at_the_exact_tick() -> None:
    # p99 turns bad at t=125; ticks every 10s: true from 130, `for 1m` fires at 190
    source = FunctionSource(lambda t, r: 0.5 if t >= 125 and r.target.track == "canary" else 0.1)
    async with Rig(source) as rig:
        await rig.engine.add(spec())
        status = await rig.engine.wait_finished("default/web")
    assert status.phase is Phase.ROLLED_BACK
    rollback = next(e for e in rig.audit.entries if e.action == "rollback")
    assert rollback.time == 190.0 and rollback.rule == "latency"
    assert rollback.explanation == (
        "rollback: latency: canary.p99 = 500ms > 300ms, true for 1m"
    )
    assert rig.weights()[-1] == 0 and rig.router.weights["default/web"] == 0
    assert status.last_verdict is not None and status.last_verdict.rule == "latency"


async def test_an_unreachable_prometheus_never_advances_a_step() -> None:
    # Prometheus is down from 90s to 390s (5 minutes); the step of weight 10 started at 60s
    source = FunctionSource(healthy, down=lambda t: 90 <= t < 390)
    async with Rig(source) as rig:
        await rig.engine.add(spec(strategy={"type": "linear", "step_duration": "1m"}))
        await rig.clock.sleep_until(385.0)
        during = rig.engine.status("default/web")
        status = await rig.engine.wait_finished("default/web")
    assert during.phase is Phase.PAUSED and during.weight == 10
    pause = next(e for e in rig.audit.entries if e.action == "pause")
    assert pause.time == 150.0 and pause.rule == "no_data"  # unknown from 90, `for 1m`
    resume = next(e for e in rig.audit.entries if e.action == "resume")
    assert resume.time == 390.0
    # while down, no step was taken: weights went 5, 10, then on after the outage
    steps = [(e.time, e.weight) for e in rig.audit.entries if e.action == "step"]
    assert [w for t, w in steps if 90 <= t < 390] == []
    # paused time does not count toward the step, whose time was up at 120 (while the
    # data was unknown): the first healthy tick after the outage moves on
    assert steps[2] == (400.0, 25)
    assert status.phase is Phase.SUCCEEDED


async def test_manual_strategy_waits_for_approval_at_every_step() -> None:
    async with Rig(FunctionSource(healthy)) as rig:
        await rig.engine.add(spec(strategy={"type": "manual", "step_duration": "30s"}))
        await rig.clock.sleep_until(600.0)
        waiting = rig.engine.status("default/web")
        assert waiting.phase is Phase.WAITING_FOR_APPROVAL and waiting.weight == 5
        for step in range(1, 6):
            status = await rig.engine.command("default/web", "approve", "alice")
            assert status.weight == [5, 10, 25, 50, 75, 100][step]
            await rig.clock.sleep_until(rig.clock.now() + 60.0)
        status = await rig.engine.wait_finished("default/web")
    assert status.phase is Phase.SUCCEEDED
    approvals = [e for e in rig.audit.entries if e.actor == "alice"]
    assert len(approvals) == 5 and all(e.action == "step" for e in approvals)


async def test_a_pause_longer_than_max_pause_rolls_back() -> None:
    source = FunctionSource(lambda t, r: None if t >= 100 else 0.1)
    async with Rig(source) as rig:
        await rig.engine.add(spec(max_pause="2m"))
        status = await rig.engine.wait_finished("default/web")
    assert status.phase is Phase.ROLLED_BACK
    rollback = next(e for e in rig.audit.entries if e.action == "rollback")
    assert rollback.time == 160.0 + 120.0
    assert "longer than the maximum pause of 2m" in rollback.explanation


async def test_abort_by_a_person_rolls_back_and_is_audited() -> None:
    async with Rig(FunctionSource(healthy)) as rig:
        await rig.engine.add(spec())
        await rig.clock.sleep_until(70.0)
        await rig.engine.command("default/web", "abort", "bob", "wrong build")
        status = await rig.engine.wait_finished("default/web")
    assert status.phase is Phase.ROLLED_BACK
    abort = next(e for e in rig.audit.entries if e.action == "abort")
    assert abort.actor == "bob" and abort.explanation == "aborted by bob: wrong build"
    assert rig.router.weights["default/web"] == 0


async def test_a_missing_policy_fails_the_rollout_with_the_reason() -> None:
    async with Rig(FunctionSource(healthy)) as rig:
        await rig.engine.add(spec(policy="nope"))
        status = await rig.engine.wait_finished("default/web")
    assert status.phase is Phase.FAILED
    assert "no policy named 'nope'" in status.message
    assert rig.router.writes == []


async def test_dry_run_decides_and_records_but_never_touches_traffic() -> None:
    source = FunctionSource(lambda t, r: 0.5 if t >= 100 else 0.1)
    async with Rig(source) as rig:
        await rig.engine.add(spec(dry_run=True))
        status = await rig.engine.wait_finished("default/web")
    assert status.phase is Phase.ROLLED_BACK
    assert rig.router.writes == []
    assert any(e.action == "rollback" for e in rig.audit.entries)


async def test_one_query_per_source_per_tick_for_many_rollouts() -> None:
    source = FunctionSource(healthy)
    async with Rig(source) as rig:
        for i in range(50):
            await rig.engine.add(spec(name=f"web{i}", stable=f"web{i}"))
        await rig.clock.sleep_until(105.0)
    # ten ticks (10s .. 100s): one fetch each, covering all fifty rollouts
    assert source.calls == [10.0 * k for k in range(1, 11)]


async def test_a_restarted_engine_resumes_without_repeating_a_step() -> None:
    source = FunctionSource(healthy)
    rig = Rig(source)
    async with rig:
        await rig.engine.add(spec())
        await rig.clock.sleep_until(95.0)
    before = rig.store.statuses["default/web"]
    assert before.phase is Phase.PROGRESSING and before.step == 1
    writes_before = len(rig.router.writes)
    # a new engine over the same store and router picks the rollout up
    rig2 = Rig(source)
    rig2.clock = rig.clock
    rig2.engine = Engine(
        policies=Policies(default=POLICY), metrics=source, router=rig.router,
        workloads=NoopWorkloads(), store=rig.store, audit=rig2.audit, clock=rig.clock,
    )
    async with rig2:
        await rig2.engine.add(spec())
        status = await rig2.engine.wait_finished("default/web")
    assert status.phase is Phase.SUCCEEDED
    resumed = [w for _, w in rig.router.writes[writes_before:]]
    assert resumed == [25, 50, 75, 100, 100, 0]  # step 1 (weight 10) was not written again


class CleaningRouter(MemoryRouter):
    """A router that keeps an object per rollout, like the canary Ingress of ingress-nginx."""

    def __init__(self) -> None:
        super().__init__()
        self.removed: list[tuple[str, int]] = []

    async def remove(self, rollout: RolloutRef) -> None:
        self.removed.append((rollout.name, self.weights.get(self._key(rollout), 0)))


@pytest.mark.parametrize("bad", [False, True])
async def test_the_routers_own_object_is_removed_after_the_canary_retires(bad: bool) -> None:
    source = FunctionSource(lambda t, r: 0.5 if bad and t >= 30 else 0.1)
    rig = Rig(source)
    rig.router = CleaningRouter()
    rig.engine.router = rig.router
    async with rig:
        await rig.engine.add(spec(strategy={"type": "linear", "step_duration": "10s"}))
        status = await rig.engine.wait_finished("default/web")
    assert status.phase is (Phase.ROLLED_BACK if bad else Phase.SUCCEEDED)
    assert rig.router.removed == [("web", 0)]  # once, with traffic already off the canary
