"""Deletion always finishes, on the real control plane.

The controller runs in-process as its ServiceAccount (exactly deploy/rbac.yaml's
rights), wired as `codedance controller` wires it, canaries owned by their
CanaryDeployment included (`OwnedRig`). A release is stopped midway by what
users and clusters really do: the HTTPRoute is deleted before the
CanaryDeployment, or the whole namespace is deleted and the namespace
controller deletes everything in the order it likes. Either way the
CanaryDeployment goes, within the restore bound, with a Warning Event.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from kubernetes.aio import client
from kubernetes.aio.client.exceptions import ApiException

from adapters.kube.controller import ROUTE_GONE, Controller, owner_reference
from adapters.kube.models import CanaryDeployment
from adapters.kube.workloads import KubeWorkloads
from tests.cluster.controlplane import ControlPlane
from tests.cluster.kube import eventually
from tests.kube.test_controller import (
    CD,
    DEPLOYMENTS,
    HEALTHY,
    ROUTES,
    Cluster,
    Rig,
    canary,
    policy_dir,  # noqa: F401  (a fixture)
    route_weight,
    running,
    seed,
)

RESTORE_TIMEOUT = 3.0
SLOW_STEPS = {"type": "steps", "steps": [30, 60], "stepDuration": "1h"}


class OwnedRig(Rig):
    """`Rig`, with the canary owned by its CanaryDeployment and a short restore bound."""

    def __init__(self, api: client.ApiClient, policies: Path, namespace: str) -> None:
        super().__init__(api, policies, HEALTHY, namespace)
        old = self.controller

        def workloads_for(cd: CanaryDeployment) -> KubeWorkloads:
            version = cd.spec.version
            return KubeWorkloads(
                api,
                images=version.images,
                pod_template_patch=version.pod_template_patch,
                clock=self.clock,
                poll_every=0.05,
                ready_timeout=30,
                owner=owner_reference(cd),
            )

        self.controller = Controller(
            api,
            engine=self.engine,
            policies=self.policies,
            routers=old.routers,
            workloads=old.workloads,
            router_for=old._router_for,
            workloads_for=workloads_for,
            audit=old.audit,
            clock=self.clock,
            namespace=namespace,
            retry_after=0.05,
            restore_timeout=RESTORE_TIMEOUT,
        )


@pytest_asyncio.fixture
async def cluster(
    admin_api: client.ApiClient, namespace: str, control_plane: ControlPlane
) -> AsyncIterator[Cluster]:
    view = Cluster(admin_api, namespace, control_plane)
    await seed(view)
    yield view
    await view.drop_finalizers()


async def at_weight(cluster: Cluster, weight: int) -> None:
    async def reached() -> bool:
        route = await cluster.read(ROUTES, "web")
        return route is not None and route_weight(route) == weight

    await eventually(reached, every=0.05)


@pytest.mark.asyncio
async def test_deleting_a_release_whose_httproute_went_first_finishes_with_a_warning(
    cluster: Cluster,
    controller_api: client.ApiClient,
    policy_dir: Path,  # noqa: F811
) -> None:
    async with running(OwnedRig(controller_api, policy_dir, cluster.namespace)):
        await cluster.create(canary(strategy=SLOW_STEPS))
        await at_weight(cluster, 30)
        await cluster.objects.delete("gateway.networking.k8s.io/v1", "HTTPRoute", "web")
        loop = asyncio.get_running_loop()
        started = loop.time()
        await cluster.objects.delete("codedance.io/v1alpha1", "CanaryDeployment", "web-release")

        async def gone() -> bool:
            return await cluster.read(CD, "web-release") is None

        # a 404 is nothing to restore: no waiting for the bound at all
        await eventually(gone, timeout=RESTORE_TIMEOUT, every=0.05)
        assert loop.time() - started < RESTORE_TIMEOUT

        async def warned() -> list[str]:
            events = await cluster.events_of()
            return [m for kind, reason, m in events if kind == "Warning" and reason == ROUTE_GONE]

        (message,) = await eventually(warned, every=0.05)
        assert "HTTPRoute" in message and "web" in message and "not found" in message

        async def canary_retired() -> bool:
            return await cluster.read(DEPLOYMENTS, "web-canary") is None

        await eventually(canary_retired, every=0.05)
        stable = await cluster.read(DEPLOYMENTS, "web")
        assert stable is not None and stable["metadata"].get("deletionTimestamp") is None


@pytest.mark.asyncio
async def test_deleting_the_namespace_mid_release_completes(
    cluster: Cluster,
    controller_api: client.ApiClient,
    policy_dir: Path,  # noqa: F811
) -> None:
    core = client.CoreV1Api(cluster.admin)
    async with running(OwnedRig(controller_api, policy_dir, cluster.namespace)):
        await cluster.create(canary(strategy=SLOW_STEPS))
        await at_weight(cluster, 30)
        await core.delete_namespace(cluster.namespace)

        async def namespace_gone() -> bool:
            try:
                await core.read_namespace(cluster.namespace)
            except ApiException as error:
                if error.status == 404:
                    return True
                raise
            return False

        # the namespace controller deletes in passes (10 s sync period here), and
        # the finalizer may have to wait out the restore bound
        await eventually(namespace_gone, timeout=90, every=0.2)
