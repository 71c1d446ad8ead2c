"""Benchmarks of the control loop: what running many rollouts costs beyond the policy.

In: nothing (the policy, the recorded series and the rollouts are generated
here, deterministically). Out: one line per figure, `NAME VALUE`, then a note
line for every figure that misses its goal; how each figure was measured goes
to stderr as it is taken.

- `loop_overhead RATIOx`: process CPU time per rollout-tick of an `Engine`
  running 10,000 rollouts of a 10-rule policy at a 10 s interval, on replayed
  metrics and in-memory adapters, divided by the CPU time of
  `CompiledPolicy.evaluate` alone on the same snapshots (recorded from the
  engine, replayed on copies of the states, checked to give the engine's
  verdicts, and timed interleaved with the engine's ticks). Fake time
  (looptime), steady state only: the rollouts sit in Progressing (a step
  lasts a day) and the windows are full before the measured ticks. Goal <= 3x.
- `tick_lag_p99_ms N`: the same rollouts on a real event loop (uvloop when it
  is installed); for every rollout at every measured tick, the time from its
  due time to the moment its policy is evaluated, so a rollout late in a
  batch counts the work done for the rollouts before it. Goal < 100.
- `memory_per_rollout_kb N`: memory traced by tracemalloc for the engine and
  its 10,000 rollouts once their streams and windows hold live ticks only,
  per rollout. Goal <= 50.
- `queries_per_tick N` and `metrics_in_policy M`: 1,000 rollouts sharing the
  policy, fetched through the real `PrometheusSource` from a Prometheus double
  (an aiohttp server on 127.0.0.1 that counts the queries it answers): HTTP
  queries per tick (an interval, in which every rollout ticks once), against
  the number of metrics the policy reads. Goal N <= M.

The exit status is 2 when no honest figure can be given (a rollout left its
step, a tick went missing, evaluate alone disagreed with the engine).
Run from the repository root: `.venv/bin/python bench/loop.py`; bench/README.md
says how to read the output.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import math
import pstats
import re
import statistics
import sys
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

# Run as a script, this file's folder comes first on sys.path and bench/dsl.py
# would shadow the `dsl` package; put the repository root there instead.
_ROOT = Path(__file__).resolve().parent.parent
if __name__ == "__main__":
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT / "bench"]
    sys.path.insert(0, str(_ROOT))

import looptime  # noqa: E402
from aiohttp import web  # noqa: E402

import dsl  # noqa: E402
from adapters.local.memory import MemoryRouter, MemoryStore, NoopWorkloads  # noqa: E402
from adapters.metrics.catalog import catalog_for  # noqa: E402
from adapters.metrics.prometheus import PrometheusSource  # noqa: E402
from adapters.metrics.replay import ReplaySource  # noqa: E402
from dsl.compile import CompiledPolicy  # noqa: E402
from dsl.runtime import PolicyState, Snapshot, Verdict  # noqa: E402
from engine.audit import MemoryAudit  # noqa: E402
from engine.loop import Engine, LoopClock  # noqa: E402
from engine.model import Phase, RolloutSpec, RolloutStatus  # noqa: E402
from engine.ports import MetricRequest, MetricSource, MetricValues, NoTelemetry  # noqa: E402

T = TypeVar("T")

INTERVAL = 10.0  # seconds between ticks
EPOCH = 1_700_000_000.0  # fake time starts here, a multiple of the interval
STEP_DURATION = 86_400.0  # a day: the rollouts stay in their first step
POLICY_NAME = "bench"

GOALS: dict[str, tuple[str, float]] = {
    "loop_overhead": ("<=", 3.0),
    "tick_lag_p99_ms": ("<", 100.0),
    "memory_per_rollout_kb": ("<=", 50.0),
}


class BenchError(Exception):
    """The benchmark cannot give an honest figure (a rollout left its step, a tick went missing)."""


# --- the policy, the series, the rollouts ------------------------------------------

POLICY = """\
# a web service: ten rules over six metrics, every kind of window
latency:   p99 > 300ms for 2m -> rollback
errors:    error_rate > 1% for 1m -> rollback
relative:  canary.p99 > stable.p99 * 1.5 and canary.p99 > 100ms for 3m -> pause
err_rel:   canary.error_rate > stable.error_rate * 2 and canary.error_rate > 0.5% for 2m -> rollback
flapping:  count(p99 > 250ms, 2m) >= 6 -> pause
p90_trend: avg(p90, 1m) > 200ms for 1m -> pause
p50_spike: max(p50, last 6) > 150ms -> pause
no_data:   absent(p99) for 1m -> pause
traffic:   request_rate < stable.request_rate * weight / 100 * 0.5 for 3m -> pause
early_win: weight >= 50 and success_rate >= 99.9% for 10m -> promote
"""

# Healthy values that wander a little: every rule is evaluated in full and stays
# false, so each tick is the common one (Progressing, continue, nothing to save).
BASELINES: dict[str, tuple[float, float]] = {
    "canary.p99": (0.115, 0.012),
    "stable.p99": (0.115, 0.012),
    "canary.p90": (0.080, 0.010),
    "canary.p50": (0.040, 0.005),
    "canary.error_rate": (0.002, 0.001),
    "stable.error_rate": (0.002, 0.001),
    "canary.success_rate": (0.995, 0.002),
    "canary.request_rate": (5.0, 0.5),
    "stable.request_rate": (95.0, 5.0),
}


def load_policy(text: str = POLICY) -> CompiledPolicy:
    return dsl.load(text, f"{POLICY_NAME}.rules")


def metrics_of(policy: CompiledPolicy) -> set[str]:
    """The distinct metric names a policy reads (`canary.p99` and `stable.p99` are one)."""
    return {key.split(".", 1)[1] for key in policy.metric_keys}


def make_series(samples: int) -> dict[str, list[float | None]]:
    """`samples` values per metric key, INTERVAL apart, deterministic."""
    out: dict[str, list[float | None]] = {}
    for n, (key, (base, amp)) in enumerate(BASELINES.items()):
        out[key] = [
            round(base + amp * math.sin(0.37 * i + n) * math.cos(0.11 * i), 6)
            for i in range(samples)
        ]
    return out


def replay_source(now: float, interval: float, ticks: int) -> ReplaySource:
    """The recorded series, starting well before `now` (for backfills) and lasting `ticks` more."""
    history = 100
    return ReplaySource(make_series(history + ticks), interval, start=now - history * interval)


def make_specs(count: int, interval: float = INTERVAL) -> list[RolloutSpec]:
    return [
        RolloutSpec(
            name=f"svc-{i:05d}",
            namespace=f"team-{i % 20:02d}",
            stable=f"svc-{i:05d}",
            policy=POLICY_NAME,
            interval=interval,
            strategy={"type": "linear", "step_duration": STEP_DURATION},  # type: ignore[arg-type]
        )
        for i in range(count)
    ]


class Policies:
    """The policy provider: one compiled policy, shared by every rollout."""

    def __init__(self, policy: CompiledPolicy) -> None:
        self.policy = policy

    def get(self, name: str) -> CompiledPolicy | None:
        return self.policy if name == POLICY_NAME else None


class BatchTelemetry(NoTelemetry):
    """The engine's telemetry, keeping the lag of every batch (and measuring nothing else)."""

    def __init__(self) -> None:
        self.lags: list[float] = []

    def tick_lag(self, seconds: float) -> None:
        self.lags.append(seconds)


@dataclass
class Rig:
    """An engine on in-memory adapters with every rollout at one interval, and its watchers."""

    engine: Engine
    store: MemoryStore
    clock: LoopClock
    policy: CompiledPolicy
    interval: float
    telemetry: BatchTelemetry
    task: asyncio.Future[None] | None = None

    @classmethod
    def build(
        cls, policy: CompiledPolicy, metrics: MetricSource, clock: LoopClock, interval: float
    ) -> Rig:
        store = MemoryStore()
        telemetry = BatchTelemetry()
        engine = Engine(
            policies=Policies(policy),
            metrics=metrics,
            router=MemoryRouter(),
            workloads=NoopWorkloads(),
            store=store,
            audit=MemoryAudit(),
            clock=clock,
            telemetry=telemetry,
        )
        return cls(engine, store, clock, policy, interval, telemetry)

    async def start(
        self, specs: Sequence[RolloutSpec], *, resume: bool = False, poll: float = 0.25
    ) -> None:
        """Run the engine, add the rollouts and wait until every one is Progressing.

        With `resume`, each rollout is taken on from a stored status in its first
        step, as a restarted controller does (its windows backfilled from the
        source), instead of being started and brought up. Both end in the same
        steady state; resuming is the quicker way to put many rollouts in place.
        """
        if any(spec.interval != self.interval for spec in specs):
            raise ValueError("every rollout of a rig has the rig's interval")
        self.task = asyncio.ensure_future(self.engine.run())
        if resume:
            now = self.clock.now()
            status = RolloutStatus(
                phase=Phase.PROGRESSING,
                step=0,
                weight=5,
                started_at=now - 60.0,
                step_started_at=now - 60.0,
                policy_hash=self.policy.source_hash,
                message="step 0: canary weight 5",
            )
            for spec in specs:
                await self.store.save(spec.key, status)
        for spec in specs:
            await self.engine.add(spec)
        while self.progressing() < len(specs):
            if any(s.phase.finished for s in self.store.statuses.values()):
                raise BenchError("a rollout finished while starting")
            await asyncio.sleep(poll)

    def progressing(self) -> int:
        return sum(s.phase is Phase.PROGRESSING for s in self.store.statuses.values())

    async def stop(self) -> None:
        await self.engine.stop()
        if self.task is not None:
            await self.task

    async def first_ticks(self) -> None:
        """Wait until every rollout has ticked (and saved its status) at least once."""
        # every rollout is due within an interval; half of one more keeps clear of a
        # batch due at the very moment this wakes
        await self.clock.sleep_until(self.clock.now() + 1.5 * self.interval)

    def phases(self) -> list[float]:
        """Where in the interval the rollouts tick, from their latest verdicts; sorted."""
        ats = (self.engine.verdict(key) for key in self.engine.keys())  # noqa: SIM118
        return sorted({round(v.at % self.interval, 6) for v in ats if v is not None})

    def quiet_after(self, t: float) -> float:
        """The first time after `t` midway in the widest gap between the rollouts' ticks.

        The engine may spread rollouts over their interval (ticks at several
        phases); a measurement that runs from such a quiet time to the same time
        intervals later holds exactly one tick of every rollout.
        """
        phases = self.phases()
        if not phases:
            raise BenchError("no rollout has ticked yet")
        ends = [*phases[1:], phases[0] + self.interval]
        width, start = max((b - a, a) for a, b in zip(phases, ends, strict=True))
        phase = (start + width / 2) % self.interval
        return (math.floor((t - phase) / self.interval) + 1) * self.interval + phase

    def batches(self) -> int:
        """How many batches (ticks) the engine has run."""
        return len(self.telemetry.lags)

    def check_steady(self, count: int, since: float, what: str) -> None:
        """Every rollout is still in its first step, was evaluated at `since` or later, healthy."""
        progressing = self.progressing()
        if progressing != count:
            raise BenchError(f"{what}: only {progressing} of {count} rollouts stayed Progressing")
        verdicts = [(k, self.engine.verdict(k)) for k in self.engine.keys()]  # noqa: SIM118
        late = [k for k, v in verdicts if v is None or v.at < since]
        if late:
            raise BenchError(f"{what}: {len(late)} rollouts missed their tick, e.g. {late[0]}")
        sick = [k for k, v in verdicts if v is not None and v.health < 100]
        if sick:
            raise BenchError(f"{what}: {len(sick)} rollouts saw unknown or bad values")


Evaluate = Callable[[float, Snapshot, PolicyState], Verdict]


@contextmanager
def wrapped_evaluate(
    policy: CompiledPolicy, wrap: Callable[[Evaluate], Evaluate]
) -> Iterator[None]:
    """Route `policy.evaluate` through `wrap(evaluate)` for the `with` block.

    The wrapper is an instance attribute shadowing the method, so outside the
    block the engine calls the plain method and pays nothing for it.
    """
    setattr(policy, "evaluate", wrap(policy.evaluate))  # noqa: B010
    try:
        yield
    finally:
        delattr(policy, "evaluate")


class TimedSource:
    """A metric source that adds up the CPU time its inner source spends in `fetch`."""

    def __init__(self, inner: MetricSource) -> None:
        self.inner = inner
        self.seconds = 0.0
        self.requests = 0

    async def fetch(self, at: float, requests: Sequence[MetricRequest]) -> MetricValues:
        t0 = time.process_time()
        try:
            return await self.inner.fetch(at, requests)
        finally:
            self.seconds += time.process_time() - t0
            self.requests += len(requests)

    async def fetch_range(
        self, start: float, end: float, step: float, requests: Sequence[MetricRequest]
    ) -> Mapping[MetricRequest, list[tuple[float, float | None]]]:
        return await self.inner.fetch_range(start, end, step, requests)


class GcTimer:
    """CPU time spent in garbage collection while installed (a `gc.callbacks` entry)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.collections: Counter[int] = Counter()
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.process_time()
        else:
            self.seconds += time.process_time() - self._started
            self.collections[info["generation"]] += 1

    @contextmanager
    def installed(self) -> Iterator[GcTimer]:
        gc.callbacks.append(self)
        try:
            yield self
        finally:
            gc.callbacks.remove(self)


def run_fake_time(coro: Coroutine[Any, Any, T]) -> T:
    """Run on a looptime loop: the clock jumps ahead whenever every task waits."""
    loop = looptime.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


def new_real_loop() -> tuple[asyncio.AbstractEventLoop, str]:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop(), "asyncio"
    return uvloop.new_event_loop(), "uvloop"


def run_real_time(coro: Coroutine[Any, Any, T]) -> tuple[T, str]:
    loop, kind = new_real_loop()
    try:
        return loop.run_until_complete(coro), kind
    finally:
        loop.close()


def log(line: str) -> None:
    print(f"# {line}", file=sys.stderr, flush=True)


# --- figures -----------------------------------------------------------------------


@dataclass(frozen=True)
class Figure:
    name: str
    value: float
    text: str  # the value as printed
    details: tuple[str, ...] = ()


# The longest window of POLICY is 2m: 12 ticks fill it. Warming up a few ticks
# more also gets the first tick's status saves (pending rules go from unset to
# none) out of the way.
WARMUP_TICKS = 14


@dataclass
class Capture:
    """Every evaluation the engine makes while it is installed, to be replayed alone.

    States are copied as they were before their first captured call. Snapshots
    equal to one seen before are kept once (every rollout replays the same
    recording), so the capture adds little to the heap the engine then runs in.
    """

    states: dict[int, PolicyState] = field(default_factory=dict)
    calls: list[tuple[int, float, Snapshot]] = field(default_factory=list)
    outcomes: list[tuple[object, ...]] = field(default_factory=list)
    snapshots: dict[tuple[tuple[str, float | None], ...], Snapshot] = field(default_factory=dict)

    def wrap(self, evaluate: Evaluate) -> Evaluate:
        states, calls, outcomes, snapshots = self.states, self.calls, self.outcomes, self.snapshots

        def recording(now: float, snapshot: Snapshot, state: PolicyState) -> Verdict:
            key = id(state)
            if key not in states:
                states[key] = state.copy()
            items = tuple(snapshot.items())
            snap = snapshots.get(items)
            if snap is None:
                snapshots[items] = snap = dict(snapshot)
            calls.append((key, now, snap))
            verdict = evaluate(now, snapshot, state)
            outcomes.append(_outcome(verdict))
            return verdict

        return recording


def _outcome(v: Verdict) -> tuple[object, ...]:
    return (v.at, v.action, v.rule, v.health, v.pending_since, v.conditions)


class Alone:
    """`policy.evaluate` alone over the captured calls, one tick's worth at a time.

    Runs on copies of the states as they were before the capture, so every call
    sees what it saw in the engine. Keeps no verdict: the engine keeps only the
    latest one per rollout, and a list of them would add collections. `gc`
    counts the collections during the timed calls only.
    """

    def __init__(self, policy: CompiledPolicy, capture: Capture, per_tick: int) -> None:
        self.evaluate = policy.evaluate
        states = {key: state.copy() for key, state in capture.states.items()}
        self.work = [(states[key], now, snap) for key, now, snap in capture.calls]
        self.per_tick = per_tick
        self.times: list[float] = []
        self.gc = GcTimer()

    def tick(self) -> None:
        """Evaluate the next tick's calls, in the engine's order, and time them."""
        start = len(self.times) * self.per_tick
        chunk = self.work[start : start + self.per_tick]
        if not chunk:
            raise BenchError("loop_overhead: no captured tick left to replay")
        evaluate = self.evaluate
        with self.gc.installed():
            t0 = time.process_time()
            for state, now, snap in chunk:
                evaluate(now, snap, state)
            gc.collect(1)  # see `_loop_overhead`
            self.times.append(time.process_time() - t0)


def verify_alone(policy: CompiledPolicy, capture: Capture) -> None:
    """Evaluate alone reaches the engine's verdicts: the timed work was the same work."""
    states = capture.states
    for i, (key, now, snap) in enumerate(capture.calls):
        if _outcome(policy.evaluate(now, snap, states[key])) != capture.outcomes[i]:
            raise BenchError(f"evaluate alone disagrees with the engine at call {i}")


async def _loop_overhead(
    rollouts: int, ticks: int, warmup: int, resume: bool, profiler: cProfile.Profile | None
) -> Figure:
    policy = load_policy()
    clock = LoopClock(epoch=EPOCH)
    source = TimedSource(replay_source(EPOCH, INTERVAL, warmup + 2 * ticks + 20))
    rig = Rig.build(policy, source, clock, INTERVAL)
    t0 = time.process_time()
    await rig.start(make_specs(rollouts), resume=resume)
    started = time.process_time() - t0
    await rig.first_ticks()
    # each step from a quiet time to the next holds one tick of every rollout
    begin = rig.quiet_after(clock.now()) + (warmup - 1) * INTERVAL
    await clock.sleep_until(begin)
    phases = len(rig.phases())
    # `ticks` ticks with every evaluation recorded, to be replayed alone ...
    capture = Capture()
    with wrapped_evaluate(policy, capture.wrap):
        await clock.sleep_until(begin + ticks * INTERVAL)
    if len(capture.calls) != rollouts * ticks:
        raise BenchError(f"loop_overhead: captured {len(capture.calls)} evaluations")
    alone = Alone(policy, capture, rollouts)
    gc.collect()
    # ... then `ticks` measured ones, each after replaying one captured tick alone:
    # interleaved, a machine that slows down slows both sides alike. Each side ends
    # its turn with a collection of the young generations, timed as its own, so
    # neither leaves the other the objects it allocated to traverse.
    begin += ticks * INTERVAL
    batches, fetched, gc_engine = rig.batches(), source.seconds, GcTimer()
    engine_ticks: list[float] = []
    for k in range(1, ticks + 1):
        alone.tick()
        with gc_engine.installed():
            if profiler is not None:
                profiler.enable()
            t0 = time.process_time()
            await clock.sleep_until(begin + k * INTERVAL)
            gc.collect(1)
            engine_ticks.append(time.process_time() - t0)
            if profiler is not None:
                profiler.disable()
    fetched = source.seconds - fetched
    if rig.batches() - batches != ticks * phases:
        raise BenchError(f"loop_overhead: {rig.batches() - batches} batches in {ticks} ticks")
    rig.check_steady(rollouts, begin + (ticks - 1) * INTERVAL, "loop_overhead")
    await rig.stop()
    verify_alone(policy, capture)
    n = rollouts * ticks
    per_engine = sum(engine_ticks) / n
    per_alone = sum(alone.times) / n
    ratio = per_engine / per_alone
    rest = per_engine - per_alone - fetched / n - gc_engine.seconds / n
    return Figure(
        "loop_overhead",
        ratio,
        f"{ratio:.2f}x",
        (
            f"engine: {us(per_engine)} CPU per rollout-tick, "
            f"median tick {statistics.median(engine_ticks) * 1e3:.0f} ms; of which "
            f"metric source {us(fetched / n)}, garbage collection {us(gc_engine.seconds / n)} "
            f"({_collections(gc_engine)}), the rest of the loop {us(rest)} "
            "beyond evaluate",
            f"evaluate alone: {us(per_alone)} per rollout-tick, "
            f"median tick {statistics.median(alone.times) * 1e3:.0f} ms; of which "
            f"garbage collection {us(alone.gc.seconds / n)} ({_collections(alone.gc)})",
            f"{rollouts} rollouts x {ticks} ticks, {len(policy.rules)} rules, "
            f"{len(policy.metric_keys)} metric keys, {phases} batches per tick, fake time, "
            f"{warmup} warm-up ticks; "
            f"{'resuming' if resume else 'starting'} the rollouts took {started:.1f} s CPU",
        ),
    )


def us(seconds: float) -> str:
    return f"{seconds * 1e6:.1f} us"


def _collections(timer: GcTimer) -> str:
    return ", ".join(f"{timer.collections[g]} of gen {g}" for g in (0, 1, 2)) or "none"


def bench_loop_overhead(
    rollouts: int = 10_000,
    ticks: int = 10,
    warmup: int = WARMUP_TICKS,
    resume: bool = True,
    profiler: cProfile.Profile | None = None,
) -> Figure:
    """The `loop_overhead` figure; `profiler`, if given, runs during the measured ticks only."""
    return run_fake_time(_loop_overhead(rollouts, ticks, warmup, resume, profiler))


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), nearest rank: a value that was really seen."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]


@dataclass
class LagProbe:
    """Per-evaluation lag: from the rollout's due time to the moment its evaluate starts.

    The engine evaluates a batch at its due time: the `now` it hands to
    `evaluate` is the time the rollout was due. The moment is read from the
    monotonic clock, in the time scale of the engine's clock: the event
    loop's clock is the monotonic one (cached per loop iteration), so
    `offset` (engine clock minus loop clock) converts exactly.
    """

    offset: float
    lags: list[float] = field(default_factory=list)

    def wrap(self, evaluate: Evaluate) -> Evaluate:
        offset, lags, clock = self.offset, self.lags, time.monotonic

        def timed(now: float, snapshot: Snapshot, state: PolicyState) -> Verdict:
            lags.append(clock() + offset - now)
            return evaluate(now, snapshot, state)

        return timed


async def _tick_lag(rollouts: int, ticks: int, interval: float) -> tuple[Figure, int]:
    policy = load_policy()
    clock = LoopClock()
    loop = asyncio.get_running_loop()
    source = replay_source(clock.now(), interval, ticks + 1000)
    rig = Rig.build(policy, source, clock, interval)
    await rig.start(make_specs(rollouts, interval), resume=True)
    await rig.first_ticks()  # not measured: the first tick saves every status once
    begin = rig.quiet_after(clock.now())
    await clock.sleep_until(begin)
    phases = len(rig.phases())
    await asyncio.sleep(0)
    probe = LagProbe(clock.now() - loop.time())
    batches = rig.batches()
    with GcTimer().installed() as gc_timer, wrapped_evaluate(policy, probe.wrap):
        await clock.sleep_until(begin + ticks * interval)
    batch_lags = rig.telemetry.lags[batches:]
    await rig.stop()
    phases_text = f"{phases} batch(es) per tick"
    if len(batch_lags) != ticks * phases or len(probe.lags) != rollouts * ticks:
        raise BenchError(
            f"tick_lag: {len(batch_lags)} batches and {len(probe.lags)} evaluations "
            f"in {ticks} ticks of {rollouts} rollouts"
        )
    if max(probe.lags) >= interval / 2 or min(probe.lags) < 0:
        raise BenchError(f"tick_lag: lags from {min(probe.lags)} to {max(probe.lags)} s")
    p99 = percentile(probe.lags, 99) * 1e3
    ms = [f"{lag * 1e3:.1f}" for lag in batch_lags]
    return Figure(
        "tick_lag_p99_ms",
        p99,
        f"{p99:.1f}",
        (
            f"per-rollout lag: median {percentile(probe.lags, 50) * 1e3:.1f} ms, "
            f"p99 {p99:.1f} ms, max {max(probe.lags) * 1e3:.1f} ms",
            f"{phases_text}; batch start lag (Engine.tick_lags): {', '.join(ms)} ms; "
            f"garbage collection {gc_timer.seconds * 1e3:.0f} ms ({_collections(gc_timer)})",
        ),
    ), rollouts


def bench_tick_lag(rollouts: int = 10_000, ticks: int = 3, interval: float = INTERVAL) -> Figure:
    """The `tick_lag_p99_ms` figure, on a real event loop (uvloop when installed)."""
    (figure, _), kind = run_real_time(_tick_lag(rollouts, ticks, interval))
    return Figure(
        figure.name,
        figure.value,
        figure.text,
        (
            *figure.details,
            f"{rollouts} rollouts x {ticks} ticks at a {interval:g} s interval, real time, {kind}",
        ),
    )


async def _memory(rollouts: int, ticks: int, top: int) -> Figure:
    policy = load_policy()
    clock = LoopClock(epoch=EPOCH)
    source = replay_source(EPOCH, INTERVAL, ticks + 20)
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    rig = Rig.build(policy, source, clock, INTERVAL)
    await rig.start(make_specs(rollouts), resume=True)
    # the windows are backfilled when a rollout resumes; the first tick saves every
    # status once with its verdict; well before the default 24 ticks every stream and
    # window holds live ticks only (its length stops changing). Memory four ticks
    # before the end and at the end shows whether it still grows.
    await rig.first_ticks()
    begin = rig.quiet_after(clock.now())
    phases = len(rig.phases())
    seen: list[tuple[int, int]] = []  # (ticks so far, bytes traced)
    for upto in (max(1, ticks - 4), ticks):
        await clock.sleep_until(begin + (upto - 1) * INTERVAL)
        gc.collect()
        seen.append((rig.batches() // phases, tracemalloc.get_traced_memory()[0] - base))
    snapshot = tracemalloc.take_snapshot()
    tracemalloc.stop()
    rig.check_steady(rollouts, begin + (ticks - 2) * INTERVAL, "memory_per_rollout_kb")
    await rig.stop()
    (mid_ticks, mid), (done, used) = seen
    kb = used / rollouts / 1024
    sites = snapshot.filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
    lines = [
        f"{stat.size / rollouts:7.0f} B  {_site(stat.traceback[0])}"
        for stat in sites.statistics("lineno")[:top]
    ]
    return Figure(
        "memory_per_rollout_kb",
        kb,
        f"{kb:.1f}",
        (
            f"{used / 2**20:.0f} MiB traced for {rollouts} rollouts after {done} ticks "
            f"({mid / rollouts / 1024:.1f} KiB per rollout after {mid_ticks}); "
            "engine, statuses, streams, windows and the in-memory adapters",
            "largest allocation sites, bytes per rollout:",
            *(f"  {line}" for line in lines),
        ),
    )


def _site(frame: tracemalloc.Frame) -> str:
    path = Path(frame.filename)
    try:
        name = str(path.resolve().relative_to(_ROOT))
    except ValueError:
        name = "/".join(path.parts[-2:])
    return f"{name}:{frame.lineno}"


def bench_memory(rollouts: int = 10_000, ticks: int = 24, top: int = 8) -> Figure:
    """The `memory_per_rollout_kb` figure: tracemalloc over the engine's life, on fake time."""
    return run_fake_time(_memory(rollouts, ticks, top))


# --- the Prometheus double ---------------------------------------------------------

_MATCHER = re.compile(r'\b(namespace|workload)=~"((?:[^"\\]|\\.)*)"')
_ESCAPE = re.compile(r"\\(.)")


def _alternatives(text: str) -> list[str]:
    """The names of a `=~` string the source wrote: `x` or `(?:a|b|c)`, escapes undone.

    The rollouts' names hold no character that needs a regex or string escape,
    so splitting at `|` is exact for them.
    """
    if text.startswith("(?:") and text.endswith(")"):
        text = text[3:-1]
    return [_ESCAPE.sub(r"\1", _ESCAPE.sub(r"\1", part)) for part in text.split("|")]


def _value_for(query: str, canary: bool) -> float:
    """A healthy value for whichever catalog query this is (the `plain` catalog's text)."""
    for quantile, value in (("0.99", 0.115), ("0.9", 0.08), ("0.5", 0.04)):
        if f"histogram_quantile({quantile}," in query:
            return value
    if 'code=~"5.."' in query:
        return 0.002
    if 'code=~"2.."' in query:
        return 0.995
    return 5.0 if canary else 95.0  # request_rate


class PrometheusDouble:
    """An aiohttp server on 127.0.0.1 answering instant queries, and counting them.

    It answers a query with one series per workload the query's `workload=~`
    alternation names whose namespace its `namespace=~` alternation names, as
    a `sum by (namespace, workload)` over a real Prometheus would.
    """

    def __init__(self, specs: Sequence[RolloutSpec]) -> None:
        self.namespace_of: dict[str, str] = {}
        for spec in specs:
            self.namespace_of[spec.stable] = spec.namespace
            self.namespace_of[spec.canary_name] = spec.namespace
        self.queries = 0
        self.series = 0
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/api/v1/query", self._query)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _query(self, request: web.Request) -> web.Response:
        form = await request.post()
        query, at = str(form["query"]), float(str(form["time"]))
        self.queries += 1
        names: dict[str, list[str]] = {"namespace": [], "workload": []}
        for label, text in _MATCHER.findall(query):
            names[label].extend(_alternatives(text))
        namespaces = set(names["namespace"])
        result = [
            {
                "metric": {"namespace": ns, "workload": workload},
                "value": [at, repr(_value_for(query, workload.endswith("-canary")))],
            }
            for workload in dict.fromkeys(names["workload"])
            if (ns := self.namespace_of.get(workload)) is not None and ns in namespaces
        ]
        self.series += len(result)
        return web.json_response(
            {"status": "success", "data": {"resultType": "vector", "result": result}}
        )


@dataclass
class KnownProbe:
    """Counts the snapshots evaluated, and those missing a value of a metric the policy reads."""

    keys: frozenset[str]
    snapshots: int = 0
    unknown: int = 0

    def wrap(self, evaluate: Evaluate) -> Evaluate:
        def checked(now: float, snapshot: Snapshot, state: PolicyState) -> Verdict:
            self.snapshots += 1
            self.unknown += any(snapshot.get(k) is None for k in self.keys)
            return evaluate(now, snapshot, state)

        return checked


async def _queries(rollouts: int, ticks: int, interval: float) -> tuple[Figure, Figure]:
    policy = load_policy()
    specs = make_specs(rollouts, interval)
    double = PrometheusDouble(specs)
    await double.start()
    source = PrometheusSource(
        double.url, catalog_for("plain"), evaluation_interval=interval, timeout=30.0
    )
    try:
        rig = Rig.build(policy, source, LoopClock(), interval)
        await rig.start(specs)
        await rig.first_ticks()
        begin = rig.quiet_after(rig.clock.now())
        await rig.clock.sleep_until(begin)
        queries, sent, batches = double.queries, source.http_requests, rig.batches()
        known = KnownProbe(policy.metric_keys)
        with wrapped_evaluate(policy, known.wrap):
            await rig.clock.sleep_until(begin + ticks * interval)
        queries, sent = double.queries - queries, source.http_requests - sent
        batches = rig.batches() - batches
        rig.check_steady(rollouts, begin + (ticks - 1) * interval, "queries_per_tick")
        phases = len(rig.phases())
        await rig.stop()
    finally:
        await source.close()
        await double.stop()
    if batches != ticks * phases or sent != queries or known.snapshots != rollouts * ticks:
        raise BenchError(
            f"queries_per_tick: {batches} batches in {ticks} ticks, {sent} requests sent "
            f"and {queries} answered, {known.snapshots} evaluations"
        )
    if known.unknown:
        raise BenchError(f"queries_per_tick: {known.unknown} snapshots lacked a metric value")
    metrics = metrics_of(policy)
    # every rollout ticks once an interval, in one batch or (when the engine spreads
    # them over the interval) in several: the queries of all of them count
    per_tick = queries / ticks
    return (
        Figure(
            "queries_per_tick",
            per_tick,
            f"{per_tick:g}",
            (
                f"{queries} queries in {ticks} ticks of {rollouts} rollouts, {phases} batch(es) "
                f"per tick ({2 * rollouts} workloads, {len(policy.metric_keys)} metric keys "
                "each); every value known",
                f"PrometheusSource with the plain catalog against a double on {double.url}, "
                f"{interval:g} s interval, real time",
            ),
        ),
        Figure(
            "metrics_in_policy",
            len(metrics),
            str(len(metrics)),
            (f"{', '.join(sorted(metrics))}",),
        ),
    )


def bench_queries(
    rollouts: int = 1_000, ticks: int = 3, interval: float = 2.0
) -> tuple[Figure, Figure]:
    """The `queries_per_tick` and `metrics_in_policy` figures (real time, a local double)."""
    figures, _ = run_real_time(_queries(rollouts, ticks, interval))
    return figures


# --- the report --------------------------------------------------------------------

FIGURES = ("loop_overhead", "tick_lag", "memory", "queries")


def missed(figures: Sequence[Figure]) -> list[str]:
    """One note per figure that misses its goal."""
    notes = []
    by_name = {f.name: f for f in figures}
    for f in figures:
        if f.name in GOALS:
            op, goal = GOALS[f.name]
            met = f.value <= goal if op == "<=" else f.value < goal
            if not met:
                unit = "x" if f.text.endswith("x") else ""
                notes.append(f"{f.name}: goal {op} {goal:g}{unit}: missed ({f.text})")
        elif f.name == "queries_per_tick" and "metrics_in_policy" in by_name:
            limit = by_name["metrics_in_policy"].value
            if f.value > limit:
                notes.append(
                    f"queries_per_tick: goal <= metrics_in_policy ({limit:g}): missed ({f.text})"
                )
    return notes


def report(figures: Sequence[Figure]) -> list[str]:
    """The lines printed on stdout: one per figure, then one per missed goal."""
    return [f"{f.name} {f.text}" for f in figures] + missed(figures)


def _show(figure: Figure) -> None:
    print(f"{figure.name} {figure.text}", file=sys.stderr)
    for line in figure.details:
        print(f"    {line}", file=sys.stderr)
    sys.stderr.flush()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rollouts", type=int, default=10_000, help="rollouts (default 10000)")
    parser.add_argument("--ticks", type=int, default=10, help="measured ticks of loop_overhead")
    parser.add_argument("--lag-ticks", type=int, default=3, help="measured ticks of tick_lag")
    parser.add_argument("--interval", type=float, default=INTERVAL, help="seconds (default 10)")
    parser.add_argument(
        "--prometheus-rollouts", type=int, default=1_000, help="rollouts of queries_per_tick"
    )
    parser.add_argument(
        "--prometheus-interval", type=float, default=2.0, help="its interval (default 2 s)"
    )
    parser.add_argument("--only", action="append", choices=FIGURES, help="repeatable")
    parser.add_argument(
        "--profile",
        type=int,
        metavar="N",
        default=0,
        help="print the N functions taking most time in loop_overhead's measured ticks",
    )
    args = parser.parse_args(argv)
    only = args.only or FIGURES
    figures: list[Figure] = []
    profiler = cProfile.Profile() if args.profile else None
    try:
        if "loop_overhead" in only:
            figures.append(bench_loop_overhead(args.rollouts, args.ticks, profiler=profiler))
            _show(figures[-1])
        if "tick_lag" in only:
            figures.append(bench_tick_lag(args.rollouts, args.lag_ticks, args.interval))
            _show(figures[-1])
        if "memory" in only:
            figures.append(bench_memory(args.rollouts))
            _show(figures[-1])
        if "queries" in only:
            for figure in bench_queries(args.prometheus_rollouts, 3, args.prometheus_interval):
                figures.append(figure)
                _show(figure)
    except BenchError as e:
        print(f"no honest figure: {e}", file=sys.stderr)
        return 2
    if profiler is not None:
        stats = pstats.Stats(profiler, stream=sys.stderr)
        stats.sort_stats("tottime").print_stats(args.profile)
    for line in report(figures):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
