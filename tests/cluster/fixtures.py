"""pytest fixtures: one real control plane per test session, a namespace per test.

- `control_plane`: the running `ControlPlane` (session-wide). Without the built
  programs the test is skipped with the command that builds them; in CI
  (CI=true) it fails instead, since CI must run every Kubernetes test.
- `namespace`: a fresh namespace (with its `default` ServiceAccount), deleted
  after the test.
- `admin_api`, `controller_api`: `kubernetes.aio` clients as the admin and as
  the controller's ServiceAccount (exactly `deploy/rbac.yaml`'s rights).
- `kubeconfig_as(identity, namespace)`: a kubeconfig file whose context is
  that identity in that namespace, for the commands a person runs.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
import yaml
from kubernetes.aio import client, config
from kubernetes.aio.client.exceptions import ApiException

from tests.cluster import binaries
from tests.cluster.controlplane import ControlPlane


def _need_binaries() -> Path:
    found = binaries.built()
    if found is not None:
        return found
    if os.environ.get("CI") == "true":
        try:
            return binaries.build()
        except binaries.BuildError as error:
            pytest.fail(f"CI must run the Kubernetes tests, but: {error}")
    pytest.skip(f"no local control plane built: {binaries.INSTALL_HINT}")


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    plane = ControlPlane(directory=tmp_path_factory.mktemp("cluster"), bin_dir=_need_binaries())
    plane.start()
    try:
        yield plane
    finally:
        plane.stop()


async def api_client(plane: ControlPlane, identity: str) -> client.ApiClient:
    configuration = client.Configuration()
    await config.load_kube_config(  # type: ignore[no-untyped-call]
        config_file=str(plane.kubeconfig(identity)),
        client_configuration=configuration,
        persist_config=False,
    )
    return client.ApiClient(configuration)


@pytest_asyncio.fixture
async def admin_api(control_plane: ControlPlane) -> AsyncIterator[client.ApiClient]:
    async with await api_client(control_plane, "admin") as api:
        yield api


@pytest_asyncio.fixture
async def controller_api(control_plane: ControlPlane) -> AsyncIterator[client.ApiClient]:
    async with await api_client(control_plane, "controller") as api:
        yield api


async def create_namespace(api: client.ApiClient, name: str) -> None:
    core = client.CoreV1Api(api)
    await core.create_namespace({"metadata": {"name": name, "labels": {"codedance.io/test": "1"}}})
    # pods are refused until the ServiceAccount controller made `default`
    for _ in range(300):
        try:
            await core.read_namespaced_service_account("default", name)
            return
        except ApiException as error:
            if error.status != 404:
                raise
        await asyncio.sleep(0.05)
    raise AssertionError(f"namespace {name}: no default ServiceAccount after 15s")


@pytest_asyncio.fixture
async def namespace(admin_api: client.ApiClient) -> AsyncIterator[str]:
    name = f"t-{secrets.token_hex(4)}"
    await create_namespace(admin_api, name)
    yield name
    try:
        await client.CoreV1Api(admin_api).delete_namespace(name)
    except ApiException as error:
        if error.status != 404:
            raise


@pytest.fixture
def kubeconfig_as(control_plane: ControlPlane, tmp_path: Path) -> Callable[[str, str], Path]:
    def write(identity: str, namespace: str) -> Path:
        document = yaml.safe_load(control_plane.kubeconfig(identity).read_text())
        document["contexts"][0]["context"]["namespace"] = namespace
        path = tmp_path / f"kubeconfig-{identity}-{namespace}"
        path.write_text(yaml.safe_dump(document))
        return path

    return write
