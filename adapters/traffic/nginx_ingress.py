"""ingress-nginx: a canary Ingress beside the user's, carrying the canary's share.

In: an API client, the stable Ingress the user owns, the canary Service, and
optional header or cookie routing. Out: the engine's `TrafficRouter` port
(`set_weight`, `get_weight`), plus `reconcile` and `remove`.

ingress-nginx splits traffic with a second Ingress for the same hosts and
paths marked `nginx.ingress.kubernetes.io/canary: "true"`, whose
`canary-weight` is the canary's share. The router writes that Ingress,
`<ingress>-canary`, as a clone of the stable one, rebuilt from it at every
write so it follows the user's changes:

- every backend of the stable Service (the rollout's `service`; every backend
  when it has none) points at the canary Service, same port; a path to
  another Service is left out, so the canary takes no share of it;
- annotations: the ones ingress-nginx reads (`nginx.ingress.kubernetes.io/*`:
  rewrite-target, backend-protocol, ssl-redirect, proxy-*, auth-*, ...) and
  `kubernetes.io/ingress.class` are kept, so the canary serves requests the
  same way; the stable's own `canary*` annotations are dropped (they would
  fight ours), and so is every other annotation: those of other controllers
  (cert-manager, external-dns, Helm, Argo CD, kubectl's
  last-applied-configuration) would have them act on a copy they do not own;
- metadata is new: name, namespace, the label
  `app.kubernetes.io/managed-by: codedance` and, when the router is given
  its `owner` (the ownerReference to the CanaryDeployment), that reference,
  so the garbage collector deletes the canary Ingress with its release. The
  router refuses to touch a `<ingress>-canary` without the label, or whose
  controller ownerReference names another owner (`foreign` says so before a
  release starts); no uid, resourceVersion, managed fields, creation time or
  status of the stable is copied;
- `canary-weight` is the weight, with `canary-weight-total` when a maximum
  weight is set (the weight is then scaled to that total: 5 % of 1000 is 50);
  `canary-by-header`, `canary-by-header-value` and `canary-by-cookie` route
  chosen requests to the canary for A/B tests.

The canary Ingress is created by the first `set_weight` above 0 (before
that, no canary Ingress is weight 0). During a rollout weight 0 keeps it
with `canary-weight: "0"` rather than deleting it, so the next step is one
update. At weight 0 the header and cookie annotations are left out too:
ingress-nginx sends a request with the header to the canary whatever the
weight, and weight 0 must mean no request reaches the canary.

`remove` deletes the canary Ingress when the rollout has ended; the engine
calls it through the workload manager's `retire`, which the composition root
wraps: `retire` first retires the canary workload's objects, then awaits
`router.remove(rollout)`. Both `roll_back` and `promote` (engine/rollback.py)
call `retire` only after weight 0 is confirmed, so the Ingress is deleted
when it carries no traffic.

The API server validates the canary Ingress as a new object: it refuses on
create (only) a `kubernetes.io/ingress.class` annotation that disagrees with
`spec.ingressClassName`, which a stable Ingress may have come to carry by an
update. The router then fails with an error naming the canary Ingress and
the field, and creates nothing. The server adds `status: {loadBalancer: {}}`
to the Ingress it stores; the router neither writes nor compares status.

Every write carries the resourceVersion read (a 409 means someone wrote in
between: read and build again). `get_weight` reads the annotation back from
the API; when it is not the weight last written someone reverted it, which
is reported (`on_revert`) and written again by the engine's read-back
confirmation or by `reconcile`.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from typing import Any

from kubernetes.aio import client
from kubernetes.aio.client.exceptions import ApiException

from adapters.traffic.errors import (
    ObjectName,
    RevertCallback,
    RevertWatch,
    TrafficObjectError,
    api_error,
    check_weight,
    log,
    retry_on_conflict,
)
from engine.ports import RolloutRef

PREFIX = "nginx.ingress.kubernetes.io"
INGRESS_CLASS = "kubernetes.io/ingress.class"
MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGER = "codedance"
INGRESS = "Ingress"
API_VERSION = "networking.k8s.io/v1"


def canary_name(ingress: str) -> str:
    return f"{ingress}-canary"


def shared_annotations(annotations: Mapping[str, str], prefix: str = PREFIX) -> dict[str, str]:
    """The stable's annotations the canary keeps: ingress-nginx's own, minus `canary*`."""
    kept: dict[str, str] = {}
    for key, value in annotations.items():
        ours = key.startswith(f"{prefix}/") and not key[len(prefix) + 1 :].startswith("canary")
        if ours or key == INGRESS_CLASS:
            kept[key] = value
    return kept


def _backend_to_canary(
    backend: Any, stable_service: str | None, canary_service: str
) -> dict[str, Any] | None:
    """The backend pointed at the canary, or None when it is not the stable's."""
    if not isinstance(backend, Mapping):
        return None
    service = backend.get("service")
    if not isinstance(service, Mapping):
        return None  # a resource backend is not a Service the canary can replace
    if stable_service and service.get("name") != stable_service:
        return None
    out = copy.deepcopy(dict(backend))
    out["service"]["name"] = canary_service
    return out


def canary_spec(
    stable: Mapping[str, Any], stable_service: str | None, canary_service: str
) -> dict[str, Any]:
    """The stable Ingress' spec with the stable Service's backends moved to the canary."""
    name = ObjectName.of(stable, INGRESS)
    spec = stable.get("spec")
    if not isinstance(spec, Mapping):
        raise TrafficObjectError(name, "is missing", "spec")
    out = copy.deepcopy(dict(spec))
    moved = 0
    if "defaultBackend" in out:
        backend = _backend_to_canary(out["defaultBackend"], stable_service, canary_service)
        if backend is None:
            del out["defaultBackend"]
        else:
            out["defaultBackend"] = backend
            moved += 1
    rules = []
    for rule in out.get("rules") or []:
        http = rule.get("http") if isinstance(rule, Mapping) else None
        if not isinstance(http, Mapping):
            continue
        paths = []
        for path in http.get("paths") or []:
            backend = _backend_to_canary(path.get("backend"), stable_service, canary_service)
            if backend is not None:
                paths.append({**path, "backend": backend})
        if paths:
            rules.append({**rule, "http": {**http, "paths": paths}})
            moved += len(paths)
    if "rules" in out:
        out["rules"] = rules
    if not moved:
        which = f"Service {stable_service}" if stable_service else "a Service"
        raise TrafficObjectError(name, f"has no backend for {which}", "spec.rules")
    return out


def canary_ingress(
    stable: Mapping[str, Any],
    *,
    canary_service: str,
    stable_service: str | None,
    weight: int,
    total: int | None = None,
    header: str | None = None,
    header_value: str | None = None,
    cookie: str | None = None,
    prefix: str = PREFIX,
    owner: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The canary Ingress for `stable` at canary `weight` percent, owned by `owner`."""
    check_weight(weight)
    name = ObjectName.of(stable, INGRESS)
    meta = stable.get("metadata") or {}
    annotations = meta.get("annotations") or {}
    if str(annotations.get(f"{prefix}/canary", "")).lower() == "true":
        raise TrafficObjectError(
            name,
            f'has {prefix}/canary: "true"; name the stable Ingress, not a canary one',
            "metadata.annotations",
        )
    wanted = shared_annotations(annotations, prefix)
    wanted[f"{prefix}/canary"] = "true"
    wanted[f"{prefix}/canary-weight"] = str(scaled(weight, total))
    if total is not None:
        wanted[f"{prefix}/canary-weight-total"] = str(total)
    if weight > 0:
        if header:
            wanted[f"{prefix}/canary-by-header"] = header
        if header and header_value:
            wanted[f"{prefix}/canary-by-header-value"] = header_value
        if cookie:
            wanted[f"{prefix}/canary-by-cookie"] = cookie
    metadata: dict[str, Any] = {
        "name": canary_name(name.name),
        "namespace": name.namespace,
        "labels": {MANAGED_BY: MANAGER},
        "annotations": wanted,
    }
    if owner is not None:
        metadata["ownerReferences"] = [dict(owner)]
    return {
        "apiVersion": API_VERSION,
        "kind": INGRESS,
        "metadata": metadata,
        "spec": canary_spec(stable, stable_service, canary_service),
    }


def scaled(weight: int, total: int | None) -> int:
    """The `canary-weight` for a percentage, on a scale of `total` (100 when None)."""
    return weight if total is None else round(weight * total / 100)


def canary_weight(canary: Mapping[str, Any], prefix: str = PREFIX) -> int:
    """The canary's share in percent, as the canary Ingress' annotations say."""
    name = ObjectName.of(canary, INGRESS)
    annotations = (canary.get("metadata") or {}).get("annotations") or {}
    field = "metadata.annotations"
    if str(annotations.get(f"{prefix}/canary", "")).lower() != "true":
        raise TrafficObjectError(name, f'has no {prefix}/canary: "true"', field)
    values = []
    for key, default in (("canary-weight", "0"), ("canary-weight-total", "100")):
        raw = annotations.get(f"{prefix}/{key}", default)
        try:
            values.append(int(raw))
        except (TypeError, ValueError):
            raise TrafficObjectError(
                name, f"{prefix}/{key} is {raw!r}, not an integer", field
            ) from None
    weight, total = values
    if total <= 0:
        raise TrafficObjectError(name, f"{prefix}/canary-weight-total is {total}", field)
    return round(min(weight, total) * 100 / total)


def _owned(ingress: Mapping[str, Any]) -> tuple[Any, Any, Any]:
    """What the router writes on the canary Ingress: our label, the annotations, the spec."""
    meta = ingress.get("metadata") or {}
    return (
        (meta.get("labels") or {}).get(MANAGED_BY),
        meta.get("annotations") or {},
        ingress.get("spec"),
    )


def _controllers(ingress: Mapping[str, Any]) -> list[dict[str, Any]]:
    refs = (ingress.get("metadata") or {}).get("ownerReferences") or []
    return [dict(r) for r in refs if r.get("controller")]


def _with_owner(
    refs: list[dict[str, Any]] | None, owner: Mapping[str, Any] | None
) -> list[dict[str, Any]] | None:
    """The ownerReferences to write: `owner` added to the others (none but its own controls)."""
    if owner is None:
        return refs
    others = [r for r in refs or [] if r.get("uid") != owner.get("uid") and not r.get("controller")]
    return [*others, dict(owner)]


class NginxIngressRouter:
    """The engine's traffic router over ingress-nginx's canary Ingress.

    `NginxIngressRouter(api, ingress="checkout", canary_service="checkout-canary")`
    writes `checkout-canary` beside the Ingress `checkout` of the rollout's
    namespace. `max_weight` sets `canary-weight-total` (at least 100);
    `header` (with `header_value`) and `cookie` add ingress-nginx's header
    and cookie routing.
    """

    def __init__(
        self,
        api_client: client.ApiClient,
        *,
        ingress: str,
        canary_service: str,
        max_weight: int | None = None,
        header: str | None = None,
        header_value: str | None = None,
        cookie: str | None = None,
        on_revert: RevertCallback | None = None,
        prefix: str = PREFIX,
        owner: Mapping[str, Any] | None = None,
    ) -> None:
        if max_weight is not None and max_weight < 100:
            # below 100 a percentage no longer survives the round trip through an integer
            raise ValueError(f"max_weight {max_weight} is below 100")
        if header_value and not header:
            raise ValueError("header_value needs the header it is the value of")
        self.ingress = ingress
        self.canary_service = canary_service
        self.max_weight = max_weight
        self.header = header
        self.header_value = header_value
        self.cookie = cookie
        self.prefix = prefix
        self.owner = dict(owner) if owner else None  # the canary Ingress' ownerReference
        self._api = client.NetworkingV1Api(api_client)
        self._reverts = RevertWatch(on_revert)

    def _names(self, rollout: RolloutRef) -> tuple[ObjectName, ObjectName]:
        return (
            ObjectName(INGRESS, rollout.namespace, self.ingress),
            ObjectName(INGRESS, rollout.namespace, canary_name(self.ingress)),
        )

    async def _read(self, obj: ObjectName, *, missing_ok: bool = False) -> dict[str, Any] | None:
        try:
            found = await self._api.read_namespaced_ingress(obj.name, obj.namespace)
        except ApiException as e:
            if missing_ok and e.status == 404:
                return None
            raise api_error(obj, e, "reading") from None
        data: dict[str, Any] = json.loads(found.to_json())
        return data

    async def _write(self, obj: ObjectName, body: dict[str, Any], *, create: bool) -> None:
        ingress = client.V1Ingress.from_dict(body)
        assert ingress is not None  # from_dict returns None for None only
        try:
            if create:
                await self._api.create_namespaced_ingress(obj.namespace, ingress)
            else:
                await self._api.replace_namespaced_ingress(obj.name, obj.namespace, ingress)
        except ApiException as e:
            if e.status == 409:
                raise  # created or changed meanwhile: retry_on_conflict reads again
            raise api_error(obj, e, "creating" if create else "writing") from None

    def _desired(
        self, stable: Mapping[str, Any], rollout: RolloutRef, weight: int
    ) -> dict[str, Any]:
        return canary_ingress(
            stable,
            canary_service=self.canary_service,
            stable_service=rollout.service or None,
            weight=weight,
            total=self.max_weight,
            header=self.header,
            header_value=self.header_value,
            cookie=self.cookie,
            prefix=self.prefix,
            owner=self.owner,
        )

    def _stopped(self, canary: Mapping[str, Any]) -> dict[str, Any]:
        """The canary Ingress as it is, at weight 0 and without header or cookie routing."""
        stopped = copy.deepcopy(dict(canary))
        annotations = {
            key: value
            for key, value in (stopped["metadata"].get("annotations") or {}).items()
            if not key.startswith(f"{self.prefix}/canary-by-")
        }
        annotations[f"{self.prefix}/canary-weight"] = "0"
        stopped["metadata"]["annotations"] = annotations
        return stopped

    def _not_ours(self, obj: ObjectName, existing: Mapping[str, Any]) -> TrafficObjectError | None:
        """Why the canary Ingress is someone else's (an error to raise), None when ours.

        Ours: our label and, when the router knows its owner, no controller
        ownerReference but one to the owner's uid. One without any controller
        reference (made before canaries had owners) is adopted by the next write.
        """
        if _owned(existing)[0] != MANAGER:
            return TrafficObjectError(
                obj,
                f"exists and is not managed by codedance (no label {MANAGED_BY}: {MANAGER})",
                "metadata.labels",
            )
        controllers = _controllers(existing)
        if self.owner is None or not controllers:
            return None
        if any(r.get("uid") == self.owner.get("uid") for r in controllers):
            return None
        other = controllers[0]
        return TrafficObjectError(
            obj,
            f"is owned by {other.get('kind')} {other.get('name')}, not by this release",
            "metadata.ownerReferences",
        )

    def _check_ours(self, obj: ObjectName, existing: Mapping[str, Any]) -> None:
        problem = self._not_ours(obj, existing)
        if problem is not None:
            raise problem

    async def foreign(self, rollout: RolloutRef) -> str | None:
        """Why `<ingress>-canary` is someone else's, None when it is absent or ours."""
        _, obj = self._names(rollout)
        existing = await self._read(obj, missing_ok=True)
        problem = None if existing is None else self._not_ours(obj, existing)
        return None if problem is None else str(problem)

    async def set_weight(self, rollout: RolloutRef, weight: int) -> None:
        """Give the canary `weight` percent; no write when the canary Ingress already says so."""
        check_weight(weight)
        stable_name, obj = self._names(rollout)

        async def attempt() -> None:
            # Weight 0 must succeed even when the stable Ingress is gone: a rollback
            # then turns the canary Ingress as it is down to 0.
            stable = await self._read(stable_name, missing_ok=weight == 0)
            existing = await self._read(obj, missing_ok=True)
            if stable is None:
                if existing is None:
                    return
                desired = self._stopped(existing)
            else:
                desired = self._desired(stable, rollout, weight)
            if existing is None:
                self._reverts.saw(obj, 0)
                if weight > 0:
                    await self._write(obj, desired, create=True)
                return
            self._check_ours(obj, existing)
            try:
                self._reverts.saw(obj, canary_weight(existing, self.prefix))
            except TrafficObjectError as e:
                log.warning("%s; rewriting it", e)
            refs = existing["metadata"].get("ownerReferences")
            owners = _with_owner(refs, self.owner)
            if _owned(existing) == _owned(desired) and owners == refs:
                return
            meta = existing["metadata"]
            desired["metadata"] = {
                **meta,
                "labels": {**(meta.get("labels") or {}), MANAGED_BY: MANAGER},
                "annotations": desired["metadata"]["annotations"],
            }
            if owners is not None:
                desired["metadata"]["ownerReferences"] = owners
            await self._write(obj, desired, create=False)

        await retry_on_conflict(obj, attempt)
        self._reverts.wrote(obj, weight)

    async def get_weight(self, rollout: RolloutRef) -> int:
        """The canary's share as the canary Ingress says now; 0 when there is none."""
        _, obj = self._names(rollout)
        existing = await self._read(obj, missing_ok=True)
        found = 0 if existing is None else canary_weight(existing, self.prefix)
        self._reverts.saw(obj, found)
        return found

    async def reconcile(self, rollout: RolloutRef) -> bool:
        """Write the last weight again if someone changed it; True when it had to."""
        expected = self._reverts.expected(self._names(rollout)[1])
        if expected is None or await self.get_weight(rollout) == expected:
            return False
        await self.set_weight(rollout, expected)
        return True

    async def remove(self, rollout: RolloutRef) -> None:
        """Delete the canary Ingress (the rollout has ended); nothing to do when it is gone."""
        _, obj = self._names(rollout)
        existing = await self._read(obj, missing_ok=True)
        if existing is not None:
            self._check_ours(obj, existing)
            try:
                await self._api.delete_namespaced_ingress(obj.name, obj.namespace)
            except ApiException as e:
                if e.status != 404:
                    raise api_error(obj, e, "deleting") from None
        self._reverts.forget(obj)
