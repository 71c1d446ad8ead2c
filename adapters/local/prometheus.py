"""A real Prometheus on this machine, scraping services whose addresses are known only at run time.

In: a working directory, a scrape interval and the Prometheus program; later,
the services to scrape as `(url, labels)` pairs. Out: the base URL of a
running Prometheus that scrapes them, and a `wait_ready()` that returns once
it has scraped every one of them.

    prometheus = LocalPrometheus(workdir)
    await prometheus.start()
    prometheus.write_targets([("http://127.0.0.1:8001", {"namespace": "default",
                               "workload": "web", "track": "stable"})])
    await prometheus.wait_ready()
    ...  # query prometheus.url
    await prometheus.stop()

(or `async with LocalPrometheus(workdir) as prometheus:`, which starts it and
waits until it is ready.)

Everything lives under the working directory: `prometheus.yml`, the data
directory `data/`, the log `prometheus.log` and the targets file
`targets.json`. The services' ports are chosen when they start, and the
stable's changes at a promotion, so the scrape job does not list them: it
reads them from the targets file (`file_sd_configs`). Prometheus watches that
file and also rereads it every second, and `write_targets` replaces it
atomically (a temporary file moved into place), so Prometheus never reads
half a file. It sees a change at once but applies a new target list at most
every five seconds (its discovery and scrape managers batch updates; no flag
changes that), so the first scrape of a new or moved target comes about 5 s
after the write, and `wait_ready()` takes that long. `ScrapeTargets` is that
file on its own, for a Prometheus run by someone else: it also gives the
scrape job to add to that Prometheus' config.

Labels. Each target carries the identity labels `namespace`, `workload` and
`track`: the ones the `plain` metric catalog (`adapters.metrics.catalog`)
matches and aggregates on, and the ones the sample service puts on its own
series. The job sets `honor_labels: true`, so where both set a label the
service's value is kept as it is instead of being renamed `exported_*`.

Readiness. `wait_ready()` polls `/-/ready`, then `/api/v1/targets` until
every target written, every target of the extra static jobs given as
`scrape_configs`, and any other active target has been scraped once, up or
down: a target that is down (a canary not started yet) is known to
Prometheus and is scraped again every interval. Past the deadline, or when
the process exits, it raises a `LocalPrometheusError` with what was missing
and the last lines of the log.

Stopping. `stop()` sends SIGTERM, waits up to `stop_timeout` seconds and then
sends SIGKILL; the process is addressed by its PID, never by name. An exit
handler does the same if the interpreter exits with it still running.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import yaml

# Debian installs prometheus in /usr/bin, which a stripped PATH may still lack.
_SYSTEM_DIRS = ("/usr/bin", "/usr/sbin", "/usr/local/bin", "/usr/local/sbin")
INSTALL_HINT = "apt-get install prometheus"
LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
LOG_LINES = 20

Target = tuple[str, Mapping[str, str]]


class LocalPrometheusError(Exception):
    """Prometheus could not be found, did not start, or did not scrape its targets in time."""


def find_prometheus(program: str = "prometheus") -> str | None:
    """The path of the Prometheus program (a name on PATH, in the system dirs, or a path)."""
    if os.sep in program:
        return program if os.access(program, os.X_OK) else None
    found = shutil.which(program)
    if found:
        return found
    for directory in _SYSTEM_DIRS:
        candidate = Path(directory) / program
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def duration(seconds: float) -> str:
    """A Prometheus duration: 1.0 -> "1s", 0.5 -> "500ms"."""
    if seconds <= 0:
        raise ValueError(f"a scrape interval must be positive, not {seconds}")
    millis = round(seconds * 1000)
    return f"{millis // 1000}s" if millis % 1000 == 0 else f"{millis}ms"


def address(url: str) -> str:
    """`host:port` of a base URL (`http://127.0.0.1:8001` -> `127.0.0.1:8001`); kept if bare."""
    if "://" not in url:
        return url
    parts = urlsplit(url)
    if not parts.hostname or parts.port is None:
        raise ValueError(f"a scrape target needs a host and a port: {url!r}")
    return f"{parts.hostname}:{parts.port}"


class ScrapeTargets:
    """A `file_sd_configs` targets file and the scrape job that reads it."""

    def __init__(self, path: Path, *, job: str = "codedance", scrape_interval: float = 1.0):
        self.path = Path(path).resolve()
        self.job = job
        self.scrape_interval = scrape_interval
        self.addresses: tuple[str, ...] = ()

    def write(self, targets: Sequence[Target]) -> None:
        """Replace the file's targets, atomically: one target group per `(url, labels)`."""
        addresses = tuple(address(url) for url, _ in targets)
        for _, labels in targets:
            for name in labels:
                if not LABEL_NAME.fullmatch(name) or name.startswith("__"):
                    raise ValueError(f"not a label name a target may carry: {name!r}")
        groups = [
            {"targets": [a], "labels": dict(labels)}
            for a, (_, labels) in zip(addresses, targets, strict=True)
        ]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(f".{self.path.name}.tmp")
        temporary.write_text(json.dumps(groups, indent=2) + "\n")
        os.replace(temporary, self.path)
        self.addresses = addresses

    def scrape_config(self) -> dict[str, Any]:
        """The scrape job (one `scrape_configs` entry) that scrapes what the file lists."""
        interval = duration(self.scrape_interval)
        return {
            "job_name": self.job,
            "honor_labels": True,
            "scrape_interval": interval,
            "scrape_timeout": interval,
            "file_sd_configs": [{"files": [str(self.path)], "refresh_interval": "1s"}],
        }

    def snippet(self) -> str:
        """`scrape_config()` as one line of YAML: a list item to paste under `scrape_configs:`."""
        job = yaml.safe_dump(
            self.scrape_config(), default_flow_style=True, sort_keys=False, width=10**6
        )
        return f"- {job.strip()}"


class LocalPrometheus:
    """A Prometheus process under `workdir` on 127.0.0.1 and a free port; see the module doc."""

    def __init__(
        self,
        workdir: Path,
        *,
        scrape_interval: float = 1.0,
        prometheus: str = "prometheus",
        scrape_configs: Sequence[Mapping[str, Any]] = (),
        startup_timeout: float = 30.0,
        stop_timeout: float = 10.0,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.scrape_interval = scrape_interval
        self.program = prometheus
        self.scrape_configs = [dict(c) for c in scrape_configs]
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.targets = ScrapeTargets(self.workdir / "targets.json", scrape_interval=scrape_interval)
        self.log_file = self.workdir / "prometheus.log"
        self.config_file = self.workdir / "prometheus.yml"
        self.port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._atexit: Callable[[], None] | None = None

    @property
    def url(self) -> str:
        """The base URL; RuntimeError before `start()`."""
        if self.port is None:
            raise RuntimeError("prometheus was not started; call start() first")
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    async def __aenter__(self) -> LocalPrometheus:
        await self.start()
        try:
            await self.wait_ready()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Write the config and an empty targets file, and launch Prometheus (not yet ready)."""
        if self._process is not None:
            return
        binary = find_prometheus(self.program)
        if binary is None:
            raise LocalPrometheusError(f"{self.program} not found: {INSTALL_HINT}")
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.targets.path.exists():
            self.targets.write([])
        interval = duration(self.scrape_interval)
        config = {
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "scrape_configs": [self.targets.scrape_config(), *self.scrape_configs],
        }
        self.config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        self.port = _free_port()
        command = [
            binary,
            f"--config.file={self.config_file}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            # Debian's build defaults these to /etc and /usr/share paths.
            f"--web.console.templates={self.workdir / 'consoles'}",
            f"--web.console.libraries={self.workdir / 'console_libraries'}",
        ]
        with self.log_file.open("wb") as log:
            self._process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        self._atexit = functools.partial(_kill, self._process)
        atexit.register(self._atexit)

    def write_targets(self, targets: Sequence[Target]) -> None:
        """Scrape exactly these services from now on (labels: namespace, workload, track)."""
        self.targets.write(targets)

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Return once Prometheus is ready and has scraped every target once; see the module doc."""
        deadline = time.monotonic() + (self.startup_timeout if timeout is None else timeout)
        missing = "not ready"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0)) as session:
            while True:
                self._check_running()
                missing = await self._missing(session)
                if not missing:
                    return
                if time.monotonic() > deadline:
                    raise LocalPrometheusError(
                        f"prometheus at {self.url}: {missing} after "
                        f"{self.startup_timeout if timeout is None else timeout:g}s; "
                        f"its log ({self.log_file}) ends:\n{self.log_tail()}"
                    )
                await asyncio.sleep(0.1)

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after `stop_timeout`; returns once the process is gone."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + self.stop_timeout
            while process.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        _kill(process)
        if self._atexit is not None:
            atexit.unregister(self._atexit)
            self._atexit = None

    def log_tail(self, lines: int = LOG_LINES) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _check_running(self) -> None:
        if self._process is None:
            raise RuntimeError("prometheus was not started; call start() first")
        code = self._process.poll()
        if code is not None:
            raise LocalPrometheusError(
                f"prometheus exited with {code}; its log ({self.log_file}) ends:\n{self.log_tail()}"
            )

    async def _missing(self, session: aiohttp.ClientSession) -> str:
        """What is still missing before `wait_ready` may return, or "" when nothing is."""
        try:
            async with session.get(f"{self.url}/-/ready") as response:
                if response.status != 200:
                    return "not ready"
            async with session.get(f"{self.url}/api/v1/targets?state=active") as response:
                body = await response.json()
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return "not answering"
        active = body.get("data", {}).get("activeTargets", [])
        scraped = {
            (t.get("scrapePool"), t.get("discoveredLabels", {}).get("__address__"))
            for t in active
            if _scraped(t)
        }
        waiting = [f"{a} ({job})" for job, a in self._expected() if (job, a) not in scraped]
        # targets of other discovery mechanisms are known only once they are active
        waiting += [str(t.get("scrapeUrl")) for t in active if not _scraped(t)]
        return f"not yet scraped: {', '.join(sorted(set(waiting)))}" if waiting else ""

    def _expected(self) -> list[tuple[str, str]]:
        """(job, address) of every target written and every target of a static job."""
        expected = [(self.targets.job, a) for a in self.targets.addresses]
        for config in self.scrape_configs:
            for group in config.get("static_configs", ()):
                expected += [(str(config["job_name"]), str(a)) for a in group.get("targets", ())]
        return expected


def _scraped(target: Mapping[str, Any]) -> bool:
    # "unknown" until the first scrape; "down" is a scrape that failed, which still counts
    return target.get("health") in ("up", "down")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _kill(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process if it still runs, and reap it."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        process.wait()
