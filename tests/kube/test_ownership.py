"""What Codedance makes is owned by its CanaryDeployment; what it did not make, it leaves alone.

On the real control plane, with the OwnerReferencesPermissionEnforcement
admission plugin on (tests/cluster/controlplane.py), as the controller's
ServiceAccount:

- the canary Deployment and the NGINX canary Ingress carry the label
  `app.kubernetes.io/managed-by: codedance` and an ownerReference to their
  CanaryDeployment (controller, blockOwnerDeletion); the garbage collector
  removes the canary when the CanaryDeployment goes without the finalizer;
- blockOwnerDeletion is refused by admission to whoever may not update
  `canarydeployments/finalizers` (why deploy/rbac.yaml grants it);
- a `<stable>-canary` Deployment or `<ingress>-canary` Ingress that is not ours
  is refused (`Ready=False, reason=ForeignObject`, a Warning Event) and never
  changed or deleted, not even when the CanaryDeployment is deleted.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import pytest
from kubernetes.aio import client
from kubernetes.aio.client.exceptions import ApiException

from adapters.kube.controller import FOREIGN, RolloutRouters, owner_reference
from adapters.kube.models import CanaryDeployment
from adapters.traffic.errors import TrafficObjectError
from adapters.traffic.nginx_ingress import NginxIngressRouter
from engine.ports import RolloutRef
from tests.cluster.controlplane import CONTROLLER_USER, ControlPlane
from tests.cluster.fixtures import api_client
from tests.cluster.kube import eventually, settled_requests
from tests.kube.test_controller import (
    CD,
    DEPLOYMENTS,
    Cluster,
    canary,
    policy_dir,  # noqa: F401  (a fixture)
    running,
)
from tests.kube.test_deletion import (
    SLOW_STEPS,
    OwnedRig,
    at_weight,
    cluster,  # noqa: F401  (a fixture)
)

MANAGED_BY = "app.kubernetes.io/managed-by"
JsonObject = dict[str, Any]


def ours(obj: JsonObject, owner: JsonObject) -> bool:
    meta = obj["metadata"]
    refs = [
        (r["kind"], r["name"], r["uid"], r.get("controller"), r.get("blockOwnerDeletion"))
        for r in meta.get("ownerReferences") or []
    ]
    wanted = ("CanaryDeployment", owner["metadata"]["name"], owner["metadata"]["uid"], True, True)
    return (meta.get("labels") or {}).get(MANAGED_BY) == "codedance" and refs == [wanted]


def foreign_deployment(namespace: str) -> JsonObject:
    labels = {"app": "someone-else"}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web-canary", "namespace": namespace, "labels": labels},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "x", "image": "x:1"}]},
            },
        },
    }


def ingress(name: str, namespace: str, service: str, labels: dict[str, str] | None = None) -> Any:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": {"name": name, "namespace": namespace, "labels": labels or {}},
        "spec": {
            "ingressClassName": "nginx",
            "rules": [
                {
                    "host": "shop.example.com",
                    "http": {
                        "paths": [
                            {
                                "path": "/",
                                "pathType": "Prefix",
                                "backend": {"service": {"name": service, "port": {"number": 80}}},
                            }
                        ]
                    },
                }
            ],
        },
    }


@pytest.mark.asyncio
async def test_the_canary_is_owned_and_collected_with_its_release(
    cluster: Cluster,  # noqa: F811
    controller_api: client.ApiClient,
    policy_dir: Path,  # noqa: F811
) -> None:
    async with running(OwnedRig(controller_api, policy_dir, cluster.namespace)):
        await cluster.create(canary(strategy=SLOW_STEPS))
        await at_weight(cluster, 30)
        release = await cluster.read(CD, "web-release")
        dep = await cluster.read(DEPLOYMENTS, "web-canary")
        assert release is not None and dep is not None
        assert ours(dep, release), dep["metadata"]
    # the controller is stopped: the CanaryDeployment goes without its finalizer
    await cluster.drop_finalizers()
    await cluster.objects.delete("codedance.io/v1alpha1", "CanaryDeployment", "web-release")

    async def collected() -> bool:
        return await cluster.read(DEPLOYMENTS, "web-canary") is None

    await eventually(collected, timeout=60, every=0.1)
    assert await cluster.read(DEPLOYMENTS, "web") is not None


@pytest.mark.asyncio
async def test_block_owner_deletion_needs_update_on_the_finalizers(
    cluster: Cluster,  # noqa: F811
    control_plane: ControlPlane,
) -> None:
    """The admission plugin is on: without the finalizers grant, blockOwnerDeletion is refused."""
    release = await cluster.create(canary())
    user = f"creator-{secrets.token_hex(3)}"
    rbac = client.RbacAuthorizationV1Api(cluster.admin)
    rule = {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["create"]}
    await rbac.create_namespaced_role(
        cluster.namespace, {"metadata": {"name": user}, "rules": [rule]}
    )
    await rbac.create_namespaced_role_binding(
        cluster.namespace,
        {
            "metadata": {"name": user},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": user},
            "subjects": [{"kind": "User", "name": user, "apiGroup": "rbac.authorization.k8s.io"}],
        },
    )
    owner = owner_reference(CanaryDeployment.model_validate(release))
    async with await api_client(control_plane, "admin") as api:
        api.set_default_header("Impersonate-User", user)
        apps = client.CustomObjectsApi(api)
        body = foreign_deployment(cluster.namespace)
        body["metadata"]["ownerReferences"] = [owner]
        with pytest.raises(ApiException) as refused:
            await apps.create_namespaced_custom_object(
                *DEPLOYMENTS[:2], cluster.namespace, "deployments", body
            )
        assert refused.value.status == 403
        assert "blockOwnerDeletion" in str(refused.value.body)
        body["metadata"]["ownerReferences"] = [{**owner, "blockOwnerDeletion": False}]
        await apps.create_namespaced_custom_object(
            *DEPLOYMENTS[:2], cluster.namespace, "deployments", body
        )


@pytest.mark.asyncio
async def test_a_foreign_canary_deployment_is_refused_and_left_alone(
    cluster: Cluster,  # noqa: F811
    controller_api: client.ApiClient,
    policy_dir: Path,  # noqa: F811
) -> None:
    before = await cluster.create(foreign_deployment(cluster.namespace))
    async with running(OwnedRig(controller_api, policy_dir, cluster.namespace)):
        await cluster.create(canary())

        async def refused() -> JsonObject | None:
            conditions = (await cluster.status()).get("conditions") or []
            ready = next((c for c in conditions if c["type"] == "Ready"), None)
            return ready if ready and ready.get("reason") == FOREIGN else None

        ready = await eventually(refused, every=0.05)
        assert ready["status"] == "False"
        assert "Deployment" in ready["message"] and "web-canary" in ready["message"]
        assert "not managed by codedance" in ready["message"]

        async def warned() -> list[tuple[str, str, str]]:
            return [e for e in await cluster.events_of() if e[1] == FOREIGN]

        ((kind, _, message),) = await eventually(warned, every=0.05)
        assert kind == "Warning" and "web-canary" in message

        await cluster.objects.delete("codedance.io/v1alpha1", "CanaryDeployment", "web-release")

        async def gone() -> bool:
            return await cluster.read(CD, "web-release") is None

        await eventually(gone, every=0.05)
    after = await cluster.read(DEPLOYMENTS, "web-canary")
    assert after is not None, "the foreign Deployment was deleted"
    assert after["spec"] == before["spec"]
    assert after["metadata"].get("ownerReferences") is None
    assert (after["metadata"].get("labels") or {}) == {"app": "someone-else"}
    # the controller only ever read it (its resourceVersion moves with the
    # Deployment controller's status writes, so the audit log is the witness)
    requests = await settled_requests(
        cluster.plane, controller_api, CONTROLLER_USER, cluster.namespace
    )
    touched = {e.verb for e in requests if e.resource == "deployments" and e.name == "web-canary"}
    assert touched == {"get"}, touched


@pytest.mark.asyncio
async def test_the_nginx_canary_ingress_is_owned_and_a_foreign_one_left_alone(
    cluster: Cluster,  # noqa: F811
    controller_api: client.ApiClient,
) -> None:
    release = await cluster.create(canary())
    owner = owner_reference(CanaryDeployment.model_validate(release))
    ns = cluster.namespace
    await cluster.create(ingress("shop", ns, "web"))
    ref = RolloutRef(ns, "web-release", "web", "web-canary", "web")
    router = NginxIngressRouter(
        controller_api, ingress="shop", canary_service="web-canary", owner=owner
    )
    assert await router.foreign(ref) is None
    await router.set_weight(ref, 10)
    made = await cluster.objects.read("networking.k8s.io/v1", "Ingress", "shop-canary")
    assert made is not None and ours(made, release), made["metadata"]
    await router.remove(ref)
    assert await cluster.objects.read("networking.k8s.io/v1", "Ingress", "shop-canary") is None

    # someone else's shop-canary: named, never written, never deleted
    theirs = await cluster.create(ingress("shop-canary", ns, "other"))
    found = await router.foreign(ref)
    assert found is not None and "shop-canary" in found and "not managed by codedance" in found
    with pytest.raises(TrafficObjectError):
        await router.set_weight(ref, 10)
    routers = RolloutRouters()
    routers.set(f"{ns}/web-release", router)
    await routers.remove(ref)  # what a rollback calls: skipped, not raised for ever
    after = await cluster.objects.read("networking.k8s.io/v1", "Ingress", "shop-canary")
    assert after is not None
    assert after["metadata"]["resourceVersion"] == theirs["metadata"]["resourceVersion"]

    # ours by label, but another release's: foreign too
    other = {**owner, "name": "another-release", "uid": "00000000-0000-0000-0000-000000000000"}
    assert other["uid"] != owner["uid"]
    someone = NginxIngressRouter(
        controller_api, ingress="shop", canary_service="web-canary", owner=other
    )
    await cluster.objects.delete("networking.k8s.io/v1", "Ingress", "shop-canary")
    await router.set_weight(ref, 10)
    found = await someone.foreign(ref)
    assert found is not None and "owned by CanaryDeployment web-release" in found
