"""`codedance controller` as a real process against the API double, from start to SIGTERM.

The double runs in the test's event loop on loopback and a reactor plays the
Deployment controller; the command runs as a subprocess reading a kubeconfig
for the double and a policy directory holding rules/demo.rules. The release
skips analysis, so the metric source is never asked (the command still wants
a Prometheus URL: it gets a closed port). What a user sees: the health
endpoints, the CanaryDeployment's status, the HTTPRoute, Events, and a clean
exit on SIGTERM that gives the Lease up.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from tests.kube.apiserver import ApiServer
from tests.kube.test_controller import NS, http_route, play_deployment_controller
from tests.kube.test_controller import stable_deployment as stable

ROOT = Path(__file__).resolve().parents[2]
NAME = "web-release"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def release() -> dict[str, Any]:
    return {
        "apiVersion": "codedance.io/v1alpha1",
        "kind": "CanaryDeployment",
        "metadata": {"name": NAME, "namespace": NS},
        "spec": {
            "targetRef": {"name": "web"},
            "version": {"images": {"web": "web:2"}},
            "strategy": {"type": "steps", "steps": [50], "stepDuration": "1s"},
            "traffic": {"provider": "gateway-api", "service": "web", "httpRoute": "web"},
            "policy": {"name": "demo"},
            "analysis": {"interval": "1s"},
            "skipAnalysis": True,
        },
    }


class Process:
    def __init__(self, proc: asyncio.subprocess.Process, port: int, log: Path) -> None:
        self.proc = proc
        self.base = f"http://127.0.0.1:{port}"
        self.log = log

    def tail(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")[-3000:]

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
    apiserver: ApiServer, kubeconfig: Path, tmp_path: Path
) -> AsyncIterator[Process]:
    policies = tmp_path / "policies"
    policies.mkdir()
    shutil.copy(ROOT / "rules" / "demo.rules", policies / "demo.rules")
    port = free_port()
    env = dict(os.environ, POD_NAME="controller-0", POD_NAMESPACE=NS)
    log = tmp_path / "controller.log"
    # its log goes to a file: a pipe nobody reads could fill up and stall it
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "codedance.cli", "controller",
            "--kubeconfig", str(kubeconfig),
            "--namespace", NS,
            "--policies", str(policies),
            "--listen", f"127.0.0.1:{port}",
            cwd=ROOT, env=env, stdout=out, stderr=out,
        )  # fmt: skip
    try:
        yield Process(proc, port, log)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def until(predicate: Any, timeout: float, what: str) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not await predicate():
                await asyncio.sleep(0.1)
    except TimeoutError:
        pytest.fail(f"timed out waiting for {what}")


@pytest.mark.asyncio
async def test_the_command_runs_a_release_to_succeeded_and_stops_on_sigterm(
    apiserver: ApiServer, controller: Process
) -> None:
    play_deployment_controller(apiserver)
    apiserver.seed(stable())
    apiserver.seed(http_route())

    async def ready() -> bool:
        if controller.proc.returncode is not None:
            pytest.fail(f"the controller exited early:\n{controller.tail()}")
        return await controller.get("/readyz") == 200

    await until(ready, 15, "/readyz")
    assert await controller.get("/healthz") == 200
    lease = apiserver.read("leases", "codedance-controller", NS)
    assert lease is not None and lease["spec"]["holderIdentity"] == "controller-0"

    apiserver.seed(release())

    async def succeeded() -> bool:
        if controller.proc.returncode is not None:
            pytest.fail(f"the controller exited during the release:\n{controller.tail()}")
        obj = apiserver.read("canarydeployments", NAME, NS)
        return obj is not None and (obj.get("status") or {}).get("phase") == "Succeeded"

    await until(succeeded, 30, "phase Succeeded")  # about two seconds here

    route = apiserver.read("httproutes", "web", NS)
    assert route is not None
    refs = [ref for rule in route["spec"]["rules"] for ref in rule["backendRefs"]]
    assert [r["name"] for r in refs] == ["web"]
    assert refs[0].get("weight", 1) > 0
    deployment = apiserver.read("deployments", "web", NS)
    assert deployment is not None
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == "web:2"

    reasons = [
        e["reason"]
        for e in apiserver.list_objects("v1/events", NS)
        if e["involvedObject"]["name"] == NAME
    ]
    assert "Progressing" in reasons and "Succeeded" in reasons, reasons

    controller.proc.send_signal(signal.SIGTERM)
    async with asyncio.timeout(5):
        code = await controller.proc.wait()
    assert code == 0
    # it gave the Lease up on the way out, so another replica need not wait for it
    lease = apiserver.read("leases", "codedance-controller", NS)
    assert lease is not None and lease["spec"]["holderIdentity"] == ""
