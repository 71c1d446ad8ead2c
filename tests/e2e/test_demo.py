"""`codedance demo` end to end: real processes, real HTTP, the builtin proxy and real nginx.

Each scenario runs the command a user runs (`codedance demo --json`), in a
subprocess, with steps of 2 s and the canary turning bad 5 s after it starts.
The runs are sequential so each one's reaction time is measured on a machine
that is not also running another demo.

What is asserted, per scenario and router:
- healthy: Succeeded at 100% through every linear step, no request failed;
- slow / errors / crash: RolledBack by the latency / error / pod-health rule;
- no request is lost by a weight change or a rollback: the only failed
  requests are the canary's own injected 500s (the service marks them);
- after the rollback every request is answered by stable (each response names
  the service that answered it);
- reaction time, from the moment the canary turned bad (as the canary itself
  reports, or its crash) to all traffic confirmed back on stable, is within the
  rule's `for` plus one evaluation interval plus 500 ms.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.services import which_or_skip

ROOT = Path(__file__).resolve().parents[2]
INTERVAL = 1.0
FOR = {"slow": 3.0, "errors": 3.0, "crash": 0.0}  # rules/demo.rules
RULE = {"slow": "latency", "errors": "errors", "crash": "crashing"}

_results: dict[tuple[str, str], tuple[int, dict[str, Any], str]] = {}


def demo(scenario: str, router: str) -> tuple[int, dict[str, Any], str]:
    key = (scenario, router)
    if key not in _results:
        if router == "nginx":
            which_or_skip("nginx", "nginx not found: apt-get install nginx")
        proc = subprocess.run(
            [
                sys.executable, "-m", "codedance.cli", "demo", "--scenario", scenario,
                "--router", router, "--json", "--step-duration", "2s", "--bad-after", "5",
            ],
            cwd=ROOT, capture_output=True, text=True, timeout=180,
        )
        try:
            summary = json.loads(proc.stdout)
        except json.JSONDecodeError:
            pytest.fail(f"no JSON summary (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        _results[key] = (proc.returncode, summary, proc.stderr)
    return _results[key]


ROUTERS = ["builtin", "nginx"]


@pytest.mark.parametrize("router", ROUTERS)
def test_a_healthy_canary_is_promoted_through_every_step(router: str) -> None:
    code, s, err = demo("healthy", router)
    assert code == 0, err
    assert s["phase"] == "Succeeded" and s["final_weight"] == 100
    steps = [t["weight"] for t in s["transitions"] if t["action"] == "step"]
    assert steps == [5, 10, 25, 50, 75, 100]
    assert s["requests_failed"] == 0 and s["requests_sent"] > 500
    assert s["reaction_seconds"] is None
    assert s["requests_by_track"].get("canary", 0) > 0


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("scenario", ["slow", "errors", "crash"])
def test_a_bad_canary_is_rolled_back_in_time_losing_no_request(
    scenario: str, router: str, record_property: Any
) -> None:
    code, s, err = demo(scenario, router)
    assert code == 1, err
    assert s["phase"] == "RolledBack" and s["final_weight"] == 0
    rollback = next(t for t in s["transitions"] if t["to"] == "RollingBack")
    assert rollback["rule"] == RULE[scenario], rollback
    # no request lost: the only failures are the canary's own injected errors
    assert s["requests_failed"] == s["canary_injected_errors"], s
    if scenario != "errors":
        assert s["requests_failed"] == 0
    # after the rollback, only stable answers
    after = s["requests_after_rollback_by_track"]
    assert after.get("stable", 0) > 0 and after.get("canary", 0) == 0, after
    reaction = s["reaction_seconds"]
    record_property("reaction_seconds", reaction)
    print(f"{scenario} via {router}: reaction {reaction}s")
    assert reaction is not None and 0 < reaction <= FOR[scenario] + INTERVAL + 0.5, s


def test_run_local_drives_a_canary_deployment_manifest(tmp_path: Path) -> None:
    manifest = (ROOT / "examples" / "local-rollout.yaml").read_text()
    fast = tmp_path / "rollout.yaml"
    fast.write_text(manifest.replace("stepDuration: 4s", "stepDuration: 1s"))
    proc = subprocess.run(
        [sys.executable, "-m", "codedance.cli", "run", str(fast), "--local", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["phase"] == "Succeeded"
    assert [t["weight"] for t in summary["transitions"] if t["action"] == "step"] == [
        5, 10, 25, 50, 75, 100,
    ]


def test_run_local_refuses_an_invalid_manifest_with_the_field(tmp_path: Path) -> None:
    manifest = (ROOT / "examples" / "local-rollout.yaml").read_text()
    bad = tmp_path / "rollout.yaml"
    bad.write_text(manifest.replace("stepDuration: 4s", "stepDuration: 4s\n    maxWeight: 150"))
    proc = subprocess.run(
        [sys.executable, "-m", "codedance.cli", "run", str(bad), "--local"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert "spec.strategy.maxWeight" in proc.stderr and "Traceback" not in proc.stderr
