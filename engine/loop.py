"""The control loop: rollouts in, traffic moves, statuses and audit lines out.

One `Engine` runs every rollout with one scheduler: a heap of due times, not
a task sleeping per rollout. Ticks are aligned to multiples of each rollout's
interval, so rollouts with the same interval come due together and their
metrics are fetched in one call per source (the Prometheus source turns that
into one query per metric). Each due rollout is then evaluated (the pure
policy), its verdict turned into a `Decision` by the decider (the state
machine, unless the composition root gives another), and the
decision's effects carried out by a task of its own, under the rollout's
lock, so a slow router never delays another rollout's tick.

Errors stay with their rollout: a failing source makes values unknown, a
failing effect is retried (rollbacks until confirmed), and an unexpected
exception is logged, recorded in the status message and the rollout is
scheduled again. `stop()` lets effects in flight finish before it returns.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
import time
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from dsl.ast import Action
from dsl.compile import CompiledPolicy
from dsl.runtime import PolicyState, Verdict
from engine import rollback
from engine.decider import Decider, MachineDecider
from engine.machine import (
    BringUp,
    Decision,
    IllegalTransition,
    Machine,
    Promote,
    RollBack,
    SetWeight,
)
from engine.model import AuditEntry, Phase, RolloutSpec, RolloutStatus, VerdictRecord
from engine.ports import (
    AuditSink,
    Clock,
    MetricRequest,
    MetricSource,
    NoTelemetry,
    PolicyProvider,
    RolloutRef,
    RolloutStore,
    Target,
    Telemetry,
    TrafficRouter,
    WorkloadFailed,
    WorkloadManager,
)
from engine.strategy import strategy_of
from engine.stream import MetricStream

log = logging.getLogger("codedance.engine")

TICKED = (Phase.PROGRESSING, Phase.PAUSED, Phase.WAITING_FOR_APPROVAL)
SLOT = 1000  # rollouts of one interval that share a tick
SLOTS = 10  # ticks per interval that rollouts are spread over


class LoopClock:
    """Wall-clock seconds driven by the event loop's monotonic clock.

    `now()` starts at the wall time and advances with the loop's clock, so it
    never jumps back when the system clock is set, and it follows a faked
    loop clock in tests (looptime), where `for 2m` takes no real time.
    """

    def __init__(self, epoch: float | None = None) -> None:
        self._epoch = epoch
        self._start: float | None = None

    def now(self) -> float:
        loop_time = asyncio.get_running_loop().time()
        if self._start is None:
            # anchor at the first reading, not at construction: a clock built early
            # must not run behind the wall clock by the time it sat unused
            self._start = loop_time
            if self._epoch is None:
                self._epoch = time.time()
        assert self._epoch is not None
        return self._epoch + (loop_time - self._start)

    async def sleep_until(self, t: float) -> None:
        delay = t - self.now()
        if delay > 0:
            await asyncio.sleep(delay)


@dataclass(slots=True)
class _Rollout:
    spec: RolloutSpec
    machine: Machine
    status: RolloutStatus
    ref: RolloutRef
    policy: CompiledPolicy | None = None
    state: PolicyState | None = None
    stream: MetricStream | None = None
    requests: list[tuple[str, MetricRequest]] = field(default_factory=list)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    due: float | None = None
    saved: RolloutStatus | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    verdict: Verdict | None = None
    pending: tuple[float | None, ...] = ()
    offset: float = 0.0  # where in its interval the rollout ticks (see Engine._offset)
    step_duration: float = 0.0
    # the rollout's requests grouped by the source that serves them, built once
    by_source: list[tuple[MetricSource, list[MetricRequest]]] = field(default_factory=list)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)  # its effects in flight


class Engine:
    """Runs rollouts. Build it in the composition root with the adapters to use."""

    def __init__(
        self,
        *,
        policies: PolicyProvider,
        metrics: MetricSource | Mapping[str, MetricSource],
        router: TrafficRouter,
        workloads: WorkloadManager,
        store: RolloutStore,
        audit: AuditSink,
        clock: Clock,
        telemetry: Telemetry | None = None,
        metrics_window: float = 60.0,
        decider: Decider | None = None,
    ) -> None:
        self.policies = policies
        self.decider: Decider = decider or MachineDecider()
        # the built-in decider changes nothing on a continue within a step; another is
        # asked at every tick, since it may act on a verdict the state machine ignores
        self._every_tick = type(self.decider) is not MachineDecider
        self._sources = metrics
        self.router = router
        self.workloads = workloads
        self.store = store
        self.audit = audit
        self.clock = clock
        self.telemetry = telemetry or NoTelemetry()
        self._count_verdicts = not isinstance(self.telemetry, NoTelemetry)
        self.metrics_window = metrics_window
        self._rollouts: dict[str, _Rollout] = {}
        # due times in a heap, and the rollouts due at each: one entry per batch, not a
        # tuple per rollout and tick (which the garbage collector has to traverse)
        self._times: list[float] = []
        self._due: dict[float, list[_Rollout]] = {}
        self._phases_changed = False
        self._flush_scheduled = False
        self._per_interval: dict[float, int] = {}
        self._wake = asyncio.Event()
        self._stopping = False
        self._inflight: set[asyncio.Task[None]] = set()
        self.tick_lags: deque[float] = deque(maxlen=10_000)  # the latest, for benchmarks

    # --- public -----------------------------------------------------------------

    def status(self, key: str) -> RolloutStatus:
        """The rollout's status, with the verdict of its latest tick."""
        ro = self._rollouts[key]
        return self._with_verdict(ro, ro.status)

    def verdict(self, key: str) -> Verdict | None:
        """The full verdict of the rollout's latest tick (rule states, values, trace)."""
        return self._rollouts[key].verdict

    def keys(self) -> list[str]:
        return list(self._rollouts)

    async def add(self, spec: RolloutSpec) -> RolloutStatus:
        """Take on a rollout: start it, or resume it from its stored status."""
        key = spec.key
        if key in self._rollouts:
            raise ValueError(f"the rollout {key} is already running")
        status = await self.store.load(key) or RolloutStatus()
        ro = _Rollout(
            spec=spec,
            machine=Machine(spec, strategy_of(spec.strategy)),
            status=status,
            ref=RolloutRef(
                spec.namespace, spec.name, spec.stable, spec.canary_name, spec.service, spec.route
            ),
            saved=status,
            offset=self._offset(spec.interval),
        )
        ro.step_duration = ro.machine.strategy.step_duration
        self._rollouts[key] = ro
        if status.phase is Phase.PENDING:
            self._spawn(ro, self._start(ro))
        elif status.phase in TICKED:
            await self._resume(ro)
        elif status.phase is Phase.ROLLING_BACK:
            self._spawn(ro, self._effects(ro, Decision(status, [RollBack()])))
        elif status.phase is Phase.PROMOTING:
            self._spawn(ro, self._effects(ro, Decision(status, [Promote()])))
        elif status.phase is Phase.INITIALIZING:
            self._spawn(ro, self._effects(ro, Decision(status, [BringUp()])))
        return ro.status

    async def command(self, key: str, verb: str, actor: str, reason: str = "") -> RolloutStatus:
        """approve, pause, resume, abort, retry or repin, on behalf of `actor`."""
        ro = self._rollouts.get(key)
        if ro is None:
            raise KeyError(f"no rollout {key}")
        if verb == "repin":
            await self._repin(ro, actor)
            return ro.status
        async with ro.lock:
            now = self.clock.now()
            m, status = ro.machine, ro.status
            if verb == "approve":
                d = m.approve(status, now, actor)
            elif verb == "pause":
                d = m.pause(status, now, actor)
            elif verb == "resume":
                d = m.resume(status, now, actor)
            elif verb == "abort":
                d = m.abort(status, actor, reason)
            elif verb == "retry":
                d = m.retry(status, actor)
            else:
                raise IllegalTransition(f"unknown command {verb}")
            await self._commit(ro, d)
        if d.effects:
            self._spawn(ro, self._effects(ro, d))
        if verb == "retry":
            self._spawn(ro, self._start(ro))
        if verb == "resume":
            self._schedule(ro)
        return ro.status

    async def forget(self, key: str) -> RolloutStatus | None:
        """Stop running a rollout: no more ticks, its effects in flight cancelled.

        For a controller whose release request changed or is being deleted; it
        decides what happens to the traffic next. The rollout's last status, or
        None when it was not running.
        """
        ro = self._rollouts.pop(key, None)
        if ro is None:
            return None
        ro.due = None
        self._phases_changed = True
        for task in ro.tasks:
            task.cancel()
        await asyncio.gather(*ro.tasks, return_exceptions=True)
        ro.changed.set()
        return ro.status

    async def run(self) -> None:
        """Tick every rollout until `stop()`; returns after effects in flight finish."""
        while not self._stopping:
            if not self._times:
                self._wake.clear()
                await self._wake.wait()
                continue
            due = self._times[0]
            now = self.clock.now()
            if due > now:
                self._wake.clear()
                sleeper = asyncio.ensure_future(self.clock.sleep_until(due))
                waker = asyncio.ensure_future(self._wake.wait())
                await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
                sleeper.cancel()
                waker.cancel()
                continue
            # Evaluate each batch at its due time, not at the moment the loop woke:
            # ticks then fall exactly on multiples of the interval and `for 10s` means
            # ten seconds of ticks, whatever the scheduling jitter.
            batches: dict[float, list[_Rollout]] = {}
            rollouts = self._rollouts
            while self._times and self._times[0] <= now:
                d = heapq.heappop(self._times)
                batches[d] = [
                    ro
                    for ro in self._due.pop(d)
                    if ro.due == d and rollouts.get(ro.spec.key) is ro
                ]
            for at, batch in sorted(batches.items()):
                lag = self.clock.now() - at
                self.tick_lags.append(lag)
                self.telemetry.tick_lag(lag)
                await self._tick(batch, at)
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    async def wait_finished(self, key: str) -> RolloutStatus:
        """Wait (in loop time) until the rollout reaches a final phase."""
        ro = self._rollouts[key]
        while not ro.status.phase.finished:
            ro.changed.clear()
            await ro.changed.wait()
        while any(not t.done() for t in self._inflight):
            await asyncio.sleep(0)
        return ro.status

    # --- ticking ----------------------------------------------------------------

    def _offset(self, interval: float) -> float:
        """Where in each interval a new rollout ticks.

        Rollouts with one interval tick together so their queries are shared, but
        at most SLOT of them: the next SLOT tick a tenth of the interval later, and
        so on. A tick's batch is then bounded, and so is the lag of its last rollout
        (10,000 rollouts due at one instant would wait for each other's evaluation).
        """
        n = self._per_interval.get(interval, 0)
        self._per_interval[interval] = n + 1
        return (n // SLOT % SLOTS) * interval / SLOTS

    def _schedule(self, ro: _Rollout, now: float | None = None) -> None:
        if ro.status.phase not in TICKED:
            ro.due = None
            return
        interval = ro.spec.interval
        now = self.clock.now() if now is None else now
        off = ro.offset
        due = (math.floor((now - off) / interval + 1e-9) + 1) * interval + off
        if ro.due is not None and due <= ro.due:
            return
        ro.due = due
        group = self._due.get(due)
        if group is None:
            self._due[due] = group = []
            heapq.heappush(self._times, due)
        group.append(ro)
        self._wake.set()

    async def _tick(self, batch: Sequence[_Rollout], now: float) -> None:
        ready = [ro for ro in batch if ro.status.phase in TICKED and not ro.lock.locked()]
        values = await self._fetch(ready, now)
        for ro in batch:
            ro.due = None
        for ro in ready:
            last = None if ro.state is None else ro.state.last_tick
            if last is not None and now <= last:
                # a re-pin rebuilt the windows while this tick fetched: it has
                # evaluated this instant already, and a policy's ticks only increase
                continue
            try:
                self._evaluate(ro, now, values)
            except Exception as e:  # one broken rollout never stops the others
                log.exception("rollout %s: evaluation failed", ro.spec.key)
                ro.status = ro.status.model_copy(update={"message": f"evaluation failed: {e}"})
        after = self.clock.now()
        for ro in batch:
            self._schedule(ro, after)
        if self._phases_changed:
            # once per batch, and only after a change: counting every rollout at every
            # transition made starting n rollouts cost n^2, and at every batch it cost
            # a pass over all rollouts for each of the batches of an interval
            self._phases_changed = False
            self._report_phases()

    def _flush_phases(self) -> None:
        self._flush_scheduled = False
        if self._phases_changed:
            self._phases_changed = False
            self._report_phases()

    def _report_phases(self) -> None:
        self.telemetry.phases(Counter(ro.status.phase.value for ro in self._rollouts.values()))

    async def _fetch(
        self, ready: Sequence[_Rollout], now: float
    ) -> Mapping[MetricRequest, float | None]:
        by_source: dict[int, tuple[MetricSource, list[MetricRequest]]] = {}
        for ro in ready:
            if ro.spec.skip_analysis:
                continue
            for src, reqs in ro.by_source:
                by_source.setdefault(id(src), (src, []))[1].extend(reqs)
        results: dict[MetricRequest, float | None] = {}

        async def one(src: MetricSource, reqs: list[MetricRequest]) -> None:
            started = time.perf_counter()
            try:
                results.update(await src.fetch(now, reqs))
                self.telemetry.query(time.perf_counter() - started, True)
            except Exception as e:  # unknown values, never a default number
                log.warning("metric source %s failed: %s", type(src).__name__, e)
                self.telemetry.query(time.perf_counter() - started, False)

        await asyncio.gather(*(one(src, reqs) for src, reqs in by_source.values()))
        return results

    def _source_for(self, metric: str) -> MetricSource:
        sources = self._sources
        if isinstance(sources, Mapping):
            return sources.get(metric) or sources["*"]
        return sources

    def _evaluate(
        self, ro: _Rollout, now: float, values: Mapping[MetricRequest, float | None]
    ) -> None:
        status = ro.status
        if ro.spec.skip_analysis or ro.policy is None or ro.state is None:
            ro.verdict = None
            record = VerdictRecord(
                at=now, action="continue", rule=None, health=100.0,
                explanation="continue: analysis skipped",
            )
        else:
            snap: dict[str, float | None] = {k: values.get(req) for k, req in ro.requests}
            if ro.stream is not None:
                ro.stream.record(now, snap)  # the stream keeps this tick's snapshot
            started, step_started = status.started_at, status.step_started_at
            step_elapsed = 0.0 if step_started is None else now - step_started
            snap["weight"] = float(status.weight)
            snap["step"] = float(status.step)
            snap["elapsed"] = 0.0 if started is None else now - started
            snap["step_elapsed"] = step_elapsed
            verdict = ro.policy.evaluate(now, snap, ro.state)
            ro.verdict = verdict
            if self._count_verdicts:
                self.telemetry.verdict(verdict.action.value, verdict.rule)
            if (
                not self._every_tick
                and status.phase is Phase.PROGRESSING
                and verdict.action is Action.CONTINUE
                and step_elapsed < ro.step_duration
            ):
                # the common tick: nothing to decide; persist only a change of pending rules
                if verdict.pending_since != ro.pending:
                    ro.status = self._with_verdict(ro, status)
                    self._spawn(ro, self._save(ro))
                return
            status = self._with_verdict(ro, status)
            record = status.last_verdict or VerdictRecord(
                at=now, action="continue", rule=None, health=100.0, explanation=""
            )
        decision = self.decider.decide(status, record, now, ro.machine)
        ro.status = decision.status
        if decision.transitions or decision.effects:
            self._spawn(ro, self._apply(ro, decision))
        elif _material(ro.saved, ro.status):
            self._spawn(ro, self._save(ro))

    def _with_verdict(self, ro: _Rollout, status: RolloutStatus) -> RolloutStatus:
        """The status with the rollout's latest verdict and pending rules in it."""
        v = ro.verdict
        if v is None:
            return status
        ro.pending = v.pending_since
        pending = {
            label: since
            for (label, _), since in zip(v.rule_info, v.pending_since, strict=True)
            if since is not None
        }
        record = VerdictRecord(
            at=v.at, action=v.action.value, rule=v.rule, explanation=v.explanation,
            health=v.health,
        )
        return status.model_copy(update={"pending_since": pending, "last_verdict": record})

    # --- acting -----------------------------------------------------------------

    def _spawn(self, ro: _Rollout, coro: object) -> None:
        async def guarded() -> None:
            try:
                await coro  # type: ignore[misc]
            except Exception as e:
                log.exception("rollout %s: action failed", ro.spec.key)
                ro.status = ro.status.model_copy(update={"message": f"action failed: {e}"})

        task = asyncio.ensure_future(guarded())
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)
        ro.tasks.add(task)
        task.add_done_callback(ro.tasks.discard)

    async def _save(self, ro: _Rollout) -> None:
        async with ro.lock:
            await self.store.save(ro.spec.key, ro.status)
            ro.saved = ro.status

    async def _apply(self, ro: _Rollout, d: Decision) -> None:
        async with ro.lock:
            await self._commit(ro, d)
        await self._effects(ro, d)
        self._schedule(ro)

    async def _commit(self, ro: _Rollout, d: Decision) -> None:
        """Save the new status before acting, so a restart knows what was under way."""
        ro.status = d.status
        await self.store.save(ro.spec.key, d.status)
        ro.saved = d.status
        ro.changed.set()
        if d.transitions:
            self._phases_changed = True
            if not self._flush_scheduled:
                # report once per turn of the event loop, however many rollouts moved
                # in it (a final phase has no tick after it to report it)
                self._flush_scheduled = True
                asyncio.get_running_loop().call_soon(self._flush_phases)
        for t in d.transitions:
            await self.audit.record(
                AuditEntry(
                    time=self.clock.now(), rollout=ro.spec.key, actor=t.actor,
                    from_phase=t.from_phase, to_phase=t.to_phase, action=t.action,
                    rule=t.rule, explanation=t.explanation, weight=t.weight,
                )
            )
            log.info(
                "%s: %s -> %s (%s by %s): %s", ro.spec.key, t.from_phase.value,
                t.to_phase.value, t.action, t.actor, t.explanation,
            )

    async def _effects(self, ro: _Rollout, d: Decision) -> None:
        for effect in d.effects:
            async with ro.lock:
                follow = await self._effect(ro, effect)
            if follow is not None:
                async with ro.lock:
                    await self._commit(ro, follow)
                await self._effects(ro, follow)
        self._schedule(ro)

    async def _effect(self, ro: _Rollout, effect: object) -> Decision | None:
        """Carry out one effect; the decision that follows from its success, if any."""
        m, ref, dry = ro.machine, ro.ref, ro.spec.dry_run
        if isinstance(effect, SetWeight):
            if not dry:
                await rollback.set_weight_confirmed(self.router, ref, effect.weight, self.clock)
            return None
        if isinstance(effect, BringUp):
            if not self._pin_policy(ro):
                return m.failed(ro.status, ro.status.message)
            if not dry:
                try:
                    await self.workloads.bring_up(ref)
                    await rollback.set_weight_confirmed(self.router, ref, 0, self.clock)
                except Exception as e:
                    return m.failed(ro.status, f"the canary did not come up: {e}")
            return m.initialized(ro.status, self.clock.now())
        delay = ro.spec.scale_down_delay
        if isinstance(effect, RollBack):
            if not dry:
                await rollback.roll_back(self.router, self.workloads, ref, self.clock, delay=delay)
            return m.rolled_back(ro.status)
        if isinstance(effect, Promote):
            if not dry:
                try:
                    await rollback.promote(
                        self.router, self.workloads, ref, self.clock, delay=delay
                    )
                except WorkloadFailed as e:
                    return m.promotion_failed(ro.status, str(e))
            return m.promoted(ro.status)
        raise TypeError(f"unknown effect {effect!r}")

    async def _start(self, ro: _Rollout) -> None:
        d = ro.machine.start(ro.status, self.clock.now())
        async with ro.lock:
            await self._commit(ro, d)
        await self._effects(ro, d)

    # --- policies and windows ---------------------------------------------------

    def _pin_policy(self, ro: _Rollout) -> bool:
        """Pin the policy the rollout runs; its hash goes into the status."""
        policy = self.policies.get(ro.spec.policy)
        if policy is None:
            ro.status = ro.status.model_copy(
                update={"message": f"no policy named {ro.spec.policy!r}"}
            )
            return False
        self._use_policy(ro, policy)
        ro.status = ro.status.model_copy(update={"policy_hash": policy.source_hash})
        return True

    def _use_policy(self, ro: _Rollout, policy: CompiledPolicy) -> None:
        policy.prepare()  # compile now, not in the rollout's first tick
        ro.policy = policy
        ro.state = policy.new_state()
        spec = ro.spec
        defined = {d.name: d.template for d in policy.checked.definitions}
        ro.requests = []
        for key in sorted(policy.metric_keys):
            track, metric = key.split(".", 1)
            if track == "stable":
                target = Target(spec.namespace, spec.stable, track, spec.service)
            else:
                target = Target(spec.namespace, spec.canary_name, track, spec.canary_service_name)
            window = max(self.metrics_window, spec.interval)
            ro.requests.append((key, MetricRequest(target, metric, window, defined.get(metric))))
        grouped: dict[int, tuple[MetricSource, list[MetricRequest]]] = {}
        for _, req in ro.requests:
            src = self._source_for(req.metric)
            grouped.setdefault(id(src), (src, []))[1].append(req)
        ro.by_source = list(grouped.values())
        horizon = max(
            policy.longest_window_seconds,
            policy.longest_window_evaluations * spec.interval,
            spec.interval,
        )
        ro.stream = MetricStream([k for k, _ in ro.requests], horizon)

    async def _repin(self, ro: _Rollout, actor: str) -> None:
        """Move a running rollout to the policy's current version (it keeps its pinned one
        otherwise); the windows are rebuilt from the metric source, as after a restart."""
        if ro.status.phase not in TICKED:
            raise IllegalTransition(f"only a running rollout can be re-pinned ({ro.status.phase})")
        policy = self.policies.get(ro.spec.policy)
        if policy is None:
            raise IllegalTransition(f"no policy named {ro.spec.policy!r} to re-pin to")
        async with ro.lock:
            old = ro.status.policy_hash
            pending = dict(ro.status.pending_since)
            self._use_policy(ro, policy)
            # rules of the new version start their `for` afresh unless they kept their name
            kept = {r.label for r in policy.rules}
            ro.status = ro.status.model_copy(
                update={
                    "policy_hash": policy.source_hash,
                    "pending_since": {k: v for k, v in pending.items() if k in kept},
                }
            )
            await self._backfill(ro)
            await self.store.save(ro.spec.key, ro.status)
            ro.saved = ro.status
            phase = ro.status.phase
            await self.audit.record(
                AuditEntry(
                    time=self.clock.now(), rollout=ro.spec.key, actor=actor,
                    from_phase=phase, to_phase=phase, action="repin",
                    explanation=f"policy {ro.spec.policy!r} re-pinned from version "
                    f"{old[:12] or 'none'} to {policy.source_hash[:12]}",
                    weight=ro.status.weight,
                )
            )

    async def _resume(self, ro: _Rollout) -> None:
        """Pick a rollout up from its status: same policy, windows backfilled, same step."""
        policy = self.policies.get(ro.spec.policy)
        if policy is None:
            d = ro.machine.failed(ro.status, f"no policy named {ro.spec.policy!r}")
            await self._commit(ro, d)
            return
        self._use_policy(ro, policy)
        await self._backfill(ro)
        if not ro.spec.dry_run:
            self._spawn(ro, self._reapply_weight(ro))
        self._schedule(ro)

    async def _reapply_weight(self, ro: _Rollout) -> None:
        """Make the router carry the status's weight after a restart.

        The status is saved before its weight is written (`_commit`), so a process
        stopped in between resumes a step whose weight never reached the router. The
        router is read first: a weight the stopped process wrote but had not read back
        yet is not written again.
        """
        ref, clock = ro.ref, self.clock

        async def attempt() -> None:
            weight = ro.status.weight
            if await self.router.get_weight(ref) != weight:
                await rollback.set_weight_confirmed(self.router, ref, weight, clock)

        async with ro.lock:  # no tick decides on this rollout until its weight holds
            await rollback.retry(f"re-applying the weight of {ro.spec.key}", attempt, clock)

    async def _backfill(self, ro: _Rollout) -> None:
        policy, state, stream = ro.policy, ro.state, ro.stream
        assert policy is not None and state is not None and stream is not None
        now = self.clock.now()
        interval = ro.spec.interval
        start = now - stream.horizon
        ticks = [
            k * interval for k in range(math.ceil(start / interval), math.floor(now / interval) + 1)
        ]
        if ticks and ro.requests:
            by_source: dict[int, tuple[MetricSource, list[MetricRequest]]] = {}
            for _, req in ro.requests:
                src = self._source_for(req.metric)
                by_source.setdefault(id(src), (src, []))[1].append(req)
            series: dict[MetricRequest, dict[float, float | None]] = {}
            for src, reqs in by_source.values():
                try:
                    got = await src.fetch_range(ticks[0], ticks[-1], interval, reqs)
                except Exception as e:
                    log.warning("backfill for %s failed: %s", ro.spec.key, e)
                    continue
                for req, points in got.items():
                    series[req] = dict(points)
            for t in ticks:
                snap = {k: series.get(req, {}).get(t) for k, req in ro.requests}
                stream.record(t, snap)
                snap_ctx: dict[str, float | None] = dict(snap)
                snap_ctx["weight"] = float(ro.status.weight)
                snap_ctx["step"] = float(ro.status.step)
                policy.evaluate(t, snap_ctx, state)
        # the status is the truth for `for`: a rule pending before the restart stays pending
        for i, rule in enumerate(policy.rules):
            since = ro.status.pending_since.get(rule.label)
            state.pending_since[i] = since
            state.firing[i] = since is not None and now - since >= rule.for_seconds


def _material(before: RolloutStatus | None, after: RolloutStatus) -> bool:
    """Whether a status changed in more than its last verdict's time and health."""
    if before is None:
        return True
    if before.pending_since != after.pending_since or before.phase != after.phase:
        return True
    a, b = before.last_verdict, after.last_verdict
    if (a is None) != (b is None):
        return True
    return a is not None and b is not None and (a.action, a.rule) != (b.action, b.rule)
