"""The rollout's data: what a person asks for, and what the engine remembers.

In: nothing. Out: pydantic models. `RolloutSpec` is the release request (the
CanaryDeployment's spec, or a local run's manifest); `RolloutStatus` is the
whole durable state of a rollout: a restarted controller resumes from it
alone. `AuditEntry` is one line of the audit log.
"""

from __future__ import annotations

import itertools
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field, field_validator

from dsl.ast import Dim
from dsl.units import UnitError, parse_quantity
from engine import registry


class Phase(StrEnum):
    PENDING = "Pending"
    INITIALIZING = "Initializing"
    PROGRESSING = "Progressing"
    PAUSED = "Paused"
    WAITING_FOR_APPROVAL = "WaitingForApproval"
    PROMOTING = "Promoting"
    SUCCEEDED = "Succeeded"
    ROLLING_BACK = "RollingBack"
    ROLLED_BACK = "RolledBack"
    FAILED = "Failed"

    @property
    def finished(self) -> bool:
        return self in (Phase.SUCCEEDED, Phase.ROLLED_BACK, Phase.FAILED)


def parse_duration(value: str | float | int) -> float:
    """`30s`, `1m30s` or a number of seconds -> seconds (positive)."""
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        try:
            seconds, dim, _ = parse_quantity(value.strip())
        except UnitError as e:
            raise ValueError(e.message) from None
        if dim is not Dim.DURATION:
            raise ValueError(f"`{value}` is not a duration; write one such as 30s or 2m")
    if seconds <= 0:
        raise ValueError(f"`{value}` is not a positive duration")
    return seconds


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StrategySpec(_Model):
    type: str = Field(
        default="linear",
        description="a registered strategy: linear, exponential, manual, steps, or a package's",
    )
    steps: tuple[int, ...] | None = None
    step_duration: float = Field(default=60.0, description="seconds each step is analysed")
    max_weight: int | None = Field(default=None, ge=1, le=100)

    @field_validator("type")
    @classmethod
    def _registered(cls, v: str) -> str:
        # strategies come from entry points, so a package can add one
        try:
            registry.check_name(registry.STRATEGIES, v)
        except registry.ProviderError as e:
            raise ValueError(e.message) from None
        return v

    @field_validator("step_duration", mode="before")
    @classmethod
    def _duration(cls, v: str | float) -> float:
        return parse_duration(v)

    @field_validator("steps")
    @classmethod
    def _steps(cls, v: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("steps must list at least one weight")
        if any(w < 0 or w > 100 for w in v):
            raise ValueError("every step weight must be between 0 and 100")
        if any(b <= a for a, b in itertools.pairwise(v)):
            raise ValueError("step weights must increase")
        return v


class RolloutSpec(_Model):
    """A release request."""

    name: str
    namespace: str = "default"
    stable: str = Field(description="the stable workload (a Deployment)")
    canary: str = Field(default="", description="the canary workload; default NAME-canary")
    service: str = Field(default="", description="the stable Service")
    canary_service: str = Field(default="", description="the canary Service (SERVICE-canary)")
    route: str = ""
    strategy: StrategySpec = StrategySpec()
    policy: str = Field(description="a policy name from the policy directory")
    interval: float = Field(default=30.0, description="seconds between evaluations")
    max_pause: float | None = Field(default=None, description="a longer pause rolls back")
    scale_down_delay: float = Field(
        default=0.0,
        ge=0,
        description="seconds between traffic leaving the canary and the canary going away",
    )
    dry_run: bool = False
    skip_analysis: bool = False

    @field_validator("interval", "max_pause", mode="before")
    @classmethod
    def _durations(cls, v: str | float | None) -> float | None:
        return None if v is None else parse_duration(v)

    @field_validator("scale_down_delay", mode="before")
    @classmethod
    def _delay(cls, v: str | float) -> float:
        # unlike the other durations, no delay at all (0, 0s, 0m) is a choice one may make
        if isinstance(v, str) and v.strip() != "0":
            try:
                seconds, dim, _ = parse_quantity(v.strip())
            except UnitError:
                seconds, dim = -1.0, Dim.DURATION
            if seconds == 0 and dim is Dim.DURATION:
                return 0.0
        elif float(v) == 0:
            return 0.0
        return parse_duration(v)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def canary_name(self) -> str:
        return self.canary or f"{self.stable}-canary"

    @property
    def canary_service_name(self) -> str:
        if self.canary_service or not self.service:
            return self.canary_service
        return f"{self.service}-canary"


class VerdictRecord(_Model):
    """The last verdict, as the status keeps it."""

    at: float
    action: str
    rule: str | None
    explanation: str
    health: float


class RolloutStatus(_Model):
    """Everything needed to resume a rollout after a restart."""

    phase: Phase = Phase.PENDING
    step: int = 0
    weight: int = 0
    started_at: float | None = None
    step_started_at: float | None = None
    paused_at: float | None = None
    paused_by: str | None = None
    policy_hash: str = ""
    pending_since: dict[str, float] = Field(default_factory=dict)
    last_verdict: VerdictRecord | None = None
    message: str = ""
    approved_step: int = -1


class AuditEntry(_Model):
    """One line of the audit log: who did what to which rollout, and why."""

    time: float
    rollout: str
    actor: str
    from_phase: Phase = Field(serialization_alias="from")
    to_phase: Phase = Field(serialization_alias="to")
    action: str
    rule: str | None = None
    explanation: str = ""
    weight: int = 0
