"""The Istio router: VirtualService weights on plain dicts, then through the API double."""

from __future__ import annotations

import copy
import json
from typing import Any, cast

import pytest
import yaml
from kubernetes.aio import client

from adapters.traffic.errors import ObjectName, RevertWatch, TrafficObjectError
from adapters.traffic.istio import (
    IstioRouter,
    RouteSpec,
    Track,
    check_destination_rule,
    host_matches,
    weights,
    with_canary_weight,
)
from engine.ports import RolloutRef, TrafficRouter
from engine.rollback import set_weight_confirmed
from tests.adapters.traffic import InstantClock, assert_golden, without_server_fields
from tests.kube.apiserver import ApiServer
from tests.kube.schemas import validate_custom

# The API double's fixtures, shared with tests/kube (a fixture is found by its module name).

VS_YAML = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: checkout
  namespace: shop
  labels: {app: checkout}
spec:
  hosts: [checkout.shop.svc.cluster.local]
  gateways: [mesh]
  http:
  - name: admin
    match:
    - uri: {prefix: /admin}
    route:
    - destination: {host: checkout-admin}
  - name: primary
    match:
    - headers:
        x-tenant: {exact: a}
    retries: {attempts: 3, perTryTimeout: 2s, retryOn: 5xx}
    timeout: 10s
    headers:
      request:
        set: {x-route: primary}
    route:
    - destination:
        host: checkout.shop.svc.cluster.local
        port: {number: 8080}
      weight: 100
      headers:
        response:
          add: {x-track: stable}
    - destination:
        host: checkout-canary
        port: {number: 8080}
      weight: 0
  - name: fallback
    route:
    - destination: {host: checkout}
"""

SUBSET_VS_YAML = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: checkout, namespace: shop}
spec:
  hosts: [checkout]
  http:
  - route:
    - destination: {host: checkout, subset: stable}
      weight: 100
    - destination: {host: checkout, subset: canary}
      weight: 0
"""

DR_YAML = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: checkout, namespace: shop}
spec:
  host: checkout
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
  subsets:
  - name: stable
    labels: {codedance.io/track: stable}
  - name: canary
    labels: {codedance.io/track: canary}
"""

HOSTS = RouteSpec("primary", Track("checkout"), Track("checkout-canary"))
SUBSETS = RouteSpec(None, Track("checkout", "stable"), Track("checkout", "canary"))


def load(text: str) -> dict[str, Any]:
    obj: dict[str, Any] = yaml.safe_load(text)
    return obj


def without_weights(vs: dict[str, Any], index: int) -> str:
    """The VirtualService as JSON, key order kept, with one route's weights blanked."""
    out = copy.deepcopy(vs)
    for destination in out["spec"]["http"][index]["route"]:
        destination.pop("weight", None)
    return json.dumps(out)


def error_of(call: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(TrafficObjectError) as caught:
        call(*args, **kwargs)
    return str(caught.value)


# --- the transform, on plain dicts ------------------------------------------------


@pytest.mark.parametrize("weight", [0, 1, 5, 33, 50, 99, 100])
def test_only_the_two_weights_of_the_named_route_change(weight: int) -> None:
    vs = load(VS_YAML)
    before = json.dumps(vs)
    out = with_canary_weight(vs, HOSTS, weight)
    assert json.dumps(vs) == before, "the object read must not be changed in place"
    route = out["spec"]["http"][1]["route"]
    assert (route[0]["weight"], route[1]["weight"]) == (100 - weight, weight)
    assert weights(out, HOSTS) == (100 - weight, weight)
    assert without_weights(out, 1) == without_weights(vs, 1)


def test_an_object_that_has_the_weights_comes_back_equal() -> None:
    vs = with_canary_weight(load(VS_YAML), HOSTS, 25)
    assert with_canary_weight(vs, HOSTS, 25) == vs


def test_the_first_route_without_a_name_and_weights_added_after_the_destination() -> None:
    vs = load(SUBSET_VS_YAML)
    for destination in vs["spec"]["http"][0]["route"]:
        del destination["weight"]
    out = with_canary_weight(vs, SUBSETS, 10)
    route = out["spec"]["http"][0]["route"]
    assert [list(d) for d in route] == [["destination", "weight"], ["destination", "weight"]]
    assert [d["weight"] for d in route] == [90, 10]


def test_hosts_match_in_every_spelling_of_the_namespace_only() -> None:
    assert host_matches("checkout.shop.svc.cluster.local", "checkout", "shop")
    assert host_matches("checkout", "checkout.shop.svc", "shop")
    assert not host_matches("checkout.other.svc.cluster.local", "checkout", "shop")
    assert not host_matches("checkout-canary", "checkout", "shop")


def test_a_missing_canary_destination_names_the_route_and_the_host() -> None:
    vs = load(VS_YAML)
    del vs["spec"]["http"][1]["route"][1]
    assert error_of(with_canary_weight, vs, HOSTS, 5) == (
        "VirtualService shop/checkout: spec.http[1].route has no destination for host "
        "checkout-canary"
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda vs: vs["spec"].pop("http"),
            "VirtualService shop/checkout: spec.http has no HTTP routes",
        ),
        (
            lambda vs: vs["spec"]["http"][1].update(name="main"),
            "VirtualService shop/checkout: spec.http has no route named primary",
        ),
        (
            lambda vs: vs["spec"]["http"][1]["route"].append(
                {"destination": {"host": "legacy"}, "weight": 10}
            ),
            "VirtualService shop/checkout: spec.http[1].route[2] sends traffic to host legacy, "
            "which is neither the stable nor the canary destination; "
            "their weights could not sum to 100",
        ),
        (
            lambda vs: vs["spec"]["http"][1]["route"][0].update(weight="100"),
            "VirtualService shop/checkout: spec.http[1].route[0].weight is '100', not an integer",
        ),
        (
            lambda vs: vs["spec"]["http"][1]["route"].append(
                {"destination": {"host": "checkout-canary"}}
            ),
            "VirtualService shop/checkout: spec.http[1].route has 2 destinations for host "
            "checkout-canary; expected one",
        ),
    ],
)
def test_a_malformed_virtual_service_names_the_field(change: Any, message: str) -> None:
    vs = load(VS_YAML)
    change(vs)
    assert error_of(weights, vs, HOSTS) == message


def test_subsets_tell_the_destinations_of_one_host_apart() -> None:
    out = with_canary_weight(load(SUBSET_VS_YAML), SUBSETS, 75)
    assert [(d["destination"]["subset"], d["weight"]) for d in out["spec"]["http"][0]["route"]] == [
        ("stable", 25),
        ("canary", 75),
    ]
    vs = load(SUBSET_VS_YAML)
    vs["spec"]["http"][0]["route"][1]["destination"]["subset"] = "v2"
    assert error_of(weights, vs, SUBSETS) == (
        "VirtualService shop/checkout: spec.http[0].route has no destination for "
        "host checkout subset canary"
    )
    vs["spec"]["http"][0]["route"].append({"destination": {"host": "checkout", "subset": "canary"}})
    vs["spec"]["http"][0]["route"][1]["weight"] = 5
    assert error_of(weights, vs, SUBSETS) == (
        "VirtualService shop/checkout: spec.http[0].route[1] sends traffic to host checkout "
        "subset v2, which is neither the stable nor the canary destination; "
        "their weights could not sum to 100"
    )


def test_the_destination_rule_must_select_both_subsets() -> None:
    check_destination_rule(load(DR_YAML), "checkout", ("stable", "canary"))
    dr = load(DR_YAML)
    del dr["spec"]["subsets"][1]
    assert error_of(check_destination_rule, dr, "checkout", ("stable", "canary")) == (
        "DestinationRule shop/checkout: spec.subsets has no subset named canary"
    )
    dr = load(DR_YAML)
    dr["spec"]["subsets"][0]["labels"] = {}
    assert error_of(check_destination_rule, dr, "checkout", ("stable", "canary")) == (
        "DestinationRule shop/checkout: spec.subsets[0].labels is empty; "
        "a subset selects its pods by a track label"
    )
    dr = load(DR_YAML)
    dr["spec"]["subsets"][1]["labels"] = {"codedance.io/track": "stable"}
    assert "select the same pods" in error_of(
        check_destination_rule, dr, "checkout", ("stable", "canary")
    )
    dr = load(DR_YAML)
    dr["spec"]["host"] = "payments"
    assert error_of(check_destination_rule, dr, "checkout", ("stable", "canary")) == (
        "DestinationRule shop/checkout: spec.host is payments, not checkout"
    )


def test_a_revert_is_reported_once_until_the_next_write() -> None:
    seen: list[tuple[str, int, int]] = []
    watch = RevertWatch(lambda name, expected, found: seen.append((name, expected, found)))
    vs = ObjectName("VirtualService", "shop", "checkout")
    assert not watch.saw(vs, 10), "nothing written yet: nothing to compare with"
    watch.wrote(vs, 25)
    assert not watch.saw(vs, 25)
    assert watch.saw(vs, 10) and watch.saw(vs, 10)
    assert seen == [("VirtualService shop/checkout", 25, 10)]
    watch.wrote(vs, 25)
    assert watch.saw(vs, 10)
    assert seen == [("VirtualService shop/checkout", 25, 10)] * 2


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


def router(kube_client: client.ApiClient, **options: Any) -> IstioRouter:
    settings: dict[str, Any] = {
        "virtual_service": "checkout",
        "route": "primary",
        "stable_host": "checkout",
        "canary_host": "checkout-canary",
        **options,
    }
    return IstioRouter(kube_client, **settings)


def stored(apiserver: ApiServer, kind: str = "VirtualService") -> dict[str, Any]:
    obj = apiserver.read(kind, "checkout", NS)
    assert obj is not None
    return obj


def assert_writes_validate(apiserver: ApiServer) -> int:
    writes = apiserver.writes()
    for call in writes:
        validate_custom(call.body)
    return len(writes)


@pytest.mark.asyncio
async def test_a_linear_rollout_and_a_rollback_move_only_the_two_weights(
    apiserver: ApiServer, kube_client: client.ApiClient
) -> None:
    created = await client.CustomObjectsApi(kube_client).create_namespaced_custom_object(
        "networking.istio.io", "v1", NS, "virtualservices", load(VS_YAML)
    )  # as the user applies it
    original = without_server_fields(cast(dict[str, Any], created))
    istio = router(kube_client)
    assert isinstance(istio, TrafficRouter)
    assert await istio.get_weight(REF) == 0
    for step, weight in ROLLOUT:
        await istio.set_weight(REF, weight)
        assert await istio.get_weight(REF) == weight
        now = stored(apiserver)
        assert_golden("istio", step, now)
        assert weights(now, HOSTS) == (100 - weight, weight)
        assert without_weights(without_server_fields(now), 1) == without_weights(original, 1)
    assert assert_writes_validate(apiserver) == 1 + len(ROLLOUT)


@pytest.mark.asyncio
async def test_set_weight_is_idempotent(
    apiserver: ApiServer, kube_client: client.ApiClient
) -> None:
    apiserver.seed(load(VS_YAML))
    istio = router(kube_client)
    await istio.set_weight(REF, 0)  # the object already says 0
    assert apiserver.writes() == []
    await istio.set_weight(REF, 10)
    await istio.set_weight(REF, 10)
    assert len(apiserver.writes()) == 1


@pytest.mark.asyncio
async def test_a_revert_by_someone_else_is_reported_and_written_again(
    apiserver: ApiServer, kube_client: client.ApiClient
) -> None:
    apiserver.seed(load(VS_YAML))
    reverts: list[tuple[str, int, int]] = []
    istio = router(kube_client, on_revert=lambda *seen: reverts.append(seen))
    await istio.set_weight(REF, 10)
    await istio.set_weight(REF, 25)
    assert not await istio.reconcile(REF), "nothing to re-apply while the object is ours"

    async def put_back(weight: int) -> None:
        api = client.CustomObjectsApi(kube_client)
        vs = await api.get_namespaced_custom_object(
            "networking.istio.io", "v1", NS, "virtualservices", "checkout"
        )
        old = with_canary_weight(cast(dict[str, Any], vs), HOSTS, weight)
        await api.replace_namespaced_custom_object(
            "networking.istio.io", "v1", NS, "virtualservices", "checkout", old
        )

    await put_back(10)
    assert await istio.get_weight(REF) == 10, "get_weight reports what is there"
    assert await istio.get_weight(REF) == 10
    assert reverts == [("VirtualService shop/checkout", 25, 10)], "reported once"
    assert await istio.reconcile(REF)
    assert weights(stored(apiserver), HOSTS) == (75, 25)

    await put_back(5)  # again; now the engine's read-back confirmation puts it back
    await set_weight_confirmed(istio, REF, 25, InstantClock())
    assert weights(stored(apiserver), HOSTS) == (75, 25)
    assert reverts[-1] == ("VirtualService shop/checkout", 25, 5)
    assert_writes_validate(apiserver)


@pytest.mark.asyncio
async def test_a_missing_or_malformed_object_is_named(
    apiserver: ApiServer, kube_client: client.ApiClient
) -> None:
    istio = router(kube_client)
    with pytest.raises(TrafficObjectError, match=r"^VirtualService shop/checkout not found$"):
        await istio.set_weight(REF, 5)
    with pytest.raises(TrafficObjectError, match=r"^VirtualService shop/checkout not found$"):
        await istio.get_weight(REF)
    vs = load(VS_YAML)
    del vs["spec"]["http"][1]["route"][1]
    apiserver.seed(vs)
    with pytest.raises(TrafficObjectError) as caught:
        await istio.set_weight(REF, 5)
    assert str(caught.value) == (
        "VirtualService shop/checkout: spec.http[1].route has no destination for host "
        "checkout-canary"
    )
    assert apiserver.writes() == []


@pytest.mark.asyncio
async def test_a_stale_write_is_read_again_and_retried(
    apiserver: ApiServer, kube_client: client.ApiClient
) -> None:
    apiserver.seed(load(VS_YAML))
    istio = router(kube_client)
    other = client.CustomObjectsApi(kube_client)
    read = istio._api.get_namespaced_custom_object
    raced = False

    async def read_then_someone_writes(*args: Any, **kwargs: Any) -> Any:
        # Another writer changes a field we do not own between our read and our write.
        nonlocal raced
        found = await read(*args, **kwargs)
        if not raced:
            raced = True
            theirs = copy.deepcopy(cast(dict[str, Any], found))
            theirs["spec"]["http"][2]["timeout"] = "3s"
            await other.replace_namespaced_custom_object(
                "networking.istio.io", "v1", NS, "virtualservices", "checkout", theirs
            )
        return found

    istio._api.get_namespaced_custom_object = read_then_someone_writes  # type: ignore[method-assign]
    await istio.set_weight(REF, 5)
    now = stored(apiserver)
    assert weights(now, HOSTS) == (95, 5)
    assert now["spec"]["http"][2]["timeout"] == "3s", "their change is kept"
    assert [c.status for c in apiserver.writes(ok=None)] == [200, 409, 200]

    apiserver.conflict_next_write(times=2)
    await istio.set_weight(REF, 10)
    assert weights(stored(apiserver), HOSTS) == (90, 10)
    apiserver.conflict_next_write(times=5)
    with pytest.raises(TrafficObjectError, match="changed by another writer 5 times in a row"):
        await istio.set_weight(REF, 25)


@pytest.mark.asyncio
async def test_subsets_are_driven_after_the_destination_rule_is_checked(
    apiserver: ApiServer, kube_client: client.ApiClient
) -> None:
    apiserver.seed(load(SUBSET_VS_YAML))
    istio = router(
        kube_client,
        route=None,
        canary_host="checkout",
        subsets=("stable", "canary"),
        destination_rule="checkout",
    )
    with pytest.raises(TrafficObjectError, match=r"^DestinationRule shop/checkout not found$"):
        await istio.set_weight(REF, 5)
    dr = load(DR_YAML)
    del dr["spec"]["subsets"][1]
    apiserver.seed(dr)
    with pytest.raises(TrafficObjectError) as caught:
        await istio.set_weight(REF, 5)
    assert (
        str(caught.value)
        == "DestinationRule shop/checkout: spec.subsets has no subset named canary"
    )
    assert apiserver.writes() == []
    apiserver.seed(load(DR_YAML))
    for _, weight in ROLLOUT:
        await istio.set_weight(REF, weight)
        assert await istio.get_weight(REF) == weight
        assert weights(stored(apiserver), SUBSETS) == (100 - weight, weight)
    assert stored(apiserver, "DestinationRule")["spec"] == load(DR_YAML)["spec"]
    assert assert_writes_validate(apiserver) == len(ROLLOUT)


@pytest.mark.asyncio
async def test_another_api_failure_is_one_line_naming_the_object(
    apiserver: ApiServer, kube_client: client.ApiClient
) -> None:
    apiserver.seed(load(VS_YAML))
    apiserver.fail(403, method="GET", message='virtualservices "checkout" is forbidden')
    with pytest.raises(TrafficObjectError) as caught:
        await router(kube_client).get_weight(REF)
    assert str(caught.value) == (
        'VirtualService shop/checkout: reading failed: HTTP 403: virtualservices "checkout" '
        "is forbidden"
    )
