"""A running rollout keeps the policy it started with; a broken file never reaches it.

The policy store watches a real directory (the way a mounted ConfigMap is
read) while the engine runs on fake time: a file made invalid mid-rollout is
refused and the last good policy stays; a valid change is picked up by the
store but a running rollout keeps its pinned version until someone re-pins it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from adapters.local.memory import MemoryRouter, MemoryStore, NoopWorkloads
from engine.audit import MemoryAudit
from engine.loop import Engine, LoopClock
from engine.model import Phase, RolloutSpec
from engine.policystore import PolicyStore
from tests.engine.test_loop import FunctionSource

pytestmark = [pytest.mark.asyncio, pytest.mark.looptime]

GOOD = "latency: p99 > 300ms for 1m -> rollback\n"
STRICTER = "latency: p99 > 50ms for 1m -> rollback\n"
BROKEN = "latency: p99 > 5% for 1m -> rollback\n"


def spec() -> RolloutSpec:
    return RolloutSpec.model_validate(
        {"name": "web", "stable": "web", "policy": "checkout", "interval": "10s",
         "strategy": {"type": "linear", "step_duration": "2m"}}
    )


async def test_an_invalid_policy_mid_rollout_keeps_the_last_good_one(tmp_path: Path) -> None:
    (tmp_path / "checkout.rules").write_text(GOOD)
    errors: list[str] = []
    store = PolicyStore(tmp_path, on_error=lambda result: errors.append(result.message))
    assert store.load().ok
    clock = LoopClock(epoch=0.0)
    audit = MemoryAudit()
    engine = Engine(
        policies=store, metrics=FunctionSource(lambda t, r: 0.1), router=MemoryRouter(),
        workloads=NoopWorkloads(), store=MemoryStore(), audit=audit, clock=clock,
    )
    runner = asyncio.create_task(engine.run())
    watcher = asyncio.create_task(store.watch(clock, interval=2.0))
    await engine.add(spec())
    await clock.sleep_until(1.0)  # the rollout has started and pinned its policy
    pinned = engine.status("default/web").policy_hash
    assert pinned
    await clock.sleep_until(100.0)
    (tmp_path / "checkout.rules").write_text(BROKEN)
    await clock.sleep_until(200.0)
    assert errors and "checkout.rules:1:16: error[E201]" in errors[-1]
    good = store.get("checkout")
    assert good is not None and good.source_hash == pinned  # the last good policy stays
    assert engine.status("default/web").phase is Phase.PROGRESSING
    status = await engine.wait_finished("default/web")
    watcher.cancel()
    await engine.stop()
    await runner
    assert status.phase is Phase.SUCCEEDED and status.policy_hash == pinned


async def test_a_running_rollout_keeps_its_version_until_re_pinned(tmp_path: Path) -> None:
    (tmp_path / "checkout.rules").write_text(GOOD)
    store = PolicyStore(tmp_path)
    store.load()
    clock = LoopClock(epoch=0.0)
    audit = MemoryAudit()
    engine = Engine(
        policies=store, metrics=FunctionSource(lambda t, r: 0.1), router=MemoryRouter(),
        workloads=NoopWorkloads(), store=MemoryStore(), audit=audit, clock=clock,
    )
    runner = asyncio.create_task(engine.run())
    await engine.add(spec())
    await clock.sleep_until(1.0)  # the rollout has started and pinned its policy
    pinned = engine.status("default/web").policy_hash
    assert pinned
    await clock.sleep_until(100.0)
    (tmp_path / "checkout.rules").write_text(STRICTER)  # p99 0.1 now breaks it
    assert store.reload().ok
    await clock.sleep_until(300.0)
    assert engine.status("default/web").phase is Phase.PROGRESSING  # still the old version
    assert engine.status("default/web").policy_hash == pinned
    await engine.command("default/web", "repin", "alice")
    assert engine.status("default/web").policy_hash != pinned
    status = await engine.wait_finished("default/web")
    await engine.stop()
    await runner
    assert status.phase is Phase.ROLLED_BACK
    repin = next(e for e in audit.entries if e.action == "repin")
    assert repin.actor == "alice" and "re-pinned" in repin.explanation
    rollback = next(e for e in audit.entries if e.action == "rollback")
    assert rollback.time >= repin.time + 60.0  # the new rule's `for 1m` starts at the re-pin


class SlowSource(FunctionSource):
    """A source whose fetch at `slow_at` waits until the test lets it answer."""

    def __init__(self, slow_at: float) -> None:
        super().__init__(lambda t, r: 0.1)
        self.slow_at = slow_at
        self.fetching = asyncio.Event()
        self.answer = asyncio.Event()

    async def fetch(self, at: float, requests: Any) -> Any:
        if at == self.slow_at:
            self.fetching.set()
            await self.answer.wait()
        return await super().fetch(at, requests)


async def test_a_re_pin_during_a_tick_does_not_evaluate_that_instant_twice(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "checkout.rules").write_text(GOOD)
    store = PolicyStore(tmp_path)
    assert store.load().ok
    clock = LoopClock(epoch=0.0)
    source = SlowSource(slow_at=100.0)
    engine = Engine(
        policies=store, metrics=source, router=MemoryRouter(), workloads=NoopWorkloads(),
        store=MemoryStore(), audit=MemoryAudit(), clock=clock,
    )
    runner = asyncio.create_task(engine.run())
    await engine.add(spec())
    await source.fetching.wait()  # the tick at 100s is waiting for its metrics
    (tmp_path / "checkout.rules").write_text(STRICTER)
    assert store.load().ok
    # the re-pin rebuilds the windows up to now, 100s included
    await engine.command("default/web", "repin", "ops")
    source.answer.set()
    await clock.sleep_until(130.0)
    status = engine.status("default/web")
    assert "evaluation failed" not in caplog.text
    assert status.phase is Phase.PROGRESSING
    await engine.stop()
    await runner
