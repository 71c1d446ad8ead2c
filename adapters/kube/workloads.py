"""The canary Deployment: brought up beside the stable one, promoted into it, retired.

In: an API client, the new version (images by container name, or a patch of
the pod template), and a `RolloutRef` per call. Out: the engine's
`WorkloadManager` port (`bring_up`, `promote`, `retire`), each returning once
the cluster has done it, or raising `WorkloadError` with the reason.

How the canary is made: `<stable>-canary` (the ref's `canary`) is a copy of
the stable Deployment's spec with the new version applied, the same number of
replicas (1 when the stable says none), and `codedance.io/track: canary` added
to its selector and pod labels. The stable Deployment is only read: its pods
are not restarted before promotion.

Traffic isolation: the canary's selector and pods carry the track label, so
its pods belong to it alone and, at weight 0, nothing routes to them unless a
Service selects them. Which Service selects which track is the traffic
adapter's business; a Service in front of the stable pods should select
`codedance.io/track: stable` (or any label the canary's pods do not carry):
the canary copies the stable's pod labels, so a Service selecting only
`app: web` would also select canary pods. When the stable's pod template
already carries `codedance.io/track: stable`, the canary's copy says `canary`
instead, which is what makes such a Service work.

Promotion writes the new version into the STABLE Deployment's pod template (its
own labels untouched) and waits for that rollout; then `retire` deletes the
canary. Ready means the Deployment's controller saw the latest generation
(`observedGeneration >= generation`), every replica is updated and ready, and
no pod of an older ReplicaSet is left (`readiness`); a Deployment whose
Progressing condition says ProgressDeadlineExceeded for the current generation
fails at once, others after `ready_timeout` seconds, with its conditions as the
reason.

Objects are read and written as JSON (the custom-objects endpoints address
`apps/v1` the same way) so fields this client version does not model are
copied, not dropped. Writes carry the resourceVersion read; a 409 re-reads and
re-applies (the Deployment controller's own status writes change the
resourceVersion too, so a Deployment mid-rollout can answer 409 with no other
writer about); 429 and 5xx are retried by `adapters.kube.retry`.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from kubernetes.aio import client
from kubernetes.aio.client.exceptions import ApiException

from adapters.kube import retry
from engine.ports import Clock, RolloutRef

TRACK_LABEL = "codedance.io/track"
ROLLOUT_LABEL = "codedance.io/rollout"
MANAGED_BY = {"app.kubernetes.io/managed-by": "codedance"}
CANARY = "canary"
CONFLICT_ATTEMPTS = 5
POLL_EVERY = 2.0

JsonObject = dict[str, Any]


class WorkloadError(Exception):
    """A Deployment could not be read, written, or made ready; the message says why."""


def merge_patch(target: Any, patch: Any) -> Any:
    """`patch` applied to `target`: a JSON merge patch whose lists of named items merge by name.

    Containers, volumes and env entries are lists keyed by `name`; a strategic
    merge patch merges those entry by entry, so `{"containers": [{"name":
    "web", "image": "web:2"}]}` changes one image and keeps the rest. Other
    lists are replaced, and null deletes a key, as in a merge patch.
    """
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    out: JsonObject = copy.deepcopy(dict(target)) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif _named_list(value) and _named_list(out.get(key)):
            out[key] = _merge_by_name(out[key], value)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def _named_list(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(item, Mapping) and "name" in item for item in value
    )


def _merge_by_name(current: list[Any], patch: list[Any]) -> list[Any]:
    merged = [copy.deepcopy(item) for item in current]
    index = {item["name"]: i for i, item in enumerate(merged)}
    for item in patch:
        if item["name"] in index:
            merged[index[item["name"]]] = merge_patch(merged[index[item["name"]]], item)
        else:
            merged.append(copy.deepcopy(item))
    return merged


def apply_version(
    template: Mapping[str, Any], images: Mapping[str, str] | None, patch: Mapping[str, Any] | None
) -> JsonObject:
    """A pod template with the new version: the patch, then the images by container name."""
    out: JsonObject = merge_patch(template, patch) if patch else copy.deepcopy(dict(template))
    if images:
        spec = out.setdefault("spec", {})
        containers = [*spec.get("initContainers", []), *spec.get("containers", [])]
        names = {c.get("name") for c in containers}
        unknown = sorted(set(images) - names)
        if unknown:
            raise WorkloadError(
                f"no container named {', '.join(unknown)} in the pod template "
                f"(containers: {', '.join(sorted(str(n) for n in names))})"
            )
        for container in containers:
            if container.get("name") in images:
                container["image"] = images[container["name"]]
    return out


def canary_of(
    stable: Mapping[str, Any], ref: RolloutRef, template: Mapping[str, Any]
) -> JsonObject:
    """The canary Deployment for a stable one, given the canary's pod template."""
    meta = stable.get("metadata") or {}
    spec = copy.deepcopy(dict(stable.get("spec") or {}))
    track = {TRACK_LABEL: CANARY}
    labels = {**(meta.get("labels") or {}), **MANAGED_BY, ROLLOUT_LABEL: ref.name, **track}
    selector = spec.get("selector") or {}
    spec["selector"] = {**selector, "matchLabels": {**(selector.get("matchLabels") or {}), **track}}
    pod_template = copy.deepcopy(dict(template))
    pod_meta = pod_template.setdefault("metadata", {})
    pod_meta["labels"] = {**(pod_meta.get("labels") or {}), **track}
    spec["template"] = pod_template
    spec["replicas"] = spec.get("replicas") or 1
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": ref.canary, "namespace": ref.namespace, "labels": labels},
        "spec": spec,
    }


def readiness(dep: Mapping[str, Any]) -> tuple[bool, str]:
    """Whether a Deployment has rolled out, and a one-line account of where it is.

    Rolled out, as `kubectl rollout status` has it: the controller saw this
    generation, `want` replicas run the current template, no pod of an older
    ReplicaSet is left, and `want` pods are ready. `readyReplicas` counts the
    pods of every ReplicaSet, so "ready >= want and updated >= want" alone is
    also true mid-rollout, while an old pod still serves and a new one is not
    ready yet.
    """
    meta, spec, status = dep.get("metadata") or {}, dep.get("spec") or {}, dep.get("status") or {}
    want = int(spec.get("replicas", 1))
    ready = int(status.get("readyReplicas") or 0)
    # the API server omits a zero count: no updatedReplicas means none is updated yet
    updated = int(status.get("updatedReplicas") or 0)
    total = int(status.get("replicas") or 0)
    seen = int(status.get("observedGeneration") or 0)
    generation = int(meta.get("generation") or 0)
    done = seen >= generation and updated >= want and total <= updated and ready >= want
    parts = [f"{ready}/{want} ready, {updated}/{want} updated"]
    if total > updated:
        parts.append(f"{total - updated} old replicas still running")
    if seen < generation:
        parts.append(f"generation {generation} not yet observed")
    for condition in status.get("conditions") or []:
        reason = condition.get("reason", "")
        message = condition.get("message", "")
        parts.append(f"{condition.get('type')}={condition.get('status')} {reason}: {message}")
    return done, "; ".join(parts)


def deadline_exceeded(dep: Mapping[str, Any]) -> bool:
    """Whether the controller gave up on the CURRENT generation.

    Right after a write, the status still describes the previous generation
    (an earlier canary that timed out, say) until the controller observes the
    new one; its ProgressDeadlineExceeded is not the new version's verdict.
    """
    status = dep.get("status") or {}
    seen = int(status.get("observedGeneration") or 0)
    if seen < int((dep.get("metadata") or {}).get("generation") or 0):
        return False
    return any(
        c.get("type") == "Progressing" and c.get("reason") == "ProgressDeadlineExceeded"
        for c in status.get("conditions") or []
    )


class KubeWorkloads:
    """`WorkloadManager` on Deployments. One instance per rollout: it holds the new version."""

    def __init__(
        self,
        api_client: client.ApiClient,
        *,
        images: dict[str, str] | None = None,
        pod_template_patch: dict[str, Any] | None = None,
        ready_timeout: float = 300.0,
        clock: Clock,
        poll_every: float = POLL_EVERY,
    ) -> None:
        if not images and not pod_template_patch:
            raise ValueError("name the new version: images or a pod template patch")
        self._api = client.CustomObjectsApi(api_client)
        self._images = dict(images or {})
        self._patch = copy.deepcopy(pod_template_patch) if pod_template_patch else None
        self._timeout = ready_timeout
        self._clock = clock
        self._poll = poll_every

    # --- the port -----------------------------------------------------------------

    async def bring_up(self, rollout: RolloutRef) -> None:
        """Create (or update) the canary Deployment and wait until its pods are ready."""
        for _ in range(CONFLICT_ATTEMPTS):
            stable = await self._read(rollout.namespace, rollout.stable)
            if stable is None:
                raise WorkloadError(f"Deployment {rollout.namespace}/{rollout.stable} not found")
            template = apply_version(
                (stable.get("spec") or {}).get("template") or {}, self._images, self._patch
            )
            desired = canary_of(stable, rollout, template)
            try:
                await self._create_or_update(rollout.namespace, desired)
                break
            except ApiException as error:
                if not retry.is_conflict(error):
                    raise self._error("write", rollout.namespace, rollout.canary, error) from None
        else:
            raise WorkloadError(self._conflicts(rollout.namespace, rollout.canary))
        await self._wait_ready(rollout.namespace, rollout.canary)

    async def promote(self, rollout: RolloutRef) -> None:
        """Write the new version into the stable Deployment and wait for its rollout."""
        ns, name = rollout.namespace, rollout.stable
        for _ in range(CONFLICT_ATTEMPTS):
            stable = await self._read(ns, name)
            if stable is None:
                raise WorkloadError(f"Deployment {ns}/{name} not found")
            spec = stable.setdefault("spec", {})
            spec["template"] = apply_version(spec.get("template") or {}, self._images, self._patch)
            stable.pop("status", None)
            try:
                await self._call(
                    lambda body=stable: self._api.replace_namespaced_custom_object(
                        "apps", "v1", ns, "deployments", name, body
                    )
                )
                break
            except ApiException as error:
                if not retry.is_conflict(error):
                    raise self._error("write", ns, name, error) from None
        else:
            raise WorkloadError(self._conflicts(ns, name))
        await self._wait_ready(ns, name)

    async def retire(self, rollout: RolloutRef) -> None:
        """Delete the canary Deployment; one already gone is fine."""
        try:
            await self._call(
                lambda: self._api.delete_namespaced_custom_object(
                    "apps",
                    "v1",
                    rollout.namespace,
                    "deployments",
                    rollout.canary,
                    propagation_policy="Background",
                )
            )
        except ApiException as error:
            if not retry.is_not_found(error):
                raise self._error("delete", rollout.namespace, rollout.canary, error) from None

    # --- reading, writing, waiting ------------------------------------------------------

    async def _call(self, fn: Any) -> Any:
        return await retry.call(fn, clock=self._clock)

    async def _read(self, ns: str, name: str) -> JsonObject | None:
        try:
            obj = await self._call(
                lambda: self._api.get_namespaced_custom_object(
                    "apps", "v1", ns, "deployments", name
                )
            )
        except ApiException as error:
            if retry.is_not_found(error):
                return None
            raise self._error("read", ns, name, error) from None
        return dict(obj)

    async def _create_or_update(self, ns: str, desired: JsonObject) -> None:
        name = desired["metadata"]["name"]
        current = await self._read(ns, name)
        if current is None:
            try:
                await self._call(
                    lambda: self._api.create_namespaced_custom_object(
                        "apps", "v1", ns, "deployments", desired
                    )
                )
                return
            except ApiException as error:
                if not retry.is_conflict(error):  # AlreadyExists: created meanwhile
                    raise
                current = await self._read(ns, name)
                if current is None:
                    raise
        # an earlier attempt (a restarted controller) made it: make it what we want now
        body = copy.deepcopy(current)
        body["metadata"]["labels"] = desired["metadata"]["labels"]
        body["spec"] = desired["spec"]
        body.pop("status", None)
        await self._call(
            lambda: self._api.replace_namespaced_custom_object(
                "apps", "v1", ns, "deployments", name, body
            )
        )

    async def _wait_ready(self, ns: str, name: str) -> None:
        deadline = self._clock.now() + self._timeout
        while True:
            dep = await self._read(ns, name)
            if dep is None:
                raise WorkloadError(f"Deployment {ns}/{name} disappeared while rolling out")
            done, where = readiness(dep)
            if done:
                return
            if deadline_exceeded(dep):
                raise WorkloadError(f"Deployment {ns}/{name} failed to roll out: {where}")
            if self._clock.now() >= deadline:
                raise WorkloadError(
                    f"Deployment {ns}/{name} not ready after {self._timeout:g}s: {where}"
                )
            await self._clock.sleep_until(min(deadline, self._clock.now() + self._poll))

    @staticmethod
    def _error(verb: str, ns: str, name: str, error: ApiException) -> WorkloadError:
        return WorkloadError(f"cannot {verb} Deployment {ns}/{name}: {error.status} {error.reason}")

    @staticmethod
    def _conflicts(ns: str, name: str) -> str:
        return (
            f"Deployment {ns}/{name} kept changing under us "
            f"({CONFLICT_ATTEMPTS} conflicting writes in a row)"
        )
