"""codedance explain: every rule in words, literals with their units, and the exit codes."""

from __future__ import annotations

from pathlib import Path

import pytest

from codedance.cli import main
from codedance.explain_cmd import spoken_duration
from tests.policies import REALISTIC_RULES

Capture = pytest.CaptureFixture[str]

OVERVIEW = REALISTIC_RULES


def explain(tmp_path: Path, capsys: Capture, source: str) -> list[str]:
    path = tmp_path / "policy.rules"
    path.write_text(source)
    assert main(["explain", str(path)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    return out.splitlines()


def test_the_overview_policy_in_words(tmp_path: Path, capsys: Capture) -> None:
    lines = explain(tmp_path, capsys, OVERVIEW)
    assert lines[0] == f"{tmp_path / 'policy.rules'}: 7 rules"
    assert lines[2:9] == [
        "latency: roll back when the canary's p99 latency has been above 300 ms (0.3 s) "
        "for 2 minutes",
        "errors: roll back when the canary's error rate has been above 1% (0.01) for 1 minute",
        "relative: pause once this has held for 3 minutes: the canary's p99 latency is above "
        "1.5 times the stable's p99 latency and the canary's p99 latency is above 100 ms (0.1 s)",
        "crashing: roll back when the canary's number of failed pods is above 0 or the increase "
        "in the canary's restart count over the last 5 minutes (a counter going back to 0 "
        "counts as a restart) is at least 3",
        "flapping: pause when the number of evaluations in the last 10 minutes where the "
        "canary's p99 latency is above 250 ms (0.25 s) is at least 5",
        "no_data: pause when the canary's p99 latency has had no value for 5 minutes",
        "early_win: promote once this has held for 10 minutes: the canary weight is at least "
        "50 (of 100) and the canary's success rate is at least 99.9% (0.999)",
    ]


def test_the_metrics_it_reads_with_their_units(tmp_path: Path, capsys: Capture) -> None:
    lines = explain(tmp_path, capsys, OVERVIEW)
    assert "  canary.p99: the canary's 99th percentile request latency, a duration in seconds" \
        in lines
    assert "  stable.p99: the stable's 99th percentile request latency, a duration in seconds" \
        in lines
    assert "  canary.error_rate: the canary's share of responses that are 5xx, a ratio from 0 " \
        "to 1 (1% is 0.01)" in lines
    assert "  weight: current canary weight, 0 to 100, a plain number" in lines


@pytest.mark.parametrize(
    ("rule", "words"),
    [
        ("avg(p99, 5m) > 300ms -> pause",
         "the average of the canary's p99 latency over the last 5 minutes is above 300 ms (0.3 s)"),
        ("min(stable.p50, last 10) <= 1s -> pause",
         "the lowest value of the stable's median (p50) latency over the last 10 evaluations is "
         "at most 1 s"),
        ("max(cpu, 1m30s) >= 1.5 -> pause",
         "the highest value of the canary's CPU use over the last 1 minute 30 seconds is at "
         "least 1.5 cores"),
        ("delta(memory, 1h) > 512Mi -> pause",
         "the change in the canary's memory use over the last hour (newest minus oldest value) "
         "is above 512 MiB (536870912 bytes)"),
        ("count(error_rate > 0.05, last 20) >= 3 -> pause",
         "the number of the last 20 evaluations where the canary's error rate is above 0.05 (5%) "
         "is at least 3"),
        ("not absent(p90) and abs(canary.p99 - stable.p99) < 20ms -> promote",
         "the canary's p90 latency has a value and the absolute value of (the canary's p99 "
         "latency minus the stable's p99 latency) is below 20 ms (0.02 s)"),
        ("(p99 > 1s or error_rate > 10%) and request_rate >= 2 -> rollback",
         "(the canary's p99 latency is above 1 s or the canary's error rate is above 10% (0.1)) "
         "and the canary's request rate is at least 2 per second"),
        ("not (p99 > 1s) and step_elapsed < 10m -> pause",
         "the canary's p99 latency is not above 1 s and the time since the current step started "
         "is below 10 min (600 s)"),
        ("300ms < p99 -> rollback", "the canary's p99 latency is above 300 ms (0.3 s)"),
        ("elapsed >= 1h and step != 0 -> promote",
         "the time since the rollout started is at least 1 h (3600 s) and the step number "
         "(from 0) is not equal to 0"),
    ],
)
def test_expressions_in_words(tmp_path: Path, capsys: Capture, rule: str, words: str) -> None:
    lines = explain(tmp_path, capsys, f"r: {rule}\n")
    action = rule.rsplit("-> ", 1)[1]
    verb = {"rollback": "roll back"}.get(action, action)
    assert lines[2] == f"r: {verb} when {words}"


def test_a_compound_condition_with_for(tmp_path: Path, capsys: Capture) -> None:
    lines = explain(tmp_path, capsys, "p99 > 300ms and p99 - stable.p99 >= 50ms for 90s -> pause\n")
    assert lines[2] == (
        "line 1: pause once this has held for 1 minute 30 seconds: the canary's p99 latency is "
        "above 300 ms (0.3 s) and the canary's p99 latency minus the stable's p99 latency is at "
        "least 50 ms (0.05 s)"
    )


def test_metric_definitions_with_their_unit(tmp_path: Path, capsys: Capture) -> None:
    source = (
        'metric queue_age = promql `max(queue_age_seconds{namespace=~"{{namespace}}", '
        'workload=~"{{workload}}"})` as duration\n'
        "stuck: queue_age > 2m for 1m -> rollback\n"
    )
    lines = explain(tmp_path, capsys, source)
    assert lines[2] == (
        "stuck: roll back when the canary's queue_age has been above 2 min (120 s) for 1 minute"
    )
    assert "  canary.queue_age: the canary's `queue_age`, defined by this policy (below), a " \
        "duration in seconds" in lines
    assert lines[-1] == (
        '  queue_age: the PromQL query `max(queue_age_seconds{namespace=~"{{namespace}}", '
        'workload=~"{{workload}}"})` (its placeholders filled in for each track), read as a '
        "duration in seconds (`as duration`)"
    )


def test_a_policy_with_errors_exits_1_with_diagnostics(tmp_path: Path, capsys: Capture) -> None:
    path = tmp_path / "bad.rules"
    path.write_text("latency: p98 > 300ms -> rollback\n")
    assert main(["explain", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"{path}:1:10: error[E101]: unknown metric `p98`")
    assert "did you mean `p99`?" in err


def test_usage_errors_exit_2(tmp_path: Path, capsys: Capture) -> None:
    assert main(["explain"]) == 2
    assert "the following arguments are required: FILE" in capsys.readouterr().err
    missing = tmp_path / "missing.rules"
    assert main(["explain", str(missing)]) == 2
    out, err = capsys.readouterr()
    assert err.strip() == f"codedance explain: {missing}: cannot read: No such file or directory"
    assert "Traceback" not in out + err


@pytest.mark.parametrize(
    ("seconds", "words"),
    [
        (120.0, "2 minutes"),
        (60.0, "1 minute"),
        (90.0, "1 minute 30 seconds"),
        (0.25, "250 milliseconds"),
        (1.5, "1.5 seconds"),
        (3600 + 5, "1 hour 5 seconds"),
        (2 * 86400, "2 days"),
    ],
)
def test_spoken_durations(seconds: float, words: str) -> None:
    assert spoken_duration(seconds) == words
