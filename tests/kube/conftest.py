"""Fixtures for tests against the Kubernetes API double (tests/kube/apiserver.py).

- `apiserver`: a fresh double per test on 127.0.0.1, with the resources Codedance
  uses registered and their schemas enforced; at teardown the test fails if the
  double itself broke (an internal error) or a reactor a test installed raised.
- `kube_client`: a `kubernetes.aio.client.ApiClient` whose Configuration points
  at the double over plain HTTP.
- `kubeconfig` / `kubeconfig_client`: the same through the real loading path, a
  kubeconfig file in the test's tmp_path read by `config.load_kube_config`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
import yaml
from kubernetes.aio import client, config

from tests.kube.apiserver import ApiServer, register_standard_resources

NAMESPACE = "default"
USER = "tester"


@pytest_asyncio.fixture
async def apiserver() -> AsyncIterator[ApiServer]:
    async with ApiServer() as server:
        register_standard_resources(server)
        yield server
        internal = list(server.errors)
        if internal or server.reactor_errors:
            pytest.fail(f"the API double failed: {internal + server.reactor_errors!r}")


def server_url(apiserver: ApiServer) -> str:
    return str(apiserver.url).rstrip("/")


@pytest_asyncio.fixture
async def kube_client(apiserver: ApiServer) -> AsyncIterator[client.ApiClient]:
    configuration = client.Configuration(host=server_url(apiserver))
    async with client.ApiClient(configuration) as api:
        yield api


@pytest.fixture
def kubeconfig(apiserver: ApiServer, tmp_path: Path) -> Path:
    """A kubeconfig file whose current context is the double, as a user would have."""
    path = tmp_path / "kubeconfig"
    document = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "double", "cluster": {"server": server_url(apiserver)}}],
        "users": [{"name": USER, "user": {"token": "test-token"}}],
        "contexts": [
            {
                "name": "double",
                "context": {"cluster": "double", "user": USER, "namespace": NAMESPACE},
            }
        ],
        "current-context": "double",
    }
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    return path


@pytest_asyncio.fixture
async def kubeconfig_client(kubeconfig: Path) -> AsyncIterator[client.ApiClient]:
    configuration = client.Configuration()
    await config.load_kube_config(  # type: ignore[no-untyped-call]
        config_file=str(kubeconfig), client_configuration=configuration, persist_config=False
    )
    async with client.ApiClient(configuration) as api:
        yield api
