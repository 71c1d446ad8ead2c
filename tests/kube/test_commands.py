"""Manual control over HTTP against the API double: `codedance status` and the commands.

The controller runs as in test_controller.py (the real `kubernetes.aio`
client, a reactor playing the Deployment controller, Gateway API traffic);
the command line runs through `codedance.cli.main` in a thread of its own
(it has its own event loop), with `--kubeconfig` pointing at the double, as
a person's terminal would.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from kubernetes.aio import client

from adapters.kube.commands import COMMAND, HANDLED, Command, command_patch, pending
from codedance.cli import main
from codedance.control_cmd import kubeconfig_user
from tests.kube.apiserver import ApiServer
from tests.kube.conftest import USER
from tests.kube.test_controller import HEALTHY, NS, POLICY, Rig, canary, running, setup

MANUAL = {"type": "manual", "stepDuration": "200ms", "maxWeight": 25}  # weights 5, 10, 25
HOUR = {"type": "steps", "steps": [20, 40], "stepDuration": "1h"}


async def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = await asyncio.to_thread(main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "policies"
    directory.mkdir()
    (directory / "latency.rules").write_text(POLICY, encoding="utf-8")
    return directory


@pytest_asyncio.fixture
async def rig(
    apiserver: ApiServer, kube_client: client.ApiClient, policy_dir: Path
) -> AsyncIterator[Rig]:
    setup(apiserver)
    async with running(Rig(apiserver, kube_client, policy_dir, HEALTHY)) as rig:
        yield rig


def handled(rig: Rig) -> dict[str, Any] | None:
    obj = rig.apiserver.read("canarydeployments", "web-release", NS)
    assert obj is not None
    text = (obj["metadata"].get("annotations") or {}).get(HANDLED)
    return json.loads(text) if text else None


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
    rig: Rig, kubeconfig: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rig.apiserver.seed(canary(strategy=MANUAL))
    await rig.until(lambda: rig.status().get("phase") == "WaitingForApproval")
    assert rig.status()["step"] == 0

    code, out, err = await cli(
        capsys, "approve", "web-release", "--kubeconfig", str(kubeconfig), "--reason", "ok"
    )
    assert (code, err) == (0, ""), err
    assert "approve done" in out and "web-release" in out
    assert rig.status()["step"] == 1 and rig.status()["weight"] == 10
    # the approved step is an audit line and an Event by the kubeconfig's user
    mine = [e for e in rig.audit_log.entries if e.actor == USER]
    assert [(e.from_phase.value, e.to_phase.value, e.weight) for e in mine] == [
        ("WaitingForApproval", "Progressing", 10)
    ]
    await rig.until(lambda: any(f"by {USER}, weight 10" in m for _, _, m in rig.events_of()))


@pytest.mark.asyncio
async def test_pause_then_resume(
    rig: Rig, kubeconfig: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rig.apiserver.seed(canary(strategy=HOUR))
    await rig.until(lambda: rig.status().get("phase") == "Progressing")

    code, out, _ = await cli(capsys, "pause", "web-release", "--kubeconfig", str(kubeconfig))
    assert code == 0 and "now Paused" in out
    assert rig.status()["phase"] == "Paused" and rig.status()["pausedBy"] == USER

    code, out, _ = await cli(capsys, "resume", "web-release", "--kubeconfig", str(kubeconfig))
    assert code == 0 and "now Progressing" in out
    assert rig.status()["phase"] == "Progressing"
    actors = {e.action: e.actor for e in rig.audit_log.entries}
    assert actors.get("pause") == USER and actors.get("resume") == USER


@pytest.mark.asyncio
async def test_abort_rolls_the_rollout_back(
    rig: Rig, kubeconfig: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rig.apiserver.seed(canary(strategy=HOUR))
    await rig.until(lambda: rig.route_weights() == [20])

    code, _, err = await cli(
        capsys, "abort", "web-release", "--kubeconfig", str(kubeconfig), "--reason", "bad build"
    )
    assert code == 0, err
    await rig.until(lambda: rig.status().get("phase") == "RolledBack")
    assert rig.route_weights() in ([], [0])
    assert rig.apiserver.read("deployments", "web-canary", NS) is None
    aborts = [e for e in rig.audit_log.entries if e.action == "abort"]
    assert aborts and aborts[0].actor == USER and "bad build" in aborts[0].explanation


@pytest.mark.asyncio
async def test_approve_when_nothing_waits_is_refused_with_the_reason(
    rig: Rig, kubeconfig: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rig.apiserver.seed(canary(strategy=HOUR))
    await rig.until(lambda: rig.status().get("phase") == "Progressing")
    step = rig.status()["step"]

    code, out, err = await cli(capsys, "approve", "web-release", "--kubeconfig", str(kubeconfig))
    assert code == 1 and out == ""
    assert "refused" in err and "nothing waits for approval" in err
    assert len(err.strip().splitlines()) == 1
    assert rig.status()["phase"] == "Progressing" and rig.status()["step"] == step
    await rig.until(lambda: any(r == "CommandRefused" for _, r, _ in rig.events_of()))
    refused = [(k, m) for k, r, m in rig.events_of() if r == "CommandRefused"]
    assert refused[0][0] == "Warning" and "nothing waits" in refused[0][1]


@pytest.mark.asyncio
async def test_usage_and_missing_objects_exit_2_with_one_line(
    rig: Rig, kubeconfig: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = await cli(capsys, "approve", "nope", "--kubeconfig", str(kubeconfig))
    assert code == 2 and "no CanaryDeployment default/nope" in err
    assert len(err.strip().splitlines()) == 1
    code, _, err = await cli(capsys, "pause", "x", "--kubeconfig", str(kubeconfig) + ".missing")
    assert code == 2 and "no kubeconfig" in err and "Traceback" not in err


@pytest.mark.asyncio
async def test_status_prints_the_table_with_the_explanation(
    rig: Rig, kubeconfig: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rig.apiserver.seed(canary(strategy=HOUR))
    await rig.until(lambda: bool(rig.status().get("lastVerdict")))
    explanation = rig.status()["lastVerdict"]

    code, out, _ = await cli(capsys, "status", "--kubeconfig", str(kubeconfig))
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "PHASE", "WEIGHT", "STEP", "HEALTH", "AGE"]
    row = lines[1].split()
    assert row[:4] == ["web-release", rig.status()["phase"], "20%", "0"]
    assert lines[2].strip() == explanation

    code, out, _ = await cli(capsys, "status", "web-release", "--kubeconfig", str(kubeconfig))
    assert code == 0
    assert "Conditions:" in out and "Ready=" in out
    assert f"Policy hash:   {rig.status()['policyHash']}" in out

    code, out, _ = await cli(capsys, "status", "-A", "--kubeconfig", str(kubeconfig))
    assert code == 0 and out.splitlines()[0].split()[0] == "NAMESPACE"


@pytest.mark.asyncio
async def test_a_restarted_controller_does_not_run_a_handled_command_again(
    apiserver: ApiServer,
    kube_client: client.ApiClient,
    policy_dir: Path,
    kubeconfig: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    setup(apiserver)
    async with running(Rig(apiserver, kube_client, policy_dir, HEALTHY)) as first:
        apiserver.seed(canary(strategy=MANUAL))
        await first.until(lambda: first.status().get("phase") == "WaitingForApproval")
        code, _, _ = await cli(capsys, "approve", "web-release", "--kubeconfig", str(kubeconfig))
        assert code == 0
        # step 1 passes and waits again: a second approve would now be legal
        await first.until(
            lambda: (first.status()["phase"], first.status()["step"]) == ("WaitingForApproval", 1)
        )
    assert (handled(first) or {}).get("ok") is True
    async with running(Rig(apiserver, kube_client, policy_dir, HEALTHY)) as second:
        await second.until(lambda: "default/web-release" in second.engine.keys())  # noqa: SIM118
        await second.controller.idle()
        await asyncio.sleep(0.5)
        assert (second.status()["phase"], second.status()["step"]) == ("WaitingForApproval", 1)
        assert [e for e in second.audit_log.entries if e.actor == USER] == []


def test_the_user_is_the_kubeconfig_context_user_else_dollar_user(
    kubeconfig: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("USER", "fallback")
    assert kubeconfig_user(str(kubeconfig)) == USER
    assert kubeconfig_user(str(tmp_path / "absent")) == "fallback"


@pytest.mark.asyncio
async def test_status_watch_prints_again_on_a_change_and_ctrl_c_exits_130(
    rig: Rig, kubeconfig: Path
) -> None:
    rig.apiserver.seed(canary(strategy=HOUR))
    await rig.until(lambda: rig.status().get("phase") == "Progressing")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "import sys; from codedance.cli import main; sys.exit(main(sys.argv[1:]))",
        "status",
        "--watch",
        "--kubeconfig",
        str(kubeconfig),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    try:
        async with asyncio.timeout(20):
            first = await process.stdout.readuntil(b"NAME")
            assert first.endswith(b"NAME")
            await rig.until(lambda: len(rig.apiserver.watches) > 1)  # the controller's and ours
            code = await asyncio.to_thread(
                main, ["pause", "web-release", "--kubeconfig", str(kubeconfig)]
            )
            assert code == 0
            text = b""
            while b"Paused" not in text:
                text += await process.stdout.readline()
    finally:
        process.send_signal(signal.SIGINT)
        returncode = await asyncio.wait_for(process.wait(), 10)
    assert returncode == 130
    assert b"Traceback" not in await process.stderr.read()
