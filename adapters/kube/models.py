"""The CanaryDeployment custom resource: its spec and status as pydantic models.

In: a manifest's `spec` (from the API or a YAML file). Out: validated models,
the `RolloutSpec` the engine runs (`to_rollout_spec`), the status as the API
stores it (`status_of`), and the CRD's openAPIV3Schema (`crd_manifest`), which
`deploy/crd.yaml` is generated from so the cluster validates exactly what
this module does. This module is the one place that knows the CRD's shape.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from engine.model import RolloutSpec, RolloutStatus, StrategySpec

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

    kind: Literal["Deployment"] = "Deployment"
    name: str = Field(pattern=NAME_PATTERN, max_length=253)


class Version(_Spec):
    """The new version: images by container name, or a patch of the pod template."""

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
    type: Literal["linear", "exponential", "manual", "steps"] = "linear"
    steps: list[int] | None = Field(
        default=None, description="canary weights of a `steps` strategy, increasing"
    )
    step_duration: Duration = Field(default="1m", pattern=DURATION_PATTERN)
    max_weight: int | None = Field(default=None, ge=1, le=100)

    @model_validator(mode="after")
    def _steps(self) -> Strategy:
        if self.steps is not None and any(not 0 <= w <= 100 for w in self.steps):
            raise ValueError("every step weight must be between 0 and 100")
        return self


class Traffic(_Spec):
    """How traffic is split, and the objects of the provider that split it."""

    provider: Literal["istio", "nginx-ingress", "gateway-api", "local"] = "local"
    service: str | None = Field(default=None, description="the stable Service")
    canary_service: str | None = Field(default=None, description="the canary Service")
    virtual_service: str | None = Field(default=None, description="Istio VirtualService")
    route: str | None = Field(default=None, description="route name in the VirtualService")
    destination_rule: str | None = Field(default=None, description="Istio DestinationRule")
    ingress: str | None = Field(default=None, description="the stable NGINX Ingress")
    http_route: str | None = Field(default=None, description="Gateway API HTTPRoute")


class Policy(_Spec):
    """A policy from the mounted policy directory, or written inline."""

    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]+$")
    inline: str | None = Field(default=None, max_length=65536)

    @model_validator(mode="after")
    def _one(self) -> Policy:
        if (self.name is None) == (self.inline is None):
            raise ValueError("give the policy either a `name` or `inline` text")
        return self


class Analysis(_Spec):
    interval: Duration = Field(default="30s", pattern=DURATION_PATTERN)
    max_pause: Duration | None = Field(default=None, pattern=DURATION_PATTERN)


class CanaryDeploymentSpec(_Spec):
    target_ref: TargetRef
    version: Version
    strategy: Strategy = Strategy()
    traffic: Traffic = Traffic()
    policy: Policy
    analysis: Analysis = Analysis()
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
        dry_run=spec.dry_run,
        skip_analysis=spec.skip_analysis,
    )


class Condition(BaseModel):
    model_config = ConfigDict(alias_generator=_camel, populate_by_name=True)

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str
    message: str = ""
    last_transition_time: str = ""
    observed_generation: int | None = None


def status_of(status: RolloutStatus, *, generation: int | None = None) -> dict[str, Any]:
    """The engine's status as the CRD's status subresource holds it."""
    verdict = status.last_verdict
    return {
        "phase": status.phase.value,
        "step": status.step,
        "weight": status.weight,
        "health": round(verdict.health) if verdict is not None else None,
        "lastVerdict": verdict.explanation if verdict is not None else "",
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
