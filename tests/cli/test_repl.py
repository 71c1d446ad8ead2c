"""codedance.repl and codedance.repl_session: the policy REPL, as a person uses it."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlparse

import pytest
from prompt_toolkit.application import create_app_session
from prompt_toolkit.completion import CompleteEvent
from prompt_toolkit.document import Document
from prompt_toolkit.history import FileHistory
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput

from codedance.cli import main
from codedance.repl import PolicyLexer, ReplCompleter, batch, highlight, interactive
from codedance.repl_session import CONTINUATION, PROMPT, Session

ROOT = Path(__file__).resolve().parents[2]
LATENCY = "latency: p99 > 300ms for 1m -> rollback\n"
# p99 is 0.1 at 0s, 30s and 60s, then 0.5: pending from 1m30s, true for 1m at 2m30s
SLOW_CANARY = [":interval 30s", ":series canary.p99 0.1x2 0.5x10"]


@pytest.fixture
def policy(tmp_path: Path) -> Path:
    path = tmp_path / "latency.rules"
    path.write_text(LATENCY)
    return path


def session_with(policy: Path, *lines: str, **kwargs: Any) -> Session:
    session = Session(**kwargs)
    assert session.load([str(policy)]).startswith("loaded")
    for line in lines:
        session.feed(line)
    return session


def verdict_lines(output: str) -> dict[str, str]:
    """`t=...` lines by time: {"2m30s": "rollback: latency: ..."}."""
    return dict(re.findall(r"^t=(\S+)  (.*?)  \(health", output, re.MULTILINE))


def completions(session: Session, text: str) -> list[str]:
    found = ReplCompleter(session).get_completions(Document(text), CompleteEvent())
    return [c.text for c in found]


# ---------------------------------------------------------------- completion


def test_completion_offers_the_arrow_and_for_after_a_complete_condition(policy: Path) -> None:
    offered = completions(session_with(policy), "p99 > 300ms ")
    assert offered[:2] == ["->", "for"]
    assert "rollback" not in offered
    assert "p99" not in offered  # a value cannot follow a value


def test_completion_offers_the_four_actions_after_the_arrow(policy: Path) -> None:
    session = session_with(policy)
    assert completions(session, "p99 > 300ms for 2m -> ") == [
        "rollback", "pause", "promote", "continue"
    ]
    assert completions(session, "latency: p99 > 300ms -> p") == ["pause", "promote"]
    assert completions(session, "p99 > 300ms for 2m ") == ["->"]


def test_completion_offers_metric_names_after_a_track(policy: Path) -> None:
    session = session_with(policy, "metric queue_depth = promql `sum(queue)` as count")
    offered = completions(session, "stable.")
    assert {"p99", "error_rate", "memory", "queue_depth"} <= set(offered)
    assert "avg(" not in offered and "weight" not in offered
    assert completions(session, "canary.p") == ["p50", "p90", "p99"]


def test_completion_of_names_commands_and_rules(policy: Path) -> None:
    session = session_with(policy)
    assert "avg(" in completions(session, "p99 > ")
    assert "canary." in completions(session, "")
    assert completions(session, "p99 > av") == ["avg("]
    assert completions(session, ":ex") == [":explain"]
    assert completions(session, ":explain l") == ["latency"]
    assert "canary.error_rate" in completions(session, ":series canary.e")
    assert completions(session, "p99 > 300m") == []  # a unit is being typed
    # the right of `=` is a value, which never goes on with `->`
    assert "->" not in completions(session, "p99 = 300ms ")


def test_completion_of_paths_for_load(policy: Path) -> None:
    prefix = str(policy)[:-3]
    assert completions(session_with(policy), f":load {prefix}") == ["les"]


def test_highlighting_follows_the_grammar(policy: Path) -> None:
    line = "latency: avg(p99, 5m) > 300ms for 2m -> rollback # slow"
    styles = dict((text, style) for style, text in highlight(line, session_with(policy)))
    assert styles["latency"] == "class:rule"
    assert styles["avg"] == "class:function"
    assert styles["p99"] == "class:metric"
    assert styles["300ms"] == "class:number"
    assert styles["for"] == "class:keyword"
    assert styles["rollback"] == "class:action.rollback"
    assert styles["# slow"] == "class:comment"
    assert "".join(text for _, text in highlight(line)) == line  # nothing lost
    broken = dict((t, s) for s, t in highlight("p99 & 1 -> rollbak"))
    assert broken["&"] == "class:error" and broken["rollbak"] == "class:error"
    lexed = PolicyLexer().lex_document(Document(":tick 3\np99"))
    assert lexed(0)[1] == ("class:command", ":tick")
    assert lexed(1) == [("class:metric", "p99")]


# ---------------------------------------------------------------- time


def test_the_rollback_comes_at_exactly_the_right_tick(policy: Path) -> None:
    session = session_with(policy, *SLOW_CANARY)
    verdicts = {}
    for _ in range(6):
        verdicts.update(verdict_lines(session.feed(":tick")))
    assert list(verdicts) == ["0s", "30s", "1m", "1m30s", "2m", "2m30s"]
    assert all(v.startswith("continue") for t, v in verdicts.items() if t != "2m30s")
    assert verdicts["2m30s"] == "rollback: latency: canary.p99 = 500ms > 300ms, true for 1m"


def test_advance_runs_every_evaluation_due_and_shows_each_rules_state(policy: Path) -> None:
    session = session_with(policy, *SLOW_CANARY)
    before = session.feed(":advance 2m")
    assert all(v.startswith("continue") for v in verdict_lines(before).values())
    assert "latency -> rollback: condition true, pending (true for 0s, since t=1m30s)" in before
    after = session.feed(":tick")
    assert verdict_lines(after) == {
        "2m30s": "rollback: latency: canary.p99 = 500ms > 300ms, true for 1m"
    }
    assert "latency -> rollback: condition true, firing (true for 1m, since t=1m30s)" in after
    assert "no evaluation due" in session.feed(":advance 10s")  # the next is at 3m


def test_a_value_holds_from_now_and_a_series_from_the_next_evaluation(policy: Path) -> None:
    session = session_with(policy, ":interval 30s", "p99 = 0.35", ":tick")
    assert "canary.p99 = 350ms > 300ms" not in session.feed(":tick")  # pending, not firing
    session.feed(":series canary.p99 0.1 0.5")
    assert session.feed("canary.p99") == "100ms"  # the series' first sample stands now
    assert "condition false" in session.feed(":tick")  # t=1m reads sample 0
    assert "condition true" in session.feed(":tick")  # t=1m30s reads sample 1


def test_a_typed_rule_replaces_the_rule_of_its_name_and_the_past_is_replayed(
    policy: Path,
) -> None:
    session = session_with(policy, *SLOW_CANARY, ":advance 2m30s")
    out = session.feed("latency: p99 > 400ms -> pause")
    assert out.splitlines() == [
        "replaced rule latency (-> pause)",
        "replayed 6 evaluations; t=2m30s: pause: latency: canary.p99 = 500ms > 400ms, "
        "true for 1m",
    ]
    assert session.rule_labels() == ["latency"]
    assert session.feed("error_rate > 1% -> rollback").startswith("added rule line 2")
    assert session.rule_labels() == ["latency", "line 2"]
    rules = session.feed(":rules")
    assert "latency: p99 > 400ms -> pause" in rules and "<repl>" in rules


def test_an_unfinished_line_asks_for_more(policy: Path) -> None:
    session = session_with(policy)
    assert session.feed("errors: error_rate > 1% and") == ""
    assert session.prompt == CONTINUATION
    assert session.feed("(p99 >") == ""
    out = session.feed("200ms) -> pause")
    assert out == "added rule errors (-> pause)"
    assert session.prompt == PROMPT
    assert session.feed("p99 > 300ms") == "unknown (no value for canary.p99)"  # a whole expression
    assert session.feed("300ms +") == ""
    assert "error[E002]" in session.feed("")  # an empty line ends it as it is


# ---------------------------------------------------------------- expressions


def test_expressions_print_their_value_with_its_unit(policy: Path) -> None:
    session = session_with(policy)
    assert session.feed("300ms + 1s") == "1.3s"
    session.feed("canary.p99 = 420ms")
    session.feed("stable.p99 = 0.3")
    assert session.feed("canary.p99 / stable.p99") == "1.4"
    session.feed("error_rate = 0.012")
    assert session.feed("error_rate") == "1.2%"
    assert session.feed("error_rate / 2") == "0.6%"
    assert session.feed("p99 > stable.p99 * 1.5") == "false"
    session.feed("weight = 25")
    assert session.feed("weight >= 50 or canary.p99 > 400ms") == "true"
    assert session.feed("memory = 512Mi") == "canary.memory = 512Mi"
    assert session.feed("stable.p50") == "unknown (no value for stable.p50)"


def test_windows_in_expressions_cover_the_sessions_history(policy: Path) -> None:
    session = session_with(policy, ":interval 1m", ":series canary.p99 0.1 0.2 0.6", ":tick 3")
    assert session.feed("avg(p99, 5m)") == "300ms"
    assert session.feed("max(p99, last 2)") == "600ms"
    assert session.feed("count(p99 > 150ms, 2m)") == "2"
    session.feed("p99 = 1s")  # changes the present, not the past
    assert session.feed("avg(p99, 5m)") == "433.3ms"


def test_explain_shows_every_sub_expression_with_its_value_and_kind(tmp_path: Path) -> None:
    path = tmp_path / "relative.rules"
    path.write_text("relative: canary.p99 > stable.p99 * 1.5 and canary.p99 > 100ms -> pause\n")
    session = session_with(path, "canary.p99 = 480ms", "stable.p99 = 300ms", ":tick")
    out = session.feed(":explain relative")
    lines = out.splitlines()
    assert lines[0].startswith("relative: canary.p99 > stable.p99 * 1.5 and canary.p99 > 100ms")
    assert lines[1] == "state at t=0s: firing since t=0s (true for 0s)"
    rows = [re.split(r"\s{2,}", line.strip()) for line in lines[2:]]
    indents = [len(line) - len(line.lstrip()) for line in lines[2:]]
    assert rows[0] == ["canary.p99 > stable.p99 * 1.5 and canary.p99 > 100ms", "true", "condition"]
    assert ["stable.p99 * 1.5", "450ms", "duration"] in rows
    assert ["1.5", "1.5", "number"] in rows
    assert ["canary.p99 > 100ms", "true", "condition"] in rows
    # children sit deeper than their parent: and > comparison > product > literal
    assert indents[rows.index(["1.5", "1.5", "number"])] == indents[0] + 6
    assert session.feed(":explain") == out  # the deciding rule by default


# ---------------------------------------------------------------- saving


def test_save_writes_a_test_that_codedance_test_passes(policy: Path, tmp_path: Path) -> None:
    policy.write_text(LATENCY + "early: weight >= 50 and p99 < 100ms -> promote\n")
    session = session_with(policy, *SLOW_CANARY, "weight = 25", ":advance 3m")
    target = tmp_path / "slow_test.yaml"
    out = session.feed(f":save {target}")
    assert out == f"wrote {target}; 4 expectations, and `codedance test` passes"
    text = target.read_text()
    assert 'rule_files: ["latency.rules"]' in text  # the loaded file itself
    assert "context: {weight: 25}" in text
    assert 'values: "0.1x2 0.5x3"' in text  # 0s to 3m
    assert "      - at: 2m30s\n        action: rollback\n        rule: \"latency\"" in text
    assert main(["test", str(target)]) == 0
    # the file pins behaviour: a policy that decides later fails it
    policy.write_text(policy.read_text().replace("for 1m", "for 90s"))
    assert main(["test", str(target)]) == 1


def test_save_copies_rules_typed_at_the_prompt_beside_the_test(
    policy: Path, tmp_path: Path
) -> None:
    session = session_with(
        policy, *SLOW_CANARY, "errors: error_rate > 1% -> pause", ":series error_rate 0x3 0.05",
        "latency: p99 > 300ms for 30s -> rollback", ":advance 3m",
    )
    target = tmp_path / "typed_test.yaml"
    assert session.feed(f":save {target}").endswith("`codedance test` passes")
    rules = tmp_path / "typed_test.rules"
    assert rules.read_text() == (
        "latency: p99 > 300ms for 30s -> rollback\nerrors: error_rate > 1% -> pause\n"
    )
    assert policy.read_text() == LATENCY  # the loaded file is never touched
    assert main(["test", str(target)]) == 0
    assert "exists" in session.feed(f":save {policy}")  # never overwrites other files


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("canary.p999 > 1s", "<repl>:1:8: error[E101]: unknown metric `p999`"),
        ("p99 > 5%", "<repl>:1:7: error[E201]: a percentage cannot be compared with a duration"),
        ("p99 = 5%", "<repl>:1:7: error[E201]: `canary.p99` is a duration, not a ratio"),
        ("weight = 50%", "<repl>:1:10: error[E204]"),
        ("p99 > 300ms -> rollbak", "<repl>:1:16: error[E103]: unknown action `rollbak`"),
        ("latency: p99 > 300ms", "<repl>:1:21: error[E002]"),
        (":frobnicate", "unknown command `:frobnicate`"),
        (":tik", "unknown command `:tik`; did you mean `:tick`?"),
        (":load /no/such/file.rules", "/no/such/file.rules: no such file or directory"),
        (":advance banana", "`banana` is not a duration; write a duration such as 30s or 2m"),
        (":advance 2mins", "unknown unit `mins` in `2mins`"),
        (":tick zero", "`:tick zero`: write a number from 1 to 100000"),
        (":series canary.p99 1 banana", "`:series canary.p99`: column 3"),
        (":series canary.p999 1", "<repl>:1:8: error[E101]"),
        (":explain nosuch", "no rule `nosuch`"),
        (":save out_test.yaml", "nothing to pin yet"),
        (":query up", "`:query` needs a Prometheus"),
        (":pull canary.p99 30m", "`:pull` needs a Prometheus"),
    ],
)
def test_bad_input_gives_a_reason_never_a_traceback(
    policy: Path, entry: str, expected: str
) -> None:
    session = session_with(policy)
    out = session.feed(entry)
    assert out.startswith(expected)
    assert "Traceback" not in out
    if not out.startswith("<repl>"):
        assert len(out.splitlines()) == 1
    assert session.failures == 1


def test_unreadable_and_broken_files_leave_the_rules_as_they_were(
    policy: Path, tmp_path: Path
) -> None:
    session = session_with(policy)
    binary = tmp_path / "binary.rules"
    binary.write_bytes(b"\xff\xfe p99")
    assert session.feed(f":load {binary}") == (
        f"{binary}: cannot read: not UTF-8 text (byte 0xff at offset 0); "
        "the session keeps its rules"
    )
    broken = tmp_path / "broken.rules"
    broken.write_text("p99 > 5% -> rollback\n")
    out = session.feed(f":load {broken}")
    assert out.startswith(f"{broken}:1:7: error[E201]")
    assert out.endswith("the session keeps its rules")
    assert session.rule_labels() == ["latency"]


def test_the_interval_is_fixed_once_time_has_run(policy: Path) -> None:
    session = session_with(policy, ":tick")
    assert session.feed(":interval 30s").startswith("the interval cannot change")
    session.feed(":reset")
    assert session.feed(":interval 30s") == "evaluations every 30s; series samples as often"


def test_an_internal_error_is_one_line(policy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    session = session_with(policy)

    def broken(args: str) -> str:
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(session, "_rules", broken)
    assert session.feed(":rules") == "error: RuntimeError: boom"


def test_an_unreachable_prometheus_is_one_line(policy: Path) -> None:
    from adapters.metrics.catalog import catalog_for
    from adapters.metrics.prometheus import SyncPrometheus

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    prom = SyncPrometheus(f"http://127.0.0.1:{port}", catalog_for("plain"), retries=0)
    session = session_with(policy, prometheus=prom, rollout=("shop", "checkout"))
    for entry in (":query up", ":pull canary.p99 5m"):
        out = session.feed(entry)
        assert out.startswith(f"cannot reach Prometheus at http://127.0.0.1:{port}: ")
        assert len(out.splitlines()) == 1


# ---------------------------------------------------------------- Prometheus


class _FakePrometheus(BaseHTTPRequestHandler):
    """Answers instant queries with `up 1` and ranges with p99 0.1 then 0.5."""

    queries: ClassVar[list[str]] = []
    empty: ClassVar[bool] = False

    def do_GET(self) -> None:
        self._answer()

    def do_POST(self) -> None:
        self._answer()

    def _answer(self) -> None:
        url = urlparse(self.path)
        form = {k: v[0] for k, v in parse_qs(url.query).items()}
        length = int(self.headers.get("Content-Length") or 0)
        form.update({k: v[0] for k, v in parse_qs(self.rfile.read(length).decode()).items()})
        type(self).queries.append(form["query"])
        if url.path.endswith("/query"):
            data: dict[str, Any] = {
                "resultType": "vector",
                "result": [{"metric": {"job": "api"}, "value": [float(form["time"]), "1"]}],
            }
        else:
            start, end, step = (float(form[k]) for k in ("start", "end", "step"))
            count = round((end - start) / step) + 1
            values = [[start + i * step, "0.1" if i < 5 else "0.5"] for i in range(count)]
            labels = {"namespace": "shop", "workload": "checkout-canary"}
            result = [] if self.empty else [{"metric": labels, "values": values}]
            data = {"resultType": "matrix", "result": result}
        body = json.dumps({"status": "success", "data": data}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def prometheus() -> Iterator[str]:
    _FakePrometheus.queries = []
    _FakePrometheus.empty = False
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakePrometheus)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_query_and_pull_read_a_live_prometheus(policy: Path, prometheus: str) -> None:
    from adapters.metrics.catalog import catalog_for
    from adapters.metrics.prometheus import SyncPrometheus

    prom = SyncPrometheus(prometheus, catalog_for("plain"), retries=0)
    session = session_with(
        policy, ":interval 30s", prometheus=prom, rollout=("shop", "checkout"),
        clock=lambda: 1_000_000.0,
    )
    assert session.feed(":query up") == '{job="api"}  1'
    out = session.feed(":pull canary.p99 5m")
    assert out == "canary.p99: 11 samples every 30s from Prometheus (0 missing), from t=0s"
    assert 'workload=~"checkout-canary"' in _FakePrometheus.queries[-1]
    # 0.5 from the sixth sample (t=2m30s): true for 1m at t=3m30s
    verdicts = verdict_lines(session.feed(":advance 3m30s"))
    assert verdicts["3m30s"].startswith("rollback: latency: canary.p99 = 500ms > 300ms")
    assert all(not v.startswith("rollback") for t, v in verdicts.items() if t != "3m30s")
    _FakePrometheus.empty = True
    assert session.feed(":pull stable.p99 5m").startswith(
        "Prometheus has no samples of stable.p99 in the last 5m"
    )


# ---------------------------------------------------------------- the terminal


def test_a_whole_session_through_prompt_toolkit(policy: Path, tmp_path: Path) -> None:
    session = Session()
    session.load([str(policy)])
    history = tmp_path / "history"
    written: list[str] = []
    keys = "\r".join([
        *SLOW_CANARY,
        "errors: error_rate > 1% and",  # Enter here opens the second prompt
        "p99 > 200ms -> pause",
        ":advance 2m30s",
        ":explain latency",
        "canary.p99 * 2",
        ":quit",
    ]) + "\r"
    with create_pipe_input() as pipe:
        pipe.send_text(keys)
        with create_app_session(input=pipe, output=DummyOutput()):
            assert interactive(session, FileHistory(str(history)), written.append) == 0
    output = "\n".join(written)
    assert "added rule errors (-> pause)" in output
    assert verdict_lines(output)["2m30s"].startswith("rollback: latency")
    assert re.search(r"^ {4}canary\.p99 +500ms  duration$", output, re.MULTILINE)
    assert written[-1] == "1s"
    assert session.finished
    kept = history.read_text()
    assert "+errors: error_rate > 1% and\n+p99 > 200ms -> pause\n" in kept  # one entry
    assert "+:explain latency\n" in kept


def test_piped_lines_are_read_without_a_terminal(policy: Path) -> None:
    lines = [*SLOW_CANARY, ":advance 2m30s", ":nope"]
    written: list[str] = []
    assert batch(session_with(policy), [line + "\n" for line in lines], written.append) == 1
    assert verdict_lines("\n".join(written))["2m30s"].startswith("rollback")


def test_the_repl_command_reads_stdin_when_it_is_not_a_terminal(policy: Path) -> None:
    lines = [*SLOW_CANARY, ":advance 2m30s", "canary.p99 / 2", "p99 > 300ms and", " p99 < 1s", ""]
    done = subprocess.run(
        [sys.executable, "-m", "codedance.cli", "repl", str(policy)],
        input="\n".join(lines),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout.splitlines()
    assert out[0] == f"loaded {policy}: 1 rule (latency)"
    assert "t=2m30s  rollback: latency: canary.p99 = 500ms > 300ms, true for 1m  (health 0)" in out
    assert out[-2:] == ["250ms", "true"]
    assert done.stderr == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rollout", "checkout"], "--rollout checkout: write NAMESPACE/NAME"),
        (["--prometheus", "http://user:secret@prometheus:9090"], "--prometheus: put Prometheus"),
    ],
)
def test_bad_options_are_a_usage_error(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["repl", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"codedance repl: {message}")
    assert "secret" not in err
