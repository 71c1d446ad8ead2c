"""Istio: the weights of a user's VirtualService route, moved between stable and canary.

In: an API client, the VirtualService (and, for subsets, the DestinationRule)
the user owns, and how its two destinations are recognised. Out: the
engine's `TrafficRouter` port (`set_weight`, `get_weight`), plus `reconcile`
and `remove`.

The user writes the VirtualService; the router owns two numbers in it: the
`weight` of the stable and of the canary destination of one HTTP route (the
one named `route`, else the first). They always sum to 100. Every other
route, match, retry, timeout, header rule and field stays as the API server
stored it, so the object is byte-for-byte the same elsewhere: the object is
read, those two numbers are changed in the dict as read, and it is written
back with the resourceVersion read (a 409 means someone wrote in between:
read and change again). The server, not the router, decides the key order:
it returns a custom resource's keys sorted, whatever order the user wrote.

Two ways to tell the destinations apart:

- host-based: two Services, `destination.host` `checkout` and
  `checkout-canary`;
- subset-based: one host and two of the DestinationRule's subsets (say
  `stable` and `canary`), each selecting pods by a track label; the router
  checks the DestinationRule has both, with labels that differ, before it
  sends traffic to them.

Both destinations must be in the route already (the user writes the canary
one with weight 0): the router does not invent destinations in a user's
object. At weight 0 the canary destination stays, with weight 0: Istio
sends it nothing (0 is a valid weight), the object keeps its shape from
step to step, and after a rollback it reads 100/0 as a user writes it.

`get_weight` reads the weight from the API, never from memory. When it is not
the weight last written, someone else reverted it: the router reports it
(`on_revert(object_name, expected, found)`, a warning log by default) and the
engine's read-back confirmation writes it again; `reconcile` does the same
outside a step.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

from kubernetes.aio import client
from kubernetes.aio.client.exceptions import ApiException

from adapters.traffic.errors import (
    ObjectName,
    RevertCallback,
    RevertWatch,
    TrafficObjectError,
    api_error,
    check_weight,
    retry_on_conflict,
)
from engine.ports import RolloutRef

GROUP = "networking.istio.io"
VERSION = "v1"
VIRTUAL_SERVICE = "VirtualService"
DESTINATION_RULE = "DestinationRule"
PLURALS = {VIRTUAL_SERVICE: "virtualservices", DESTINATION_RULE: "destinationrules"}


def host_matches(host: str, service: str, namespace: str) -> bool:
    """Whether two host names are the same Service of `namespace`, short or fully qualified."""

    def spellings(name: str) -> set[str]:
        short = name.split(".", 1)[0]
        forms = {short, f"{short}.{namespace}", f"{short}.{namespace}.svc"}
        forms.add(f"{short}.{namespace}.svc.cluster.local")
        return forms if name in forms else {name}

    return bool(spellings(host) & spellings(service))


@dataclass(frozen=True, slots=True)
class Track:
    """How one track's destination is recognised in a route: its host, and its subset."""

    host: str
    subset: str | None = None

    def __str__(self) -> str:
        return f"host {self.host}" + (f" subset {self.subset}" if self.subset else "")

    def matches(self, destination: Mapping[str, Any], namespace: str) -> bool:
        if not host_matches(str(destination.get("host", "")), self.host, namespace):
            return False
        return self.subset is None or destination.get("subset") == self.subset


@dataclass(frozen=True, slots=True)
class RouteSpec:
    """The route the router drives: which HTTP route, and its two tracks."""

    route: str | None
    stable: Track
    canary: Track


def _spec(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    spec = obj.get("spec")
    if not isinstance(spec, Mapping):
        raise TrafficObjectError(ObjectName.of(obj, VIRTUAL_SERVICE), "is missing", "spec")
    return spec


def http_route_index(vs: Mapping[str, Any], route: str | None) -> int:
    """The index in `spec.http` of the route named `route`, else of the first route."""
    name = ObjectName.of(vs, VIRTUAL_SERVICE)
    http = _spec(vs).get("http")
    if not isinstance(http, list) or not http:
        raise TrafficObjectError(name, "has no HTTP routes", "spec.http")
    if route is None:
        return 0
    for i, entry in enumerate(http):
        if isinstance(entry, Mapping) and entry.get("name") == route:
            return i
    raise TrafficObjectError(name, f"has no route named {route}", "spec.http")


def _weight(entry: Mapping[str, Any], name: ObjectName, field: str) -> int:
    value = entry.get("weight", 0)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TrafficObjectError(name, f"is {value!r}, not an integer", f"{field}.weight")
    return value


def _describe(destination: Mapping[str, Any]) -> str:
    subset = destination.get("subset")
    return str(Track(str(destination.get("host", "")), str(subset) if subset else None))


def destination_indices(vs: Mapping[str, Any], spec: RouteSpec) -> tuple[int, int, int]:
    """(route index, stable index, canary index) in `spec.http[i].route`.

    Raises when a destination is missing or ambiguous, or when another
    destination takes traffic the two could never add up to 100 beside.
    """
    name = ObjectName.of(vs, VIRTUAL_SERVICE)
    namespace = name.namespace
    index = http_route_index(vs, spec.route)
    field = f"spec.http[{index}].route"
    routes = _spec(vs)["http"][index].get("route")
    if not isinstance(routes, list) or not routes:
        raise TrafficObjectError(name, "has no destinations", field)
    found: dict[str, list[int]] = {"stable": [], "canary": []}
    for i, entry in enumerate(routes):
        destination = entry.get("destination") if isinstance(entry, Mapping) else None
        if not isinstance(destination, Mapping):
            raise TrafficObjectError(name, "is missing", f"{field}[{i}].destination")
        if spec.canary.matches(destination, namespace):
            found["canary"].append(i)
        elif spec.stable.matches(destination, namespace):
            found["stable"].append(i)
        elif _weight(entry, name, f"{field}[{i}]") != 0:
            raise TrafficObjectError(
                name,
                f"sends traffic to {_describe(destination)}, which is neither the stable nor "
                "the canary destination; their weights could not sum to 100",
                f"{field}[{i}]",
            )
    for track, indices in found.items():
        which = spec.stable if track == "stable" else spec.canary
        if not indices:
            raise TrafficObjectError(name, f"has no destination for {which}", field)
        if len(indices) > 1:
            raise TrafficObjectError(
                name, f"has {len(indices)} destinations for {which}; expected one", field
            )
    return index, found["stable"][0], found["canary"][0]


def weights(vs: Mapping[str, Any], spec: RouteSpec) -> tuple[int, int]:
    """(stable weight, canary weight) as the VirtualService has them (absent is 0)."""
    name = ObjectName.of(vs, VIRTUAL_SERVICE)
    index, s, c = destination_indices(vs, spec)
    routes = vs["spec"]["http"][index]["route"]
    field = f"spec.http[{index}].route"
    return (
        _weight(routes[s], name, f"{field}[{s}]"),
        _weight(routes[c], name, f"{field}[{c}]"),
    )


def with_canary_weight(vs: Mapping[str, Any], spec: RouteSpec, weight: int) -> dict[str, Any]:
    """A copy of the VirtualService with canary `weight` and stable `100 - weight`.

    Only the two `weight` values change (a weight the user left out is
    added). Everything else, key order included, is the object as given.
    """
    check_weight(weight)
    index, s, c = destination_indices(vs, spec)
    out = copy.deepcopy(dict(vs))
    routes = out["spec"]["http"][index]["route"]
    routes[s]["weight"] = 100 - weight
    routes[c]["weight"] = weight
    return out


def check_destination_rule(dr: Mapping[str, Any], host: str, subsets: tuple[str, str]) -> None:
    """Raise unless the DestinationRule is for `host` and selects pods for both subsets."""
    name = ObjectName.of(dr, DESTINATION_RULE)
    spec = dr.get("spec")
    if not isinstance(spec, Mapping):
        raise TrafficObjectError(name, "is missing", "spec")
    dr_host = str(spec.get("host", ""))
    if not host_matches(dr_host, host, name.namespace):
        raise TrafficObjectError(name, f"is {dr_host or 'empty'}, not {host}", "spec.host")
    listed = spec.get("subsets")
    if not isinstance(listed, list):
        listed = []
    labels: dict[str, object] = {}
    for wanted in subsets:
        for i, subset in enumerate(listed):
            if isinstance(subset, Mapping) and subset.get("name") == wanted:
                if not subset.get("labels"):
                    raise TrafficObjectError(
                        name,
                        "is empty; a subset selects its pods by a track label",
                        f"spec.subsets[{i}].labels",
                    )
                labels[wanted] = subset["labels"]
                break
        else:
            raise TrafficObjectError(name, f"has no subset named {wanted}", "spec.subsets")
    if labels[subsets[0]] == labels[subsets[1]]:
        raise TrafficObjectError(
            name,
            f"subsets {subsets[0]} and {subsets[1]} select the same pods",
            "spec.subsets",
        )


class IstioRouter:
    """The engine's traffic router over a user's VirtualService.

    Host-based: `IstioRouter(api, virtual_service="checkout",
    stable_host="checkout", canary_host="checkout-canary")`. Subset-based:
    `IstioRouter(api, virtual_service="checkout", stable_host="checkout",
    canary_host="checkout", subsets=("stable", "canary"),
    destination_rule="checkout")` (the DestinationRule defaults to the
    stable host's name). The objects are looked up in the rollout's namespace.
    """

    def __init__(
        self,
        api_client: client.ApiClient,
        *,
        virtual_service: str,
        route: str | None = None,
        stable_host: str,
        canary_host: str,
        subsets: tuple[str, str] | None = None,
        destination_rule: str | None = None,
        on_revert: RevertCallback | None = None,
        version: str = VERSION,
    ) -> None:
        if subsets is None and stable_host == canary_host:
            raise ValueError(
                f"stable and canary are both host {stable_host}: name two hosts, or give the "
                "DestinationRule subsets that tell them apart"
            )
        if subsets is not None and (len(subsets) != 2 or subsets[0] == subsets[1]):
            raise ValueError(f"subsets must be two different names, not {subsets!r}")
        self.virtual_service = virtual_service
        self.subsets = subsets
        self.destination_rule = destination_rule or stable_host.split(".", 1)[0]
        self.spec = RouteSpec(
            route,
            Track(stable_host, subsets[0] if subsets else None),
            Track(canary_host, subsets[1] if subsets else None),
        )
        self.version = version
        self._api = client.CustomObjectsApi(api_client)
        self._reverts = RevertWatch(on_revert)

    def _name(self, rollout: RolloutRef, kind: str = VIRTUAL_SERVICE) -> ObjectName:
        name = self.virtual_service if kind == VIRTUAL_SERVICE else self.destination_rule
        return ObjectName(kind, rollout.namespace, name)

    async def _read(self, obj: ObjectName) -> dict[str, Any]:
        try:
            found = await self._api.get_namespaced_custom_object(
                GROUP, self.version, obj.namespace, PLURALS[obj.kind], obj.name
            )
        except ApiException as e:
            raise api_error(obj, e, "reading") from None
        return cast(dict[str, Any], found)

    async def _replace(self, obj: ObjectName, body: dict[str, Any]) -> None:
        try:
            await self._api.replace_namespaced_custom_object(
                GROUP, self.version, obj.namespace, PLURALS[obj.kind], obj.name, body
            )
        except ApiException as e:
            if e.status == 409:
                raise  # stale resourceVersion: retry_on_conflict reads again
            raise api_error(obj, e, "writing") from None

    async def set_weight(self, rollout: RolloutRef, weight: int) -> None:
        """Give the canary `weight` percent and stable the rest; no write when already so."""
        check_weight(weight)
        obj = self._name(rollout)

        async def attempt() -> None:
            vs = await self._read(obj)
            self._reverts.saw(obj, weights(vs, self.spec)[1])
            desired = with_canary_weight(vs, self.spec, weight)
            if desired == vs:
                return
            if self.subsets is not None:
                dr = await self._read(self._name(rollout, DESTINATION_RULE))
                check_destination_rule(dr, self.spec.stable.host, self.subsets)
            await self._replace(obj, desired)

        await retry_on_conflict(obj, attempt)
        self._reverts.wrote(obj, weight)

    async def get_weight(self, rollout: RolloutRef) -> int:
        """The canary weight the VirtualService has now, as the API returns it."""
        obj = self._name(rollout)
        found = weights(await self._read(obj), self.spec)[1]
        self._reverts.saw(obj, found)
        return found

    async def reconcile(self, rollout: RolloutRef) -> bool:
        """Write the last weight again if someone changed it; True when it had to."""
        expected = self._reverts.expected(self._name(rollout))
        if expected is None or await self.get_weight(rollout) == expected:
            return False
        await self.set_weight(rollout, expected)
        return True

    async def remove(self, rollout: RolloutRef) -> None:
        """End of a rollout: the route is the user's and stays (canary at weight 0)."""
        self._reverts.forget(self._name(rollout))
