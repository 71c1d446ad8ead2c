"""`codedance demo --prometheus auto` end to end: the policy reads a real Prometheus.

Each run is the command a user runs, in a subprocess, with steps of 2 s: the
demo starts a Prometheus of its own that scrapes the two services' `/metrics`
(their addresses in a file_sd targets file), and the engine reads p99 and the
error rate from it instead of from the router.

What is asserted:
- slow: RolledBack by the `latency` rule, no request failed, and the p99 in
  the verdict's explanation is one Prometheus computed (the summary names the
  metric source, and the value is `histogram_quantile`'s interpolation inside
  the service's (300ms, 400ms] bucket). The reaction time is printed, not
  bounded: scrapes and the 5 s rate window add to the router's figure;
- healthy: Succeeded at 100% through every step, no request failed, and
  Prometheus followed the stable to its new port at the promotion: its data
  (read back by a Prometheus started again on the run's data directory) holds
  the first stable, the canary and every identity label, and the targets file
  now names a different stable;
- `--prometheus auto` without the program is a one-line usage error.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from codedance import cli
from tests.services import prometheus_query, start_prometheus, which_or_skip

ROOT = Path(__file__).resolve().parents[2]
MISSING = "prometheus not found: apt-get install prometheus"


def demo(scenario: str) -> tuple[int, dict[str, Any], str]:
    which_or_skip("prometheus", "apt-get install prometheus")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "codedance.cli",
            "demo",
            "--scenario",
            scenario,
            "--prometheus",
            "auto",
            "--json",
            "--step-duration",
            "2s",
            "--bad-after",
            "6",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=90,
    )
    try:
        summary = json.loads(proc.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"no JSON summary (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.returncode, summary, proc.stderr


def test_a_slow_canary_is_rolled_back_on_the_p99_prometheus_measured(
    record_property: Any,
) -> None:
    code, s, err = demo("slow")
    assert code == 1, err
    assert s["phase"] == "RolledBack" and s["final_weight"] == 0
    assert s["metrics_source"] == "prometheus"
    rollback = next(t for t in s["transitions"] if t["to"] == "RollingBack")
    assert rollback["rule"] == "latency", rollback
    assert s["requests_failed"] == 0, s
    after = s["requests_after_rollback_by_track"]
    assert after.get("stable", 0) > 0 and after.get("canary", 0) == 0, after
    found = re.search(r"canary\.p99 = ([\d.]+)ms > 150ms", rollback["explanation"])
    assert found, rollback["explanation"]
    # The canary answers in 160ms; Prometheus interpolates inside the (0.15, 0.2] bucket.
    assert 150 < float(found.group(1)) <= 200, rollback["explanation"]
    reaction = s["reaction_seconds"]
    assert reaction is not None and reaction > 0, s
    record_property("reaction_seconds", reaction)
    print(f"slow via Prometheus: reaction {reaction:.2f}s ({rollback['explanation']})")


def test_a_healthy_canary_is_promoted_and_prometheus_follows_the_stable(
    tmp_path: Path,
) -> None:
    code, s, err = demo("healthy")
    assert code == 0, err
    assert s["phase"] == "Succeeded" and s["final_weight"] == 100
    assert s["metrics_source"] == "prometheus"
    steps = [t["weight"] for t in s["transitions"] if t["action"] == "step"]
    assert steps == [5, 10, 25, 50, 75, 100]
    assert s["requests_failed"] == 0 and s["reaction_seconds"] is None

    workdir = Path(s["audit_log"]).parent
    written = json.loads((workdir / "prometheus" / "targets.json").read_text())
    now_listed = {group["labels"]["track"]: group["targets"][0] for group in written}
    # The demo's Prometheus has stopped; one started on its data answers what it scraped.
    with start_prometheus(workdir) as url:
        seen = prometheus_query(url, 'max_over_time(up{job="codedance"}[5m])')
        series = prometheus_query(
            url,
            "count by (workload, exported_workload) (last_over_time(http_requests_total[5m]))",
        )
    scraped = {
        (r["metric"]["instance"], r["metric"]["track"], r["metric"]["workload"])
        for r in seen
        if r["value"][1] == "1"
    }
    assert (now_listed["canary"], "canary", "web-canary") in scraped, (scraped, now_listed)
    stables = {i for i, track, workload in scraped if track == "stable" and workload == "web"}
    # the first stable was scraped, and the file was rewritten when the stable moved
    assert stables - {now_listed["stable"]}, (scraped, now_listed)
    # honor_labels: the services' own identity labels are kept, never renamed exported_*
    labels = {(r["metric"].get("workload"), r["metric"].get("exported_workload")) for r in series}
    assert labels == {("web", None), ("web-canary", None)}, series


def test_auto_without_prometheus_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import adapters.local.prometheus

    monkeypatch.setattr(adapters.local.prometheus, "find_prometheus", lambda *a: None)
    started = time.monotonic()
    code = cli.main(["demo", "--prometheus", "auto"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines() == [f"codedance demo: {MISSING}"]
    assert time.monotonic() - started < 5.0  # refused before anything started
