"""The local control plane is a real one: the version, the APIs, the controllers, RBAC, fake nodes.

These are the behaviours the rest of the Kubernetes tests rely on; each one
would fail on our old API double (no Deployment controller, no EndpointSlices,
no RBAC, no garbage collection).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from kubernetes.aio import client
from kubernetes.aio.client.exceptions import ApiException

from tests.cluster import binaries
from tests.cluster.controlplane import ROOT, ControlPlane


async def eventually(check: Callable[[], Awaitable[Any]], timeout: float = 30.0) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = await check()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not true within {timeout}s: {check}")
        await asyncio.sleep(0.1)


def deployment(name: str, replicas: int = 2, annotations: dict[str, str] | None = None) -> Any:
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels, "annotations": annotations or {}},
                "spec": {"containers": [{"name": name, "image": f"{name}:1"}]},
            },
        },
    }


@pytest.mark.asyncio
async def test_version_and_codedance_api(admin_api: client.ApiClient) -> None:
    version = await client.VersionApi(admin_api).get_code()
    assert version.git_version == binaries.kubernetes_version()
    groups = await client.ApisApi(admin_api).get_api_versions()
    names = {group.name: [v.version for v in group.versions] for group in groups.groups}
    assert "v1alpha1" in names["codedance.io"]
    assert "gateway.networking.k8s.io" in names
    assert "networking.istio.io" in names


@pytest.mark.asyncio
async def test_deployment_becomes_available_with_endpoints(
    admin_api: client.ApiClient, namespace: str
) -> None:
    apps, core = client.AppsV1Api(admin_api), client.CoreV1Api(admin_api)
    await apps.create_namespaced_deployment(namespace, deployment("web", 3))
    await core.create_namespaced_service(
        namespace,
        {
            "metadata": {"name": "web"},
            "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]},
        },
    )

    async def available() -> bool:
        status = (await apps.read_namespaced_deployment("web", namespace)).status
        return status.available_replicas == 3 and status.updated_replicas == 3

    await eventually(available)
    discovery = client.DiscoveryV1Api(admin_api)

    async def endpoints() -> list[str]:
        slices = await discovery.list_namespaced_endpoint_slice(
            namespace, label_selector="kubernetes.io/service-name=web"
        )
        return [
            address
            for item in slices.items
            for endpoint in item.endpoints or []
            if endpoint.conditions.ready
            for address in endpoint.addresses
        ]

    assert len(await eventually(endpoints)) == 3


@pytest.mark.asyncio
async def test_faults_from_annotations(admin_api: client.ApiClient, namespace: str) -> None:
    apps, core = client.AppsV1Api(admin_api), client.CoreV1Api(admin_api)
    fault = "fakelet.codedance.io/fault"
    await apps.create_namespaced_deployment(namespace, deployment("crash", 1, {fault: "crash"}))
    await apps.create_namespaced_deployment(
        namespace, deployment("never", 1, {fault: "never-ready"})
    )

    async def pod(app: str) -> Any:
        pods = (await core.list_namespaced_pod(namespace, label_selector=f"app={app}")).items
        return pods[0] if pods and pods[0].status.container_statuses else None

    async def restarting() -> bool:
        found = await pod("crash")
        return bool(found and found.status.container_statuses[0].restart_count >= 2)

    await eventually(restarting)
    never = await eventually(lambda: pod("never"))
    assert never.status.phase in ("Pending", "Running")
    await asyncio.sleep(0.5)
    never = await pod("never")
    assert never.status.phase == "Running"
    assert not never.status.container_statuses[0].ready


@pytest.mark.asyncio
async def test_rbac_is_enforced(control_plane: ControlPlane, namespace: str) -> None:
    from tests.cluster.fixtures import api_client

    async with await api_client(control_plane, "alice") as api:
        apps = client.AppsV1Api(api)
        await apps.list_namespaced_deployment(namespace)
        with pytest.raises(ApiException) as refused:
            await apps.delete_namespaced_deployment("web", namespace)
        assert refused.value.status == 403


@pytest.mark.asyncio
async def test_garbage_collection_and_namespace_deletion(admin_api: client.ApiClient) -> None:
    from tests.cluster.fixtures import create_namespace

    core, apps = client.CoreV1Api(admin_api), client.AppsV1Api(admin_api)
    name = "t-gc-ns"
    await create_namespace(admin_api, name)
    await apps.create_namespaced_deployment(name, deployment("web", 2))

    async def pods() -> int:
        return len((await core.list_namespaced_pod(name)).items)

    await eventually(lambda: pods())
    await apps.delete_namespaced_deployment("web", name)
    await eventually(lambda: _zero(pods))
    await apps.create_namespaced_deployment(name, deployment("web", 2))
    await eventually(lambda: pods())
    await core.delete_namespace(name)

    async def gone() -> bool:
        try:
            await core.read_namespace(name)
        except ApiException as error:
            return error.status == 404
        return False

    await eventually(gone, timeout=60)


async def _zero(count: Callable[[], Awaitable[int]]) -> bool:
    return await count() == 0


def test_scripts_cluster_up_env_down(tmp_path: Any) -> None:
    """The user command: up prints a kubeconfig the Python client can use; down leaves nothing."""
    if binaries.built() is None:
        pytest.skip(f"no local control plane built: {binaries.INSTALL_HINT}")
    state = ROOT / ".cluster"
    if (state / "state.json").exists():
        pytest.skip("a control plane started by scripts/cluster is running here")
    python = sys.executable
    up = subprocess.run(
        [python, "-m", "tests.cluster", "up", "--nodes", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    try:
        assert up.returncode == 0, up.stderr
        kubeconfig = up.stdout.strip().splitlines()[-1]
        probe = (
            "import asyncio, sys\n"
            "from kubernetes.aio import client, config\n"
            "async def main():\n"
            "    c = client.Configuration()\n"
            f"    await config.load_kube_config(config_file={kubeconfig!r},\n"
            "                                  client_configuration=c)\n"
            "    async with client.ApiClient(c) as api:\n"
            "        print((await client.VersionApi(api).get_code()).git_version)\n"
            "        r = await client.CustomObjectsApi(api).list_cluster_custom_object("
            "'codedance.io', 'v1alpha1', 'canarydeployments')\n"
            "        print(len(r['items']))\n"
            "asyncio.run(main())\n"
        )
        seen = subprocess.run(
            [python, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        assert seen.stdout.split() == [binaries.kubernetes_version(), "0"], seen.stderr
        env = subprocess.run(
            [python, "-m", "tests.cluster", "env"], cwd=ROOT, capture_output=True, text=True
        )
        assert f"export KUBECONFIG={kubeconfig}" in env.stdout
        plane = ControlPlane.load(state)
        assert plane is not None
        pids = dict(plane.pids)
    finally:
        down = subprocess.run(
            [python, "-m", "tests.cluster", "down"], cwd=ROOT, capture_output=True, text=True
        )
    assert down.returncode == 0, down.stderr
    from tests.cluster.controlplane import pid_alive

    assert [name for name, pid in pids.items() if pid_alive(pid)] == []
    assert not state.exists()
