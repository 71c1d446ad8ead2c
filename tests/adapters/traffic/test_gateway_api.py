"""The Gateway API router: HTTPRoute backendRefs on plain dicts, then on the real API server.

The real server has the HTTPRoute CRD with its schema, CEL rules and
defaults (a backendRef gets group "", kind Service and weight 1). The router
works as the controller's ServiceAccount (`controller_api`, exactly
deploy/rbac.yaml's rights); the test sets up, reverts and checks as the admin,
as a person would. Nothing here uses the API double.
"""

from __future__ import annotations

import asyncio
import copy
import json
from typing import Any, cast

import pytest
import yaml
from kubernetes.aio import client

from adapters.traffic.errors import TrafficObjectError
from adapters.traffic.gateway_api import (
    GatewayApiRouter,
    canary_weights,
    owned_rules,
    with_canary_weight,
    without_canary,
)
from engine.ports import RolloutRef, TrafficRouter
from engine.rollback import set_weight_confirmed
from tests.adapters.traffic import (
    InstantClock,
    assert_golden,
    settled,
    without_server_fields,
    writes,
)
from tests.cluster.controlplane import ControlPlane

ROUTE_YAML = """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: checkout
  namespace: shop
  labels: {app: checkout}
spec:
  parentRefs:
  - name: public
    namespace: infra
    sectionName: https
  hostnames: [shop.example.com]
  rules:
  - matches:
    - path: {type: PathPrefix, value: /admin}
    backendRefs:
    - name: checkout-admin
      port: 8080
  - matches:
    - path: {type: PathPrefix, value: /checkout}
      headers:
      - {name: x-tenant, value: a}
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set:
        - {name: x-route, value: primary}
    timeouts: {request: 10s}
    backendRefs:
    - name: checkout
      port: 8080
      filters:
      - type: ResponseHeaderModifier
        responseHeaderModifier:
          add:
          - {name: x-frame-options, value: DENY}
  - matches:
    - path: {type: PathPrefix, value: /api}
    backendRefs:
    - kind: Service
      name: checkout
      port: 8080
      weight: 1
"""


def load() -> dict[str, Any]:
    obj: dict[str, Any] = yaml.safe_load(ROUTE_YAML)
    return obj


def without_canary_parts(route: dict[str, Any]) -> str:
    """The route as JSON, key order kept, without canary backendRefs and stable weights."""
    out = copy.deepcopy(route)
    for rule in out["spec"]["rules"]:
        rule["backendRefs"] = [
            {k: v for k, v in ref.items() if k != "weight" or ref["name"] != "checkout"}
            for ref in rule["backendRefs"]
            if ref["name"] != "checkout-canary"
        ]
    return json.dumps(out)


def error_of(call: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(TrafficObjectError) as caught:
        call(*args, **kwargs)
    return str(caught.value)


# --- the transform, on plain dicts ------------------------------------------------


def test_the_canary_backend_ref_is_added_after_the_stable_one() -> None:
    route = load()
    out = with_canary_weight(route, "checkout", "checkout-canary", 10)
    refs = out["spec"]["rules"][1]["backendRefs"]
    assert refs == [
        {**route["spec"]["rules"][1]["backendRefs"][0], "weight": 90},
        {**route["spec"]["rules"][1]["backendRefs"][0], "name": "checkout-canary", "weight": 10},
    ], "a copy of the stable backendRef: same port and filters, so the canary serves alike"
    assert out["spec"]["rules"][2]["backendRefs"] == [
        {"kind": "Service", "name": "checkout", "port": 8080, "weight": 90},
        {"kind": "Service", "name": "checkout-canary", "port": 8080, "weight": 10},
    ]
    assert out["spec"]["rules"][0] == route["spec"]["rules"][0]
    assert without_canary_parts(out) == without_canary_parts(route)
    assert canary_weights(out, "checkout", "checkout-canary") == [10, 10]


@pytest.mark.parametrize("weight", [0, 5, 50, 100])
def test_weights_sum_to_100_and_an_equal_object_means_no_change(weight: int) -> None:
    out = with_canary_weight(load(), "checkout", "checkout-canary", weight)
    for r, s, c in owned_rules(out, "checkout", "checkout-canary", None):
        refs = out["spec"]["rules"][r]["backendRefs"]
        assert c is not None
        assert refs[s]["weight"] + refs[c]["weight"] == 100
    assert with_canary_weight(out, "checkout", "checkout-canary", weight) == out


def test_rule_index_and_port_choose_the_rule_and_the_canary_port() -> None:
    out = with_canary_weight(load(), "checkout", "checkout-canary", 25, rule_index=2, port=9090)
    assert out["spec"]["rules"][1] == load()["spec"]["rules"][1]
    assert out["spec"]["rules"][2]["backendRefs"][1] == {
        "kind": "Service",
        "name": "checkout-canary",
        "port": 9090,
        "weight": 25,
    }


def test_weights_are_read_as_relative_shares() -> None:
    route = load()
    refs = route["spec"]["rules"][2]["backendRefs"]
    refs.append({"name": "checkout-canary", "port": 8080, "weight": 3})
    assert canary_weights(route, "checkout", "checkout-canary", 2) == [75]
    assert canary_weights(load(), "checkout", "checkout-canary") == [0, 0]


def test_without_canary_takes_the_added_refs_out() -> None:
    out = with_canary_weight(load(), "checkout", "checkout-canary", 0)
    back = without_canary(out, "checkout", "checkout-canary")
    assert all(
        ref["name"] != "checkout-canary"
        for rule in back["spec"]["rules"]
        for ref in rule["backendRefs"]
    )


@pytest.mark.parametrize(
    ("change", "rule_index", "message"),
    [
        (
            lambda r: [rule["backendRefs"].pop() for rule in r["spec"]["rules"][1:]],
            None,
            "HTTPRoute shop/checkout: spec.rules has no backendRef to Service checkout",
        ),
        (
            lambda r: None,
            0,
            "HTTPRoute shop/checkout: spec.rules[0].backendRefs has no backendRef to Service "
            "checkout",
        ),
        (lambda r: None, 7, "HTTPRoute shop/checkout: spec.rules has no rule [7]"),
        (
            lambda r: r["spec"]["rules"][1]["backendRefs"].append({"name": "legacy", "port": 80}),
            None,
            "HTTPRoute shop/checkout: spec.rules[1].backendRefs[1] sends traffic to legacy, "
            "which is neither the stable nor the canary Service; "
            "their weights could not be percentages",
        ),
        (
            lambda r: r["spec"]["rules"][2]["backendRefs"][0].update(weight="1"),
            None,
            "HTTPRoute shop/checkout: spec.rules[2].backendRefs[0].weight is '1', not an integer",
        ),
        (
            lambda r: r["spec"].pop("rules"),
            None,
            "HTTPRoute shop/checkout: spec.rules has no rules",
        ),
    ],
)
def test_a_malformed_route_names_the_field(
    change: Any, rule_index: int | None, message: str
) -> None:
    route = load()
    change(route)
    assert error_of(canary_weights, route, "checkout", "checkout-canary", rule_index) == message


def test_a_service_of_another_namespace_is_not_the_stable_one() -> None:
    route = load()
    for rule in route["spec"]["rules"][1:]:
        rule["backendRefs"][0]["namespace"] = "other"
    assert "has no backendRef to Service checkout" in error_of(
        with_canary_weight, route, "checkout", "checkout-canary", 5
    )


# --- through the real client, on the real API server ----------------------------

ROLLOUT = [
    ("01-weight-5", 5),
    ("02-weight-10", 10),
    ("03-weight-25", 25),
    ("04-weight-50", 50),
    ("05-weight-75", 75),
    ("06-weight-100", 100),
    ("07-rollback", 0),
]
GV = ("gateway.networking.k8s.io", "v1")
UPDATED = ("update", "checkout", 200)


def ref(namespace: str) -> RolloutRef:
    return RolloutRef(namespace, "checkout", "checkout", "checkout-canary", "checkout")


def in_namespace(namespace: str) -> dict[str, Any]:
    route = load()
    route["metadata"]["namespace"] = namespace
    return route


def router(controller_api: client.ApiClient, **options: Any) -> GatewayApiRouter:
    settings: dict[str, Any] = {
        "http_route": "checkout",
        "stable_service": "checkout",
        "canary_service": "checkout-canary",
        **options,
    }
    return GatewayApiRouter(controller_api, **settings)


async def create(admin_api: client.ApiClient, route: dict[str, Any]) -> dict[str, Any]:
    """Create as the user applies it; the route as the server stored it (with its defaults)."""
    created = await client.CustomObjectsApi(admin_api).create_namespaced_custom_object(
        *GV, route["metadata"]["namespace"], "httproutes", route
    )
    return cast(dict[str, Any], created)


async def stored(admin_api: client.ApiClient, namespace: str) -> dict[str, Any]:
    found = await client.CustomObjectsApi(admin_api).get_namespaced_custom_object(
        *GV, namespace, "httproutes", "checkout"
    )
    return cast(dict[str, Any], found)


def canary_refs(route: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        backend
        for rule in route["spec"]["rules"]
        for backend in rule["backendRefs"]
        if backend["name"] == "checkout-canary"
    ]


@pytest.mark.asyncio
async def test_a_linear_rollout_and_a_rollback_move_only_the_weights(
    control_plane: ControlPlane,
    admin_api: client.ApiClient,
    controller_api: client.ApiClient,
    namespace: str,
) -> None:
    original = without_server_fields(await create(admin_api, in_namespace(namespace)))
    gateway = router(controller_api)
    assert isinstance(gateway, TrafficRouter)
    assert await gateway.get_weight(ref(namespace)) == 0
    for step, weight in ROLLOUT:
        await gateway.set_weight(ref(namespace), weight)
        assert await gateway.get_weight(ref(namespace)) == weight
        now = await stored(admin_api, namespace)
        assert_golden("gateway_api", step, now, namespace)
        assert canary_weights(now, "checkout", "checkout-canary") == [weight, weight]
        assert without_canary_parts(without_server_fields(now)) == without_canary_parts(original)
    events = await settled(control_plane, controller_api, namespace, "httproutes")
    assert writes(events) == [UPDATED] * len(ROLLOUT)

    await gateway.remove(ref(namespace))  # the rollout has ended: the canary backendRefs go
    now = await stored(admin_api, namespace)
    assert canary_refs(now) == []
    assert without_canary_parts(without_server_fields(now)) == without_canary_parts(original)
    events = await settled(control_plane, controller_api, namespace, "httproutes")
    assert writes(events) == [UPDATED] * (len(ROLLOUT) + 1)


@pytest.mark.asyncio
async def test_set_weight_is_idempotent(
    control_plane: ControlPlane,
    admin_api: client.ApiClient,
    controller_api: client.ApiClient,
    namespace: str,
) -> None:
    await create(admin_api, in_namespace(namespace))
    gateway = router(controller_api)
    await gateway.set_weight(ref(namespace), 10)
    # The canary backendRef we added is a copy of the stable one as the server stored
    # it, defaults included, so the server stores what we wrote and the next read
    # finds nothing to change.
    await gateway.set_weight(ref(namespace), 10)
    events = await settled(control_plane, controller_api, namespace, "httproutes")
    assert writes(events) == [UPDATED]


@pytest.mark.asyncio
async def test_a_revert_by_someone_else_is_reported_and_written_again(
    control_plane: ControlPlane,
    admin_api: client.ApiClient,
    controller_api: client.ApiClient,
    namespace: str,
) -> None:
    await create(admin_api, in_namespace(namespace))
    reverts: list[tuple[str, int, int]] = []
    gateway = router(controller_api, on_revert=lambda *seen: reverts.append(seen))
    name = f"HTTPRoute {namespace}/checkout"
    await gateway.set_weight(ref(namespace), 10)
    await gateway.set_weight(ref(namespace), 25)
    assert not await gateway.reconcile(ref(namespace))

    async def put_back(weight: int, rule_index: int) -> None:
        # as `kubectl patch --type merge` would: the person's rules, one with an older weight
        route = with_canary_weight(
            await stored(admin_api, namespace),
            "checkout",
            "checkout-canary",
            weight,
            rule_index=rule_index,
        )
        await client.CustomObjectsApi(admin_api).patch_namespaced_custom_object(
            *GV, namespace, "httproutes", "checkout", {"spec": {"rules": route["spec"]["rules"]}}
        )

    await put_back(10, rule_index=2)  # one rule of two is enough
    assert await gateway.get_weight(ref(namespace)) == 10, "get_weight reports what is there"
    assert await gateway.get_weight(ref(namespace)) == 10
    assert reverts == [(name, 25, 10)], "reported once"
    assert await gateway.reconcile(ref(namespace))
    now = await stored(admin_api, namespace)
    assert canary_weights(now, "checkout", "checkout-canary") == [25, 25]

    await put_back(5, rule_index=1)
    await set_weight_confirmed(gateway, ref(namespace), 25, InstantClock())
    now = await stored(admin_api, namespace)
    assert canary_weights(now, "checkout", "checkout-canary") == [25, 25]
    assert reverts[-1] == (name, 25, 5)
    events = await settled(control_plane, controller_api, namespace, "httproutes")
    assert {code for _, _, code in writes(events)} == {200}, "every write was accepted"


@pytest.mark.asyncio
async def test_a_route_applied_again_by_its_owner_is_a_revert_to_zero(
    control_plane: ControlPlane,
    admin_api: client.ApiClient,
    controller_api: client.ApiClient,
    namespace: str,
) -> None:
    await create(admin_api, in_namespace(namespace))
    reverts: list[tuple[str, int, int]] = []
    gateway = router(controller_api, on_revert=lambda *seen: reverts.append(seen))
    await gateway.set_weight(ref(namespace), 25)
    # The owner applies their file again (GitOps does the same): the rules as written,
    # without the canary backendRefs; the server gives the stable ones weight 1 again.
    manifest = yaml.safe_dump(in_namespace(namespace), sort_keys=False)
    await asyncio.to_thread(control_plane.kubectl, "apply", "-f", "-", input=manifest)
    now = await stored(admin_api, namespace)
    assert canary_refs(now) == []
    assert {b["weight"] for rule in now["spec"]["rules"] for b in rule["backendRefs"]} == {1}
    assert await gateway.get_weight(ref(namespace)) == 0
    assert reverts == [(f"HTTPRoute {namespace}/checkout", 25, 0)]
    assert await gateway.reconcile(ref(namespace))
    now = await stored(admin_api, namespace)
    assert canary_weights(now, "checkout", "checkout-canary") == [25, 25]
    assert await gateway.get_weight(ref(namespace)) == 25


@pytest.mark.asyncio
async def test_a_missing_or_malformed_object_is_named(
    control_plane: ControlPlane,
    admin_api: client.ApiClient,
    controller_api: client.ApiClient,
    namespace: str,
) -> None:
    gateway = router(controller_api)
    missing = rf"^HTTPRoute {namespace}/checkout not found$"
    with pytest.raises(TrafficObjectError, match=missing):
        await gateway.set_weight(ref(namespace), 5)
    with pytest.raises(TrafficObjectError, match=missing):
        await gateway.get_weight(ref(namespace))
    route = in_namespace(namespace)
    route["spec"]["rules"][1]["backendRefs"].append({"name": "legacy", "port": 80})
    await create(admin_api, route)  # the server gives legacy weight 1: it takes traffic
    with pytest.raises(TrafficObjectError) as caught:
        await gateway.set_weight(ref(namespace), 5)
    assert str(caught.value) == (
        f"HTTPRoute {namespace}/checkout: spec.rules[1].backendRefs[1] sends traffic to legacy, "
        "which is neither the stable nor the canary Service; their weights could not be "
        "percentages"
    )
    assert writes(await settled(control_plane, controller_api, namespace, "httproutes")) == []


@pytest.mark.asyncio
async def test_a_write_the_server_refuses_names_the_route_and_the_field(
    control_plane: ControlPlane,
    admin_api: client.ApiClient,
    controller_api: client.ApiClient,
    namespace: str,
) -> None:
    route = in_namespace(namespace)
    # 16 backendRefs, the schema's most: the stable one and 15 retired ones at weight 0
    route["spec"]["rules"][1]["backendRefs"] += [
        {"name": f"retired-{i}", "port": 80, "weight": 0} for i in range(15)
    ]
    await create(admin_api, route)
    with pytest.raises(TrafficObjectError) as caught:
        await router(controller_api).set_weight(ref(namespace), 5)
    assert caught.value.field == "spec.rules[1].backendRefs"
    assert str(caught.value) == (
        f"HTTPRoute {namespace}/checkout: spec.rules[1].backendRefs is refused by the API "
        "server: Too many: 17: must have at most 16 items"
    )
    events = await settled(control_plane, controller_api, namespace, "httproutes")
    assert writes(events) == [("update", "checkout", 422)]
    assert canary_refs(await stored(admin_api, namespace)) == []


def someone_writes_after_our_read(
    gateway: GatewayApiRouter, admin_api: client.ApiClient, times: int
) -> list[str]:
    """Make another writer add a hostname between our read and our write, `times` times.

    The router's write then carries a resourceVersion the real server no
    longer has, and the server answers 409. Returns the hostnames added.
    """
    read = gateway._api.get_namespaced_custom_object
    other = client.CustomObjectsApi(admin_api)
    added: list[str] = []

    async def read_then_someone_writes(*args: Any, **kwargs: Any) -> Any:
        found = cast(dict[str, Any], await read(*args, **kwargs))
        if len(added) < times:
            theirs = copy.deepcopy(found)
            added.append(f"www{len(theirs['spec']['hostnames'])}.example.com")
            theirs["spec"]["hostnames"].append(added[-1])
            await other.replace_namespaced_custom_object(
                *GV, found["metadata"]["namespace"], "httproutes", "checkout", theirs
            )
        return found

    gateway._api.get_namespaced_custom_object = read_then_someone_writes  # type: ignore[method-assign]
    return added


@pytest.mark.asyncio
async def test_a_stale_write_is_read_again_and_retried(
    control_plane: ControlPlane,
    admin_api: client.ApiClient,
    controller_api: client.ApiClient,
    namespace: str,
) -> None:
    await create(admin_api, in_namespace(namespace))
    gateway = router(controller_api)
    someone_writes_after_our_read(gateway, admin_api, times=1)
    await gateway.set_weight(ref(namespace), 5)
    now = await stored(admin_api, namespace)
    assert canary_weights(now, "checkout", "checkout-canary") == [5, 5]
    assert now["spec"]["hostnames"] == ["shop.example.com", "www1.example.com"], "theirs is kept"
    events = await settled(control_plane, controller_api, namespace, "httproutes")
    assert [code for _, _, code in writes(events)] == [409, 200]

    someone_writes_after_our_read(gateway, admin_api, times=2)
    await gateway.set_weight(ref(namespace), 10)
    now = await stored(admin_api, namespace)
    assert canary_weights(now, "checkout", "checkout-canary") == [10, 10]
    assert now["spec"]["hostnames"][-1] == "www3.example.com"
    events = await settled(control_plane, controller_api, namespace, "httproutes")
    assert [code for _, _, code in writes(events)][2:] == [409, 409, 200]
    someone_writes_after_our_read(gateway, admin_api, times=5)
    with pytest.raises(TrafficObjectError, match="changed by another writer 5 times in a row"):
        await gateway.set_weight(ref(namespace), 25)
