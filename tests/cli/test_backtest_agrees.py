"""`backtest --recording` and `codedance test` agree on every shipped policy's test series.

For each `rules/X.rules` (each has `rules/X_test.yaml` beside it) and each
test of that file, the test's series become a recording (its `interval` and
`input_series`; its `context` values become series of one sample, which hold
for the whole replay), and `codedance backtest --recording --json` replays it
with the file's evaluation interval up to the test's latest `at`. The verdict
at each expectation's `at` (the last change at or before it) must be what
the test expects, and `codedance test` must pass the file, so both commands
give the same verdicts on the same series.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from codedance.cli import main
from engine.policytest import PolicyTestFile

RULES = Path(__file__).resolve().parents[2] / "rules"
POLICIES = sorted(RULES.glob("*.rules"))
Capture = pytest.CaptureFixture[str]


def test_every_shipped_policy_has_a_test_file() -> None:
    assert POLICIES, f"no policies under {RULES}"
    missing = [p.name for p in POLICIES if not p.with_name(f"{p.stem}_test.yaml").is_file()]
    assert missing == []


def verdict_at(verdicts: list[dict[str, Any]], at: float) -> dict[str, Any]:
    """The verdict in force at `at`: the last change at or before it."""
    current = [v for v in verdicts if v["at"] <= at + 1e-9 * max(1.0, at)]
    assert current, f"no verdict at or before {at}"
    return current[-1]


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.stem)
def test_backtest_agrees_with_the_test_file(
    policy: Path, tmp_path: Path, capsys: Capture
) -> None:
    test_file = policy.with_name(f"{policy.stem}_test.yaml")
    data = yaml.safe_load(test_file.read_text())
    spec = PolicyTestFile.model_validate(data)
    assert spec.rule_files == [policy.name]  # the verdicts compared are this policy's alone
    assert main(["test", str(test_file)]) == 0, capsys.readouterr().out
    capsys.readouterr()

    step = f"{spec.evaluation_interval!r}s"
    for i, (raw, case) in enumerate(zip(data["tests"], spec.tests, strict=True)):
        interval = case.interval if case.interval is not None else spec.evaluation_interval
        context = [{"series": k, "values": repr(v)} for k, v in case.context.items()]
        recording = {"interval": f"{interval!r}s",
                     "input_series": [*raw.get("input_series", []), *context]}
        path = tmp_path / f"case{i}.yaml"
        path.write_text(yaml.safe_dump(recording))
        until = max(e.at for e in case.expect)
        args = ["backtest", str(policy), "--recording", str(path), "--json",
                "--step", step, "--to", f"{until!r}s"]
        assert main(args) == 0, capsys.readouterr().err
        result = json.loads(capsys.readouterr().out)
        verdicts = result["verdicts"]
        for e in case.expect:
            got = verdict_at(verdicts, e.at)
            where = f"{test_file.name}, test {case.name!r}, at {e.at:g}s: {got['explanation']}"
            assert got["action"] == e.action.value, where
            if e.rule is not None:
                assert got["rule"] == e.rule, where
        first = next((v for v in verdicts if v["action"] != "continue"), None)
        assert result["first_non_continue"] == first
