"""The ingress-nginx router: the canary Ingress on plain dicts, then on the real API server.

The router works as the controller's ServiceAccount (`controller_api`, exactly
deploy/rbac.yaml's rights); the test sets up, reverts and checks as the
admin, as a person would. The real server validates every Ingress the router
writes. Nothing here uses the API double.
"""

from __future__ import annotations

import json
from typing import Any, cast

import pytest
import yaml
from kubernetes.aio import client

from adapters.traffic.errors import TrafficObjectError
from adapters.traffic.nginx_ingress import (
    NginxIngressRouter,
    canary_ingress,
    canary_weight,
    shared_annotations,
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

P = "nginx.ingress.kubernetes.io"

STABLE_YAML = f"""
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: checkout
  namespace: shop
  uid: 4c1e5d2a-0000-4000-8000-000000000001
  resourceVersion: "812"
  generation: 3
  creationTimestamp: "2025-01-01T00:00:00Z"
  labels: {{app: checkout, app.kubernetes.io/instance: shop}}
  annotations:
    kubernetes.io/ingress.class: nginx
    kubectl.kubernetes.io/last-applied-configuration: '{{"kind":"Ingress"}}'
    cert-manager.io/cluster-issuer: letsencrypt
    {P}/rewrite-target: /$2
    {P}/backend-protocol: HTTP
    {P}/ssl-redirect: "true"
    {P}/proxy-body-size: 8m
    {P}/auth-url: http://auth.shop.svc/check
    {P}/canary-weight: "30"
  managedFields:
  - manager: kubectl
    operation: Apply
spec:
  tls:
  - hosts: [shop.example.com]
    secretName: shop-tls
  rules:
  - host: shop.example.com
    http:
      paths:
      - path: /checkout(/|$)(.*)
        pathType: ImplementationSpecific
        backend:
          service:
            name: checkout
            port: {{number: 80}}
      - path: /static
        pathType: Prefix
        backend:
          service:
            name: cdn
            port: {{name: http}}
  - host: api.example.com
    http:
      paths:
      - path: /
        pathType: Prefix
        backend:
          service:
            name: checkout
            port: {{name: http}}
status:
  loadBalancer:
    ingress:
    - ip: 10.0.0.1
"""


def load(text: str) -> dict[str, Any]:
    obj: dict[str, Any] = yaml.safe_load(text)
    return obj


def canary(weight: int, **options: Any) -> dict[str, Any]:
    return canary_ingress(
        load(STABLE_YAML),
        canary_service="checkout-canary",
        stable_service="checkout",
        weight=weight,
        **options,
    )


# --- the canary Ingress, on plain dicts -----------------------------------------


def test_the_canary_is_a_clone_pointing_at_the_canary_service() -> None:
    out = canary(5)
    assert out["metadata"] == {
        "name": "checkout-canary",
        "namespace": "shop",
        "labels": {"app.kubernetes.io/managed-by": "codedance"},
        "annotations": {
            "kubernetes.io/ingress.class": "nginx",
            f"{P}/rewrite-target": "/$2",
            f"{P}/backend-protocol": "HTTP",
            f"{P}/ssl-redirect": "true",
            f"{P}/proxy-body-size": "8m",
            f"{P}/auth-url": "http://auth.shop.svc/check",
            f"{P}/canary": "true",
            f"{P}/canary-weight": "5",
        },
    }
    assert "status" not in out
    spec = out["spec"]
    assert spec["tls"] == load(STABLE_YAML)["spec"]["tls"]
    backends = [
        (rule["host"], path["path"], path["backend"]["service"])
        for rule in spec["rules"]
        for path in rule["http"]["paths"]
    ]
    assert backends == [
        (
            "shop.example.com",
            "/checkout(/|$)(.*)",
            {"name": "checkout-canary", "port": {"number": 80}},
        ),
        ("api.example.com", "/", {"name": "checkout-canary", "port": {"name": "http"}}),
    ], "the path to another Service is left out: the canary takes no share of it"


def test_without_a_stable_service_every_backend_moves() -> None:
    out = canary_ingress(
        load(STABLE_YAML), canary_service="checkout-canary", stable_service=None, weight=5
    )
    names = {
        p["backend"]["service"]["name"] for r in out["spec"]["rules"] for p in r["http"]["paths"]
    }
    assert names == {"checkout-canary"}


def test_shared_annotations_keep_nginx_ones_and_the_class_only() -> None:
    kept = shared_annotations(
        {
            f"{P}/canary": "true",
            f"{P}/canary-by-header": "x",
            f"{P}/affinity": "cookie",
            "kubernetes.io/ingress.class": "nginx",
            "external-dns.alpha.kubernetes.io/hostname": "shop.example.com",
            "meta.helm.sh/release-name": "shop",
        }
    )
    assert kept == {f"{P}/affinity": "cookie", "kubernetes.io/ingress.class": "nginx"}


def test_total_header_and_cookie() -> None:
    annotations = canary(5, total=1000, header="x-canary", header_value="yes", cookie="canary")[
        "metadata"
    ]["annotations"]
    assert {k: v for k, v in annotations.items() if "/canary" in k} == {
        f"{P}/canary": "true",
        f"{P}/canary-weight": "50",
        f"{P}/canary-weight-total": "1000",
        f"{P}/canary-by-header": "x-canary",
        f"{P}/canary-by-header-value": "yes",
        f"{P}/canary-by-cookie": "canary",
    }
    assert canary_weight(canary(5, total=1000)) == 5


def test_weight_zero_drops_header_and_cookie_routing() -> None:
    annotations = canary(0, header="x-canary", cookie="canary")["metadata"]["annotations"]
    assert annotations[f"{P}/canary-weight"] == "0"
    assert not any(k.startswith(f"{P}/canary-by") for k in annotations)


@pytest.mark.parametrize("weight", range(0, 101, 7))
def test_the_weight_reads_back(weight: int) -> None:
    assert canary_weight(canary(weight)) == weight
    assert canary_weight(canary(weight, total=300)) == weight


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda ing: ing["metadata"]["annotations"].update({f"{P}/canary": "true"}),
            f'Ingress shop/checkout: metadata.annotations has {P}/canary: "true"; '
            "name the stable Ingress, not a canary one",
        ),
        (
            lambda ing: [r["http"]["paths"].pop(0) for r in ing["spec"]["rules"]],
            "Ingress shop/checkout: spec.rules has no backend for Service checkout",
        ),
        (lambda ing: ing.pop("spec"), "Ingress shop/checkout: spec is missing"),
    ],
)
def test_a_malformed_stable_ingress_names_the_field(change: Any, message: str) -> None:
    stable = load(STABLE_YAML)
    change(stable)
    with pytest.raises(TrafficObjectError) as caught:
        canary_ingress(
            stable, canary_service="checkout-canary", stable_service="checkout", weight=5
        )
    assert str(caught.value) == message


def test_a_malformed_canary_weight_names_the_annotation() -> None:
    out = canary(5)
    out["metadata"]["annotations"][f"{P}/canary-weight"] = "five"
    with pytest.raises(TrafficObjectError) as caught:
        canary_weight(out)
    assert str(caught.value) == (
        f"Ingress shop/checkout-canary: metadata.annotations {P}/canary-weight is 'five', "
        "not an integer"
    )


def test_options_are_checked_up_front() -> None:
    with pytest.raises(ValueError, match="below 100"):
        NginxIngressRouter(None, ingress="checkout", canary_service="c", max_weight=10)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="header_value"):
        NginxIngressRouter(None, ingress="checkout", canary_service="c", header_value="x")  # type: ignore[arg-type]


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
CREATED = ("create", "checkout-canary", 201)
UPDATED = ("update", "checkout-canary", 200)


def ref(namespace: str) -> RolloutRef:
    return RolloutRef(namespace, "checkout", "checkout", "checkout-canary", "checkout")


def router(controller_api: client.ApiClient, **options: Any) -> NginxIngressRouter:
    settings: dict[str, Any] = {
        "ingress": "checkout",
        "canary_service": "checkout-canary",
        "header": "x-canary",
        "header_value": "yes",
        **options,
    }
    return NginxIngressRouter(controller_api, **settings)


def user_ingress(namespace: str) -> dict[str, Any]:
    """The stable Ingress as a user applies it (the server sets the rest)."""
    ingress = without_server_fields(load(STABLE_YAML))
    ingress["metadata"]["namespace"] = namespace
    del ingress["status"]  # the server ignores status on create: it belongs to the controller
    return ingress


async def create(admin_api: client.ApiClient, ingress: dict[str, Any]) -> dict[str, Any]:
    """Create as the user applies it; the Ingress as the server stored it."""
    body = client.V1Ingress.from_dict(ingress)
    assert body is not None
    response = await client.NetworkingV1Api(
        admin_api
    ).create_namespaced_ingress_without_preload_content(ingress["metadata"]["namespace"], body)
    assert response.status == 201, await response.read()
    return cast(dict[str, Any], json.loads(await response.read()))


async def stored(
    admin_api: client.ApiClient, namespace: str, name: str = "checkout-canary"
) -> dict[str, Any] | None:
    """The Ingress as the server returns it, raw JSON (None when there is none)."""
    response = await client.NetworkingV1Api(
        admin_api
    ).read_namespaced_ingress_without_preload_content(name, namespace)
    if response.status == 404:  # the raw variant answers an error instead of raising it
        return None
    assert response.status == 200, await response.read()
    return cast(dict[str, Any], json.loads(await response.read()))


async def patch_ingress(
    admin_api: client.ApiClient, namespace: str, name: str, patch: dict[str, Any]
) -> None:
    """A merge patch, as `kubectl annotate --overwrite` or `kubectl patch --type merge` sends."""
    await client.CustomObjectsApi(admin_api).patch_namespaced_custom_object(
        "networking.k8s.io", "v1", namespace, "ingresses", name, patch
    )


@pytest.mark.asyncio
async def test_a_linear_rollout_and_a_rollback_through_the_canary_ingress(
    control_plane: ControlPlane,
    admin_api: client.ApiClient,
    controller_api: client.ApiClient,
    namespace: str,
) -> None:
    stable = await create(admin_api, user_ingress(namespace))
    nginx = router(controller_api)
    assert isinstance(nginx, TrafficRouter)
    assert await nginx.get_weight(ref(namespace)) == 0
    for step, weight in ROLLOUT:
        await nginx.set_weight(ref(namespace), weight)
        assert await nginx.get_weight(ref(namespace)) == weight
        canary_now = await stored(admin_api, namespace)
        assert canary_now is not None, "weight 0 during a rollout keeps the canary Ingress"
        assert_golden("nginx_ingress", step, canary_now, namespace)
        assert canary_weight(canary_now) == weight
    assert await stored(admin_api, namespace, "checkout") == stable, "the stable is never written"
    events = await settled(control_plane, controller_api, namespace, "ingresses")
    assert writes(events) == [CREATED] + [UPDATED] * (len(ROLLOUT) - 1), (
        "no write addresses the stable Ingress, and the server took every canary one"
    )

    await nginx.remove(ref(namespace))  # the rollout has ended
    assert await stored(admin_api, namespace) is None
    assert await nginx.get_weight(ref(namespace)) == 0
    await nginx.remove(ref(namespace))  # nothing left to delete: no error
    events = await settled(control_plane, controller_api, namespace, "ingresses")
    assert writes(events)[len(ROLLOUT) :] == [("delete", "checkout-canary", 200)]


@pytest.mark.asyncio
async def test_weight_zero_creates_nothing_and_set_weight_is_idempotent(
    control_plane: ControlPlane,
    admin_api: client.ApiClient,
    controller_api: client.ApiClient,
    namespace: str,
) -> None:
    await create(admin_api, user_ingress(namespace))
    nginx = router(controller_api)
    await nginx.set_weight(ref(namespace), 0)
    assert writes(await settled(control_plane, controller_api, namespace, "ingresses")) == []
    await nginx.set_weight(ref(namespace), 10)
    # what the server stores (its status {loadBalancer: {}} aside) is what we wrote
    await nginx.set_weight(ref(namespace), 10)
    events = await settled(control_plane, controller_api, namespace, "ingresses")
    assert writes(events) == [CREATED]


@pytest.mark.asyncio
async def test_a_change_to_the_stable_ingress_reaches_the_canary(
    admin_api: client.ApiClient, controller_api: client.ApiClient, namespace: str
) -> None:
    await create(admin_api, user_ingress(namespace))
    nginx = router(controller_api)
    await nginx.set_weight(ref(namespace), 10)
    await patch_ingress(
        admin_api,
        namespace,
        "checkout",
        {"metadata": {"annotations": {f"{P}/proxy-read-timeout": "120"}}},
    )
    await nginx.set_weight(ref(namespace), 25)
    canary_now = await stored(admin_api, namespace)
    assert canary_now is not None
    assert canary_now["metadata"]["annotations"][f"{P}/proxy-read-timeout"] == "120"


@pytest.mark.asyncio
async def test_a_revert_by_someone_else_is_reported_and_written_again(
    control_plane: ControlPlane,
    admin_api: client.ApiClient,
    controller_api: client.ApiClient,
    namespace: str,
) -> None:
    await create(admin_api, user_ingress(namespace))
    reverts: list[tuple[str, int, int]] = []
    nginx = router(controller_api, on_revert=lambda *seen: reverts.append(seen))
    name = f"Ingress {namespace}/checkout-canary"
    await nginx.set_weight(ref(namespace), 10)
    await nginx.set_weight(ref(namespace), 25)
    assert not await nginx.reconcile(ref(namespace))

    async def put_back(weight: int) -> None:  # kubectl annotate --overwrite
        await patch_ingress(
            admin_api,
            namespace,
            "checkout-canary",
            {"metadata": {"annotations": {f"{P}/canary-weight": str(weight)}}},
        )

    async def weight_now() -> int:
        return canary_weight(await stored(admin_api, namespace) or {})

    await put_back(10)
    assert await nginx.get_weight(ref(namespace)) == 10, "get_weight reports what is there"
    assert await nginx.get_weight(ref(namespace)) == 10
    assert reverts == [(name, 25, 10)], "reported once"
    assert await nginx.reconcile(ref(namespace))
    assert await weight_now() == 25

    await put_back(5)
    await set_weight_confirmed(nginx, ref(namespace), 25, InstantClock())
    assert await weight_now() == 25
    assert reverts[-1] == (name, 25, 5)

    # deleted (kubectl delete) is a revert to 0
    await client.NetworkingV1Api(admin_api).delete_namespaced_ingress("checkout-canary", namespace)
    assert await nginx.get_weight(ref(namespace)) == 0
    assert reverts[-1] == (name, 25, 0)
    assert await nginx.reconcile(ref(namespace))
    assert await weight_now() == 25
    events = await settled(control_plane, controller_api, namespace, "ingresses")
    assert {code for _, _, code in writes(events)} <= {200, 201}, "every write was accepted"


@pytest.mark.asyncio
async def test_a_missing_or_malformed_object_is_named(
    control_plane: ControlPlane,
    admin_api: client.ApiClient,
    controller_api: client.ApiClient,
    namespace: str,
) -> None:
    nginx = router(controller_api)
    with pytest.raises(TrafficObjectError, match=rf"^Ingress {namespace}/checkout not found$"):
        await nginx.set_weight(ref(namespace), 5)
    stable = user_ingress(namespace)
    for rule in stable["spec"]["rules"]:
        rule["http"]["paths"] = [
            p for p in rule["http"]["paths"] if p["backend"]["service"]["name"] != "checkout"
        ]
    stable["spec"]["rules"] = [r for r in stable["spec"]["rules"] if r["http"]["paths"]]
    await create(admin_api, stable)
    with pytest.raises(TrafficObjectError) as caught:
        await nginx.set_weight(ref(namespace), 5)
    assert str(caught.value) == (
        f"Ingress {namespace}/checkout: spec.rules has no backend for Service checkout"
    )
    assert writes(await settled(control_plane, controller_api, namespace, "ingresses")) == []


@pytest.mark.asyncio
async def test_weight_zero_still_works_when_the_stable_ingress_is_gone(
    control_plane: ControlPlane,
    admin_api: client.ApiClient,
    controller_api: client.ApiClient,
    namespace: str,
) -> None:
    await create(admin_api, user_ingress(namespace))
    nginx = router(controller_api)
    await nginx.set_weight(ref(namespace), 25)
    await client.NetworkingV1Api(admin_api).delete_namespaced_ingress("checkout", namespace)
    with pytest.raises(TrafficObjectError, match=rf"^Ingress {namespace}/checkout not found$"):
        await nginx.set_weight(ref(namespace), 50)
    await nginx.set_weight(ref(namespace), 0)  # a rollback must still take the canary's share
    canary_now = await stored(admin_api, namespace)
    assert canary_now is not None
    assert canary_weight(canary_now) == 0
    assert not any("canary-by" in key for key in canary_now["metadata"]["annotations"])
    assert await nginx.get_weight(ref(namespace)) == 0
    events = await settled(control_plane, controller_api, namespace, "ingresses")
    assert writes(events) == [CREATED, UPDATED]


@pytest.mark.asyncio
async def test_an_ingress_we_do_not_manage_is_never_touched(
    control_plane: ControlPlane,
    admin_api: client.ApiClient,
    controller_api: client.ApiClient,
    namespace: str,
) -> None:
    await create(admin_api, user_ingress(namespace))
    theirs = canary(30)
    theirs["metadata"]["namespace"] = namespace
    theirs["metadata"]["labels"] = {"team": "payments"}
    before = await create(admin_api, theirs)
    nginx = router(controller_api)
    for call in (nginx.set_weight(ref(namespace), 5), nginx.remove(ref(namespace))):
        with pytest.raises(TrafficObjectError) as caught:
            await call
        assert str(caught.value) == (
            f"Ingress {namespace}/checkout-canary: metadata.labels exists and is not managed by "
            "codedance (no label app.kubernetes.io/managed-by: codedance)"
        )
    assert await stored(admin_api, namespace) == before
    assert writes(await settled(control_plane, controller_api, namespace, "ingresses")) == []


@pytest.mark.asyncio
async def test_a_canary_the_server_refuses_names_the_ingress_and_the_field(
    control_plane: ControlPlane,
    admin_api: client.ApiClient,
    controller_api: client.ApiClient,
    namespace: str,
) -> None:
    stable = user_ingress(namespace)
    stable["spec"]["ingressClassName"] = "nginx"
    await create(admin_api, stable)
    # The server refuses a class annotation that disagrees with ingressClassName on
    # create only, so a stable Ingress may carry both after an update; its clone may not.
    await patch_ingress(
        admin_api,
        namespace,
        "checkout",
        {"metadata": {"annotations": {"kubernetes.io/ingress.class": "public"}}},
    )
    with pytest.raises(TrafficObjectError) as caught:
        await router(controller_api).set_weight(ref(namespace), 5)
    assert caught.value.field == "annotations.kubernetes.io/ingress.class"
    assert str(caught.value) == (
        f"Ingress {namespace}/checkout-canary: annotations.kubernetes.io/ingress.class is "
        'refused by the API server: Invalid value: "public": must match `ingressClassName` '
        "when both are specified"
    )
    events = await settled(control_plane, controller_api, namespace, "ingresses")
    assert writes(events) == [("create", "checkout-canary", 422)]


def someone_writes_after_our_read(
    nginx: NginxIngressRouter, admin_api: client.ApiClient, times: int
) -> list[str]:
    """Another writer labels the canary Ingress between our read of it and our write.

    The next `times` reads of the canary Ingress are each followed by the
    admin's write, so the router's write carries a resourceVersion the real
    server no longer has, and the server answers 409. Returns the labels set.
    """
    read = nginx._api.read_namespaced_ingress
    labelled: list[str] = []

    async def read_then_someone_writes(name: str, namespace: str, **kwargs: Any) -> Any:
        found = await read(name, namespace, **kwargs)
        if name == "checkout-canary" and len(labelled) < times:
            labelled.append(f"shop-{len(labelled)}")
            await patch_ingress(
                admin_api, namespace, name, {"metadata": {"labels": {"team": labelled[-1]}}}
            )
        return found

    nginx._api.read_namespaced_ingress = read_then_someone_writes  # type: ignore[method-assign,assignment]
    return labelled


@pytest.mark.asyncio
async def test_a_stale_write_is_read_again_and_retried(
    control_plane: ControlPlane,
    admin_api: client.ApiClient,
    controller_api: client.ApiClient,
    namespace: str,
) -> None:
    await create(admin_api, user_ingress(namespace))
    nginx = router(controller_api)
    # Another replica creates the canary Ingress between our read (none) and our create.
    other = router(controller_api)
    read = nginx._api.read_namespaced_ingress
    raced = False

    async def read_then_another_creates(name: str, namespace: str, **kwargs: Any) -> Any:
        nonlocal raced
        try:
            return await read(name, namespace, **kwargs)
        finally:
            if name == "checkout-canary" and not raced:
                raced = True
                await other.set_weight(ref(namespace), 10)

    nginx._api.read_namespaced_ingress = read_then_another_creates  # type: ignore[method-assign,assignment]
    await nginx.set_weight(ref(namespace), 5)
    assert canary_weight(await stored(admin_api, namespace) or {}) == 5
    events = await settled(control_plane, controller_api, namespace, "ingresses")
    assert writes(events) == [CREATED, ("create", "checkout-canary", 409), UPDATED]

    labels = someone_writes_after_our_read(nginx, admin_api, times=2)
    await nginx.set_weight(ref(namespace), 25)
    canary_now = await stored(admin_api, namespace)
    assert canary_now is not None
    assert canary_weight(canary_now) == 25
    assert canary_now["metadata"]["labels"]["team"] == labels[-1], "their label is kept"
    events = await settled(control_plane, controller_api, namespace, "ingresses")
    assert [code for _, _, code in writes(events)][3:] == [409, 409, 200]
    someone_writes_after_our_read(nginx, admin_api, times=5)
    with pytest.raises(TrafficObjectError, match="changed by another writer 5 times in a row"):
        await nginx.set_weight(ref(namespace), 50)
