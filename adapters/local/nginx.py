"""A real nginx, run as a plain process, splitting traffic between stable and canary.

In: a working directory, the port to listen on, the stable and canary base
URLs, the `TrafficStats` to feed, and the nginx program. Out: the engine's
`TrafficRouter` port over that nginx, plus `set_stable` / `set_canary` to
point a track at another process (promotion replaces the stable one).

Everything nginx writes lives under the working directory (config, pid, error
and access logs, temp paths), so it runs without root and without touching
/etc or /var. The config has one upstream block with weighted servers: stable
`weight=100-w`, canary `weight=w`, the server left out at 0 (nginx weights
start at 1). One worker process, so nginx's smooth weighted round robin makes
the split exact over any 100 consecutive requests. `proxy_next_upstream error
timeout` sends a request the canary could not take (it crashed) to stable.

A weight change writes a candidate config, has `nginx -t` check it (a bad
config is an `NginxConfigError` naming the file, and nginx keeps serving the
one it has), moves it into place atomically and sends the master SIGHUP, as
`nginx -s reload` does. The config answers `GET /__codedance/weight` on the
listen port with its weight and, in a header, its generation, so the write is
confirmed by the running nginx: `set_weight` returns once the new generation
answers, and `get_weight` reads the weight nginx is serving, never a
remembered one.

Per-request metrics come from a JSON access log tailed in the background.
`$upstream_addr` names the server that answered and resolves the track; when
nginx tried two servers it lists both, and the earlier one is recorded as a
failure of its track (a connection error: status None).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import grp
import ipaddress
import json
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from adapters.local.proxy import check_url, check_weight
from adapters.local.trafficstats import TrafficStats
from engine.ports import RolloutRef

log = logging.getLogger("codedance.nginx")

WEIGHT_PATH = "/__codedance/weight"
GENERATION_HEADER = "x-codedance-generation"
LOG_FORMAT = (
    '{"t":"$msec","up":"$upstream_addr","status":"$status",'
    '"rt":"$request_time","urt":"$upstream_response_time"}'
)
# Debian installs nginx in /usr/sbin, which a non-root PATH often lacks.
_SBIN = ("/usr/sbin", "/usr/local/sbin", "/usr/local/bin", "/usr/bin")
_TEMP_KINDS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
# Characters that would end or reinterpret a value in nginx's config syntax.
_UNSAFE = re.compile(r'[\s;{}"\'\\$#]')


class NginxError(RuntimeError):
    """nginx is missing, did not start, or did not take a new config in time."""


class NginxConfigError(NginxError):
    """`nginx -t` rejected a config; the running nginx still serves the previous one."""


def find_nginx(program: str) -> str:
    """The path of the nginx program: as given when it has a slash, else looked up."""
    if "/" in program:
        if os.access(program, os.X_OK):
            return program
        raise NginxError(f"{program} is not an executable file")
    found = shutil.which(program)
    if found:
        return found
    for directory in _SBIN:
        candidate = Path(directory) / program
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise NginxError(f"{program} not found on PATH or in /usr/sbin: apt-get install nginx")


def upstream_address(url: str, what: str) -> str:
    """The `IP:PORT` nginx should connect to for `url` (and that it logs as $upstream_addr).

    A host name is resolved here, once: nginx would make one server of every
    address a name resolves to (localhost: 127.0.0.1 and ::1), each with the
    full weight, and the split would no longer be the one asked for.
    """
    parts = urlsplit(check_url(url, what))
    host = parts.hostname or ""
    port = parts.port or 80
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as e:
            raise ValueError(f"the {what} URL {url!r}: cannot resolve {host}: {e}") from None
        found = sorted({str(info[4][0]) for info in infos})
        v4 = [a for a in found if ipaddress.ip_address(a).version == 4]
        # prefer one IPv4 address (what the local services listen on), else the only one
        chosen = v4 if len(v4) == 1 else found
        if len(chosen) != 1:
            raise ValueError(
                f"the {what} URL {url!r}: {host} resolves to {', '.join(found)}; use one IP address"
            ) from None
        ip = ipaddress.ip_address(chosen[0])
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def _quoted(path: Path) -> str:
    text = str(path)
    if _UNSAFE.search(text.replace(" ", "")):
        raise ValueError(f"the nginx working directory {text!r} has characters nginx would parse")
    return f'"{text}"'


def _user_line() -> str:
    """Workers as the user running nginx: as root, nginx would otherwise drop to nobody,
    which cannot reach temp paths inside a private working directory."""
    if os.geteuid() != 0:
        return ""
    user = pwd.getpwuid(os.geteuid()).pw_name
    group = grp.getgrgid(os.getegid()).gr_name
    return f"user {user} {group};\n"


def render_config(
    workdir: Path,
    listen: str,
    stable: str,
    canary: str,
    weight: int,
    generation: int,
) -> str:
    """The whole nginx.conf for `weight` percent to `canary` (addresses as `IP:PORT`)."""
    w = check_weight(weight)
    q = {name: _quoted(workdir / name) for name in ("nginx.pid", "error.log", "access.log")}
    temp = {kind: _quoted(workdir / "temp" / kind) for kind in _TEMP_KINDS}
    servers = []
    if w < 100:
        servers.append(f"        server {stable} weight={100 - w} max_fails=0;")
    if w > 0:
        servers.append(f"        server {canary} weight={w} max_fails=0;")
    server_lines = "\n".join(servers)
    return f"""\
# Written by codedance on every weight change; edits are overwritten.
daemon off;
worker_processes 1;
pid {q["nginx.pid"]};
error_log {q["error.log"]} notice;
{_user_line()}
events {{
    worker_connections 1024;
}}

http {{
    client_body_temp_path {temp["client_body"]};
    proxy_temp_path {temp["proxy"]};
    fastcgi_temp_path {temp["fastcgi"]};
    uwsgi_temp_path {temp["uwsgi"]};
    scgi_temp_path {temp["scgi"]};

    log_format codedance escape=json '{LOG_FORMAT}';
    access_log {q["access.log"]} codedance;

    upstream codedance_backend {{
        # max_fails=0: a crashed canary keeps getting its share, so its failures
        # show in the metrics instead of nginx quietly routing around it
{server_lines}
        keepalive 32;
    }}

    server {{
        listen {listen};

        location = {WEIGHT_PATH} {{
            access_log off;
            default_type text/plain;
            add_header X-Codedance-Generation {generation} always;
            return 200 "{w}";
        }}

        location / {{
            proxy_pass http://codedance_backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_next_upstream error timeout;
            proxy_next_upstream_tries 2;
            proxy_connect_timeout 2s;
        }}
    }}
}}
"""


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL nginx's process group (master, workers, helpers), if anything is left of it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=5.0)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class NginxRouter:
    """nginx under `workdir`, listening on 127.0.0.1:`listen_port` (0: a free port).

    Usage::

        router = NginxRouter(tmp / "nginx", 0, "http://127.0.0.1:8001",
                             "http://127.0.0.1:8002", stats)
        await router.start()
        await router.set_weight(ref, 25)   # confirmed by the running nginx
        ...
        await router.stop()

    It serves one rollout: the `RolloutRef` passed to the port's methods is not consulted.
    """

    def __init__(
        self,
        workdir: str | Path,
        listen_port: int,
        stable_url: str,
        canary_url: str,
        stats: TrafficStats,
        nginx: str = "nginx",
        *,
        listen_host: str = "127.0.0.1",
        reload_timeout: float = 10.0,
        stop_timeout: float = 10.0,
        log_interval: float = 0.1,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.listen_host = listen_host
        self.listen_port = listen_port
        self.stats = stats
        self.program = nginx
        self.reload_timeout = reload_timeout
        self.stop_timeout = stop_timeout
        self.log_interval = log_interval
        self.urls = {
            "stable": check_url(stable_url, "stable"),
            "canary": check_url(canary_url, "canary"),
        }
        self.config_path = self.workdir / "nginx.conf"
        self.candidate_path = self.workdir / "nginx.conf.next"
        self.error_log = self.workdir / "error.log"
        self.access_log = self.workdir / "access.log"
        self._port = listen_port
        self._weight = 0
        self._generation = 0
        self._addresses = {track: upstream_address(url, track) for track, url in self.urls.items()}
        # $upstream_addr -> track; earlier addresses stay, their requests may still be logged
        self._tracks = {addr: track for track, addr in self._addresses.items()}
        self._process: subprocess.Popen[bytes] | None = None
        self._binary = ""
        self._lock = asyncio.Lock()
        self._tailer: asyncio.Task[None] | None = None
        self._log_offset = 0
        self._log_rest = b""
        self._workers = _Workers(self.error_log)
        self._atexit: Callable[[], None] | None = None

    # --- lifecycle ----------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        host = f"[{self.listen_host}]" if ":" in self.listen_host else self.listen_host
        return f"http://{host}:{self._port}"

    @property
    def pid(self) -> int | None:
        """The master process id while nginx runs (it leads its own process group)."""
        return self._process.pid if self.running and self._process else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _command(self, config: Path, *extra: str) -> list[str]:
        return [
            self._binary,
            *extra,
            "-p",
            str(self.workdir),
            "-c",
            str(config),
            "-e",
            str(self.error_log),
        ]

    async def start(self) -> None:
        """Write the first config (weight 0), start nginx and wait until it serves it."""
        if self._process is not None:
            return
        self._binary = find_nginx(self.program)
        for kind in _TEMP_KINDS:
            (self.workdir / "temp" / kind).mkdir(parents=True, exist_ok=True)
        if self._port == 0:
            self._port = _free_port(self.listen_host)
        self._log_offset = self.access_log.stat().st_size if self.access_log.exists() else 0
        self._log_rest = b""
        self._workers = _Workers(self.error_log)
        await self._install(0, self._generation + 1, self._addresses)
        with (self.workdir / "nginx.out").open("ab") as out:
            # its own process group, so stop() can reach the workers too
            self._process = subprocess.Popen(
                self._command(self.config_path),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        # a process that exits without stop() still takes nginx with it
        self._atexit = functools.partial(_kill_group, self._process)
        atexit.register(self._atexit)
        try:
            await self._wait_serving(self._generation + 1, retiring=set())
        except BaseException:
            await self.stop()
            raise
        self._generation += 1
        self._weight = 0
        self._tailer = asyncio.ensure_future(self._tail_forever())

    async def stop(self) -> None:
        """Graceful stop (SIGQUIT: requests in flight finish), SIGKILL after `stop_timeout`."""
        tailer, self._tailer = self._tailer, None
        if tailer is not None:
            tailer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await tailer
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGQUIT)
            deadline = time.monotonic() + self.stop_timeout
            while process.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        # whatever is left of the group (a stuck master, workers of a crashed one)
        _kill_group(process)
        if self._atexit is not None:
            atexit.unregister(self._atexit)
            self._atexit = None
        self.flush_log()

    async def __aenter__(self) -> NginxRouter:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- the TrafficRouter port ---------------------------------------------------

    async def set_weight(self, rollout: RolloutRef, weight: int) -> None:
        """Reload nginx with `weight`; returns once the running nginx serves it."""
        await self._change(check_weight(weight), dict(self._addresses))

    async def get_weight(self, rollout: RolloutRef) -> int:
        """The weight in the config the running nginx answers with."""
        weight, _ = await self._read_back(timeout=2.0)
        return weight

    async def set_stable(self, url: str) -> None:
        """Send stable's share to `url`; returns once nginx serves the new config."""
        await self._set_upstream("stable", url)

    async def set_canary(self, url: str) -> None:
        await self._set_upstream("canary", url)

    async def _set_upstream(self, track: str, url: str) -> None:
        checked = check_url(url, track)
        address = await asyncio.to_thread(upstream_address, checked, track)
        await self._change(self._weight, {**self._addresses, track: address})
        self.urls[track] = checked

    # --- config changes -----------------------------------------------------------

    async def _change(self, weight: int, addresses: dict[str, str]) -> None:
        async with self._lock:
            process = self._process
            if process is None or process.poll() is not None:
                raise NginxError(f"nginx is not running (config {self.config_path})")
            generation = self._generation + 1
            # track the new addresses before nginx logs a request to them
            self._tracks.update({addr: track for track, addr in addresses.items()})
            await self._install(weight, generation, addresses)
            # a generation on disk is never reused, even if nginx is slow to load it
            self._generation = generation
            retiring = self._workers.alive()
            # what `nginx -s reload` does, without trusting a pid file
            process.send_signal(signal.SIGHUP)
            await self._wait_serving(generation, retiring)
            self._weight = weight
            self._addresses = addresses

    async def _install(self, weight: int, generation: int, addresses: dict[str, str]) -> None:
        """Write, test and move a config into place; a rejected one stays as the candidate."""
        host = f"[{self.listen_host}]" if ":" in self.listen_host else self.listen_host
        text = render_config(
            self.workdir,
            f"{host}:{self._port}",
            addresses["stable"],
            addresses["canary"],
            weight,
            generation,
        )
        self.candidate_path.write_text(text, encoding="utf-8")
        result = await asyncio.to_thread(
            subprocess.run,
            self._command(self.candidate_path, "-t", "-q"),
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            message = (result.stderr or result.stdout).strip()
            raise NginxConfigError(
                f"nginx rejected the config {self.candidate_path}: {message}"
                f" (still serving {self.config_path}, weight {self._weight})"
            )
        os.replace(self.candidate_path, self.config_path)

    async def _wait_serving(self, generation: int, retiring: set[int]) -> None:
        """Until nginx answers from `generation` and the `retiring` workers stopped accepting.

        After a reload the master starts the new workers, waits 100 ms, then
        tells the old ones to finish gracefully; until an old worker has closed
        its listening socket it may still take a new connection and answer
        with the old config, so a single new answer does not prove the switch.
        """
        deadline = time.monotonic() + self.reload_timeout
        last: str = "no answer"
        while True:
            process = self._process
            if process is None or process.poll() is not None:
                code = None if process is None else process.returncode
                raise NginxError(
                    f"nginx exited ({code}) with config {self.config_path}:\n"
                    f"{_tail(self.error_log)}"
                )
            try:
                _, answered = await self._read_back(timeout=1.0)
                last = f"generation {answered}"
                if answered == generation:
                    lingering = retiring & self._workers.accepting()
                    if not lingering:
                        return
                    last = f"generation {answered}; old workers {sorted(lingering)} still accepting"
            except NginxError as e:
                last = str(e)
            if time.monotonic() > deadline:
                raise NginxError(
                    f"nginx did not serve config generation {generation} of {self.config_path}"
                    f" within {self.reload_timeout:.0f}s (last: {last}):\n{_tail(self.error_log)}"
                )
            await asyncio.sleep(0.02)

    async def _read_back(self, timeout: float) -> tuple[int, int]:
        """(weight, generation) from the weight endpoint, on a new connection."""
        request = f"GET {WEIGHT_PATH} HTTP/1.0\r\nHost: codedance\r\n\r\n".encode()
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(self.listen_host, self._port)
                try:
                    writer.write(request)
                    raw = await reader.read()
                finally:
                    writer.close()
        except (OSError, TimeoutError) as e:
            raise NginxError(f"no answer from nginx at {self.url}{WEIGHT_PATH}: {e!r}") from e
        head, _, body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(":") for line in lines[1:])
        }
        try:
            if lines[0].split()[1] != "200":
                raise ValueError(lines[0])
            return int(body), int(headers[GENERATION_HEADER])
        except (IndexError, KeyError, ValueError) as e:
            raise NginxError(
                f"unexpected answer from {self.url}{WEIGHT_PATH}: {raw[:200]!r}"
            ) from e

    # --- the access log -----------------------------------------------------------

    async def _tail_forever(self) -> None:
        while True:
            await asyncio.sleep(self.log_interval)
            try:
                self.flush_log()
            except OSError as e:  # a passing problem with the file: try again next time
                log.warning("reading %s failed: %s", self.access_log, e)

    def flush_log(self) -> int:
        """Read the access log's new lines into the stats now; the number of requests read."""
        try:
            with self.access_log.open("rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < self._log_offset:  # truncated or replaced: start over
                    self._log_offset, self._log_rest = 0, b""
                f.seek(self._log_offset)
                chunk = f.read()
        except FileNotFoundError:
            return 0
        self._log_offset += len(chunk)
        data = self._log_rest + chunk
        *lines, self._log_rest = data.split(b"\n")
        read = 0
        for line in lines:
            if line.strip() and self._ingest(line):
                read += 1
        return read

    def _ingest(self, line: bytes) -> bool:
        try:
            entry = json.loads(line)
            addresses = _split_list(entry["up"])
            status = int(entry["status"])
            finished = float(entry["t"])
            total = float(entry["rt"])
        except (ValueError, KeyError, TypeError):
            return False
        if not addresses:
            return False  # answered by nginx itself
        times = _split_list(entry.get("urt", ""))
        # nginx's $msec is wall time; place it on the stats' clock by its age
        at = self.stats.clock.now() - max(0.0, time.time() - finished)
        last = len(addresses) - 1
        for i, address in enumerate(addresses):
            track = self._tracks.get(address)
            if track is None:
                continue
            latency = _seconds(times[i] if i < len(times) else "", total)
            self.stats.record(track, latency, status if i == last else None, at=at)
        return True


class _Workers:
    """nginx's worker processes as its error log (level notice) tells them.

    The master logs `start worker process N` and `worker process N exited`;
    a worker logs `gracefully shutting down` as it closes its listening
    sockets. The log is read incrementally from where it stood at start.
    """

    _STARTED = re.compile(r": start worker process (\d+)$")
    _CLOSING = re.compile(r"\] (\d+)#\d+: gracefully shutting down$")
    _EXITED = re.compile(r": worker process (\d+) exited")

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = path.stat().st_size if path.exists() else 0
        self._rest = b""
        self._started: set[int] = set()
        self._closing: set[int] = set()
        self._exited: set[int] = set()

    def _read(self) -> None:
        try:
            with self.path.open("rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return
        self._offset += len(chunk)
        *lines, self._rest = (self._rest + chunk).split(b"\n")
        for raw in lines:
            line = raw.decode("utf-8", "replace").rstrip()
            for pattern, pids in (
                (self._STARTED, self._started),
                (self._CLOSING, self._closing),
                (self._EXITED, self._exited),
            ):
                match = pattern.search(line)
                if match:
                    pids.add(int(match.group(1)))

    def alive(self) -> set[int]:
        """Workers started and not exited (shutting-down ones included)."""
        self._read()
        return self._started - self._exited

    def accepting(self) -> set[int]:
        """Workers that may still take new connections."""
        self._read()
        return self._started - self._exited - self._closing


def _split_list(value: str) -> list[str]:
    """nginx's per-attempt lists: "a, b" for retries, "a : b" across internal redirects.

    An attempt without a value keeps its place as "-", so the lists of one
    request line up; a request no upstream saw gives an empty list.
    """
    value = value.strip()
    if value in ("", "-"):
        return []
    return re.split(r"\s*,\s*|\s+:\s+", value)


def _seconds(value: str, fallback: float) -> float:
    try:
        return float(value)
    except ValueError:
        return fallback
