"""The CanaryDeployment custom resource: its spec and status as pydantic models.

In: a manifest's `spec` (from the API or a YAML file). Out: validated models,
the `RolloutSpec` the engine runs (`to_rollout_spec`), the status as the API
stores it (`status_of`, whose shape `CanaryDeploymentStatus` describes), and
the descriptions, patterns and bounds that `adapters.kube.crd` turns into the
CRD's openAPIV3Schema; `deploy/crd.yaml` is generated from them so the cluster
validates what this module does. This module is the one place that knows the
CRD's shape.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from engine.model import Phase, RolloutSpec, RolloutStatus, StrategySpec, VerdictRecord

GROUP = "codedance.io"
VERSION = "v1alpha1"
KIND = "CanaryDeployment"
PLURAL = "canarydeployments"
SINGULAR = "canarydeployment"
SHORT_NAMES = ["cdep"]

DURATION_PATTERN = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h|d))+$"
NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(w.capitalize() for w in rest)


class _Spec(BaseModel):
    model_config = ConfigDict(
        extra="forbid", frozen=True, alias_generator=_camel, populate_by_name=True
    )


Duration = str


class TargetRef(_Spec):
    """The stable workload the release replaces."""

    kind: Literal["Deployment"] = Field(
        default="Deployment", description="the kind of the stable workload; only Deployment"
    )
    name: str = Field(
        pattern=NAME_PATTERN,
        max_length=253,
        description="the stable Deployment, in the CanaryDeployment's namespace",
    )


class Version(_Spec):
    """The new version: images by container name, or a patch of the pod template."""

    # The API server's copy of the check in `_one`: at least one of the two, not empty.
    model_config = ConfigDict(
        json_schema_extra={
            "anyOf": [
                {"required": ["images"], "properties": {"images": {"minProperties": 1}}},
                {
                    "required": ["podTemplatePatch"],
                    "properties": {"podTemplatePatch": {"minProperties": 1}},
                },
            ]
        }
    )

    images: dict[str, str] | None = Field(
        default=None, description="container name -> image of the new version"
    )
    pod_template_patch: dict[str, Any] | None = Field(
        default=None, description="a strategic-merge patch applied to the pod template"
    )

    @model_validator(mode="after")
    def _one(self) -> Version:
        if not self.images and not self.pod_template_patch:
            raise ValueError("name the new version: `images` or `podTemplatePatch`")
        return self


class Strategy(_Spec):
    """How the canary's weight grows, and how long each step is analysed."""

    type: Literal["linear", "exponential", "manual", "steps"] = Field(
        default="linear",
        description="linear, exponential, manual (each step waits for approval) or steps",
    )
    steps: list[int] | None = Field(
        default=None,
        description="canary weights of a `steps` strategy, increasing",
        # the bounds `_steps` checks, for the API server; the model keeps its own message
        json_schema_extra={"items": {"type": "integer", "minimum": 0, "maximum": 100}},
    )
    step_duration: Duration = Field(
        default="1m",
        pattern=DURATION_PATTERN,
        description="how long each step is analysed, such as 30s, 2m or 1m30s",
    )
    max_weight: int | None = Field(
        default=None, ge=1, le=100, description="the highest canary weight before promotion"
    )
    scale_down_delay: Duration = Field(
        default="30s",
        pattern=DURATION_PATTERN,
        description="how long the canary's pods are kept after traffic has left them (at "
        "promotion and at rollback), so proxies that apply new weights late never send "
        "a request to pods that are gone; 0s retires it at once",
    )

    @model_validator(mode="after")
    def _steps(self) -> Strategy:
        if self.steps is not None and any(not 0 <= w <= 100 for w in self.steps):
            raise ValueError("every step weight must be between 0 and 100")
        return self


class Traffic(_Spec):
    """How traffic is split, and the objects of the provider that split it."""

    provider: Literal["istio", "nginx-ingress", "gateway-api", "local"] = Field(
        default="local", description="the traffic provider that splits requests"
    )
    service: str | None = Field(default=None, description="the stable Service")
    canary_service: str | None = Field(default=None, description="the canary Service")
    virtual_service: str | None = Field(default=None, description="Istio VirtualService")
    route: str | None = Field(default=None, description="route name in the VirtualService")
    destination_rule: str | None = Field(default=None, description="Istio DestinationRule")
    ingress: str | None = Field(default=None, description="the stable NGINX Ingress")
    http_route: str | None = Field(default=None, description="Gateway API HTTPRoute")


class Policy(_Spec):
    """A policy from the mounted policy directory, or written inline."""

    # The API server's copy of the check in `_one`: exactly one of the two.
    model_config = ConfigDict(
        json_schema_extra={"oneOf": [{"required": ["name"]}, {"required": ["inline"]}]}
    )

    name: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="a policy file of the policy directory, without `.rules`",
    )
    inline: str | None = Field(
        default=None, max_length=65536, description="the text of a policy, in the policy language"
    )

    @model_validator(mode="after")
    def _one(self) -> Policy:
        if (self.name is None) == (self.inline is None):
            raise ValueError("give the policy either a `name` or `inline` text")
        return self


class Analysis(_Spec):
    """How often the policy is evaluated, and how long a pause may last."""

    interval: Duration = Field(
        default="30s", pattern=DURATION_PATTERN, description="time between two evaluations"
    )
    max_pause: Duration | None = Field(
        default=None, pattern=DURATION_PATTERN, description="a longer pause rolls back"
    )


class CanaryDeploymentSpec(_Spec):
    """A release request: the stable workload, the new version and how to roll it out."""

    target_ref: TargetRef = Field(description="the stable workload the release replaces")
    version: Version = Field(description="the new version")
    strategy: Strategy = Field(default=Strategy(), description="how the canary's weight grows")
    traffic: Traffic = Field(default=Traffic(), description="how traffic is split")
    policy: Policy = Field(description="what healthy means: a policy by name, or inline")
    analysis: Analysis = Field(default=Analysis(), description="when the policy is evaluated")
    dry_run: bool = Field(default=False, description="decide and record; change nothing")
    skip_analysis: bool = Field(default=False, description="walk the steps without a policy")


class CanaryDeployment(_Spec):
    """A whole manifest: apiVersion, kind, metadata, spec."""

    api_version: Literal["codedance.io/v1alpha1"]
    kind: Literal["CanaryDeployment"]
    metadata: dict[str, Any]
    spec: CanaryDeploymentSpec

    @property
    def name(self) -> str:
        return str(self.metadata.get("name", ""))

    @property
    def namespace(self) -> str:
        return str(self.metadata.get("namespace") or "default")

    @model_validator(mode="after")
    def _named(self) -> CanaryDeployment:
        name = self.metadata.get("name")
        if not isinstance(name, str) or not re.match(NAME_PATTERN, name):
            raise ValueError("metadata.name must be a DNS-1123 name such as `checkout`")
        return self


def to_rollout_spec(cd: CanaryDeployment, policy_name: str | None = None) -> RolloutSpec:
    """The engine's view of a CanaryDeployment. An inline policy runs under `policy_name`."""
    spec = cd.spec
    policy = spec.policy.name or policy_name
    if policy is None:
        raise ValueError("an inline policy needs a name to run under")
    return RolloutSpec(
        name=cd.name,
        namespace=cd.namespace,
        stable=spec.target_ref.name,
        canary=f"{spec.target_ref.name}-canary",
        service=spec.traffic.service or spec.target_ref.name,
        canary_service=spec.traffic.canary_service or "",
        route=spec.traffic.route or "",
        strategy=StrategySpec(
            type=spec.strategy.type,
            steps=tuple(spec.strategy.steps) if spec.strategy.steps is not None else None,
            step_duration=spec.strategy.step_duration,  # type: ignore[arg-type]
            max_weight=spec.strategy.max_weight,
        ),
        policy=policy,
        interval=spec.analysis.interval,  # type: ignore[arg-type]
        max_pause=spec.analysis.max_pause,  # type: ignore[arg-type]
        scale_down_delay=spec.strategy.scale_down_delay,  # type: ignore[arg-type]
        dry_run=spec.dry_run,
        skip_analysis=spec.skip_analysis,
    )


class Condition(BaseModel):
    """One condition of the status, as Kubernetes conventions shape them."""

    model_config = ConfigDict(alias_generator=_camel, populate_by_name=True)

    type: str = Field(description="what the condition is about, such as Ready")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown")
    reason: str = Field(description="a CamelCase word a program can match")
    message: str = Field(default="", description="what happened, for a person")
    # format date-time: the API server refuses anything but an RFC 3339 time
    last_transition_time: str = Field(
        description="when the status last changed (RFC 3339)",
        json_schema_extra={"format": "date-time"},
    )
    observed_generation: int | None = Field(
        default=None, description="the spec generation the condition describes"
    )


class CanaryDeploymentStatus(BaseModel):
    """The status subresource as `status_of` writes it, plus the conditions.

    It is the whole durable state of a rollout: a restarted controller resumes
    from it. Times are seconds since the epoch, as the engine keeps them.
    """

    model_config = ConfigDict(alias_generator=_camel, populate_by_name=True)

    phase: Phase = Field(default=Phase.PENDING, description="where the rollout is")
    step: int = Field(default=0, description="the current step of the strategy")
    weight: int = Field(default=0, ge=0, le=100, description="the canary's share of traffic")
    health: int | None = Field(
        default=None, ge=0, le=100, description="the last verdict's health score"
    )
    last_verdict: str = Field(default="", description="the last verdict's explanation")
    last_verdict_at: float | None = Field(
        default=None, description="when the last verdict was made (epoch seconds)"
    )
    last_health: float | None = Field(
        default=None, ge=0, le=100, description="the last verdict's exact health score"
    )
    last_action: str = Field(default="", description="the last verdict's action")
    last_rule: str | None = Field(default=None, description="the rule that decided it")
    message: str = Field(default="", description="why the rollout is in its phase")
    policy_hash: str = Field(default="", description="the version of the policy the rollout runs")
    pending_since: dict[str, float] = Field(
        default_factory=dict, description="rule label -> when its condition became true"
    )
    started_at: float | None = Field(default=None, description="when the rollout started")
    step_started_at: float | None = Field(default=None, description="when the step started")
    paused_at: float | None = Field(default=None, description="when the rollout was paused")
    paused_by: str | None = Field(default=None, description="who paused it")
    approved_step: int = Field(default=-1, description="the last step a person approved")
    observed_generation: int | None = Field(
        default=None, description="the spec generation this status describes"
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        description="the latest observation of each condition type",
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"],
        },
    )


def status_of(status: RolloutStatus, *, generation: int | None = None) -> dict[str, Any]:
    """The engine's status as the CRD's status subresource holds it."""
    verdict = status.last_verdict
    return {
        "phase": status.phase.value,
        "step": status.step,
        "weight": status.weight,
        "health": round(verdict.health) if verdict is not None else None,
        "lastVerdict": verdict.explanation if verdict is not None else "",
        "lastVerdictAt": verdict.at if verdict is not None else None,
        "lastHealth": verdict.health if verdict is not None else None,
        "lastAction": verdict.action if verdict is not None else "",
        "lastRule": verdict.rule if verdict is not None else None,
        "message": status.message,
        "policyHash": status.policy_hash,
        "pendingSince": dict(status.pending_since),
        "startedAt": status.started_at,
        "stepStartedAt": status.step_started_at,
        "pausedAt": status.paused_at,
        "pausedBy": status.paused_by,
        "approvedStep": status.approved_step,
        "observedGeneration": generation,
    }


def status_from(data: dict[str, Any]) -> RolloutStatus | None:
    """The engine's status from the status subresource: the reverse of `status_of`.

    None when the subresource holds no rollout yet (no phase). `status_of`
    keeps the last verdict's health as a whole number and not the time it was
    made; the time reads back from `lastVerdictAt` when the status has it, else
    as the step's start (the verdict was made within the step).
    """
    if not data.get("phase"):
        return None
    verdict = None
    if data.get("lastVerdict") or data.get("lastAction"):
        at = data.get("lastVerdictAt")
        if at is None:
            at = data.get("stepStartedAt") or data.get("startedAt") or 0.0
        health = data.get("lastHealth", data.get("health"))
        verdict = VerdictRecord(
            at=float(at),
            action=str(data.get("lastAction") or ""),
            rule=data.get("lastRule"),
            explanation=str(data.get("lastVerdict") or ""),
            health=float(health) if health is not None else 0.0,
        )
    return RolloutStatus(
        phase=Phase(data["phase"]),
        step=int(data.get("step") or 0),
        weight=int(data.get("weight") or 0),
        started_at=data.get("startedAt"),
        step_started_at=data.get("stepStartedAt"),
        paused_at=data.get("pausedAt"),
        paused_by=data.get("pausedBy"),
        policy_hash=str(data.get("policyHash") or ""),
        pending_since={str(k): float(v) for k, v in (data.get("pendingSince") or {}).items()},
        last_verdict=verdict,
        message=str(data.get("message") or ""),
        approved_step=int(data.get("approvedStep", -1)),
    )
