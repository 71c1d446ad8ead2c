"""`for` agrees with Prometheus' own alerting rules, as `promtool test rules` runs them.

What is compared: a policy of one rule `METRIC OP THRESHOLD [for D] -> rollback`
(METRIC `p99` or `error_rate`, OP `>`, `>=` or `<`, D a multiple of the sample
interval or not, or no `for` at all) against the Prometheus alerting rule
`expr: METRIC{track="canary"} OP THRESHOLD` with `for: D` (`0s` without `for`).
One series `METRIC{track="canary"}` has a sample at every tick, with no gaps,
so Prometheus' 5m lookback never hides or stretches a value; the
`evaluation_interval` equals the sample interval, so Prometheus evaluates
exactly at our ticks. At every tick we work out whether our rule fires, with
`dsl.load(...).evaluate` and with the reference interpreter (the two must
agree), and write that down as the alert's expectation at that `eval_time`:
one firing alert labelled `track="canary"`, or none. promtool then evaluates
the real rule and reports every tick where its alert state differs.

This holds the FIXED rule 3 of LANGUAGE.md section 5 to Prometheus: a rule
becomes pending at the first true tick (the alert's ActiveAt), fires at the
first tick where t - pending_since >= d (`ts - ActiveAt >= holdDuration`),
stays firing while the condition holds, and a false condition resets it; with
no `for` (`for: 0s`) it fires at the first true tick. Pending alerts are not
compared: promtool's `exp_alerts` lists firing alerts only.

Thresholds and sample values are written as the same decimal text on both
sides (`300ms` here is `0.3` there), so both parse them to the same float and
the comparisons at exactly the threshold agree.
"""

from __future__ import annotations

import random
import re
import subprocess
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml

import dsl
from dsl.ast import Action
from dsl.parser import parse
from dsl.units import format_duration
from tests.dsl.oracle import Oracle
from tests.services import which_or_skip

TIMEOUT = 120.0


@dataclass(frozen=True)
class Scenario:
    """One rule and one series; `alert` names the Prometheus alert (unique per run)."""

    alert: str
    metric: str  # "p99" or "error_rate"
    op: str
    threshold: str  # decimal text in base units: "0.3"
    hold: int  # seconds; 0 means no `for`
    interval: int  # seconds between samples and between evaluations
    values: tuple[str, ...]  # decimal text in base units, one per tick

    def policy(self) -> str:
        amount = Decimal(self.threshold)
        literal = f"{amount * 1000}ms" if self.metric == "p99" else f"{amount * 100}%"
        hold = f" for {format_duration(self.hold)}" if self.hold else ""
        return f"{self.metric} {self.op} {_plain(literal)}{hold} -> rollback\n"

    def times(self) -> list[float]:
        return [float(i * self.interval) for i in range(len(self.values))]

    def snapshots(self) -> list[dict[str, float | None]]:
        return [{f"canary.{self.metric}": float(v)} for v in self.values]


def _plain(literal: str) -> str:
    """`300.000ms` -> `300ms`, `1.0%` -> `1%`: the decimal without trailing zeros."""
    number = re.match(r"[\d.]+", literal)
    assert number is not None
    digits = number.group()
    if "." in digits:
        digits = digits.rstrip("0").rstrip(".")
    return digits + literal[number.end() :]


def our_firing(scenario: Scenario) -> list[bool]:
    """At which ticks our rule fires, by the compiled policy; the oracle must agree."""
    source = scenario.policy()
    policy = dsl.load(source)
    state = policy.new_state()
    tree, diagnostics = parse(source)
    assert tree is not None, diagnostics
    oracle = Oracle(tree)
    firing = []
    for now, snapshot in zip(scenario.times(), scenario.snapshots(), strict=True):
        compiled = policy.evaluate(now, snapshot, state).action is Action.ROLLBACK
        reference = oracle.step(now, snapshot).action == "rollback"
        assert compiled == reference, f"t={now}: compiled {compiled}, oracle {reference}"
        firing.append(compiled)
    return firing


# --- promtool -----------------------------------------------------------------------


def _rule_file(scenario: Scenario) -> dict[str, Any]:
    rule: dict[str, Any] = {
        "alert": scenario.alert,
        "expr": f'{scenario.metric}{{track="canary"}} {scenario.op} {scenario.threshold}',
    }
    if scenario.hold:
        rule["for"] = f"{scenario.hold}s"
    return {"groups": [{"name": scenario.alert, "rules": [rule]}]}


def _test_file(scenario: Scenario, rule_file: str, firing: list[bool]) -> dict[str, Any]:
    alert = [{"exp_labels": {"track": "canary"}}]
    checks = [
        {"eval_time": f"{int(t)}s", "alertname": scenario.alert, "exp_alerts": alert if f else []}
        for t, f in zip(scenario.times(), firing, strict=True)
    ]
    return {
        "rule_files": [rule_file],
        "evaluation_interval": f"{scenario.interval}s",
        "tests": [
            {
                "name": scenario.alert,
                "interval": f"{scenario.interval}s",
                "input_series": [
                    {
                        "series": f'{scenario.metric}{{track="canary"}}',
                        "values": " ".join(scenario.values),
                    }
                ],
                "alert_rule_test": checks,
            }
        ],
    }


_FAILED_AT = re.compile(r"alertname: (\S+), time: ([0-9hms]+),")


def _seconds(text: str) -> int:
    """A Prometheus duration as promtool prints it (`1m30s`) in seconds."""
    units = {"h": 3600, "m": 60, "s": 1}
    parts = re.findall(r"(\d+)([hms])", text)
    assert "".join(n + u for n, u in parts) == text, text
    return sum(int(n) * units[u] for n, u in parts)


def promtool_mismatches(
    promtool: str, tmp_path: Path, cases: list[tuple[Scenario, list[bool]]]
) -> set[tuple[str, int]]:
    """Run promtool once over every (scenario, expected firing per tick).

    Returns the (alert, seconds) of every tick where the real alert's state
    differed from the expectation; fails the test if promtool broke otherwise.
    """
    files = []
    for scenario, firing in cases:
        rules = tmp_path / f"{scenario.alert}.rules.yml"
        rules.write_text(yaml.safe_dump(_rule_file(scenario), sort_keys=False))
        test = tmp_path / f"{scenario.alert}.test.yml"
        test.write_text(yaml.safe_dump(_test_file(scenario, rules.name, firing), sort_keys=False))
        files.append(test.name)
    result = subprocess.run(
        [promtool, "test", "rules", *files],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    output = result.stdout + result.stderr
    found = {(alert, _seconds(at)) for alert, at in _FAILED_AT.findall(output)}
    if result.returncode == 0:
        assert not found, output
        assert output.count("SUCCESS") == len(files), output
    else:
        assert result.returncode == 1 and found, f"promtool exited {result.returncode}:\n{output}"
    return found


@pytest.fixture(scope="module")
def promtool() -> str:
    return which_or_skip("promtool", "apt-get install prometheus")


# --- scenarios -----------------------------------------------------------------------

P99_THRESHOLDS = ["0.1", "0.25", "0.3", "0.5"]
P99_VALUES = ["0", "0.05", "0.1", "0.25", "0.299", "0.3", "0.301", "0.5", "1"]
ERROR_THRESHOLDS = ["0.005", "0.01", "0.05"]
ERROR_VALUES = ["0", "0.001", "0.005", "0.01", "0.02", "0.05", "0.1"]


def random_scenarios(seed: int, count: int) -> list[Scenario]:
    """Runs of equal values, so conditions hold for a while and then break."""
    rng = random.Random(seed)
    out = []
    for n in range(count):
        metric = rng.choice(["p99", "error_rate"])
        interval = rng.choice([10, 30])
        multiple = interval * rng.randint(1, 4)
        hold = rng.choice([0, multiple, multiple, rng.choice([15, 25, 45, 50, 90, 100])])
        thresholds, levels = (
            (P99_THRESHOLDS, P99_VALUES) if metric == "p99" else (ERROR_THRESHOLDS, ERROR_VALUES)
        )
        values: list[str] = []
        length = rng.randint(10, 40)
        while len(values) < length:
            values += [rng.choice(levels)] * rng.randint(1, 8)
        out.append(
            Scenario(
                alert=f"Random{n}",
                metric=metric,
                op=rng.choice([">", ">=", "<"]),
                threshold=rng.choice(thresholds),
                hold=hold,
                interval=interval,
                values=tuple(values[:length]),
            )
        )
    return out


def _edge(alert: str, op: str, hold: int, interval: int, values: str) -> Scenario:
    return Scenario(alert, "p99", op, "0.3", hold, interval, tuple(values.split()))


# Hand-picked edges: a value exactly at the threshold, `for` exactly one or more
# intervals, `for` between two ticks, a break one tick before firing, no `for`.
EDGES = [
    _edge("AtThresholdStrict", ">", 20, 10, "0.3 0.3 0.301 0.301 0.301 0.3 0.301"),
    _edge("AtThresholdOrEqual", ">=", 20, 10, "0.3 0.3 0.3 0.299 0.3 0.3 0.3 0.3"),
    _edge("ForOneInterval", ">", 10, 10, "0.5 0.5 0.1 0.5 0.1 0.5 0.5 0.5"),
    _edge("ForBetweenTicks", ">", 25, 10, "0.5 0.5 0.5 0.5 0.5 0.1 0.5 0.5 0.5 0.5"),
    _edge("BreakBeforeFiring", ">", 60, 30, "0.5 0.5 0.1 0.5 0.5 0.5 0.5 0.1 0.5"),
    _edge("NoFor", ">", 0, 10, "0.1 0.5 0.1 0.5 0.5 0.3 0.301"),
    _edge("BelowThreshold", "<", 30, 30, "0.5 0.1 0.1 0.1 0.3 0.299 0.299"),
]


def test_edges_agree_with_promtool(promtool: str, tmp_path: Path) -> None:
    cases = [(s, our_firing(s)) for s in EDGES]
    assert promtool_mismatches(promtool, tmp_path, cases) == set()


def test_random_scenarios_agree_with_promtool(promtool: str, tmp_path: Path) -> None:
    scenarios = random_scenarios(seed=20240527, count=40)
    cases = [(s, our_firing(s)) for s in scenarios]
    # The scenarios must exercise both outcomes and a pending rule that has not fired yet.
    ticks = [f for _, firing in cases for f in firing]
    assert any(ticks) and not all(ticks)
    assert any(
        s.hold and firing[i] and not firing[i - 1]
        for s, firing in cases
        for i in range(1, len(firing))
    )
    assert promtool_mismatches(promtool, tmp_path, cases) == set()


def test_a_wrong_expectation_is_reported(promtool: str, tmp_path: Path) -> None:
    # The harness itself can fail: flip what we expect at two ticks and promtool
    # must name exactly those.
    scenario = EDGES[3]
    firing = our_firing(scenario)
    assert firing == [False, False, False, True, True, False, False, False, False, True]
    wrong = list(firing)
    wrong[2] = not wrong[2]
    wrong[4] = not wrong[4]
    mismatches = promtool_mismatches(promtool, tmp_path, [(scenario, wrong)])
    assert mismatches == {(scenario.alert, 20), (scenario.alert, 40)}
