"""Where a CanaryDeployment's requests really go: routing weights, endpoints, pods, shares.

In: an API client, a namespace and a CanaryDeployment name (`read_traffic_view`),
or, for the pure part, the objects as plain dicts (`routing_backends`,
`endpoints_of`, `traffic_shares`, `build_view`). Out: one JSON-ready document
(a dict, `VIEW_VERSION` 1):

    {"version": 1, "namespace", "name", "provider", "phase", "statusWeight",
     "routing": [{"kind", "name", "found"}],
     "backends": [{"service", "namespace", "subset", "weight", "weightPercent",
                   "serviceFound", "readyEndpoints", "notReadyEndpoints",
                   "groups": [{"track", "version", "ready"}],
                   "share": {"canary", "stable", "unknown", "unserved"},
                   "flags": [...], "problems": [...]}],
     "share": {"canary", "stable", "unknown", "unserved"},
     "problems": [...]}

Shares are percentages of all requests the routing object receives. A
backend gets `weight / sum of weights` of them, split evenly across its
ready endpoints (what kube-proxy and the meshes do, give or take their load
balancing), and each endpoint's part goes to its pod's track: `canary` when
the pod belongs to the canary Deployment `<targetRef>-canary` (through its
ReplicaSet's owner) or carries `codedance.io/track: canary`, else `stable`;
`unknown` when no pod stands behind the endpoint. A backend with weight and
no ready endpoint sends its part nowhere (`unserved`: those requests fail).
Flags: `both-tracks` (the Service selects canary and stable pods, so its
weight is not the split it looks like), `no-ready-endpoints`, `no-service`.

Which backends, per `spec.traffic.provider` (names default as the controller
defaults them: the stable Service is `service` or the target's name, the
canary Service `canaryService` or `<service>-canary`):

- `gateway-api`: the HTTPRoute `httpRoute` (default: the stable Service); its
  first rule with a backendRef to the stable or canary Service; every
  backendRef of that rule, weight 1 when unset (the Gateway API default);
- `istio`: the VirtualService `virtualService` (default: the stable Service);
  its HTTP route named `route`, else the first; every destination (a lone
  destination without weight takes 100, as Istio does). A destination with a
  `subset` counts only the endpoints whose pods carry that subset's labels,
  from the DestinationRule `destinationRule` (default: the stable host);
- `nginx-ingress`: the Ingress `ingress` (default: the stable Service) and
  its canary Ingress `<ingress>-canary`; the canary Ingress' `canary-weight`
  (of `canary-weight-total`, 100 by default) goes to its Service, the rest to
  the stable Ingress' Service. No canary Ingress means canary weight 0.

Objects are read as raw JSON (routing objects through the custom-objects and
networking endpoints; this module does not use `adapters.traffic`, which
drives them). A missing CanaryDeployment or routing object raises
`TrafficViewError`; other API errors are raised as `ApiException` for the
caller to report.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from kubernetes.aio import client
from kubernetes.aio.client.exceptions import ApiException

from adapters.kube.models import GROUP, PLURAL, VERSION
from adapters.kube.workloads import CANARY, TRACK_LABEL

VIEW_VERSION = 1
STABLE, UNKNOWN, UNSERVED = "stable", "unknown", "unserved"
SHARE_KEYS = (CANARY, STABLE, UNKNOWN, UNSERVED)
BOTH_TRACKS, NO_READY, NO_SERVICE = "both-tracks", "no-ready-endpoints", "no-service"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"  # how an EndpointSlice names its Service
NGINX = "nginx.ingress.kubernetes.io"
GATEWAY = ("gateway.networking.k8s.io", "v1", "httproutes")
ISTIO_VS = ("networking.istio.io", "v1", "virtualservices")
ISTIO_DR = ("networking.istio.io", "v1", "destinationrules")

JsonObject = dict[str, Any]


class TrafficViewError(Exception):
    """An object the view needs is missing or unusable; the message names it."""


@dataclass(frozen=True)
class Backend:
    """One backend of a routing object: a Service (and subset), with its relative weight."""

    service: str
    namespace: str
    weight: int
    subset: str | None = None


@dataclass(frozen=True)
class Routing:
    """What the routing object says: its objects (kind, name, found) and its backends."""

    objects: list[tuple[str, str, bool]]
    backends: list[Backend]
    problems: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Traffic:
    """`spec.traffic` with the controller's defaults filled in."""

    provider: str
    stable_service: str
    canary_service: str
    object_name: str  # the HTTPRoute, VirtualService or stable Ingress
    route: str | None
    destination_rule: str


def traffic_of(cd: Mapping[str, Any]) -> Traffic:
    """The provider and object names of a CanaryDeployment, defaulted as the controller does."""
    spec = cd.get("spec") or {}
    traffic = spec.get("traffic") or {}
    target = str((spec.get("targetRef") or {}).get("name") or "")
    provider = str(traffic.get("provider") or "local")
    stable = str(traffic.get("service") or target)
    canary = str(traffic.get("canaryService") or f"{stable}-canary")
    named = {"gateway-api": "httpRoute", "istio": "virtualService", "nginx-ingress": "ingress"}
    object_name = str(traffic.get(named.get(provider, "")) or stable)
    return Traffic(
        provider=provider,
        stable_service=stable,
        canary_service=canary,
        object_name=object_name,
        route=traffic.get("route") or None,
        destination_rule=str(traffic.get("destinationRule") or stable.split(".", 1)[0]),
    )


# --- routing objects to backends (pure) -----------------------------------------------


def _int(value: Any, default: int) -> int:
    if value is None:
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def gateway_backends(route: Mapping[str, Any], namespace: str, traffic: Traffic) -> list[Backend]:
    """The backendRefs of the HTTPRoute's first rule that names the stable or canary Service."""
    ours = {traffic.stable_service, traffic.canary_service}
    rules = (route.get("spec") or {}).get("rules") or []
    for rule in rules:
        refs = [r for r in (rule or {}).get("backendRefs") or [] if isinstance(r, Mapping)]
        services = [
            r
            for r in refs
            if r.get("kind", "Service") == "Service" and r.get("group", "") in ("", "core")
        ]
        if any(r.get("name") in ours and r.get("namespace", namespace) == namespace for r in refs):
            return [
                Backend(
                    service=str(r.get("name")),
                    namespace=str(r.get("namespace") or namespace),
                    weight=max(0, _int(r.get("weight"), 1)),
                )
                for r in services
            ]
    raise TrafficViewError(
        f"HTTPRoute {namespace}/{route.get('metadata', {}).get('name')} has no rule with a "
        f"backendRef to Service {traffic.stable_service} or {traffic.canary_service}"
    )


def _host_service(host: str, namespace: str) -> tuple[str, str]:
    """(Service, namespace) of an Istio destination host: `api`, `api.ns`, `api.ns.svc...`."""
    parts = host.split(".")
    return parts[0], parts[1] if len(parts) > 1 and parts[1] else namespace


def istio_backends(vs: Mapping[str, Any], namespace: str, traffic: Traffic) -> list[Backend]:
    """The destinations of the VirtualService's HTTP route `traffic.route` (else the first)."""
    name = f"VirtualService {namespace}/{(vs.get('metadata') or {}).get('name')}"
    http = [h for h in (vs.get("spec") or {}).get("http") or [] if isinstance(h, Mapping)]
    if not http:
        raise TrafficViewError(f"{name} has no HTTP routes")
    chosen = http[0]
    if traffic.route:
        found = [h for h in http if h.get("name") == traffic.route]
        if not found:
            raise TrafficViewError(f"{name} has no HTTP route named {traffic.route}")
        chosen = found[0]
    entries = [e for e in chosen.get("route") or [] if isinstance(e, Mapping)]
    backends = []
    for entry in entries:
        destination = entry.get("destination") or {}
        service, ns = _host_service(str(destination.get("host") or ""), namespace)
        # a lone destination takes every request whatever its weight says (Istio's rule)
        weight = 100 if len(entries) == 1 else max(0, _int(entry.get("weight"), 0))
        subset = destination.get("subset")
        backends.append(Backend(service, ns, weight, str(subset) if subset else None))
    return backends


def _ingress_services(ingress: Mapping[str, Any]) -> list[str]:
    spec = ingress.get("spec") or {}
    backends = [spec.get("defaultBackend")]
    for rule in spec.get("rules") or []:
        for path in ((rule or {}).get("http") or {}).get("paths") or []:
            backends.append((path or {}).get("backend"))
    names = []
    for backend in backends:
        service = (backend or {}).get("service") if isinstance(backend, Mapping) else None
        if isinstance(service, Mapping) and service.get("name") not in names:
            names.append(str(service.get("name")))
    return names


def nginx_backends(
    stable: Mapping[str, Any], canary: Mapping[str, Any] | None, namespace: str, traffic: Traffic
) -> list[Backend]:
    """The stable Ingress' Service and the canary Ingress' Service, weighted by `canary-weight`."""
    stable_services = _ingress_services(stable)
    if not stable_services:
        raise TrafficViewError(f"Ingress {namespace}/{traffic.object_name} has no backend Service")
    # the Service the rollout names, when the Ingress routes to it; else its first
    stable_service = (
        traffic.stable_service if traffic.stable_service in stable_services else stable_services[0]
    )
    if canary is None:
        return [Backend(stable_service, namespace, 100)]
    annotations = (canary.get("metadata") or {}).get("annotations") or {}
    total = max(1, _int(annotations.get(f"{NGINX}/canary-weight-total"), 100))
    weight = min(total, max(0, _int(annotations.get(f"{NGINX}/canary-weight"), 0)))
    if str(annotations.get(f"{NGINX}/canary", "")).lower() != "true":
        weight = 0  # without the marker ingress-nginx treats it as an Ingress of its own
    canary_services = _ingress_services(canary) or [traffic.canary_service]
    return [
        Backend(stable_service, namespace, total - weight),
        Backend(canary_services[0], namespace, weight),
    ]


# --- endpoints and pods (pure) ----------------------------------------------------------


def _owner(obj: Mapping[str, Any], kind: str) -> str | None:
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("kind") == kind:
            return str(ref.get("name"))
    return None


def track_of(
    pod: Mapping[str, Any], replicasets: Mapping[str, Mapping[str, Any]], canary_deployment: str
) -> str:
    """`canary` for a pod of the canary Deployment or labelled canary, else `stable`."""
    labels = (pod.get("metadata") or {}).get("labels") or {}
    if labels.get(TRACK_LABEL) == CANARY:
        return CANARY
    rs_name = _owner(pod, "ReplicaSet")
    rs = replicasets.get(rs_name) if rs_name else None
    if rs is not None and _owner(rs, "Deployment") == canary_deployment:
        return CANARY
    return STABLE


def version_of(pod: Mapping[str, Any]) -> str:
    """The pod's container images, in container order (the version a person recognises)."""
    containers = (pod.get("spec") or {}).get("containers") or []
    return ",".join(str(c.get("image")) for c in containers) or "-"


def endpoints_of(
    slices: Iterable[Mapping[str, Any]],
    pods: Mapping[str, Mapping[str, Any]],
    replicasets: Mapping[str, Mapping[str, Any]],
    canary_deployment: str,
    subset_labels: Mapping[str, str] | None = None,
) -> list[JsonObject]:
    """A Service's endpoints, one per pod (or address): `{"ready", "track", "version"}`.

    An endpoint in two slices (dual stack, a slice being replaced) counts once.
    With `subset_labels`, only endpoints whose pods carry them are kept.
    A `ready` condition that is absent means ready (the EndpointSlice API's rule).
    """
    seen: dict[str, JsonObject] = {}
    for slice_ in slices:
        for endpoint in slice_.get("endpoints") or []:
            target = endpoint.get("targetRef") or {}
            pod_name = target.get("name") if target.get("kind", "Pod") == "Pod" else None
            key = f"pod/{pod_name}" if pod_name else f"ip/{(endpoint.get('addresses') or ['?'])[0]}"
            pod = pods.get(str(pod_name)) if pod_name else None
            if subset_labels:
                labels = ((pod or {}).get("metadata") or {}).get("labels") or {}
                if pod is None or any(labels.get(k) != v for k, v in subset_labels.items()):
                    continue
            ready = (endpoint.get("conditions") or {}).get("ready")
            found = {
                "ready": ready is None or bool(ready),
                "track": UNKNOWN if pod is None else track_of(pod, replicasets, canary_deployment),
                "version": "-" if pod is None else version_of(pod),
            }
            # a ready copy wins over a stale not-ready one in another slice
            if key not in seen or (found["ready"] and not seen[key]["ready"]):
                seen[key] = found
    return list(seen.values())


# --- shares (pure) ------------------------------------------------------------------------


def _zero() -> dict[str, float]:
    return dict.fromkeys(SHARE_KEYS, 0.0)


def _round(share: Mapping[str, float]) -> dict[str, float]:
    return {k: round(share[k], 3) for k in SHARE_KEYS}


def traffic_shares(backends: Sequence[Mapping[str, Any]]) -> JsonObject:
    """Shares of requests per track, from backends as plain dicts.

    In: `[{"service": str, "weight": int, "endpoints": [{"ready": bool, "track":
    "canary"|"stable"|"unknown", "version": str}], "serviceFound": bool (default
    True)}]`. Out: `{"backends": [...], "share": {...}, "problems": [...]}`, each
    backend with `weightPercent`, ready/not-ready counts, `groups` (ready
    endpoints by track and version), its `share`, `flags` and `problems`.
    """
    total_weight = sum(max(0, int(b.get("weight") or 0)) for b in backends)
    total = _zero()
    out_backends = []
    problems: list[str] = []
    if not backends:
        problems.append("the routing object has no backends")
    elif total_weight == 0:
        problems.append("every backend has weight 0: the routing object sends requests nowhere")
    for backend in backends:
        weight = max(0, int(backend.get("weight") or 0))
        percent = 100.0 * weight / total_weight if total_weight else 0.0
        endpoints = list(backend.get("endpoints") or [])
        ready = [e for e in endpoints if e.get("ready")]
        groups: dict[tuple[str, str], int] = {}
        for e in ready:
            key = (str(e.get("track") or UNKNOWN), str(e.get("version") or "-"))
            groups[key] = groups.get(key, 0) + 1
        share = _zero()
        if ready:
            for (track, _), count in groups.items():
                share[track if track in SHARE_KEYS else UNKNOWN] += percent * count / len(ready)
        else:
            share[UNSERVED] = percent
        for k in SHARE_KEYS:
            total[k] += share[k]
        name = str(backend.get("service"))
        if backend.get("subset"):
            name += f" (subset {backend['subset']})"
        flags, notes = [], []
        if not backend.get("serviceFound", True):
            flags.append(NO_SERVICE)
            notes.append(f"Service {name} does not exist")
        tracks = {track for track, _ in groups}
        if {CANARY, STABLE} <= tracks:
            flags.append(BOTH_TRACKS)
            notes.append(
                f"Service {name} reaches both canary and stable pods: its selector matches "
                f"both tracks (add {TRACK_LABEL} to it)"
            )
        if not ready:
            flags.append(NO_READY)
            if percent > 0:
                notes.append(
                    f"Service {name} has no ready endpoints; its {percent:.1f}% of requests fail"
                )
            else:
                notes.append(f"Service {name} has no ready endpoints (weight 0)")
        problems.extend(notes)
        out_backends.append(
            {
                "service": str(backend.get("service")),
                "namespace": backend.get("namespace"),
                "subset": backend.get("subset"),
                "weight": weight,
                "weightPercent": round(percent, 3),
                "serviceFound": bool(backend.get("serviceFound", True)),
                "readyEndpoints": len(ready),
                "notReadyEndpoints": len(endpoints) - len(ready),
                "groups": [
                    {"track": track, "version": version, "ready": count}
                    for (track, version), count in sorted(groups.items())
                ],
                "share": _round(share),
                "flags": flags,
                "problems": notes,
            }
        )
    return {"backends": out_backends, "share": _round(total), "problems": problems}


def build_view(
    cd: Mapping[str, Any],
    routing: Routing,
    services: Mapping[tuple[str, str], Mapping[str, Any] | None],
    slices: Mapping[tuple[str, str], Sequence[Mapping[str, Any]]],
    pods: Mapping[str, Mapping[str, Mapping[str, Any]]],
    replicasets: Mapping[str, Mapping[str, Mapping[str, Any]]],
    subsets: Mapping[str, Mapping[str, str]] | None = None,
) -> JsonObject:
    """The whole document (see the module's docstring) from the objects read.

    `services` and `slices` are keyed by (namespace, Service); `pods` and
    `replicasets` by namespace, then name; `subsets` maps an Istio subset to
    its DestinationRule labels.
    """
    meta, spec, status = cd.get("metadata") or {}, cd.get("spec") or {}, cd.get("status") or {}
    namespace = str(meta.get("namespace") or "default")
    canary_deployment = f"{(spec.get('targetRef') or {}).get('name')}-canary"
    problems = list(routing.problems)
    plain = []
    for b in routing.backends:
        key = (b.namespace, b.service)
        labels = (subsets or {}).get(b.subset) if b.subset else None
        if b.subset and labels is None:
            problems.append(f"subset {b.subset} is not in the DestinationRule; all pods counted")
        plain.append(
            {
                "service": b.service,
                "namespace": b.namespace,
                "subset": b.subset,
                "weight": b.weight,
                "serviceFound": services.get(key) is not None,
                "endpoints": endpoints_of(
                    slices.get(key) or [],
                    pods.get(b.namespace) or {},
                    replicasets.get(b.namespace) or {},
                    canary_deployment,
                    labels,
                ),
            }
        )
    shares = traffic_shares(plain)
    weight = status.get("weight")
    return {
        "version": VIEW_VERSION,
        "namespace": namespace,
        "name": meta.get("name"),
        "provider": traffic_of(cd).provider,
        "phase": status.get("phase"),
        "statusWeight": weight if isinstance(weight, int) else None,
        "routing": [{"kind": k, "name": n, "found": f} for k, n, f in routing.objects],
        "backends": shares["backends"],
        "share": shares["share"],
        "problems": problems + shares["problems"],
    }


# --- reading the cluster ---------------------------------------------------------------------


async def _raw(call: Awaitable[Any]) -> JsonObject | None:
    """A raw (`*_without_preload_content`) call's JSON; None on 404, ApiException otherwise."""
    response = await call
    body = await response.read()
    if response.status == 404:
        return None
    if not 200 <= response.status < 300:
        raise ApiException(
            status=response.status, reason=response.reason, body=body.decode("utf-8", "replace")
        )
    return cast(JsonObject, json.loads(body))


async def _custom(
    api: client.CustomObjectsApi, gvp: tuple[str, str, str], namespace: str, name: str
) -> JsonObject | None:
    try:
        group, version, plural = gvp
        found = await api.get_namespaced_custom_object(group, version, namespace, plural, name)
        return cast(JsonObject, found)
    except ApiException as error:
        if error.status == 404:
            return None
        raise


async def _routing(api: client.ApiClient, namespace: str, traffic: Traffic) -> Routing:
    custom = client.CustomObjectsApi(api)
    name = traffic.object_name

    def missing(kind: str, name: str) -> TrafficViewError:
        return TrafficViewError(f"{kind} {namespace}/{name} (spec.traffic) not found")

    if traffic.provider == "gateway-api":
        route = await _custom(custom, GATEWAY, namespace, name)
        if route is None:
            raise missing("HTTPRoute", name)
        return Routing([("HTTPRoute", name, True)], gateway_backends(route, namespace, traffic))
    if traffic.provider == "istio":
        vs = await _custom(custom, ISTIO_VS, namespace, name)
        if vs is None:
            raise missing("VirtualService", name)
        return Routing([("VirtualService", name, True)], istio_backends(vs, namespace, traffic))
    if traffic.provider == "nginx-ingress":
        net = client.NetworkingV1Api(api)
        stable = await _raw(net.read_namespaced_ingress_without_preload_content(name, namespace))
        if stable is None:
            raise missing("Ingress", name)
        canary_name = f"{name}-canary"
        canary = await _raw(
            net.read_namespaced_ingress_without_preload_content(canary_name, namespace)
        )
        return Routing(
            [("Ingress", name, True), ("Ingress", canary_name, canary is not None)],
            nginx_backends(stable, canary, namespace, traffic),
            [] if canary is not None else [f"no canary Ingress {canary_name}: canary weight 0"],
        )
    raise TrafficViewError(
        f"provider {traffic.provider} has no routing object in the cluster "
        "(gateway-api, istio and nginx-ingress do)"
    )


async def _subsets(
    api: client.ApiClient, namespace: str, traffic: Traffic, routing: Routing
) -> tuple[dict[str, dict[str, str]], list[str]]:
    if not any(b.subset for b in routing.backends):
        return {}, []
    dr = await _custom(client.CustomObjectsApi(api), ISTIO_DR, namespace, traffic.destination_rule)
    if dr is None:
        return {}, [f"DestinationRule {namespace}/{traffic.destination_rule} not found"]
    subsets = {
        str(s.get("name")): {str(k): str(v) for k, v in (s.get("labels") or {}).items()}
        for s in (dr.get("spec") or {}).get("subsets") or []
        if isinstance(s, Mapping)
    }
    return subsets, []


async def read_traffic_view(api: client.ApiClient, namespace: str, name: str) -> JsonObject:
    """Read the CanaryDeployment, its routing object, Services, EndpointSlices and pods."""
    cd = await _custom(client.CustomObjectsApi(api), (GROUP, VERSION, PLURAL), namespace, name)
    if cd is None:
        raise TrafficViewError(f"no CanaryDeployment {namespace}/{name}")
    traffic = traffic_of(cd)
    routing = await _routing(api, namespace, traffic)
    subsets, notes = await _subsets(api, namespace, traffic, routing)
    routing = Routing(routing.objects, routing.backends, routing.problems + notes)

    core, discovery, apps = client.CoreV1Api(api), client.DiscoveryV1Api(api), client.AppsV1Api(api)
    services: dict[tuple[str, str], JsonObject | None] = {}
    slices: dict[tuple[str, str], list[JsonObject]] = {}
    for b in routing.backends:
        key = (b.namespace, b.service)
        if key in services:
            continue
        services[key] = await _raw(
            core.read_namespaced_service_without_preload_content(b.service, b.namespace)
        )
        listed = await _raw(
            discovery.list_namespaced_endpoint_slice_without_preload_content(
                b.namespace, label_selector=f"{SERVICE_NAME_LABEL}={b.service}"
            )
        )
        slices[key] = list((listed or {}).get("items") or [])
    pods: dict[str, dict[str, JsonObject]] = {}
    replicasets: dict[str, dict[str, JsonObject]] = {}
    # one list per namespace rather than a read per endpoint
    for ns in sorted({b.namespace for b in routing.backends}):
        listed = await _raw(core.list_namespaced_pod_without_preload_content(ns))
        pods[ns] = _by_name((listed or {}).get("items"))
        listed = await _raw(apps.list_namespaced_replica_set_without_preload_content(ns))
        replicasets[ns] = _by_name((listed or {}).get("items"))
    return build_view(cd, routing, services, slices, pods, replicasets, subsets)


def _by_name(items: Any) -> dict[str, JsonObject]:
    return {
        str((item.get("metadata") or {}).get("name")): dict(item)
        for item in items or []
        if isinstance(item, Mapping)
    }
