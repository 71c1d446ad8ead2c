"""Finding and starting the external programs some tests drive (Prometheus, nginx).

In: a program name and how to install it, or a directory for a Prometheus to
keep its data. Out: the program's path, a free local port, or the base URL of a
running Prometheus that is stopped again when the `with` block ends.

A missing program skips the test with the install command in the reason, except
in CI (CI=true), where it fails: a test that needs Prometheus or nginx must
really run there, and `scripts/bootstrap` installs both as root.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from adapters.local.prometheus import LocalPrometheus

# Debian puts daemons such as nginx in /usr/sbin, which a non-root PATH often lacks.
_EXTRA_DIRS = ("/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin")

STARTUP_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


def in_ci() -> bool:
    return os.environ.get("CI") == "true"


def find_program(program: str) -> str | None:
    """The path of `program` on PATH or in the usual system directories, or None."""
    found = shutil.which(program)
    if found:
        return found
    for directory in _EXTRA_DIRS:
        candidate = Path(directory) / program
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def which_or_skip(program: str, install_hint: str) -> str:
    """The path of `program`; skip the test if it is missing (fail it in CI).

    `install_hint` is the command that installs it, e.g. "apt-get install prometheus".
    """
    path = find_program(program)
    if path is not None:
        return path
    reason = f"{program} not found: {install_hint}"
    if in_ci():
        pytest.fail(f"{reason} (CI=true, so this test must run)", pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def http_get_json(url: str, timeout: float = 5.0) -> Any:
    """GET `url` and decode its JSON body."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.load(response)


def prometheus_query(base_url: str, query: str) -> list[dict[str, Any]]:
    """The `result` of an instant query (`/api/v1/query`)."""
    params = urllib.parse.urlencode({"query": query})
    body = http_get_json(f"{base_url}/api/v1/query?{params}")
    if body.get("status") != "success":
        raise RuntimeError(f"query {query!r} failed: {body}")
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


@contextmanager
def start_prometheus(
    tmp_path: Path,
    scrape_configs: Sequence[Mapping[str, Any]] | None = None,
) -> Iterator[str]:
    """Run a Prometheus on 127.0.0.1 for the `with` block; yield its base URL.

    `scrape_configs` are Prometheus `scrape_configs` entries, e.g.
    `[{"job_name": "app", "static_configs": [{"targets": ["127.0.0.1:8000"]}]}]`.
    Scrapes and rule evaluations run every second so tests stay short. The block
    starts once every target has been scraped (or, with no targets, once
    Prometheus is ready). Data and log live under `tmp_path / "prometheus"`.

    This is `adapters.local.prometheus.LocalPrometheus` (the one way a
    Prometheus is started), driven on a loop of its own: the caller may be a
    plain test, or a thread of an async test whose loop serves the targets.
    """
    binary = which_or_skip("prometheus", "apt-get install prometheus")
    server = LocalPrometheus(
        tmp_path / "prometheus",
        prometheus=binary,
        scrape_configs=scrape_configs or (),
        startup_timeout=STARTUP_TIMEOUT,
        stop_timeout=STOP_TIMEOUT,
    )
    try:
        asyncio.run(_started(server))
        yield server.url
    finally:
        asyncio.run(server.stop())


async def _started(server: LocalPrometheus) -> None:
    await server.start()
    await server.wait_ready()
