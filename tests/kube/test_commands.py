"""Manual control on the real control plane: `codedance status` and the commands, run by people.

The controller runs in the test's event loop as its ServiceAccount
(`controller_api`, exactly deploy/rbac.yaml's rights), wired as `codedance
controller` wires it, with a `ReplaySource` for metrics and an in-memory
audit log; the real Deployment controller and the fake nodes run the pods.
The command line runs through `codedance.cli.main` in a thread of its own
(it has its own event loop) with a person's kubeconfig, as a terminal would:
bob (the approver) for the commands and `status`, alice (the releaser), and
people with no rights at all. The test reads what a user would, as admin,
and what each person really asked of the API server from its audit log.

Who the audit line and the Event name today: the *kubeconfig's user name*
(the `user` of its current context), which the command writes into the
annotation. The API server authenticates the token, not that name; the test
pins the name as it is (a later change records the authenticated user).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import yaml
from kubernetes.aio import client
from kubernetes.aio.client.exceptions import ApiException

from adapters.kube.commands import COMMAND, HANDLED, Command, command_patch, pending
from adapters.traffic.gateway_api import canary_weights
from codedance.cli import main
from codedance.control_cmd import kubeconfig_user
from tests.cluster.controlplane import ControlPlane
from tests.cluster.kube import Objects, audit_events, eventually
from tests.kube.test_controller import (
    HEALTHY,
    Rig,
    canary,
    http_route,
    running,
    stable_deployment,
)

POLICY = "latency: p99 > 300ms for 1s -> rollback\n"
MANUAL = {  # weights 5, 10, 25
    "type": "manual",
    "stepDuration": "200ms",
    "maxWeight": 25,
    "scaleDownDelay": "0s",
}
HOUR = {"type": "steps", "steps": [20, 40], "stepDuration": "1h", "scaleDownDelay": "0s"}
CD = "codedance.io/v1alpha1", "CanaryDeployment"
NAME = "web-release"

JsonObject = dict[str, Any]
Kubeconfig = Callable[[str, str], Path]


async def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = await asyncio.to_thread(main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def release(**spec: Any) -> JsonObject:
    """The CanaryDeployment NAME, in the namespace `Cluster.create` gives it."""
    body = canary(NAME, **spec)
    del body["metadata"]["namespace"]
    return body


class Cluster:
    """What a user sees in the test's namespace, read as admin."""

    def __init__(self, admin: client.ApiClient, namespace: str, plane: ControlPlane) -> None:
        self.admin = admin
        self.namespace = namespace
        self.plane = plane
        self.objects = Objects(admin, namespace)

    async def create(self, obj: JsonObject) -> JsonObject:
        return await self.objects.create(obj)

    async def release(self) -> JsonObject:
        obj = await self.objects.read(*CD, NAME)
        assert obj is not None
        return obj

    async def status(self) -> JsonObject:
        return dict((await self.release()).get("status") or {})

    async def until(self, check: Callable[[JsonObject], bool], timeout: float = 30) -> JsonObject:
        """The status, once `check(status)` holds."""

        async def reached() -> JsonObject | None:
            status = await self.status()
            return status if check(status) else None

        found: JsonObject = await eventually(reached, timeout=timeout, every=0.05)
        return found

    async def until_phase(self, phase: str, timeout: float = 30) -> JsonObject:
        return await self.until(lambda s: s.get("phase") == phase, timeout)

    async def handled(self) -> JsonObject | None:
        text = ((await self.release())["metadata"].get("annotations") or {}).get(HANDLED)
        return json.loads(text) if text else None

    async def events(self) -> list[tuple[str, str, str]]:
        listed = await client.CoreV1Api(self.admin).list_namespaced_event(
            self.namespace, field_selector=f"involvedObject.name={NAME}"
        )
        ordered = sorted(listed.items, key=lambda e: int(e.metadata.resource_version or 0))
        return [(str(e.type), str(e.reason), str(e.message)) for e in ordered]

    async def until_event(self, check: Callable[[str, str, str], bool]) -> list[Any]:
        async def seen() -> list[Any]:
            return [e for e in await self.events() if check(*e)]

        found: list[Any] = await eventually(seen, timeout=10)
        return found

    async def route_weights(self) -> list[int]:
        route = await self.objects.read("gateway.networking.k8s.io/v1", "HTTPRoute", "web")
        assert route is not None
        return canary_weights(route, "web", "web-canary")

    def requests_of(self, user: str) -> list[tuple[str, str, str, int]]:
        """What `user` asked of the API server in this namespace: (verb, resource, name, code)."""
        return [
            (e.verb, e.resource, e.name, e.code)
            for e in audit_events(self.plane.audit_log, user)
            if e.namespace == self.namespace
        ]

    async def drop_finalizers(self) -> None:
        """After the controller stopped: let the namespace's deletion finish."""
        with contextlib.suppress(ApiException):
            if await self.objects.read(*CD, NAME) is not None:
                await self.objects.patch(*CD, NAME, {"metadata": {"finalizers": None}})


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "policies"
    directory.mkdir()
    (directory / "latency.rules").write_text(POLICY, encoding="utf-8")
    return directory


@pytest_asyncio.fixture
async def cluster(
    admin_api: client.ApiClient, namespace: str, control_plane: ControlPlane
) -> AsyncIterator[Cluster]:
    view = Cluster(admin_api, namespace, control_plane)
    await view.create(stable_deployment(namespace=namespace))
    await view.create(http_route(namespace=namespace))
    yield view
    await view.drop_finalizers()


@pytest_asyncio.fixture
async def rig(
    cluster: Cluster, controller_api: client.ApiClient, policy_dir: Path
) -> AsyncIterator[Rig]:
    async with running(Rig(controller_api, policy_dir, HEALTHY, cluster.namespace)) as rig:
        yield rig


@pytest.fixture
def bob(kubeconfig_as: Kubeconfig, namespace: str) -> str:
    """bob's kubeconfig (the approver), its context in the test's namespace."""
    return str(kubeconfig_as("bob", namespace))


async def nobody(cluster: Cluster, tmp_path: Path, bob: str) -> str:
    """A kubeconfig for a ServiceAccount with no rights at all (a token the server accepts)."""
    core = client.CoreV1Api(cluster.admin)
    account = client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="eve"))
    await core.create_namespaced_service_account(cluster.namespace, account)
    request = await core.create_namespaced_service_account_token(
        "eve",
        cluster.namespace,
        client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=600)
        ),
    )
    assert request.status is not None
    return kubeconfig_with(tmp_path / "kubeconfig-eve", bob, user="eve", token=request.status.token)


def kubeconfig_with(path: Path, base: str, *, user: str, token: str | None = None) -> str:
    """`base` with its user renamed to `user` (and its token replaced, if given)."""
    document = yaml.safe_load(Path(base).read_text())
    entry = document["users"][0]
    entry["name"] = user
    if token is not None:
        entry["user"]["token"] = token
    document["contexts"][0]["context"]["user"] = user
    path.write_text(yaml.safe_dump(document))
    return str(path)


def test_a_command_is_pending_until_its_id_is_handled() -> None:
    command = Command("approve", "ana", "looks good", 1.0, "id-1")
    obj: dict[str, Any] = command_patch(command)
    assert pending(obj) == command
    obj["metadata"]["annotations"][HANDLED] = json.dumps({"id": "id-1", "ok": True})
    assert pending(obj) is None
    obj["metadata"]["annotations"][COMMAND] = "not json"
    assert pending(obj) is None


@pytest.mark.asyncio
async def test_approve_moves_a_waiting_manual_rollout_one_step_as_the_kubeconfig_user(
    cluster: Cluster, rig: Rig, bob: str, capsys: pytest.CaptureFixture[str]
) -> None:
    await cluster.create(release(strategy=MANUAL))
    status = await cluster.until_phase("WaitingForApproval")
    assert status["step"] == 0

    code, out, err = await cli(capsys, "approve", NAME, "--kubeconfig", bob, "--reason", "ok")
    assert (code, err) == (0, ""), err
    assert "approve done" in out and NAME in out
    # the outcome is written after the status: once the command returns, the step is taken
    status = await cluster.status()
    assert status["step"] == 1 and status["weight"] == 10
    # the approved step is an audit line and an Event by the kubeconfig's user
    assert [(e.from_phase.value, e.to_phase.value, e.weight) for e in rig.actions_by("bob")] == [
        ("WaitingForApproval", "Progressing", 10)
    ]
    await cluster.until_event(lambda _, __, message: "by bob, weight 10" in message)
    # and the API server saw bob, with the approver's rights, patch it and read it back
    requests = cluster.requests_of("bob")
    assert ("patch", "canarydeployments", NAME, 200) in requests
    assert {verb for verb, *_ in requests} == {"patch", "get"}
    assert all(code == 200 for *_, code in requests)


@pytest.mark.asyncio
async def test_pause_then_resume(
    cluster: Cluster, rig: Rig, bob: str, capsys: pytest.CaptureFixture[str]
) -> None:
    await cluster.create(release(strategy=HOUR))
    await cluster.until_phase("Progressing")

    code, out, _ = await cli(capsys, "pause", NAME, "--kubeconfig", bob)
    assert code == 0 and "now Paused" in out
    status = await cluster.status()
    assert status["phase"] == "Paused" and status["pausedBy"] == "bob"

    code, out, _ = await cli(capsys, "resume", NAME, "--kubeconfig", bob)
    assert code == 0 and "now Progressing" in out
    assert (await cluster.status())["phase"] == "Progressing"
    actors = {e.action: e.actor for e in rig.audit_log.entries}
    assert actors.get("pause") == "bob" and actors.get("resume") == "bob"


@pytest.mark.asyncio
async def test_abort_rolls_the_rollout_back(
    cluster: Cluster, rig: Rig, bob: str, capsys: pytest.CaptureFixture[str]
) -> None:
    await cluster.create(release(strategy=HOUR))

    async def at_20() -> bool:
        return await cluster.route_weights() == [20]

    await eventually(at_20)

    code, _, err = await cli(capsys, "abort", NAME, "--kubeconfig", bob, "--reason", "bad build")
    assert code == 0, err
    await cluster.until_phase("RolledBack")
    assert await cluster.route_weights() in ([], [0])

    async def canary_gone() -> bool:
        return await cluster.objects.read("apps/v1", "Deployment", "web-canary") is None

    await eventually(canary_gone)
    aborts = [e for e in rig.audit_log.entries if e.action == "abort"]
    assert aborts and aborts[0].actor == "bob" and "bad build" in aborts[0].explanation


@pytest.mark.asyncio
async def test_approve_when_nothing_waits_is_refused_with_the_reason(
    cluster: Cluster, rig: Rig, bob: str, capsys: pytest.CaptureFixture[str]
) -> None:
    await cluster.create(release(strategy=HOUR))
    step = (await cluster.until_phase("Progressing"))["step"]

    code, out, err = await cli(capsys, "approve", NAME, "--kubeconfig", bob)
    assert code == 1 and out == ""
    assert "refused" in err and "nothing waits for approval" in err
    assert len(err.strip().splitlines()) == 1
    status = await cluster.status()
    assert status["phase"] == "Progressing" and status["step"] == step
    refused = await cluster.until_event(lambda _, reason, __: reason == "CommandRefused")
    assert refused[0][0] == "Warning" and "nothing waits" in refused[0][2]


@pytest.mark.asyncio
async def test_usage_and_missing_objects_exit_2_with_one_line(
    cluster: Cluster, rig: Rig, bob: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = await cli(capsys, "approve", "nope", "--kubeconfig", bob)
    assert code == 2 and f"no CanaryDeployment {cluster.namespace}/nope" in err
    assert len(err.strip().splitlines()) == 1
    assert ("patch", "canarydeployments", "nope", 404) in cluster.requests_of("bob")
    code, _, err = await cli(capsys, "pause", "x", "--kubeconfig", bob + ".missing")
    assert code == 2 and "no kubeconfig" in err and "Traceback" not in err


@pytest.mark.asyncio
async def test_people_without_the_rights_get_one_line_naming_what_was_refused(
    cluster: Cluster, rig: Rig, bob: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await cluster.create(release(strategy=HOUR))
    await cluster.until_phase("Progressing")
    eve = await nobody(cluster, tmp_path, bob)
    for argv in (["pause", NAME], ["status"], ["status", NAME], ["status", "-A"]):
        code, out, err = await cli(capsys, *argv, "--kubeconfig", eve)
        assert code == 2 and out == "", (argv, out)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert "403 Forbidden" in err and "system:serviceaccount:" in err, err
        assert "cannot" in err and "canarydeployments" in err, err
    # nothing reached the object: no command asked for, still running
    assert COMMAND not in ((await cluster.release())["metadata"].get("annotations") or {})
    assert (await cluster.status())["phase"] == "Progressing"

    # a token the server does not know: 401, in one line too
    stranger = kubeconfig_with(tmp_path / "kubeconfig-x", bob, user="x", token="not-a-token")
    code, _, err = await cli(capsys, "pause", NAME, "--kubeconfig", stranger)
    assert code == 2 and "401 Unauthorized" in err and len(err.strip().splitlines()) == 1


@pytest.mark.asyncio
async def test_a_releaser_may_command_too_and_is_the_actor_recorded(
    cluster: Cluster,
    rig: Rig,
    kubeconfig_as: Kubeconfig,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """alice may release, so she may patch: today a command needs no more than that."""
    await cluster.create(release(strategy=HOUR))
    await cluster.until_phase("Progressing")
    alice = str(kubeconfig_as("alice", cluster.namespace))
    code, out, err = await cli(capsys, "pause", NAME, "--kubeconfig", alice)
    assert code == 0 and "now Paused" in out, err
    assert (await cluster.status())["pausedBy"] == "alice"
    assert [e.action for e in rig.actions_by("alice")] == ["pause"]
    assert ("patch", "canarydeployments", NAME, 200) in cluster.requests_of("alice")


@pytest.mark.asyncio
async def test_status_prints_the_table_with_the_explanation(
    cluster: Cluster, rig: Rig, bob: str, capsys: pytest.CaptureFixture[str]
) -> None:
    await cluster.create(release(strategy=HOUR))
    status = await cluster.until(lambda s: bool(s.get("lastVerdict")))
    explanation = status["lastVerdict"]

    code, out, _ = await cli(capsys, "status", "--kubeconfig", bob)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "PHASE", "WEIGHT", "STEP", "HEALTH", "AGE"]
    row = lines[1].split()
    assert row[:4] == [NAME, status["phase"], "20%", "0"]
    assert lines[2].strip() == explanation

    code, out, _ = await cli(capsys, "status", NAME, "--kubeconfig", bob)
    assert code == 0
    assert "Conditions:" in out and "Ready=" in out
    assert f"Policy hash:   {status['policyHash']}" in out

    code, out, _ = await cli(capsys, "status", "-A", "--kubeconfig", bob)
    assert code == 0 and out.splitlines()[0].split()[0] == "NAMESPACE"
    assert any(line.split()[:2] == [cluster.namespace, NAME] for line in out.splitlines())


@pytest.mark.asyncio
async def test_a_restarted_controller_does_not_run_a_handled_command_again(
    cluster: Cluster,
    controller_api: client.ApiClient,
    policy_dir: Path,
    bob: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    async with running(Rig(controller_api, policy_dir, HEALTHY, cluster.namespace)):
        await cluster.create(release(strategy=MANUAL))
        await cluster.until_phase("WaitingForApproval")
        code, _, _ = await cli(capsys, "approve", NAME, "--kubeconfig", bob)
        assert code == 0
        # step 1 passes and waits again: a second approve would now be legal
        await cluster.until(lambda s: (s.get("phase"), s.get("step")) == ("WaitingForApproval", 1))
    handled = await cluster.handled()
    assert (handled or {}).get("ok") is True
    async with running(Rig(controller_api, policy_dir, HEALTHY, cluster.namespace)) as second:
        key = f"{cluster.namespace}/{NAME}"

        async def resumed() -> bool:
            return key in second.engine.keys()  # noqa: SIM118

        await eventually(resumed)
        # the reconcile that resumed the rollout has also looked at the command
        # (commands.handle runs at its end): once it is done, so is the decision
        await second.controller.idle()
        status = await cluster.status()
        assert (status["phase"], status["step"]) == ("WaitingForApproval", 1)
        assert second.actions_by("bob") == []
        assert await cluster.handled() == handled


def test_the_user_is_the_kubeconfig_context_user_else_dollar_user(
    kubeconfig_as: Kubeconfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("USER", "fallback")
    bob = str(kubeconfig_as("bob", "default"))
    assert kubeconfig_user(bob) == "bob"
    # the name comes from the kubeconfig, not from the server: bob's token under
    # another name is recorded under that name (the server still authenticates bob)
    renamed = kubeconfig_with(tmp_path / "kubeconfig-renamed", bob, user="robert")
    assert kubeconfig_user(renamed) == "robert"
    assert kubeconfig_user(str(tmp_path / "absent")) == "fallback"


@pytest.mark.asyncio
async def test_status_watch_prints_again_on_a_change_and_ctrl_c_exits_130(
    cluster: Cluster, rig: Rig, bob: str
) -> None:
    await cluster.create(release(strategy=HOUR))
    await cluster.until_phase("Progressing")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "import sys; from codedance.cli import main; sys.exit(main(sys.argv[1:]))",
        "status",
        "--watch",
        "--kubeconfig",
        bob,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    try:
        async with asyncio.timeout(20):
            first = await process.stdout.readuntil(b"NAME")
            assert first.endswith(b"NAME")

            async def watching() -> bool:  # bob's watch is open on the API server
                return any(
                    verb == "watch" and resource == "canarydeployments"
                    for verb, resource, _, _ in cluster.requests_of("bob")
                )

            await eventually(watching, timeout=10)
            code = await asyncio.to_thread(main, ["pause", NAME, "--kubeconfig", bob])
            assert code == 0
            text = b""
            while b"Paused" not in text:
                text += await process.stdout.readline()
    finally:
        process.send_signal(signal.SIGINT)
        returncode = await asyncio.wait_for(process.wait(), 10)
    assert returncode == 130
    assert b"Traceback" not in await process.stderr.read()
