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
(`observedGeneration >= generation`), every replica is updated, ready and
available (ready for `minReadySeconds`), and no pod of an older ReplicaSet is
left (`readiness`); a Deployment whose Progressing condition says
ProgressDeadlineExceeded for the current generation fails at once, others
after `ready_timeout` seconds, with its conditions as the reason.

A promotion either finishes or leaves the stable as it was: before writing the
new version, the stable's previous pod template is kept in the stable's own
annotation `codedance.io/promoted-from` (so a restarted controller still has
it); when the stable will not roll out, that template is written back, waited
for, and `promote` raises `StableRolloutFailed` (the engine's `WorkloadFailed`:
roll back, do not retry). `restore_stable` does the same for a rollback that
finds a promotion under way. The annotation goes once the stable is rolled out
(either version).

Objects are read and written as JSON (the custom-objects endpoints address
`apps/v1` the same way) so fields this client version does not model are
copied, not dropped. Writes carry the resourceVersion read; a 409 re-reads and
re-applies (the Deployment controller's own status writes change the
resourceVersion too, so a Deployment mid-rollout can answer 409 with no other
writer about); 429 and 5xx are retried by `adapters.kube.retry`.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Mapping
from typing import Any

from kubernetes.aio import client
from kubernetes.aio.client.exceptions import ApiException

from adapters.kube import retry
from engine.ports import Clock, RolloutRef, WorkloadFailed

TRACK_LABEL = "codedance.io/track"
ROLLOUT_LABEL = "codedance.io/rollout"
MANAGED_BY = {"app.kubernetes.io/managed-by": "codedance"}
CANARY = "canary"
PROMOTED_FROM = "codedance.io/promoted-from"
CONFLICT_ATTEMPTS = 5
POLL_EVERY = 2.0

JsonObject = dict[str, Any]


class WorkloadError(Exception):
    """A Deployment could not be read, written, or made ready; the message says why."""


class StableRolloutFailed(WorkloadError, WorkloadFailed):
    """The stable Deployment gave up on the new version; its previous version is back."""


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
    stable: Mapping[str, Any],
    ref: RolloutRef,
    template: Mapping[str, Any],
    owner: Mapping[str, Any] | None = None,
) -> JsonObject:
    """The canary Deployment for a stable one, given the canary's pod template.

    `owner` is the ownerReference to the CanaryDeployment (the garbage collector
    deletes the canary with it); None leaves the canary without one.
    """
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
    metadata: JsonObject = {"name": ref.canary, "namespace": ref.namespace, "labels": labels}
    if owner is not None:
        metadata["ownerReferences"] = [dict(owner)]
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": metadata, "spec": spec}


def not_ours(
    obj: Mapping[str, Any], rollout: str, owner: Mapping[str, Any] | None = None
) -> str | None:
    """Why `obj` belongs to someone else, or None when this rollout may write it.

    Ours: the label `app.kubernetes.io/managed-by: codedance` and, when
    `owner` is known, no controller ownerReference but one to that owner's
    uid. One without any controller ownerReference is ours when its
    `codedance.io/rollout` label names this rollout (made before canaries
    had owners; the next write adds it).
    """
    meta = obj.get("metadata") or {}
    what = f"{obj.get('kind') or 'object'} {meta.get('namespace')}/{meta.get('name')}"
    labels = meta.get("labels") or {}
    manager = next(iter(MANAGED_BY.items()))
    if labels.get(manager[0]) != manager[1]:
        return (
            f"{what} exists and is not managed by codedance (no label {manager[0]}: {manager[1]})"
        )
    controllers = [r for r in meta.get("ownerReferences") or [] if r.get("controller")]
    if owner is not None and controllers:
        if any(r.get("uid") == owner.get("uid") for r in controllers):
            return None
        other = controllers[0]
        return f"{what} is owned by {other.get('kind')} {other.get('name')}, not by this release"
    if labels.get(ROLLOUT_LABEL) != rollout:
        return f"{what} belongs to the release {labels.get(ROLLOUT_LABEL)!r}, not {rollout!r}"
    return None


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
    # available = ready for minReadySeconds: what the Deployment itself waits for
    available = int(status.get("availableReplicas") or 0)
    # the API server omits a zero count: no updatedReplicas means none is updated yet
    updated = int(status.get("updatedReplicas") or 0)
    total = int(status.get("replicas") or 0)
    seen = int(status.get("observedGeneration") or 0)
    generation = int(meta.get("generation") or 0)
    done = (
        seen >= generation
        and updated >= want
        and total <= updated
        and ready >= want
        and available >= want
    )
    parts = [f"{ready}/{want} ready, {available}/{want} available, {updated}/{want} updated"]
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


def _promoted_from(dep: Mapping[str, Any], rollout: RolloutRef) -> JsonObject | None:
    """The pod template a promotion of `rollout` replaced, if the Deployment keeps one."""
    text = ((dep.get("metadata") or {}).get("annotations") or {}).get(PROMOTED_FROM)
    if not text:
        return None
    try:
        kept = json.loads(text)
    except ValueError:
        return None
    if not isinstance(kept, dict) or kept.get("rollout") != rollout.name:
        return None  # another release's, or not ours at all: not what this one replaced
    template = kept.get("template")
    return template if isinstance(template, dict) else None


def _forget_promotion(dep: JsonObject, rollout: RolloutRef) -> bool:
    """Drop the kept template of `rollout` (False: there is none to drop)."""
    if _promoted_from(dep, rollout) is None:
        return False
    del dep["metadata"]["annotations"][PROMOTED_FROM]
    return True


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
        owner: Mapping[str, Any] | None = None,
    ) -> None:
        if not images and not pod_template_patch:
            raise ValueError("name the new version: images or a pod template patch")
        self._api = client.CustomObjectsApi(api_client)
        self._images = dict(images or {})
        self._patch = copy.deepcopy(pod_template_patch) if pod_template_patch else None
        self._timeout = ready_timeout
        self._clock = clock
        self._poll = poll_every
        self._owner = dict(owner) if owner else None  # the canary's ownerReference

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
            desired = canary_of(stable, rollout, template, self._owner)
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
        """Write the new version into the stable Deployment and wait for its rollout.

        Raises `StableRolloutFailed` once the stable has given up on the new
        version and has its previous pod template back; `WorkloadError`
        otherwise (transient: calling again carries on where this call was).
        """
        ns, name = rollout.namespace, rollout.stable

        def to_new_version(stable: JsonObject) -> bool:
            spec = stable.setdefault("spec", {})
            current = spec.get("template") or {}
            new = apply_version(current, self._images, self._patch)
            meta = stable.setdefault("metadata", {})
            annotations = meta.get("annotations") or {}
            # A second call (a restarted controller) finds the new version in place:
            # the template kept by the first call is the one to go back to.
            if new != current and _promoted_from(stable, rollout) is None:
                kept = {"rollout": rollout.name, "template": current}
                annotations[PROMOTED_FROM] = json.dumps(kept, sort_keys=True)
                meta["annotations"] = annotations
            spec["template"] = new
            return True

        await self._update(ns, name, to_new_version)
        try:
            await self._wait_ready(ns, name, failure=StableRolloutFailed)
        except StableRolloutFailed as failed:
            try:
                await self.restore_stable(rollout)
            except WorkloadError as error:
                raise StableRolloutFailed(
                    f"{failed}; restoring its previous version failed too: {error}"
                ) from None
            raise StableRolloutFailed(f"{failed}; its previous version is restored") from None
        await self._update(ns, name, lambda dep: _forget_promotion(dep, rollout))
        # a Deployment's generation counts annotation changes too: wait until the
        # controller has seen this one, so "rolled out" holds when we return
        await self._wait_ready(ns, name, failure=StableRolloutFailed)

    async def restore_stable(self, rollout: RolloutRef) -> None:
        """Put back the stable pod template a promotion of this rollout replaced, and wait
        for it; nothing to do when no promotion of this rollout is recorded."""
        ns, name = rollout.namespace, rollout.stable
        kept: JsonObject | None = None

        def to_previous_version(stable: JsonObject) -> bool:
            nonlocal kept
            kept = _promoted_from(stable, rollout)
            if kept is None or (stable.get("spec") or {}).get("template") == kept:
                return False
            stable.setdefault("spec", {})["template"] = kept
            return True

        await self._update(ns, name, to_previous_version)
        if kept is None:
            return
        # No early failure on ProgressDeadlineExceeded here: the controller keeps the
        # condition of the abandoned version until the restored pods make progress.
        await self._wait_ready(ns, name, deadline_fails=False)
        await self._update(ns, name, lambda dep: _forget_promotion(dep, rollout))
        await self._wait_ready(ns, name, deadline_fails=False)  # the annotation's generation

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

    async def foreign(self, rollout: RolloutRef) -> str | None:
        """Why `<stable>-canary` belongs to someone else; None when absent or ours."""
        current = await self._read(rollout.namespace, rollout.canary)
        if current is None:
            return None
        return not_ours({"kind": "Deployment", **current}, rollout.name, self._owner)

    async def _update(self, ns: str, name: str, change: Callable[[JsonObject], bool]) -> None:
        """Read, `change` in place (False: nothing to write), write; again on a 409."""
        for _ in range(CONFLICT_ATTEMPTS):
            dep = await self._read(ns, name)
            if dep is None:
                raise WorkloadError(f"Deployment {ns}/{name} not found")
            if not change(dep):
                return
            dep.pop("status", None)
            try:
                await self._call(
                    lambda body=dep: self._api.replace_namespaced_custom_object(
                        "apps", "v1", ns, "deployments", name, body
                    )
                )
                return
            except ApiException as error:
                if not retry.is_conflict(error):
                    raise self._error("write", ns, name, error) from None
        raise WorkloadError(self._conflicts(ns, name))

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
        # never overwrite someone else's `<stable>-canary`
        foreign = not_ours(current, desired["metadata"]["labels"][ROLLOUT_LABEL], self._owner)
        if foreign:
            raise WorkloadError(foreign)
        # an earlier attempt (a restarted controller) made it: make it what we want now
        body = copy.deepcopy(current)
        body["metadata"]["labels"] = desired["metadata"]["labels"]
        if self._owner is not None:
            others = [
                r
                for r in body["metadata"].get("ownerReferences") or []
                if r.get("uid") != self._owner.get("uid") and not r.get("controller")
            ]
            body["metadata"]["ownerReferences"] = [*others, dict(self._owner)]
        body["spec"] = desired["spec"]
        body.pop("status", None)
        await self._call(
            lambda: self._api.replace_namespaced_custom_object(
                "apps", "v1", ns, "deployments", name, body
            )
        )

    async def _wait_ready(
        self,
        ns: str,
        name: str,
        *,
        failure: type[WorkloadError] = WorkloadError,
        deadline_fails: bool = True,
    ) -> None:
        """Poll until rolled out; `failure` when the Deployment gives up or time runs out."""
        deadline = self._clock.now() + self._timeout
        while True:
            dep = await self._read(ns, name)
            if dep is None:
                raise WorkloadError(f"Deployment {ns}/{name} disappeared while rolling out")
            done, where = readiness(dep)
            if done:
                return
            if deadline_fails and deadline_exceeded(dep):
                raise failure(
                    f"Deployment {ns}/{name} failed to roll out (progressDeadlineSeconds "
                    f"exceeded): {where}"
                )
            if self._clock.now() >= deadline:
                raise failure(
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
