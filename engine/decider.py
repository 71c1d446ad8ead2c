"""Deciders: a verdict and the rollout's context in, the rollout's next plan out.

The policy says what it sees (a `VerdictRecord`: continue, pause, promote or
roll back, with the rule, the explanation and the health); a decider says
what that means for this rollout now, as a `Decision` (the new status and the
effects the loop carries out). The built-in `MachineDecider` is the rollout
state machine itself (LANGUAGE.md section 5). A custom one, registered in the
entry point group `codedance.deciders`, usually rewrites the verdict and
hands it to `machine.on_verdict`, so every transition it causes is still one
the state machine allows and records.

`machine` carries the rollout's context: `machine.spec` (the release
request) and `machine.strategy` (the weights of its steps and how long each
is analysed). The loop asks the built-in decider only when there is something
to decide (a verdict other than continue, or a step whose time is up); it
asks any other decider at every tick.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from engine.machine import Decision, Machine
from engine.model import RolloutStatus, VerdictRecord


@runtime_checkable
class Decider(Protocol):
    """Turns a verdict into the next plan of one rollout."""

    def decide(
        self, status: RolloutStatus, verdict: VerdictRecord, now: float, machine: Machine
    ) -> Decision: ...


class MachineDecider:
    """The built-in decider: the verdict, as the rollout state machine reads it."""

    def decide(
        self, status: RolloutStatus, verdict: VerdictRecord, now: float, machine: Machine
    ) -> Decision:
        return machine.on_verdict(status, verdict, now)
