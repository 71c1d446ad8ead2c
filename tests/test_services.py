"""tests.services: the program lookup's skip/fail rule and a real Prometheus run."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.services import free_port, prometheus_query, start_prometheus, which_or_skip

MISSING = "codedance-no-such-program"


class _Metrics(BaseHTTPRequestHandler):
    """A scrape target exposing one counter in Prometheus' text format."""

    def do_GET(self) -> None:
        body = b"# TYPE demo_requests_total counter\ndemo_requests_total 7\n"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # keep scrapes out of the test output


@pytest.fixture
def metrics_target() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), _Metrics)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_missing_program_skips_with_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=f"{MISSING} not found: apt-get install x"):
        which_or_skip(MISSING, "apt-get install x")


def test_missing_program_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="apt-get install x"):
        which_or_skip(MISSING, "apt-get install x")


def test_present_program_is_found() -> None:
    assert Path(which_or_skip("sh", "apt-get install dash")).name == "sh"


def test_prometheus_scrapes_a_target(tmp_path: Path, metrics_target: str) -> None:
    scrape = [{"job_name": "app", "static_configs": [{"targets": [metrics_target]}]}]
    with start_prometheus(tmp_path, scrape) as url:
        up = prometheus_query(url, 'up{job="app"}')
        requests = prometheus_query(url, "demo_requests_total")
    assert [sample["value"][1] for sample in up] == ["1"]
    assert [sample["value"][1] for sample in requests] == ["7"]


def test_prometheus_without_targets_is_ready(tmp_path: Path) -> None:
    with start_prometheus(tmp_path) as url:
        assert prometheus_query(url, "up") == []
        assert prometheus_query(url, "vector(2)")[0]["value"][1] == "2"
