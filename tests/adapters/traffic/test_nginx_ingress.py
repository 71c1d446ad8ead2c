"""The ingress-nginx router: the canary Ingress on plain dicts, then through the API double."""

from __future__ import annotations

from typing import Any

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
from tests.adapters.traffic import InstantClock, assert_golden, without_server_fields
from tests.kube.apiserver import ApiServer
from tests.kube.schemas import validate_builtin

# The API double's fixtures, shared with tests/kube (a fixture is found by its module name).

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


def router(kube_client: client.ApiClient, **options: Any) -> NginxIngressRouter:
    settings: dict[str, Any] = {
        "ingress": "checkout",
        "canary_service": "checkout-canary",
        "header": "x-canary",
        "header_value": "yes",
        **options,
    }
    return NginxIngressRouter(kube_client, **settings)


def stored(apiserver: ApiServer, name: str = "checkout-canary") -> dict[str, Any] | None:
    return apiserver.read("Ingress", name, NS)


def user_ingress() -> dict[str, Any]:
    """The stable Ingress as a user applies it (the server sets the rest)."""
    return without_server_fields(load(STABLE_YAML))


def seed_stable(apiserver: ApiServer) -> dict[str, Any]:
    return apiserver.seed(user_ingress())


def assert_writes_validate(apiserver: ApiServer) -> int:
    writes = [call for call in apiserver.writes() if call.method != "DELETE"]
    for call in writes:
        validate_builtin(call.body)
    return len(writes)


@pytest.mark.asyncio
async def test_a_linear_rollout_and_a_rollback_through_the_canary_ingress(
    apiserver: ApiServer, kube_client: client.ApiClient
) -> None:
    applied = client.V1Ingress.from_dict(user_ingress())
    assert applied is not None
    await client.NetworkingV1Api(kube_client).create_namespaced_ingress(NS, applied)
    stable = stored(apiserver, "checkout")
    nginx = router(kube_client)
    assert isinstance(nginx, TrafficRouter)
    assert await nginx.get_weight(REF) == 0
    for step, weight in ROLLOUT:
        await nginx.set_weight(REF, weight)
        assert await nginx.get_weight(REF) == weight
        canary = stored(apiserver)
        assert canary is not None, "weight 0 during a rollout keeps the canary Ingress"
        assert_golden("nginx_ingress", step, canary)
        assert canary_weight(canary) == weight
    assert stored(apiserver, "checkout") == stable, "the stable Ingress is never written"
    assert apiserver.writes(name="checkout") == [], "no write addresses the stable Ingress"
    assert assert_writes_validate(apiserver) == 1 + len(ROLLOUT)

    await nginx.remove(REF)  # the rollout has ended
    assert stored(apiserver) is None
    assert await nginx.get_weight(REF) == 0
    await nginx.remove(REF)  # nothing left to delete: no error


@pytest.mark.asyncio
async def test_weight_zero_creates_nothing_and_set_weight_is_idempotent(
    apiserver: ApiServer, kube_client: client.ApiClient
) -> None:
    seed_stable(apiserver)
    nginx = router(kube_client)
    await nginx.set_weight(REF, 0)
    assert apiserver.writes() == []
    await nginx.set_weight(REF, 10)
    await nginx.set_weight(REF, 10)
    assert [call.method for call in apiserver.writes()] == ["POST"]


@pytest.mark.asyncio
async def test_a_change_to_the_stable_ingress_reaches_the_canary(
    apiserver: ApiServer, kube_client: client.ApiClient
) -> None:
    stable = seed_stable(apiserver)
    nginx = router(kube_client)
    await nginx.set_weight(REF, 10)
    stable["metadata"]["annotations"][f"{P}/proxy-read-timeout"] = "120"
    apiserver.seed(stable)
    await nginx.set_weight(REF, 25)
    canary = stored(apiserver)
    assert canary is not None
    assert canary["metadata"]["annotations"][f"{P}/proxy-read-timeout"] == "120"


@pytest.mark.asyncio
async def test_a_revert_by_someone_else_is_reported_and_written_again(
    apiserver: ApiServer, kube_client: client.ApiClient
) -> None:
    seed_stable(apiserver)
    reverts: list[tuple[str, int, int]] = []
    nginx = router(kube_client, on_revert=lambda *seen: reverts.append(seen))
    await nginx.set_weight(REF, 10)
    await nginx.set_weight(REF, 25)
    assert not await nginx.reconcile(REF)
    api = client.NetworkingV1Api(kube_client)

    async def put_back(weight: int) -> None:
        canary = await api.read_namespaced_ingress("checkout-canary", NS)
        assert canary.metadata is not None and canary.metadata.annotations is not None
        canary.metadata.annotations[f"{P}/canary-weight"] = str(weight)
        await api.replace_namespaced_ingress("checkout-canary", NS, canary)

    await put_back(10)
    assert await nginx.get_weight(REF) == 10, "get_weight reports what is there"
    assert await nginx.get_weight(REF) == 10
    assert reverts == [("Ingress shop/checkout-canary", 25, 10)], "reported once"
    assert await nginx.reconcile(REF)
    assert canary_weight(stored(apiserver) or {}) == 25

    await put_back(5)
    await set_weight_confirmed(nginx, REF, 25, InstantClock())
    assert canary_weight(stored(apiserver) or {}) == 25
    assert reverts[-1] == ("Ingress shop/checkout-canary", 25, 5)

    await api.delete_namespaced_ingress("checkout-canary", NS)  # deleted is a revert to 0
    assert await nginx.get_weight(REF) == 0
    assert reverts[-1] == ("Ingress shop/checkout-canary", 25, 0)
    assert await nginx.reconcile(REF)
    assert canary_weight(stored(apiserver) or {}) == 25
    assert_writes_validate(apiserver)


@pytest.mark.asyncio
async def test_a_missing_or_malformed_object_is_named(
    apiserver: ApiServer, kube_client: client.ApiClient
) -> None:
    nginx = router(kube_client)
    with pytest.raises(TrafficObjectError, match=r"^Ingress shop/checkout not found$"):
        await nginx.set_weight(REF, 5)
    stable = user_ingress()
    for rule in stable["spec"]["rules"]:
        rule["http"]["paths"] = [
            p for p in rule["http"]["paths"] if p["backend"]["service"]["name"] != "checkout"
        ]
    stable["spec"]["rules"] = [r for r in stable["spec"]["rules"] if r["http"]["paths"]]
    apiserver.seed(stable)
    with pytest.raises(TrafficObjectError) as caught:
        await nginx.set_weight(REF, 5)
    assert (
        str(caught.value) == "Ingress shop/checkout: spec.rules has no backend for Service checkout"
    )
    assert apiserver.writes() == []


@pytest.mark.asyncio
async def test_weight_zero_still_works_when_the_stable_ingress_is_gone(
    apiserver: ApiServer, kube_client: client.ApiClient
) -> None:
    seed_stable(apiserver)
    nginx = router(kube_client)
    await nginx.set_weight(REF, 25)
    await client.NetworkingV1Api(kube_client).delete_namespaced_ingress("checkout", NS)
    with pytest.raises(TrafficObjectError, match=r"^Ingress shop/checkout not found$"):
        await nginx.set_weight(REF, 50)
    await nginx.set_weight(REF, 0)  # a rollback must still take the canary's share away
    canary_now = stored(apiserver)
    assert canary_now is not None
    assert canary_weight(canary_now) == 0
    assert not any("canary-by" in key for key in canary_now["metadata"]["annotations"])
    assert await nginx.get_weight(REF) == 0
    assert_writes_validate(apiserver)


@pytest.mark.asyncio
async def test_an_ingress_we_do_not_manage_is_never_touched(
    apiserver: ApiServer, kube_client: client.ApiClient
) -> None:
    seed_stable(apiserver)
    theirs = canary(30)
    theirs["metadata"]["labels"] = {"team": "payments"}
    apiserver.seed(theirs)
    nginx = router(kube_client)
    for call in (nginx.set_weight(REF, 5), nginx.remove(REF)):
        with pytest.raises(TrafficObjectError) as caught:
            await call
        assert str(caught.value) == (
            "Ingress shop/checkout-canary: metadata.labels exists and is not managed by "
            "codedance (no label app.kubernetes.io/managed-by: codedance)"
        )
    assert apiserver.writes() == []


@pytest.mark.asyncio
async def test_a_stale_write_is_read_again_and_retried(
    apiserver: ApiServer, kube_client: client.ApiClient
) -> None:
    seed_stable(apiserver)
    nginx = router(kube_client)
    apiserver.conflict_next_write(times=2)
    await nginx.set_weight(REF, 5)
    assert [call.status for call in apiserver.writes(ok=None)] == [409, 409, 201]
    await nginx.set_weight(REF, 10)
    canary_now = stored(apiserver)
    assert canary_now is not None
    canary_now["metadata"]["labels"]["team"] = "shop"
    apiserver.seed(canary_now)  # someone else wrote since; our next write reads it again
    apiserver.conflict_next_write(times=1)
    await nginx.set_weight(REF, 25)
    canary_now = stored(apiserver)
    assert canary_now is not None
    assert canary_weight(canary_now) == 25
    assert canary_now["metadata"]["labels"]["team"] == "shop", "their label is kept"
    apiserver.conflict_next_write(times=5)
    with pytest.raises(TrafficObjectError, match="changed by another writer 5 times in a row"):
        await nginx.set_weight(REF, 50)
