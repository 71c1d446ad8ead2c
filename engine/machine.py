"""The rollout state machine: a status and an event in, a `Decision` out.

Pure: no I/O, no clock (`now` is passed in). A `Decision` holds the new
status, the effects the loop must carry out (set a weight, bring up, promote,
roll back) and the transitions to record, each with its actor and
explanation. Only the transitions in `LEGAL` can happen; anything else is a
`IllegalTransition`, which a manual command reports to the person.

Verdicts drive it as LANGUAGE.md section 5 says: `continue` moves to the next
step once the step's time is up; `pause` holds the weight while the rule
fires and resumes when it clears (paused time does not count toward the
step); `promote` skips the remaining steps; `rollback` sends all traffic back
to stable. A pause that lasts longer than `max_pause` becomes a rollback.
A step moves on only at a tick whose health is 100: no rollback or pause rule
is true, pending or unknown, so an outage of the metrics never advances one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dsl.units import format_duration
from engine.model import Phase, RolloutSpec, RolloutStatus, VerdictRecord
from engine.strategy import Strategy

P = Phase
LEGAL: dict[Phase, frozenset[Phase]] = {
    P.PENDING: frozenset({P.INITIALIZING, P.FAILED, P.ROLLED_BACK}),
    P.INITIALIZING: frozenset({P.PROGRESSING, P.FAILED, P.ROLLING_BACK}),
    P.PROGRESSING: frozenset(
        {P.PROGRESSING, P.PAUSED, P.WAITING_FOR_APPROVAL, P.PROMOTING, P.ROLLING_BACK, P.FAILED}
    ),
    P.PAUSED: frozenset({P.PROGRESSING, P.PROMOTING, P.ROLLING_BACK, P.FAILED}),
    P.WAITING_FOR_APPROVAL: frozenset({P.PROGRESSING, P.PAUSED, P.ROLLING_BACK, P.FAILED}),
    P.PROMOTING: frozenset({P.SUCCEEDED, P.FAILED, P.ROLLING_BACK}),
    P.ROLLING_BACK: frozenset({P.ROLLED_BACK, P.FAILED}),
    P.ROLLED_BACK: frozenset({P.PENDING}),
    P.FAILED: frozenset({P.PENDING, P.ROLLING_BACK}),
    P.SUCCEEDED: frozenset(),
}

POLICY = "policy"


class IllegalTransition(Exception):
    """A command that makes no sense in the rollout's phase."""


@dataclass(frozen=True, slots=True)
class SetWeight:
    weight: int


@dataclass(frozen=True, slots=True)
class BringUp:
    pass


@dataclass(frozen=True, slots=True)
class Promote:
    pass


@dataclass(frozen=True, slots=True)
class RollBack:
    pass


Effect = SetWeight | BringUp | Promote | RollBack


@dataclass(frozen=True, slots=True)
class Transition:
    from_phase: Phase
    to_phase: Phase
    actor: str
    action: str
    rule: str | None
    explanation: str
    weight: int


@dataclass(slots=True)
class Decision:
    status: RolloutStatus
    effects: list[Effect] = field(default_factory=list)
    transitions: list[Transition] = field(default_factory=list)


class Machine:
    """The rules of one rollout: its spec and strategy, applied to its status."""

    def __init__(self, spec: RolloutSpec, strategy: Strategy) -> None:
        self.spec = spec
        self.strategy = strategy

    # --- helpers ----------------------------------------------------------------

    def _move(
        self,
        d: Decision,
        to: Phase,
        actor: str,
        action: str,
        explanation: str,
        rule: str | None = None,
        **changes: object,
    ) -> None:
        frm = d.status.phase
        if to not in LEGAL[frm]:
            raise IllegalTransition(f"cannot go from {frm.value} to {to.value}")
        d.status = d.status.model_copy(update={"phase": to, "message": explanation, **changes})
        d.transitions.append(
            Transition(frm, to, actor, action, rule, explanation, d.status.weight)
        )

    # --- lifecycle --------------------------------------------------------------

    def start(self, status: RolloutStatus, now: float, actor: str = "controller") -> Decision:
        d = Decision(status)
        if status.phase is not P.PENDING:
            return d
        self._move(
            d, P.INITIALIZING, actor, "start", "bringing up the canary at weight 0",
            started_at=now, step=0, weight=0,
        )
        d.effects.append(BringUp())
        return d

    def initialized(self, status: RolloutStatus, now: float) -> Decision:
        d = Decision(status)
        weight = self.strategy.weight(0)
        self._move(
            d, P.PROGRESSING, "controller", "step", f"step 0: canary weight {weight}",
            step=0, weight=weight, step_started_at=now,
        )
        d.effects.append(SetWeight(weight))
        return d

    def failed(self, status: RolloutStatus, reason: str) -> Decision:
        d = Decision(status)
        self._move(d, P.FAILED, "controller", "fail", reason)
        return d

    def rolled_back(self, status: RolloutStatus) -> Decision:
        d = Decision(status)
        self._move(
            d, P.ROLLED_BACK, "controller", "rolled-back", "all traffic is on stable",
            weight=0, message=status.message,
        )
        return d

    def promotion_failed(self, status: RolloutStatus, reason: str) -> Decision:
        """The stable would not roll out the new version: roll back (traffic is still on the
        canary, and the workload manager has put the stable's previous version back)."""
        d = Decision(status)
        why = f"the promotion failed, rolling back: {reason}"
        self._move(d, P.ROLLING_BACK, "controller", "rollback", why)
        d.effects.append(RollBack())
        return d

    def promoted(self, status: RolloutStatus) -> Decision:
        d = Decision(status)
        self._move(d, P.SUCCEEDED, "controller", "promoted", "the canary is the new stable")
        return d

    # --- verdicts ---------------------------------------------------------------

    def on_verdict(self, status: RolloutStatus, verdict: VerdictRecord, now: float) -> Decision:
        d = Decision(status.model_copy(update={"last_verdict": verdict}))
        phase = status.phase
        action = verdict.action
        if phase not in (P.PROGRESSING, P.PAUSED, P.WAITING_FOR_APPROVAL):
            return d
        if action == "rollback":
            self._roll_back(d, POLICY, "rollback", verdict.explanation, verdict.rule)
            return d
        if phase is P.PAUSED:
            self._paused(d, verdict, now)
            return d
        if phase is P.WAITING_FOR_APPROVAL:
            return d
        if action == "pause":
            self._move(
                d, P.PAUSED, POLICY, "pause", verdict.explanation, verdict.rule,
                paused_at=now, paused_by=POLICY,
            )
        elif action == "promote":
            self._promote(d, POLICY, verdict.explanation, verdict.rule)
        else:
            self._maybe_advance(d, now, POLICY, verdict)
        return d

    def _paused(self, d: Decision, verdict: VerdictRecord, now: float) -> None:
        status = d.status
        if status.paused_by != POLICY:
            return  # a person paused it; only a person resumes it
        since = status.paused_at if status.paused_at is not None else now
        if verdict.action == "pause":
            limit = self.spec.max_pause
            if limit is not None and now - since >= limit:
                self._roll_back(
                    d, POLICY, "rollback",
                    f"paused for {format_duration(now - since)}, longer than the "
                    f"maximum pause of {format_duration(limit)}: {verdict.explanation}",
                    verdict.rule,
                )
            return
        if verdict.action == "promote":
            self._promote(d, POLICY, verdict.explanation, verdict.rule)
            return
        self._resume(d, now, POLICY, "the pause rule cleared: " + verdict.explanation)

    def _resume(self, d: Decision, now: float, actor: str, why: str) -> None:
        status = d.status
        paused_for = now - status.paused_at if status.paused_at is not None else 0.0
        started = (now if status.step_started_at is None else status.step_started_at) + paused_for
        self._move(
            d, P.PROGRESSING, actor, "resume", why,
            paused_at=None, paused_by=None, step_started_at=started,
        )

    def _maybe_advance(
        self, d: Decision, now: float, actor: str, verdict: VerdictRecord
    ) -> None:
        status = d.status
        started = status.step_started_at if status.step_started_at is not None else now
        if now - started < self.strategy.step_duration:
            return
        if verdict.health < 100:
            # Unknown is never taken as healthy: a step moves on only at a tick where
            # every rollback and pause rule is plainly false (none unknown or pending).
            d.status = status.model_copy(
                update={
                    "message": f"step {status.step} is due; waiting for a healthy evaluation "
                    f"(health {verdict.health:.0f})"
                }
            )
            return
        if status.step >= self.strategy.last_step:
            self._promote(d, actor, "every step passed its analysis", None)
            return
        nxt = status.step + 1
        if self.strategy.needs_approval(nxt) and status.approved_step < nxt:
            self._move(
                d, P.WAITING_FOR_APPROVAL, actor, "wait",
                f"step {status.step} passed; step {nxt} (weight "
                f"{self.strategy.weight(nxt)}) waits for approval",
            )
            return
        self._step(d, nxt, now, actor)

    def _step(self, d: Decision, step: int, now: float, actor: str) -> None:
        weight = self.strategy.weight(step)
        self._move(
            d, P.PROGRESSING, actor, "step", f"step {step}: canary weight {weight}",
            step=step, weight=weight, step_started_at=now,
        )
        d.effects.append(SetWeight(weight))

    def _promote(self, d: Decision, actor: str, why: str, rule: str | None) -> None:
        self._move(d, P.PROMOTING, actor, "promote", why, rule, weight=100)
        d.effects.append(Promote())

    def _roll_back(self, d: Decision, actor: str, action: str, why: str, rule: str | None) -> None:
        self._move(d, P.ROLLING_BACK, actor, action, why, rule)
        d.effects.append(RollBack())

    # --- people -----------------------------------------------------------------

    def approve(self, status: RolloutStatus, now: float, actor: str) -> Decision:
        d = Decision(status)
        if status.phase is not P.WAITING_FOR_APPROVAL:
            raise IllegalTransition(f"nothing waits for approval ({status.phase.value})")
        nxt = status.step + 1
        d.status = status.model_copy(update={"approved_step": nxt})
        self._step(d, nxt, now, actor)
        return d

    def pause(self, status: RolloutStatus, now: float, actor: str) -> Decision:
        d = Decision(status)
        if status.phase not in (P.PROGRESSING, P.WAITING_FOR_APPROVAL):
            raise IllegalTransition(f"only a progressing rollout can pause ({status.phase.value})")
        self._move(
            d, P.PAUSED, actor, "pause", f"paused by {actor}", paused_at=now, paused_by=actor
        )
        return d

    def resume(self, status: RolloutStatus, now: float, actor: str) -> Decision:
        d = Decision(status)
        if status.phase is not P.PAUSED:
            raise IllegalTransition(f"the rollout is not paused ({status.phase.value})")
        self._resume(d, now, actor, f"resumed by {actor}")
        return d

    def abort(self, status: RolloutStatus, actor: str, reason: str = "") -> Decision:
        d = Decision(status)
        why = f"aborted by {actor}" + (f": {reason}" if reason else "")
        if status.phase is P.PENDING:
            self._move(d, P.ROLLED_BACK, actor, "abort", why)
            return d
        if status.phase.finished and status.phase is not P.FAILED:
            raise IllegalTransition(f"the rollout has finished ({status.phase.value})")
        self._roll_back(d, actor, "abort", why, None)
        return d

    def retry(self, status: RolloutStatus, actor: str) -> Decision:
        d = Decision(status)
        if status.phase not in (P.ROLLED_BACK, P.FAILED):
            raise IllegalTransition(
                f"only a rolled back or failed rollout can be retried ({status.phase.value})"
            )
        self._move(
            d, P.PENDING, actor, "retry", f"retried by {actor}",
            step=0, weight=0, started_at=None, step_started_at=None, paused_at=None,
            paused_by=None, approved_step=-1, pending_since={}, last_verdict=None,
        )
        return d
