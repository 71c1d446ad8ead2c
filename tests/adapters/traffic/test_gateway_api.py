"""The Gateway API router: HTTPRoute backendRefs on plain dicts, then through the API double."""

from __future__ import annotations

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
from tests.adapters.traffic import InstantClock, assert_golden, without_server_fields
from tests.kube.apiserver import ApiServer
from tests.kube.schemas import validate_custom

# The API double's fixtures, shared with tests/kube (a fixture is found by its module name).

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


# --- through the real client, over HTTP, against the API double -------------------

NS = "shop"
REF = RolloutRef(NS, "checkout", "checkout", "checkout-canary", "checkout")
ROLLOUT = [
    ("01-weight-5", 5),
    ("02-weight-10", 10),
    ("03-weight-25", 25),
    ("04-weight-50", 50),
    ("05-weight-75", 75),
    ("06-weight-100", 100),
    ("07-rollback", 0),
]
API = ("gateway.networking.k8s.io", "v1", NS, "httproutes", "checkout")


def router(kube_client: client.ApiClient, **options: Any) -> GatewayApiRouter:
    settings: dict[str, Any] = {
        "http_route": "checkout",
        "stable_service": "checkout",
        "canary_service": "checkout-canary",
        **options,
    }
    return GatewayApiRouter(kube_client, **settings)


def stored(apiserver: ApiServer) -> dict[str, Any]:
    obj = apiserver.read("HTTPRoute", "checkout", NS)
    assert obj is not None
    return obj


def assert_writes_validate(apiserver: ApiServer) -> int:
    writes = apiserver.writes()
    for call in writes:
        validate_custom(call.body)
    return len(writes)


@pytest.mark.asyncio
async def test_a_linear_rollout_and_a_rollback_move_only_the_weights(
    apiserver: ApiServer, kube_client: client.ApiClient
) -> None:
    created = await client.CustomObjectsApi(kube_client).create_namespaced_custom_object(
        *API[:4], load()
    )  # as the user applies it
    original = without_server_fields(cast(dict[str, Any], created))
    gateway = router(kube_client)
    assert isinstance(gateway, TrafficRouter)
    assert await gateway.get_weight(REF) == 0
    for step, weight in ROLLOUT:
        await gateway.set_weight(REF, weight)
        assert await gateway.get_weight(REF) == weight
        now = stored(apiserver)
        assert_golden("gateway_api", step, now)
        assert canary_weights(now, "checkout", "checkout-canary") == [weight, weight]
        assert without_canary_parts(without_server_fields(now)) == without_canary_parts(original)
    assert assert_writes_validate(apiserver) == 1 + len(ROLLOUT)

    await gateway.remove(REF)  # the rollout has ended: the canary backendRefs go
    assert all(
        ref["name"] != "checkout-canary"
        for rule in stored(apiserver)["spec"]["rules"]
        for ref in rule["backendRefs"]
    )
    assert without_canary_parts(without_server_fields(stored(apiserver))) == (
        without_canary_parts(original)
    )
    assert_writes_validate(apiserver)


@pytest.mark.asyncio
async def test_set_weight_is_idempotent(
    apiserver: ApiServer, kube_client: client.ApiClient
) -> None:
    apiserver.seed(load())
    gateway = router(kube_client)
    await gateway.set_weight(REF, 10)
    await gateway.set_weight(REF, 10)
    assert len(apiserver.writes()) == 1


@pytest.mark.asyncio
async def test_a_revert_by_someone_else_is_reported_and_written_again(
    apiserver: ApiServer, kube_client: client.ApiClient
) -> None:
    apiserver.seed(load())
    reverts: list[tuple[str, int, int]] = []
    gateway = router(kube_client, on_revert=lambda *seen: reverts.append(seen))
    await gateway.set_weight(REF, 10)
    await gateway.set_weight(REF, 25)
    assert not await gateway.reconcile(REF)
    api = client.CustomObjectsApi(kube_client)

    async def put_back(weight: int, rule_index: int) -> None:
        route = await api.get_namespaced_custom_object(*API)
        old = with_canary_weight(
            cast(dict[str, Any], route),
            "checkout",
            "checkout-canary",
            weight,
            rule_index=rule_index,
        )
        await api.replace_namespaced_custom_object(*API, old)

    await put_back(10, rule_index=2)  # one rule of two is enough
    assert await gateway.get_weight(REF) == 10, "get_weight reports what is there"
    assert await gateway.get_weight(REF) == 10
    assert reverts == [("HTTPRoute shop/checkout", 25, 10)], "reported once"
    assert await gateway.reconcile(REF)
    assert canary_weights(stored(apiserver), "checkout", "checkout-canary") == [25, 25]

    await put_back(5, rule_index=1)
    await set_weight_confirmed(gateway, REF, 25, InstantClock())
    assert canary_weights(stored(apiserver), "checkout", "checkout-canary") == [25, 25]
    assert reverts[-1] == ("HTTPRoute shop/checkout", 25, 5)
    assert_writes_validate(apiserver)


@pytest.mark.asyncio
async def test_a_missing_or_malformed_object_is_named(
    apiserver: ApiServer, kube_client: client.ApiClient
) -> None:
    gateway = router(kube_client)
    with pytest.raises(TrafficObjectError, match=r"^HTTPRoute shop/checkout not found$"):
        await gateway.set_weight(REF, 5)
    with pytest.raises(TrafficObjectError, match=r"^HTTPRoute shop/checkout not found$"):
        await gateway.get_weight(REF)
    route = load()
    route["spec"]["rules"][1]["backendRefs"].append({"name": "legacy", "port": 80})
    apiserver.seed(route)
    with pytest.raises(TrafficObjectError) as caught:
        await gateway.set_weight(REF, 5)
    assert str(caught.value) == (
        "HTTPRoute shop/checkout: spec.rules[1].backendRefs[1] sends traffic to legacy, which "
        "is neither the stable nor the canary Service; their weights could not be percentages"
    )
    assert apiserver.writes() == []


@pytest.mark.asyncio
async def test_a_stale_write_is_read_again_and_retried(
    apiserver: ApiServer, kube_client: client.ApiClient
) -> None:
    apiserver.seed(load())
    gateway = router(kube_client)
    other = client.CustomObjectsApi(kube_client)
    read = gateway._api.get_namespaced_custom_object
    raced = False

    async def read_then_someone_writes(*args: Any, **kwargs: Any) -> Any:
        # Another writer changes a field we do not own between our read and our write.
        nonlocal raced
        found = await read(*args, **kwargs)
        if not raced:
            raced = True
            theirs = copy.deepcopy(cast(dict[str, Any], found))
            theirs["spec"]["hostnames"].append("www.example.com")
            await other.replace_namespaced_custom_object(*API, theirs)
        return found

    gateway._api.get_namespaced_custom_object = read_then_someone_writes  # type: ignore[method-assign]
    await gateway.set_weight(REF, 5)
    now = stored(apiserver)
    assert canary_weights(now, "checkout", "checkout-canary") == [5, 5]
    assert now["spec"]["hostnames"] == ["shop.example.com", "www.example.com"], "theirs is kept"
    assert [c.status for c in apiserver.writes(ok=None)] == [200, 409, 200]

    apiserver.conflict_next_write(times=2)
    await gateway.set_weight(REF, 10)
    assert canary_weights(stored(apiserver), "checkout", "checkout-canary") == [10, 10]
    apiserver.conflict_next_write(times=5)
    with pytest.raises(TrafficObjectError, match="changed by another writer 5 times in a row"):
        await gateway.set_weight(REF, 25)
