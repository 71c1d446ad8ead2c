"""codedance backtest: the timeline, the chart, --json, --output, and bad input.

Recordings are small YAML files written per test. The Prometheus mode runs
against a stand-in HTTP server that answers the two API endpoints the
backtest uses (`/api/v1/query` for the reachability check and
`/api/v1/query_range`) with series computed from the requested times, so the
tests can check which targets were asked for and where each verdict falls.
"""

from __future__ import annotations

import json
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

from codedance.cli import main
from tests.services import free_port

Capture = pytest.CaptureFixture[str]

LATENCY = "latency: p99 > 300ms for 2m -> rollback\n"
# 0.1 at 0..1m30s, 0.5 from 2m to 5m, 0.1 again from 5m30s (sample 11) to 7m.
RECORDING = """\
interval: 30s
input_series:
  - {series: canary.p99, values: "0.1x3 0.5x6 0.1x3"}
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    return write(tmp_path / "latency.rules", LATENCY), write(tmp_path / "incident.yaml", RECORDING)


def backtest_json(capsys: Capture, *args: str) -> dict[str, Any]:
    assert main(["backtest", *args, "--json"]) == 0, capsys.readouterr().err
    data: dict[str, Any] = json.loads(capsys.readouterr().out)
    return data


# ---------------------------------------------------------------- recording mode


def test_json_lists_each_change_of_verdict(files: tuple[Path, Path], capsys: Capture) -> None:
    policy, recording = files
    data = backtest_json(capsys, str(policy), "--recording", str(recording))
    rollback = {
        "at": 240.0,
        "action": "rollback",
        "rule": "latency",
        "explanation": "rollback: latency: canary.p99 = 500ms > 300ms, true for 2m",
    }
    assert data == {
        "verdicts": [
            {"at": 0.0, "action": "continue", "rule": None,
             "explanation": "continue: no rule fires"},
            rollback,
            {"at": 330.0, "action": "continue", "rule": None,
             "explanation": "continue: no rule fires"},
        ],
        "first_non_continue": rollback,
    }


def test_json_without_a_firing_rule(tmp_path: Path, capsys: Capture) -> None:
    policy = write(tmp_path / "p.rules", LATENCY)
    recording = write(
        tmp_path / "r.yaml",
        "interval: 1m\ninput_series:\n  - {series: canary.p99, values: '0.1x5 0.5 0.1x3'}\n",
    )
    data = backtest_json(capsys, str(policy), "--recording", str(recording))
    assert [v["action"] for v in data["verdicts"]] == ["continue"]
    assert data["first_non_continue"] is None


def test_the_timeline_shows_rules_and_verdicts(files: tuple[Path, Path], capsys: Capture) -> None:
    policy, recording = files
    assert main(["backtest", str(policy), "--recording", str(recording)]) == 0
    out = capsys.readouterr().out
    timeline = [line.split(None, 1) for line in out.split("timeline:\n")[1].split("\n\n")[0]
                .splitlines()]
    assert timeline == [
        ["+0s", "verdict continue: no rule fires"],
        ["+2m", "latency pending (-> rollback)"],
        ["+4m", "latency fired after 2m (-> rollback)"],
        ["+4m", "verdict rollback: latency: canary.p99 = 500ms > 300ms, true for 2m"],
        ["+5m30s", "latency cleared (condition false)"],
        ["+5m30s", "verdict continue: no rule fires"],
    ]
    assert "first non-continue verdict at +4m: rollback: latency:" in out


def test_the_chart_draws_the_deciding_metric_against_its_threshold(
    files: tuple[Path, Path], capsys: Capture
) -> None:
    policy, recording = files
    assert main(["backtest", str(policy), "--recording", str(recording)]) == 0
    out = capsys.readouterr().out
    assert "chart: canary.p99 against 300ms (rule latency: fires while > 300ms)" in out
    rows = {line.split("|")[0].strip(): line.split("|")[1] for line in out.splitlines()
            if "|" in line}
    # 15 ticks, one column each: 0.1 for 4 ticks, 0.5 for 7, 0.1 for 4
    assert rows["500ms"] == "    *******"
    assert rows["300ms"] == "-" * 15
    verdicts = next(line for line in out.splitlines() if line.strip().startswith("verdict "))
    assert verdicts.split()[1] == "........RRR...."


def test_the_chart_follows_the_first_rule_that_fires(tmp_path: Path, capsys: Capture) -> None:
    policy = write(
        tmp_path / "p.rules",
        "latency: p99 > 300ms for 2m -> rollback\n"
        "errors: error_rate > 1% and request_rate >= 1 -> rollback\n",
    )
    recording = write(
        tmp_path / "r.yaml",
        "interval: 30s\ninput_series:\n"
        "  - {series: canary.p99, values: '0.1x10'}\n"
        "  - {series: canary.error_rate, values: '0.001x3 0.05x7'}\n"
        "  - {series: canary.request_rate, values: '20x10'}\n",
    )
    assert main(["backtest", str(policy), "--recording", str(recording)]) == 0
    out = capsys.readouterr().out
    # the traffic guard `request_rate >= 1` is not what the rule watches
    assert "chart: canary.error_rate against 1% (rule errors: fires while > 1%)" in out


def test_step_to_and_weight_for_a_recording(tmp_path: Path, capsys: Capture) -> None:
    policy = write(tmp_path / "p.rules", "early: weight >= 50 and p99 < 200ms for 2m -> promote\n")
    recording = write(
        tmp_path / "r.yaml", "interval: 30s\ninput_series:\n  - {series: p99, values: '0.1'}\n"
    )
    # one sample, held: the replay runs to --to, every --step
    data = backtest_json(
        capsys, str(policy), "--recording", str(recording), "--step", "1m", "--to", "5m",
        "--weight", "50",
    )
    assert [(v["at"], v["action"]) for v in data["verdicts"]] == [
        (0.0, "continue"), (120.0, "promote")
    ]
    data = backtest_json(capsys, str(policy), "--recording", str(recording), "--to", "5m")
    assert [v["action"] for v in data["verdicts"]] == ["continue"]  # weight 0


def test_context_series_in_a_recording(tmp_path: Path, capsys: Capture) -> None:
    policy = write(tmp_path / "p.rules", "early: weight >= 50 and p99 < 200ms -> promote\n")
    recording = write(
        tmp_path / "r.yaml",
        "interval: 1m\ninput_series:\n  - {series: p99, values: '0.1x5'}\n"
        "  - {series: weight, values: '10 25 50x3'}\n",
    )
    data = backtest_json(capsys, str(policy), "--recording", str(recording))
    assert [(v["at"], v["action"]) for v in data["verdicts"]] == [
        (0.0, "continue"), (120.0, "promote")
    ]


# ---------------------------------------------------------------- --output


def test_output_writes_a_test_that_codedance_test_passes(
    files: tuple[Path, Path], tmp_path: Path, capsys: Capture
) -> None:
    policy, recording = files
    out = tmp_path / "regressions" / "incident_test.yaml"
    out.parent.mkdir()
    assert main(["backtest", str(policy), "--recording", str(recording), "--output", str(out)]) == 0
    capsys.readouterr()
    text = out.read_text()
    assert 'rule_files: ["../latency.rules"]' in text
    assert '{series: canary.p99, values: "0.1x3 0.5x6 0.1x3"}' in text
    assert '- {at: 3m30s, action: continue}' in text  # the last tick before the change
    assert '- {at: 4m, action: rollback, rule: "latency"}' in text
    assert main(["test", str(out)]) == 0
    assert "1 passed, 0 failed" in capsys.readouterr().out


def test_the_written_test_pins_the_behaviour(
    files: tuple[Path, Path], tmp_path: Path, capsys: Capture
) -> None:
    policy, recording = files
    out = tmp_path / "pinned_test.yaml"
    assert main(["backtest", str(policy), "--recording", str(recording), "--output", str(out)]) == 0
    # a later edit that changes when the policy rolls back fails the pinned test
    policy.write_text("latency: p99 > 300ms for 2m30s -> rollback\n")
    capsys.readouterr()
    assert main(["test", str(out)]) == 1
    assert "at 4m: expected rollback (rule latency), got continue" in capsys.readouterr().out


def test_output_keeps_the_weight_and_missing_samples(tmp_path: Path, capsys: Capture) -> None:
    policy = write(
        tmp_path / "p.rules",
        "early: weight >= 50 and p99 < 200ms for 1m -> promote\nno_data: absent(p99) -> pause\n",
    )
    recording = write(
        tmp_path / "r.yaml",
        "interval: 30s\ninput_series:\n  - {series: p99, values: '0.1x3 _x2 0.1x4'}\n",
    )
    out = tmp_path / "w_test.yaml"
    args = ["backtest", str(policy), "--recording", str(recording), "--weight", "50"]
    assert main([*args, "--output", str(out)]) == 0
    text = out.read_text()
    assert "context: {weight: 50}" in text
    assert '"0.1x3 _x2 0.1x4"' in text
    assert "action: pause" in text and "action: promote" in text
    capsys.readouterr()
    assert main(["test", str(out)]) == 0, capsys.readouterr().out


# ---------------------------------------------------------------- Prometheus mode


START = 1714564800.0  # 2024-05-01T12:00:00Z


class FakePrometheus(BaseHTTPRequestHandler):
    """Answers the query endpoints; a range query gets one series per workload it matches."""

    values: ClassVar[Callable[[str, float], float | None]] = staticmethod(lambda workload, t: None)
    queries: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        self._answer()

    def do_POST(self) -> None:
        self._answer()

    def _answer(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        form = dict(urllib.parse.parse_qsl(url.query))
        if url.path == "/api/v1/query":
            data = {"resultType": "vector", "result": [{"metric": {}, "value": [0, "1"]}]}
        elif url.path == "/api/v1/query_range":
            type(self).queries.append(form["query"])
            start, end, step = float(form["start"]), float(form["end"]), float(form["step"])
            times = [start + i * step for i in range(int((end - start) / step + 1e-9) + 1)]
            result = []
            for workload in ("web", "web-canary"):
                points = [(t, self.values(workload, t)) for t in times]
                known = [[t, str(v)] for t, v in points if v is not None]
                if known:
                    result.append({"metric": {"namespace": "shop", "workload": workload},
                                   "values": known})
            data = {"resultType": "matrix", "result": result}
        else:
            self.send_error(404)
            return
        body = json.dumps({"status": "success", "data": data}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def prometheus() -> Iterator[tuple[str, type[FakePrometheus]]]:
    handler = type("Handler", (FakePrometheus,), {"queries": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


def slow_canary(workload: str, t: float) -> float | None:
    """Stable at 100ms; the canary at 100ms, then 500ms from 12:02."""
    return 0.5 if workload == "web-canary" and t >= START + 120 else 0.1


def test_prometheus_ranges_of_both_tracks_are_replayed(
    tmp_path: Path, capsys: Capture, prometheus: tuple[str, type[FakePrometheus]]
) -> None:
    url, handler = prometheus
    handler.values = staticmethod(slow_canary)
    policy = write(
        tmp_path / "p.rules",
        "latency: p99 > 300ms for 1m -> rollback\nslower: p99 > stable.p99 * 2 -> pause\n",
    )
    args = [str(policy), "--prometheus", url, "--rollout", "shop/web",
            "--from", "2024-05-01T12:00:00Z", "--to", str(START + 600)]
    data = backtest_json(capsys, *args)
    assert [(v["at"], v["action"], v["rule"]) for v in data["verdicts"]] == [
        (0.0, "continue", None), (120.0, "pause", "slower"), (180.0, "rollback", "latency"),
    ]
    # p99 of both tracks in one query, with the plain catalog's labels
    assert len(handler.queries) == 1
    assert 'workload=~"(?:web|web-canary)"' in handler.queries[0]
    assert main(["backtest", *args]) == 0
    out = capsys.readouterr().out
    assert "+3m  2024-05-01T12:03:00Z  verdict rollback: latency: canary.p99 = 500ms" in out
    assert "21 evaluations every 30s, from +0s to +10m (2024-05-01T12:00:00Z to " in out


def test_prometheus_output_passes_codedance_test(
    tmp_path: Path, capsys: Capture, prometheus: tuple[str, type[FakePrometheus]]
) -> None:
    url, handler = prometheus
    handler.values = staticmethod(slow_canary)
    policy = write(tmp_path / "p.rules", "latency: p99 > 300ms for 1m -> rollback\n")
    out = tmp_path / "incident_test.yaml"
    args = ["backtest", str(policy), "--prometheus", url, "--rollout", "shop/web",
            "--from", str(START), "--to", str(START + 300), "--step", "15s", "--output", str(out)]
    assert main(args) == 0
    assert '{series: canary.p99, values: "0.1x7 0.5x12"}' in out.read_text()
    capsys.readouterr()
    assert main(["test", str(out)]) == 0, capsys.readouterr().out


# ---------------------------------------------------------------- bad input


def fails_with(capsys: Capture, args: list[str], reason: str) -> str:
    """Exit 2, the reason on the last line of stderr, and no traceback."""
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    last = err.strip().splitlines()[-1]
    assert last.startswith("codedance backtest: ") or last.startswith("usage:"), err
    assert reason in last, err
    return err


@pytest.mark.parametrize(
    ("policy", "reason", "diagnostic"),
    [
        ("latency: p98 > 300ms -> rollback\n", "has errors", "error[E101]: unknown metric `p98`"),
        ("latency: p99 > 5% -> rollback\n", "has errors", "error[E201]"),
    ],
)
def test_a_policy_with_errors(
    files: tuple[Path, Path], capsys: Capture, policy: str, reason: str, diagnostic: str
) -> None:
    path, recording = files
    path.write_text(policy)
    err = fails_with(capsys, ["backtest", str(path), "--recording", str(recording)], reason)
    assert diagnostic in err


@pytest.mark.parametrize(
    ("recording", "reason"),
    [
        ("interval: 30s\ninput_series:\n  - {series: canary.p99, values: '0.1 fast'}\n",
         "`fast` is not a sample"),
        ("interval: soon\ninput_series: []\n", "not a recording"),
        ("- just a list\n", "not a recording"),
        ("interval: [30s\n", "invalid YAML"),
    ],
)
def test_a_bad_recording(
    files: tuple[Path, Path], capsys: Capture, recording: str, reason: str
) -> None:
    policy, path = files
    path.write_text(recording)
    fails_with(capsys, ["backtest", str(policy), "--recording", str(path)], reason)


def test_a_missing_recording(files: tuple[Path, Path], capsys: Capture) -> None:
    policy, path = files
    fails_with(capsys, ["backtest", str(policy), "--recording", str(path) + ".gone"],
               "No such file")


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        (["--from", "yesterday"], "write RFC 3339 (2024-05-01T12:00:00Z), epoch seconds"),
        (["--to", "2024-05-01 12:00"], "has no time zone"),
        (["--from", "1714564800000"], "looks like milliseconds"),
        (["--from", "-30x"], "is not a time"),
        (["--from", "now", "--to", "-1h"], "must be before --to"),
        (["--step", "fast"], "--step `fast` is not a duration"),
        (["--step", "1s", "--from", "-1d"], "Prometheus answers at most 11000"),
    ],
)
def test_bad_times(
    files: tuple[Path, Path], capsys: Capture, extra: list[str], reason: str,
    prometheus: tuple[str, type[FakePrometheus]],
) -> None:
    policy, _ = files
    url, _ = prometheus
    args = ["backtest", str(policy), "--prometheus", url, "--rollout", "shop/web", *extra]
    fails_with(capsys, args, reason)


def test_relative_times_are_accepted(
    files: tuple[Path, Path], capsys: Capture, prometheus: tuple[str, type[FakePrometheus]]
) -> None:
    policy, _ = files
    url, handler = prometheus
    handler.values = staticmethod(lambda workload, t: 0.1)
    data = backtest_json(capsys, str(policy), "--prometheus", url, "--rollout", "shop/web",
                         "--from", "-30m", "--to", "now-10m", "--step", "1m")
    assert data["verdicts"][0]["action"] == "continue"
    assert len(handler.queries) == 1


def test_unreachable_prometheus(files: tuple[Path, Path], capsys: Capture) -> None:
    policy, _ = files
    url = f"http://127.0.0.1:{free_port()}"
    fails_with(capsys, ["backtest", str(policy), "--prometheus", url, "--rollout", "shop/web"],
               f"cannot query Prometheus at {url}: connection refused")


def test_an_empty_range_names_the_metric_and_the_range(
    tmp_path: Path, capsys: Capture, prometheus: tuple[str, type[FakePrometheus]]
) -> None:
    url, handler = prometheus
    handler.values = staticmethod(lambda workload, t: None)
    policy = write(tmp_path / "p.rules", "slower: p99 > stable.p99 * 2 -> pause\n")
    args = ["backtest", str(policy), "--prometheus", url, "--rollout", "shop/web",
            "--from", "2024-05-01T12:00:00Z", "--to", "2024-05-01T13:00:00Z"]
    fails_with(capsys, args, "no data for canary.p99, stable.p99 of shop/web from "
               "2024-05-01T12:00:00Z to 2024-05-01T13:00:00Z")


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ([], "--prometheus needs --rollout NAMESPACE/NAME"),
        (["--rollout", "web"], "`web` is not NAMESPACE/NAME"),
        (["--rollout", "shop/web", "--catalog", "linkerd"], "invalid choice"),
    ],
)
def test_bad_rollouts_and_catalogs(
    files: tuple[Path, Path], capsys: Capture, extra: list[str], reason: str
) -> None:
    policy, _ = files
    args = ["backtest", str(policy), "--prometheus", "http://127.0.0.1:9", *extra]
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert reason in err


def test_a_source_is_required(files: tuple[Path, Path], capsys: Capture) -> None:
    policy, recording = files
    assert main(["backtest", str(policy)]) == 2
    assert "one of the arguments --recording --prometheus is required" in capsys.readouterr().err
    fails_with(capsys, ["backtest", str(policy), "--recording", str(recording), "--from", "-1h"],
               "--from and --rollout go with --prometheus")
