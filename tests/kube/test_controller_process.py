"""`codedance controller` as a real process on the real control plane, from start to SIGTERM.

The command runs as a subprocess with the controller's kubeconfig (its
ServiceAccount, exactly deploy/rbac.yaml's rights), watching the test's
namespace, holding a Lease of its own name in `codedance` (as the Deployment
runs it: POD_NAME and POD_NAMESPACE set), and reading a policy directory
holding rules/demo.rules. The real Deployment controller and the fake nodes
run the pods. The release skips analysis, so no metric source is asked.
What a user sees: the health endpoints, the Lease, the CanaryDeployment's
status, the HTTPRoute, the Deployment, Events, a clean exit on SIGTERM that
gives the Lease up, and (from the API server's audit log) no request of the
controller refused.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shutil
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from kubernetes.aio import client
from kubernetes.aio.client.exceptions import ApiException

from adapters.kube.lease import GROUP as LEASE_GROUP
from adapters.kube.lease import PLURAL as LEASES
from adapters.kube.lease import VERSION as LEASE_VERSION
from codedance import controller_cmd
from tests.cluster.controlplane import CONTROLLER_NAMESPACE, CONTROLLER_USER, ControlPlane
from tests.cluster.kube import Objects, audit_events, eventually

ROOT = Path(__file__).resolve().parents[2]
NAME = "web-release"
IDENTITY = "controller-0"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stable() -> dict[str, Any]:
    labels = {"app": "web", "codedance.io/track": "stable"}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web", "labels": {"app": "web"}},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "web", "image": "web:1"}]},
            },
        },
    }


def service(name: str, track: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name},
        "spec": {
            "selector": {"app": "web", "codedance.io/track": track},
            "ports": [{"port": 80}],
        },
    }


def http_route() -> dict[str, Any]:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "web"},
        "spec": {
            "parentRefs": [{"name": "gateway"}],
            "rules": [{"backendRefs": [{"name": "web", "port": 80}]}],
        },
    }


def release() -> dict[str, Any]:
    return {
        "apiVersion": "codedance.io/v1alpha1",
        "kind": "CanaryDeployment",
        "metadata": {"name": NAME},
        "spec": {
            "targetRef": {"name": "web"},
            "version": {"images": {"web": "web:2"}},
            "strategy": {
                "type": "steps",
                "steps": [50],
                "stepDuration": "1s",
                "scaleDownDelay": "0s",
            },
            "traffic": {"provider": "gateway-api", "service": "web", "httpRoute": "web"},
            "policy": {"name": "demo"},
            "analysis": {"interval": "1s"},
            "skipAnalysis": True,
        },
    }


class Process:
    def __init__(self, proc: asyncio.subprocess.Process, port: int, log: Path, lease: str) -> None:
        self.proc = proc
        self.base = f"http://127.0.0.1:{port}"
        self.log = log
        self.lease = lease

    def tail(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")[-3000:]

    def alive(self, during: str) -> None:
        if self.proc.returncode is not None:
            pytest.fail(f"the controller exited {during}:\n{self.tail()}")

    async def get(self, path: str) -> int:
        """The status of GET `path`, 0 while nothing answers."""
        try:
            async with (
                aiohttp.ClientSession() as session,
                session.get(self.base + path) as response,
            ):
                return response.status
        except aiohttp.ClientError:
            return 0


@pytest_asyncio.fixture
async def controller(
    admin_api: client.ApiClient,
    namespace: str,
    kubeconfig_as: Callable[[str, str], Path],
    tmp_path: Path,
) -> AsyncIterator[Process]:
    policies = tmp_path / "policies"
    policies.mkdir()
    shutil.copy(ROOT / "rules" / "demo.rules", policies / "demo.rules")
    port = free_port()
    lease = f"test-controller-{secrets.token_hex(4)}"  # no other test's Lease
    env = dict(os.environ, POD_NAME=IDENTITY, POD_NAMESPACE=CONTROLLER_NAMESPACE)
    log = tmp_path / "controller.log"
    # its log goes to a file: a pipe nobody reads could fill up and stall it
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "codedance.cli", "controller",
            "--kubeconfig", str(kubeconfig_as("controller", namespace)),
            "--namespace", namespace,
            "--lease-name", lease,
            "--policies", str(policies),
            "--listen", f"127.0.0.1:{port}",
            cwd=ROOT, env=env, stdout=out, stderr=out,
        )  # fmt: skip
    try:
        yield Process(proc, port, log, lease)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        try:
            await client.CustomObjectsApi(admin_api).delete_namespaced_custom_object(
                LEASE_GROUP, LEASE_VERSION, CONTROLLER_NAMESPACE, LEASES, lease
            )
        except ApiException as error:
            if error.status != 404:
                raise


@pytest.mark.asyncio
async def test_the_command_runs_a_release_to_succeeded_and_stops_on_sigterm(
    admin_api: client.ApiClient,
    namespace: str,
    control_plane: ControlPlane,
    controller: Process,
) -> None:
    objects = Objects(admin_api, namespace)
    await objects.create(stable())
    await objects.create(service("web", "stable"))
    await objects.create(service("web-canary", "canary"))
    await objects.create(http_route())

    async def holder() -> str:
        lease = await objects.read(
            f"{LEASE_GROUP}/{LEASE_VERSION}", "Lease", controller.lease, CONTROLLER_NAMESPACE
        )
        return "" if lease is None else str(lease["spec"].get("holderIdentity") or "")

    async def ready() -> bool:
        controller.alive("early")
        return await controller.get("/readyz") == 200

    await eventually(ready, timeout=15)
    assert await controller.get("/healthz") == 200
    assert await holder() == IDENTITY

    await objects.create(release())

    async def succeeded() -> bool:
        controller.alive("during the release")
        obj = await objects.read("codedance.io/v1alpha1", "CanaryDeployment", NAME)
        return obj is not None and (obj.get("status") or {}).get("phase") == "Succeeded"

    await eventually(succeeded, timeout=30)  # a few seconds here

    route = await objects.read("gateway.networking.k8s.io/v1", "HTTPRoute", "web")
    assert route is not None
    refs = [ref for rule in route["spec"]["rules"] for ref in rule["backendRefs"]]
    assert [r["name"] for r in refs] == ["web"]
    assert refs[0].get("weight", 1) > 0
    deployment = await objects.read("apps/v1", "Deployment", "web")
    assert deployment is not None
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == "web:2"

    async def reasons() -> list[str]:
        events = await objects.list("v1", "Event")
        found = [e["reason"] for e in events if e["involvedObject"]["name"] == NAME]
        return found if {"Progressing", "Succeeded"} <= set(found) else []

    await eventually(reasons, timeout=10)

    # everything it asked of the API server, in the test's namespace and of its Lease, was allowed
    lease = controller.lease
    refused = [
        (e.verb, e.resource, e.subresource, e.code)
        for e in audit_events(control_plane.audit_log, CONTROLLER_USER)
        if (e.namespace == namespace or (e.namespace, e.name) == (CONTROLLER_NAMESPACE, lease))
        and e.code in (401, 403)
    ]
    assert refused == []

    controller.proc.send_signal(signal.SIGTERM)
    async with asyncio.timeout(5):
        code = await controller.proc.wait()
    assert code == 0, controller.tail()
    # it gave the Lease up on the way out, so another replica need not wait for it
    assert await holder() == ""


def test_the_lease_lives_in_the_controllers_own_namespace_not_the_watched_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """deploy/rbac.yaml grants the Lease verbs in `codedance` only (a Role there)."""

    def parse(*argv: str) -> argparse.Namespace:
        parser = argparse.ArgumentParser()
        controller_cmd.add_command(parser.add_subparsers())
        return parser.parse_args(["controller", *argv])

    monkeypatch.delenv("POD_NAMESPACE", raising=False)
    monkeypatch.setattr(controller_cmd, "SERVICE_ACCOUNT_NAMESPACE", Path("/nonexistent"))
    args = parse("--namespace", "shop")
    assert (controller_cmd.lease_namespace(args), args.lease_name) == (
        CONTROLLER_NAMESPACE,
        "codedance-controller",
    )
    monkeypatch.setenv("POD_NAMESPACE", "ops")
    assert controller_cmd.lease_namespace(args) == "ops"
    args = parse("--lease-namespace", "x", "--lease-name", "y")
    assert (controller_cmd.lease_namespace(args), args.lease_name) == ("x", "y")
