"""The order of promotion and rollback in the engine, on fake time (looptime).

A recording router and workload manager (the outside world) log every call
with the loop's time; the engine must move traffic to stable only after the
stable has rolled out, retire the canary only `scale_down_delay` later, and
turn a stable that will not roll out (`WorkloadFailed`) into a rollback that
says why.
"""

from __future__ import annotations

import asyncio

import pytest

from adapters.local.memory import MemoryStore
from engine.audit import MemoryAudit
from engine.loop import Engine, LoopClock
from engine.model import Phase, RolloutSpec
from engine.ports import RolloutRef, WorkloadFailed
from tests.engine.test_loop import FunctionSource, Policies, healthy

pytestmark = [pytest.mark.asyncio, pytest.mark.looptime]

PROMOTION_TAKES = 40.0


class World:
    """Router and workloads in one, recording (time, call) in order."""

    def __init__(self, clock: LoopClock, *, stable_fails: bool = False) -> None:
        self.clock = clock
        self.stable_fails = stable_fails
        self.weight = 0
        self.calls: list[tuple[float, str]] = []

    def log(self, what: str) -> None:
        self.calls.append((self.clock.now(), what))

    async def set_weight(self, rollout: RolloutRef, weight: int) -> None:
        self.weight = weight
        self.log(f"weight {weight}")

    async def get_weight(self, rollout: RolloutRef) -> int:
        return self.weight

    async def bring_up(self, rollout: RolloutRef) -> None:
        self.log("bring up")

    async def promote(self, rollout: RolloutRef) -> None:
        self.log("promote")
        await self.clock.sleep_until(self.clock.now() + PROMOTION_TAKES)  # the stable rolls out
        if self.stable_fails:
            self.log("stable failed")
            raise WorkloadFailed("Deployment web failed to roll out (progressDeadlineSeconds)")
        self.log("stable rolled out")

    async def restore_stable(self, rollout: RolloutRef) -> None:
        self.log("restore stable")

    async def retire(self, rollout: RolloutRef) -> None:
        self.log("retire")

    def after(self, what: str) -> list[str]:
        names = [c for _, c in self.calls]
        return names[len(names) - 1 - names[::-1].index(what) :]

    def at(self, what: str) -> float:
        """When `what` last happened (weight 0 is written at bring-up too)."""
        return max(t for t, c in self.calls if c == what)


def spec(**overrides: object) -> RolloutSpec:
    data: dict[str, object] = {
        "name": "web",
        "stable": "web",
        "policy": "default",
        "interval": "10s",
        "strategy": {"type": "steps", "steps": [50], "step_duration": "1m"},
        "skip_analysis": True,
    }
    data.update(overrides)
    return RolloutSpec.model_validate(data)


async def run(world: World, audit: MemoryAudit, clock: LoopClock, rollout: RolloutSpec) -> Engine:
    engine = Engine(
        policies=Policies(default="x: p99 > 1s -> rollback\n"),
        metrics=FunctionSource(healthy),
        router=world,
        workloads=world,
        store=MemoryStore(),
        audit=audit,
        clock=clock,
    )
    task = asyncio.create_task(engine.run())
    await engine.add(rollout)
    await engine.wait_finished(rollout.key)
    await engine.stop()
    await task
    return engine


async def test_traffic_returns_to_stable_after_its_rollout_and_the_canary_goes_later() -> None:
    clock = LoopClock(epoch=0.0)
    world, audit = World(clock), MemoryAudit()
    engine = await run(world, audit, clock, spec(scale_down_delay="30s"))

    assert engine.status("default/web").phase is Phase.SUCCEEDED
    assert world.after("promote") == ["promote", "stable rolled out", "weight 0", "retire"]
    # traffic stayed on the canary (100) while the stable rolled out
    assert world.after("weight 100")[:2] == ["weight 100", "promote"]
    assert world.at("weight 0") == world.at("stable rolled out")
    assert world.at("retire") - world.at("weight 0") == pytest.approx(30.0)


async def test_no_delay_retires_at_once() -> None:
    clock = LoopClock(epoch=0.0)
    world, audit = World(clock), MemoryAudit()
    await run(world, audit, clock, spec(scale_down_delay="0s"))
    assert world.at("retire") == world.at("weight 0")


async def test_a_stable_that_will_not_roll_out_rolls_back_and_says_why() -> None:
    clock = LoopClock(epoch=0.0)
    world, audit = World(clock, stable_fails=True), MemoryAudit()
    engine = await run(world, audit, clock, spec(scale_down_delay="20s"))

    status = engine.status("default/web")
    assert status.phase is Phase.ROLLED_BACK
    assert "the promotion failed" in status.message
    assert "progressDeadlineSeconds" in status.message
    # promote was tried once, not retried; the stable is restored before traffic moves to it
    assert [c for _, c in world.calls].count("promote") == 1
    assert world.after("stable failed") == ["stable failed", "restore stable", "weight 0", "retire"]
    assert world.at("retire") - world.at("weight 0") == pytest.approx(20.0)
    moves = [(e.from_phase, e.to_phase, e.action) for e in audit.entries][-3:]
    assert moves == [
        (Phase.PROGRESSING, Phase.PROMOTING, "promote"),
        (Phase.PROMOTING, Phase.ROLLING_BACK, "rollback"),
        (Phase.ROLLING_BACK, Phase.ROLLED_BACK, "rolled-back"),
    ]
    assert "the promotion failed" in audit.entries[-2].explanation


async def test_a_rollback_retires_the_canary_only_after_the_delay() -> None:
    clock = LoopClock(epoch=0.0)
    world, audit = World(clock), MemoryAudit()
    engine = Engine(
        policies=Policies(default="x: p99 > 1s -> rollback\n"),
        metrics=FunctionSource(lambda t, r: 5.0),
        router=world,
        workloads=world,
        store=MemoryStore(),
        audit=audit,
        clock=clock,
    )
    task = asyncio.create_task(engine.run())
    rollout = spec(scale_down_delay="45s", skip_analysis=False)
    await engine.add(rollout)
    await engine.wait_finished(rollout.key)
    await engine.stop()
    await task
    assert engine.status(rollout.key).phase is Phase.ROLLED_BACK
    assert world.after("weight 0")[-2:] == ["weight 0", "retire"]
    assert world.at("retire") - world.at("weight 0") == pytest.approx(45.0)
