"""The Istio router: VirtualService weights on plain dicts, then on the real API server.

The router works as the controller's ServiceAccount (`controller_api`, exactly
deploy/rbac.yaml's rights); the test sets up, reverts and checks as the
admin, as a person would. Nothing here uses the API double.
"""

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
from tests.adapters.traffic import (
    InstantClock,
    assert_golden,
    settled,
    without_server_fields,
    writes,
)
from tests.cluster.controlplane import ControlPlane
from tests.cluster.fixtures import api_client

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
VS_API = ("networking.istio.io", "v1")


def ref(namespace: str) -> RolloutRef:
    return RolloutRef(namespace, "checkout", "checkout", "checkout-canary", "checkout")


def in_namespace(text: str, namespace: str) -> dict[str, Any]:
    """One of the YAML objects above, in the test's namespace (its hosts too)."""
    obj = load(text.replace(".shop.", f".{namespace}."))
    obj["metadata"]["namespace"] = namespace
    return obj


def router(controller_api: client.ApiClient, **options: Any) -> IstioRouter:
    settings: dict[str, Any] = {
        "virtual_service": "checkout",
        "route": "primary",
        "stable_host": "checkout",
        "canary_host": "checkout-canary",
        **options,
    }
    return IstioRouter(controller_api, **settings)


async def create(admin_api: client.ApiClient, obj: dict[str, Any]) -> dict[str, Any]:
    """Create as the user applies it; the object as the server stored it."""
    plural = "virtualservices" if obj["kind"] == "VirtualService" else "destinationrules"
    created = await client.CustomObjectsApi(admin_api).create_namespaced_custom_object(
        *VS_API, obj["metadata"]["namespace"], plural, obj
    )
    return cast(dict[str, Any], created)


async def stored(
    admin_api: client.ApiClient, namespace: str, plural: str = "virtualservices"
) -> dict[str, Any]:
    found = await client.CustomObjectsApi(admin_api).get_namespaced_custom_object(
        *VS_API, namespace, plural, "checkout"
    )
    return cast(dict[str, Any], found)


@pytest.mark.asyncio
async def test_a_linear_rollout_and_a_rollback_move_only_the_two_weights(
    control_plane: ControlPlane,
    admin_api: client.ApiClient,
    controller_api: client.ApiClient,
    namespace: str,
) -> None:
    original = without_server_fields(await create(admin_api, in_namespace(VS_YAML, namespace)))
    istio = router(controller_api)
    assert isinstance(istio, TrafficRouter)
    assert await istio.get_weight(ref(namespace)) == 0
    for step, weight in ROLLOUT:
        await istio.set_weight(ref(namespace), weight)
        assert await istio.get_weight(ref(namespace)) == weight
        now = await stored(admin_api, namespace)
        assert_golden("istio", step, now, namespace)
        assert weights(now, HOSTS) == (100 - weight, weight)
        # byte for byte (as the server serialises it) but for the two weights
        assert without_weights(without_server_fields(now), 1) == without_weights(original, 1)
    events = await settled(control_plane, controller_api, namespace, "virtualservices")
    assert writes(events) == [("update", "checkout", 200)] * len(ROLLOUT)


@pytest.mark.asyncio
async def test_set_weight_is_idempotent(
    control_plane: ControlPlane,
    admin_api: client.ApiClient,
    controller_api: client.ApiClient,
    namespace: str,
) -> None:
    await create(admin_api, in_namespace(VS_YAML, namespace))
    istio = router(controller_api)
    await istio.set_weight(ref(namespace), 0)  # the object already says 0
    assert writes(await settled(control_plane, controller_api, namespace, "virtualservices")) == []
    await istio.set_weight(ref(namespace), 10)
    version = (await stored(admin_api, namespace))["metadata"]["resourceVersion"]
    await istio.set_weight(ref(namespace), 10)
    events = await settled(control_plane, controller_api, namespace, "virtualservices")
    assert writes(events) == [("update", "checkout", 200)]
    assert (await stored(admin_api, namespace))["metadata"]["resourceVersion"] == version


@pytest.mark.asyncio
async def test_a_revert_by_someone_else_is_reported_and_written_again(
    control_plane: ControlPlane,
    admin_api: client.ApiClient,
    controller_api: client.ApiClient,
    namespace: str,
) -> None:
    await create(admin_api, in_namespace(VS_YAML, namespace))
    reverts: list[tuple[str, int, int]] = []
    istio = router(controller_api, on_revert=lambda *seen: reverts.append(seen))
    name = f"VirtualService {namespace}/checkout"
    await istio.set_weight(ref(namespace), 10)
    await istio.set_weight(ref(namespace), 25)
    assert not await istio.reconcile(ref(namespace)), "nothing to re-apply while it is ours"

    async def put_back(weight: int) -> None:
        # as `kubectl patch --type merge` would: the person's http routes, older weights
        vs = with_canary_weight(await stored(admin_api, namespace), HOSTS, weight)
        await client.CustomObjectsApi(admin_api).patch_namespaced_custom_object(
            *VS_API,
            namespace,
            "virtualservices",
            "checkout",
            {"spec": {"http": vs["spec"]["http"]}},
        )

    await put_back(10)
    assert await istio.get_weight(ref(namespace)) == 10, "get_weight reports what is there"
    assert await istio.get_weight(ref(namespace)) == 10
    assert reverts == [(name, 25, 10)], "reported once"
    assert await istio.reconcile(ref(namespace))
    assert weights(await stored(admin_api, namespace), HOSTS) == (75, 25)

    await put_back(5)  # again; now the engine's read-back confirmation puts it back
    await set_weight_confirmed(istio, ref(namespace), 25, InstantClock())
    assert weights(await stored(admin_api, namespace), HOSTS) == (75, 25)
    assert reverts[-1] == (name, 25, 5)
    events = await settled(control_plane, controller_api, namespace, "virtualservices")
    assert {code for _, _, code in writes(events)} == {200}, "every write was accepted"


@pytest.mark.asyncio
async def test_a_missing_or_malformed_object_is_named(
    control_plane: ControlPlane,
    admin_api: client.ApiClient,
    controller_api: client.ApiClient,
    namespace: str,
) -> None:
    istio = router(controller_api)
    missing = rf"^VirtualService {namespace}/checkout not found$"
    with pytest.raises(TrafficObjectError, match=missing):
        await istio.set_weight(ref(namespace), 5)
    with pytest.raises(TrafficObjectError, match=missing):
        await istio.get_weight(ref(namespace))
    vs = in_namespace(VS_YAML, namespace)
    del vs["spec"]["http"][1]["route"][1]
    await create(admin_api, vs)  # the server takes it: only our router needs the canary
    with pytest.raises(TrafficObjectError) as caught:
        await istio.set_weight(ref(namespace), 5)
    assert str(caught.value) == (
        f"VirtualService {namespace}/checkout: spec.http[1].route has no destination for host "
        "checkout-canary"
    )
    assert writes(await settled(control_plane, controller_api, namespace, "virtualservices")) == []


def someone_writes_after_our_read(
    istio: IstioRouter, admin_api: client.ApiClient, times: int
) -> list[str]:
    """Make another writer change a field we do not own between our read and our write.

    The next `times` reads of the router are each followed by the admin's
    write, so the router's write carries a resourceVersion the real server no
    longer has, and the server answers 409. Returns the timeouts written (each
    new: the real server takes a write that changes nothing as a no-op, which
    keeps the resourceVersion and so would not make the router's write stale).
    """
    read = istio._api.get_namespaced_custom_object
    other = client.CustomObjectsApi(admin_api)
    written: list[str] = []

    async def read_then_someone_writes(*args: Any, **kwargs: Any) -> Any:
        found = cast(dict[str, Any], await read(*args, **kwargs))
        if len(written) < times and found["kind"] == "VirtualService":
            theirs = copy.deepcopy(found)
            written.append(f"{int(theirs['spec']['http'][2].get('timeout', '2s')[:-1]) + 1}s")
            theirs["spec"]["http"][2]["timeout"] = written[-1]
            await other.replace_namespaced_custom_object(
                *VS_API, found["metadata"]["namespace"], "virtualservices", "checkout", theirs
            )
        return found

    istio._api.get_namespaced_custom_object = read_then_someone_writes  # type: ignore[method-assign]
    return written


@pytest.mark.asyncio
async def test_a_stale_write_is_read_again_and_retried(
    control_plane: ControlPlane,
    admin_api: client.ApiClient,
    controller_api: client.ApiClient,
    namespace: str,
) -> None:
    await create(admin_api, in_namespace(VS_YAML, namespace))
    istio = router(controller_api)
    theirs = someone_writes_after_our_read(istio, admin_api, times=1)
    await istio.set_weight(ref(namespace), 5)
    now = await stored(admin_api, namespace)
    assert weights(now, HOSTS) == (95, 5)
    assert now["spec"]["http"][2]["timeout"] == theirs[-1] == "3s", "their change is kept"
    events = await settled(control_plane, controller_api, namespace, "virtualservices")
    assert [code for _, _, code in writes(events)] == [409, 200]

    theirs = someone_writes_after_our_read(istio, admin_api, times=2)
    await istio.set_weight(ref(namespace), 10)
    now = await stored(admin_api, namespace)
    assert weights(now, HOSTS) == (90, 10)
    assert now["spec"]["http"][2]["timeout"] == theirs[-1] == "5s"
    events = await settled(control_plane, controller_api, namespace, "virtualservices")
    assert [code for _, _, code in writes(events)][2:] == [409, 409, 200]
    someone_writes_after_our_read(istio, admin_api, times=5)
    with pytest.raises(TrafficObjectError, match="changed by another writer 5 times in a row"):
        await istio.set_weight(ref(namespace), 25)
    assert weights(await stored(admin_api, namespace), HOSTS) == (90, 10)


@pytest.mark.asyncio
async def test_subsets_are_driven_after_the_destination_rule_is_checked(
    control_plane: ControlPlane,
    admin_api: client.ApiClient,
    controller_api: client.ApiClient,
    namespace: str,
) -> None:
    await create(admin_api, in_namespace(SUBSET_VS_YAML, namespace))
    istio = router(
        controller_api,
        route=None,
        canary_host="checkout",
        subsets=("stable", "canary"),
        destination_rule="checkout",
    )
    with pytest.raises(
        TrafficObjectError, match=rf"^DestinationRule {namespace}/checkout not found$"
    ):
        await istio.set_weight(ref(namespace), 5)
    dr = in_namespace(DR_YAML, namespace)
    del dr["spec"]["subsets"][1]
    await create(admin_api, dr)
    with pytest.raises(TrafficObjectError) as caught:
        await istio.set_weight(ref(namespace), 5)
    assert str(caught.value) == (
        f"DestinationRule {namespace}/checkout: spec.subsets has no subset named canary"
    )
    assert writes(await settled(control_plane, controller_api, namespace, "virtualservices")) == []
    dr = await stored(admin_api, namespace, "destinationrules")  # the person fixes it
    dr["spec"] = in_namespace(DR_YAML, namespace)["spec"]
    await client.CustomObjectsApi(admin_api).replace_namespaced_custom_object(
        *VS_API, namespace, "destinationrules", "checkout", dr
    )
    before = await stored(admin_api, namespace, "destinationrules")
    for _, weight in ROLLOUT:
        await istio.set_weight(ref(namespace), weight)
        assert await istio.get_weight(ref(namespace)) == weight
        assert weights(await stored(admin_api, namespace), SUBSETS) == (100 - weight, weight)
    assert await stored(admin_api, namespace, "destinationrules") == before
    events = await settled(control_plane, controller_api, namespace, "virtualservices")
    assert writes(events) == [("update", "checkout", 200)] * len(ROLLOUT)
    rules = await settled(control_plane, controller_api, namespace, "destinationrules")
    assert rules and writes(rules) == [], "the DestinationRule is read, never written"


@pytest.mark.asyncio
async def test_another_api_failure_is_one_line_naming_the_object(
    control_plane: ControlPlane, admin_api: client.ApiClient, namespace: str
) -> None:
    await create(admin_api, in_namespace(VS_YAML, namespace))
    # alice may release but holds no right on VirtualServices: the server's real 403
    async with await api_client(control_plane, "alice") as alice:
        with pytest.raises(TrafficObjectError) as caught:
            await router(alice).get_weight(ref(namespace))
    assert str(caught.value) == (
        f"VirtualService {namespace}/checkout: reading failed: HTTP 403: "
        'virtualservices.networking.istio.io "checkout" is forbidden: User "alice" cannot get '
        'resource "virtualservices" in API group "networking.istio.io" in the namespace '
        f'"{namespace}"'
    )
