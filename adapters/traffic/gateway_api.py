"""Gateway API: weighted backendRefs of a user's HTTPRoute, moved between stable and canary.

In: an API client, the HTTPRoute (gateway.networking.k8s.io/v1) the user
owns, the stable and canary Services. Out: the engine's `TrafficRouter` port
(`set_weight`, `get_weight`), plus `reconcile` and `remove`.

The router owns the rules that send traffic to the stable Service (all of
them, or the one at `rule_index`), and in each of them two `weight`s: the
stable backendRef's and the canary's. Gateway API weights are relative; the
router keeps them as percentages, `100 - w` and `w`, so the object reads as
the split it makes. The canary backendRef is added, right after the stable
one, the first time it is needed: a copy of the stable backendRef (same
kind, port, filters) with the canary Service's name (and `port`, when the
canary listens elsewhere). At weight 0 it stays, with weight 0 (a valid
weight that sends it nothing), so a rollout's steps change numbers only;
`remove` takes it out when the rollout has ended. Every other rule, match,
filter and field stays as the API server stored it.

The real server defaults the HTTPRoute (its CRD's schema): every backendRef
gets `group: ""`, `kind: Service` and `weight: 1`, a parentRef its group and
kind, a header match `type: Exact`, a rule without matches a `PathPrefix /`
match; and it returns the keys sorted. The router reads the object with those
defaults, and the canary backendRef is a copy of the stable one as stored,
defaults included, so what the router writes is what the server keeps: the
next read finds nothing to change, and no write is ever repeated for a
default. A route its owner applies again without the canary backendRefs
reads as weight 0 (the stable's weight is 1 again), a revert like any other.
A write the server refuses (its schema or CEL rules: at most 16 backendRefs
in a rule, say) fails with an error naming the route and the field.

Writes carry the resourceVersion read (a 409 means someone wrote in between:
read and change again). `get_weight` reads back from the API; a weight that
is not the one last written was reverted by someone else, which is reported
(`on_revert`) and written again by the engine's read-back confirmation or by
`reconcile`.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
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

GROUP = "gateway.networking.k8s.io"
VERSION = "v1"
PLURAL = "httproutes"
HTTP_ROUTE = "HTTPRoute"
DEFAULT_WEIGHT = 1  # the Gateway API default for a backendRef without a weight


def is_service_ref(ref: Any, service: str, namespace: str) -> bool:
    """Whether a backendRef names the Service `service` of the route's namespace."""
    return (
        isinstance(ref, Mapping)
        and ref.get("name") == service
        and ref.get("kind", "Service") == "Service"
        and ref.get("group", "") in ("", "core")
        and ref.get("namespace", namespace) == namespace
    )


def _weight(ref: Mapping[str, Any], name: ObjectName, field: str) -> int:
    value = ref.get("weight", DEFAULT_WEIGHT)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TrafficObjectError(name, f"is {value!r}, not an integer", f"{field}.weight")
    return value


def owned_rules(
    route: Mapping[str, Any], stable: str, canary: str, rule_index: int | None
) -> list[tuple[int, int, int | None]]:
    """(rule index, stable backendRef index, canary backendRef index or None) of each owned rule.

    Raises when no rule (or not the rule at `rule_index`) sends traffic to
    the stable Service, when a rule has two backendRefs for one Service, or
    when an owned rule also sends traffic to a third backend.
    """
    name = ObjectName.of(route, HTTP_ROUTE)
    spec = route.get("spec")
    if not isinstance(spec, Mapping):
        raise TrafficObjectError(name, "is missing", "spec")
    rules = spec.get("rules")
    if not isinstance(rules, list) or not rules:
        raise TrafficObjectError(name, "has no rules", "spec.rules")
    if rule_index is not None and not 0 <= rule_index < len(rules):
        raise TrafficObjectError(name, f"has no rule [{rule_index}]", "spec.rules")
    indices = range(len(rules)) if rule_index is None else [rule_index]
    owned = []
    for r in indices:
        refs = rules[r].get("backendRefs") if isinstance(rules[r], Mapping) else None
        field = f"spec.rules[{r}].backendRefs"
        refs = refs if isinstance(refs, list) else []
        found: dict[str, list[int]] = {stable: [], canary: []}
        others: list[int] = []
        for i, ref in enumerate(refs):
            for service in (stable, canary):
                if is_service_ref(ref, service, name.namespace):
                    found[service].append(i)
                    break
            else:
                if isinstance(ref, Mapping) and _weight(ref, name, f"{field}[{i}]") != 0:
                    others.append(i)
        if not found[stable]:
            if rule_index is not None:
                raise TrafficObjectError(name, f"has no backendRef to Service {stable}", field)
            continue
        for service in (stable, canary):
            if len(found[service]) > 1:
                raise TrafficObjectError(
                    name, f"has {len(found[service])} backendRefs to Service {service}", field
                )
        if others:
            i = others[0]
            raise TrafficObjectError(
                name,
                f"sends traffic to {refs[i].get('name')}, which is neither the stable nor the "
                "canary Service; their weights could not be percentages",
                f"{field}[{i}]",
            )
        owned.append((r, found[stable][0], found[canary][0] if found[canary] else None))
    if not owned:
        raise TrafficObjectError(name, f"has no backendRef to Service {stable}", "spec.rules")
    return owned


def canary_weights(
    route: Mapping[str, Any], stable: str, canary: str, rule_index: int | None = None
) -> list[int]:
    """The canary's share in percent in each owned rule (0 where it has no backendRef)."""
    name = ObjectName.of(route, HTTP_ROUTE)
    shares = []
    for r, s, c in owned_rules(route, stable, canary, rule_index):
        refs = route["spec"]["rules"][r]["backendRefs"]
        field = f"spec.rules[{r}].backendRefs"
        sw = _weight(refs[s], name, f"{field}[{s}]")
        if c is None:
            shares.append(0)
            continue
        cw = _weight(refs[c], name, f"{field}[{c}]")
        shares.append(round(cw * 100 / (sw + cw)) if sw + cw > 0 else 0)
    return shares


def with_canary_weight(
    route: Mapping[str, Any],
    stable: str,
    canary: str,
    weight: int,
    *,
    rule_index: int | None = None,
    port: int | None = None,
) -> dict[str, Any]:
    """A copy of the HTTPRoute with canary `weight` and stable `100 - weight` in owned rules."""
    check_weight(weight)
    out = copy.deepcopy(dict(route))
    for r, s, c in owned_rules(route, stable, canary, rule_index):
        refs = out["spec"]["rules"][r]["backendRefs"]
        refs[s]["weight"] = 100 - weight
        if c is None:
            added = copy.deepcopy(refs[s])
            added["name"] = canary
            if port is not None:
                added["port"] = port
            refs.insert(s + 1, added)
            c = s + 1
        refs[c]["weight"] = weight
    return out


def without_canary(
    route: Mapping[str, Any], stable: str, canary: str, rule_index: int | None = None
) -> dict[str, Any]:
    """A copy of the HTTPRoute with the canary backendRefs taken out of owned rules."""
    out = copy.deepcopy(dict(route))
    for r, _, c in owned_rules(route, stable, canary, rule_index):
        if c is not None:
            del out["spec"]["rules"][r]["backendRefs"][c]
    return out


class GatewayApiRouter:
    """The engine's traffic router over a user's HTTPRoute.

    `GatewayApiRouter(api, http_route="checkout", stable_service="checkout",
    canary_service="checkout-canary")` drives every rule of the HTTPRoute
    `checkout` (in the rollout's namespace) that sends traffic to `checkout`;
    `rule_index` limits it to one rule, `port` gives the canary's port when it
    differs from the stable backendRef's.
    """

    def __init__(
        self,
        api_client: client.ApiClient,
        *,
        http_route: str,
        rule_index: int | None = None,
        stable_service: str,
        canary_service: str,
        port: int | None = None,
        on_revert: RevertCallback | None = None,
        version: str = VERSION,
    ) -> None:
        if stable_service == canary_service:
            raise ValueError(f"stable and canary are both Service {stable_service}")
        self.http_route = http_route
        self.rule_index = rule_index
        self.stable_service = stable_service
        self.canary_service = canary_service
        self.port = port
        self.version = version
        self._api = client.CustomObjectsApi(api_client)
        self._reverts = RevertWatch(on_revert)

    def _name(self, rollout: RolloutRef) -> ObjectName:
        return ObjectName(HTTP_ROUTE, rollout.namespace, self.http_route)

    async def _read(self, obj: ObjectName) -> dict[str, Any]:
        try:
            found = await self._api.get_namespaced_custom_object(
                GROUP, self.version, obj.namespace, PLURAL, obj.name
            )
        except ApiException as e:
            raise api_error(obj, e, "reading") from None
        return cast(dict[str, Any], found)

    async def _replace(self, obj: ObjectName, body: dict[str, Any]) -> None:
        try:
            await self._api.replace_namespaced_custom_object(
                GROUP, self.version, obj.namespace, PLURAL, obj.name, body
            )
        except ApiException as e:
            if e.status == 409:
                raise  # stale resourceVersion: retry_on_conflict reads again
            raise api_error(obj, e, "writing") from None

    def _found(self, route: Mapping[str, Any], expected: int | None) -> int:
        """The weight to report: the first owned rule that differs from `expected`, else theirs."""
        shares = canary_weights(route, self.stable_service, self.canary_service, self.rule_index)
        return next((w for w in shares if w != expected), shares[0])

    async def set_weight(self, rollout: RolloutRef, weight: int) -> None:
        """Give the canary `weight` percent in every owned rule; no write when already so."""
        check_weight(weight)
        obj = self._name(rollout)

        async def attempt() -> None:
            route = await self._read(obj)
            self._reverts.saw(obj, self._found(route, self._reverts.expected(obj)))
            desired = with_canary_weight(
                route,
                self.stable_service,
                self.canary_service,
                weight,
                rule_index=self.rule_index,
                port=self.port,
            )
            if desired != route:
                await self._replace(obj, desired)

        await retry_on_conflict(obj, attempt)
        self._reverts.wrote(obj, weight)

    async def get_weight(self, rollout: RolloutRef) -> int:
        """The canary's share as the HTTPRoute says now (a rule that disagrees wins)."""
        obj = self._name(rollout)
        found = self._found(await self._read(obj), self._reverts.expected(obj))
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
        """Take the canary backendRefs out (the rollout has ended and the canary is at 0)."""
        obj = self._name(rollout)

        async def attempt() -> None:
            route = await self._read(obj)
            desired = without_canary(
                route, self.stable_service, self.canary_service, self.rule_index
            )
            if desired != route:
                await self._replace(obj, desired)

        await retry_on_conflict(obj, attempt)
        self._reverts.forget(obj)
