"""Workloads as real processes on one machine: service configurations in, running servers out.

`ProcessWorkloads` implements the engine's `WorkloadManager` port with
processes of the sample service (`python -m adapters.local.service`), one
per track, the way a Deployment of one replica runs one pod:

- `start_stable()` starts the stable version. The engine never calls it: a
  local run starts stable first, then builds its router on `stable_url`.
- `bring_up(ref)` starts the canary and returns once it printed READY and
  answers `/healthz`. A process that exits first, or is not ready within
  `ready_timeout`, is a `WorkloadError` saying why, with its last stderr
  lines. The canary always listens on the same port (chosen when the manager
  is built, unless its config names one), so `canary_url` is known before
  any canary runs, like a Service in front of pods that come and go.
- `promote(ref)` is "update the stable Deployment and wait for its rollout":
  a new stable process with exactly the canary's configuration (the promoted
  version IS the canary, faults and all; only its identity labels become the
  stable's) starts on a new port; once ready, `on_stable_moved(url)` tells
  the router, which swaps its stable upstream; then the old stable process
  gets SIGTERM and drains its requests in flight. A failing start or
  callback stops the new process and raises, leaving the old stable serving.
  Promoting the same canary twice does nothing the second time. The router
  is usually built on `stable_url` after `start_stable()`, so the callback
  (sync or async) may also be set later, as the `on_stable_moved` attribute.
- `retire(ref)` sends the canary SIGTERM and waits for it to exit, killing it
  after `stop_timeout`. Retiring when no canary runs does nothing.

Bookkeeping, per track, as kube-state-metrics would count pods:
`status(track)` gives the processes that are ready, not ready (starting, or
waiting to restart) and failed (exited non-zero without being asked), and
their restarts. A process that exits 0 unasked counts in none of them. With
`restart_crashed=True` a process that exits unasked is started again, on
the same port, after `restart_backoff` seconds (doubling up to 10 s for
each further crash, like the kubelet's back-off), and each restart counts in
`restarts`; without it, it stays failed. `PodStatusSource` serves those
counts to the engine as the metrics `ready_pods`, `not_ready_pods`,
`failed_pods` and `restarts`.

No orphans: each process runs in a session (process group) of its own and
is signalled as a group; `stop_all()` (or leaving `async with`) stops them
all; and each is started with `--exit-on-stdin-close` on a pipe this process
holds, so even a parent killed with SIGKILL takes its services with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path

import aiohttp

from engine.ports import MetricRequest, RolloutRef

log = logging.getLogger("codedance.local")

TRACKS = ("stable", "canary")
POD_METRICS = ("ready_pods", "not_ready_pods", "failed_pods", "restarts")
STDERR_LINES = 20
MAX_BACKOFF = 10.0
# The directory holding the `adapters` package, so `-m adapters.local.service`
# imports whatever interpreter runs it and wherever it runs.
_SOURCE_ROOT = str(Path(__file__).resolve().parent.parent.parent)

StableMoved = Callable[[str], Awaitable[None] | None]


class WorkloadError(Exception):
    """A process that did not come up: `reason` (one line) and its last stderr lines."""

    def __init__(self, reason: str, stderr: Sequence[str] = ()) -> None:
        self.reason = reason
        self.stderr = tuple(stderr)
        if self.stderr:
            tail = "; its last stderr lines:\n  " + "\n  ".join(self.stderr)
        else:
            tail = "; it wrote nothing on stderr"
        super().__init__(reason + tail)


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    """One version of the sample service: its name, identity labels and faults.

    The fields are the service's flags (see `adapters.local.service`); the
    track is not one of them, as the manager gives it. `port` 0 lets the
    manager choose a free one.
    """

    version: str
    workload: str = "web"
    namespace: str = "default"
    port: int = 0
    host: str = "127.0.0.1"
    latency: float = 0.0
    jitter: float = 0.0
    error_share: float = 0.0
    bad_after: float | None = None
    crash_after: float | None = None
    seed: int | None = None

    def argv(self, *, track: str, port: int) -> list[str]:
        """The service's command-line arguments for running this config on `track`."""
        args = [
            "--port", str(port), "--host", self.host, "--version", self.version,
            "--namespace", self.namespace, "--workload", self.workload, "--track", track,
        ]
        if self.latency:
            args += ["--latency", repr(self.latency)]
        if self.jitter:
            args += ["--jitter", repr(self.jitter)]
        if self.error_share:
            args += ["--error-share", repr(self.error_share)]
        if self.bad_after is not None:
            args += ["--bad-after", repr(self.bad_after)]
        if self.crash_after is not None:
            args += ["--crash-after", repr(self.crash_after)]
        if self.seed is not None:
            args += ["--seed", str(self.seed)]
        return args


class PodState(StrEnum):
    STARTING = "starting"
    READY = "ready"
    RESTARTING = "restarting"  # exited unasked, waiting out the back-off
    FAILED = "failed"
    EXITED = "exited"
    STOPPING = "stopping"


@dataclass(frozen=True, slots=True)
class TrackStatus:
    """The processes of one track, counted as pods."""

    ready_pods: int = 0
    not_ready_pods: int = 0
    failed_pods: int = 0
    restarts: int = 0

    def value(self, metric: str) -> int:
        if metric not in POD_METRICS:
            raise KeyError(metric)
        return int(getattr(self, metric))


class _Pod:
    """One service process and the restarts that replace it; a pod of one container."""

    def __init__(
        self,
        *,
        track: str,
        config: ServiceConfig,
        port: int,
        python: str,
        ready_timeout: float,
        restart: bool,
        backoff: float,
        spawned: list[int],
    ) -> None:
        self.track = track
        self.config = config
        self.port = port
        self.state = PodState.STARTING
        self.restarts = 0
        self.exit_code: int | None = None
        self.exited_at: float | None = None  # wall time of the last exit nobody asked for
        self.stderr: deque[str] = deque(maxlen=STDERR_LINES)
        self.process: asyncio.subprocess.Process | None = None
        self._python = python
        self._ready_timeout = ready_timeout
        self._restart = restart
        self._backoff = backoff
        self._spawned = spawned
        self._stopping = False
        self._readers: list[asyncio.Task[None]] = []
        self._supervisor: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return f"the {self.track} {self.config.version} ({self.config.workload})"

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    async def start(self) -> None:
        """Start the process and wait until it is ready; then watch it for crashes."""
        await self._launch()
        self._supervisor = asyncio.ensure_future(self._supervise())

    async def stop(self, timeout: float) -> None:
        """SIGTERM to the process group, SIGKILL after `timeout`; waits for the exit."""
        self._stopping = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        proc = self.process
        if proc is not None and proc.returncode is None:
            self.state = PodState.STOPPING
            _signal_group(proc, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                log.warning("%s did not stop within %gs; killing it", self.name, timeout)
                _signal_group(proc, signal.SIGKILL)
                await proc.wait()
            self.exit_code = proc.returncode
            self.state = PodState.EXITED
        await self._drain_readers()

    async def _launch(self) -> None:
        """Spawn a process and wait for READY and /healthz; WorkloadError when it fails."""
        self.state = PodState.STARTING
        self.stderr.clear()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_SOURCE_ROOT, env.get("PYTHONPATH")]))
        argv = self.config.argv(track=self.track, port=self.port)
        proc = await asyncio.create_subprocess_exec(
            self._python, "-m", "adapters.local.service", *argv, "--exit-on-stdin-close",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
            env=env,
        )
        self.process = proc
        self._spawned.append(proc.pid)
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[int] = loop.create_future()
        self._readers = [
            asyncio.ensure_future(self._read_stdout(proc, ready)),
            asyncio.ensure_future(self._read_stderr(proc)),
        ]
        try:
            port = await self._await_ready(proc, ready, loop.time() + self._ready_timeout)
        except BaseException:
            _signal_group(proc, signal.SIGKILL)
            await proc.wait()
            self.exit_code = proc.returncode
            self.state = PodState.FAILED
            await self._drain_readers()
            raise
        self.port = port
        self.state = PodState.READY

    async def _await_ready(
        self, proc: asyncio.subprocess.Process, ready: asyncio.Future[int], deadline: float
    ) -> int:
        loop = asyncio.get_running_loop()
        exited = asyncio.ensure_future(proc.wait())
        try:
            await asyncio.wait(
                {ready, exited}, timeout=max(0.0, deadline - loop.time()),
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            exited.cancel()
        if not ready.done():
            if proc.returncode is not None:
                await self._drain_readers()
                raise WorkloadError(
                    f"{self.name} {_exit_text(proc.returncode)} before it was ready",
                    list(self.stderr),
                )
            raise WorkloadError(
                f"{self.name} was not ready within {self._ready_timeout:g}s", list(self.stderr)
            )
        port = ready.result()
        await self._check_health(proc, f"http://{self.config.host}:{port}/healthz", deadline)
        return port

    async def _check_health(
        self, proc: asyncio.subprocess.Process, url: str, deadline: float
    ) -> None:
        loop = asyncio.get_running_loop()
        problem = "no answer"
        timeout = aiohttp.ClientTimeout(total=1.0)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                try:
                    async with session.get(url) as response:
                        if response.status == 200:
                            return
                        problem = f"status {response.status}"
                except (aiohttp.ClientError, TimeoutError) as e:
                    problem = str(e) or type(e).__name__
                if proc.returncode is not None:
                    await self._drain_readers()
                    raise WorkloadError(
                        f"{self.name} {_exit_text(proc.returncode)} before /healthz answered",
                        list(self.stderr),
                    )
                if loop.time() >= deadline:
                    raise WorkloadError(
                        f"{self.name} printed READY but /healthz did not answer 200 within "
                        f"{self._ready_timeout:g}s ({problem})",
                        list(self.stderr),
                    )
                await asyncio.sleep(0.05)

    async def _supervise(self) -> None:
        """Record an unasked exit; with restarts on, start the process again after a back-off."""
        backoff = self._backoff
        while True:
            proc = self.process
            assert proc is not None
            code = await proc.wait()
            if self._stopping:
                return
            self.exit_code = code
            self.exited_at = time.time()
            self.state = PodState.FAILED if code != 0 else PodState.EXITED
            log.warning("%s %s", self.name, _exit_text(code))
            if not self._restart:
                return
            while True:
                self.state = PodState.RESTARTING
                await asyncio.sleep(backoff)
                backoff = min(MAX_BACKOFF, backoff * 2)
                self.restarts += 1
                try:
                    await self._launch()
                    break
                except WorkloadError as e:
                    log.warning("restarting %s failed: %s", self.name, e.reason)

    async def _read_stdout(
        self, proc: asyncio.subprocess.Process, ready: asyncio.Future[int]
    ) -> None:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            line = raw.decode(errors="replace").strip()
            if not ready.done() and line.startswith("READY "):
                fields = dict(f.split("=", 1) for f in line.split()[1:] if "=" in f)
                try:
                    ready.set_result(int(fields["port"]))
                except (KeyError, ValueError):
                    ready.set_exception(WorkloadError(f"{self.name} printed {line!r}"))

    async def _read_stderr(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None
        async for raw in proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            if line:
                self.stderr.append(line)

    async def _drain_readers(self) -> None:
        """Let the pipe readers reach end of file (bounded: a grandchild may hold a pipe)."""
        readers, self._readers = self._readers, []
        if readers:
            _, pending = await asyncio.wait(readers, timeout=2.0)
            for task in pending:
                task.cancel()


def _signal_group(proc: asyncio.subprocess.Process, sig: signal.Signals) -> None:
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        # start_new_session made the process the leader of its own group
        os.killpg(proc.pid, sig)


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class ProcessWorkloads:
    """`engine.ports.WorkloadManager` over processes of the sample service; see the module doc.

    Usage:

        async with ProcessWorkloads(stable=ServiceConfig("v1"),
                                    canary=ServiceConfig("v2", workload="web-canary"),
                                    on_stable_moved=router.set_stable) as workloads:
            await workloads.start_stable()
            ... Engine(workloads=workloads, ...) ...
    """

    def __init__(
        self,
        *,
        stable: ServiceConfig,
        canary: ServiceConfig,
        python: str = sys.executable,
        ready_timeout: float = 10.0,
        stop_timeout: float = 10.0,
        on_stable_moved: StableMoved | None = None,
        restart_crashed: bool = False,
        restart_backoff: float = 1.0,
    ) -> None:
        self.stable_config = stable
        self.canary_config = canary
        self.python = python
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self.on_stable_moved = on_stable_moved
        self.restart_crashed = restart_crashed
        self.restart_backoff = restart_backoff
        self._canary_port = canary.port or _free_port(canary.host)
        self._pods: dict[str, list[_Pod]] = {track: [] for track in TRACKS}
        self._exited: dict[str, float] = {}  # last crash per track, of pods since removed
        self._lock = asyncio.Lock()
        self._canary_generation = 0
        self._promoted_generation = -1
        self.spawned_pids: list[int] = []  # every process ever started, for leak checks

    async def __aenter__(self) -> ProcessWorkloads:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop_all()

    # --- addresses and bookkeeping ------------------------------------------------

    @property
    def stable_url(self) -> str:
        """The address of the current stable process; RuntimeError before `start_stable()`."""
        pods = self._pods["stable"]
        # while a promotion starts the new process, the old one still is the stable
        ready = [p for p in pods if p.state is PodState.READY]
        live = ready or [p for p in pods if p.state is not PodState.STOPPING]
        if not live:
            raise RuntimeError("no stable process was started; call start_stable() first")
        return live[-1].url

    @property
    def canary_url(self) -> str:
        """The canary's address: fixed for the manager's life, whether a canary runs or not."""
        return f"http://{self.canary_config.host}:{self._canary_port}"

    def status(self, track: str) -> TrackStatus:
        """The processes of `track` ("stable" or "canary"), counted as pods."""
        if track not in self._pods:
            raise KeyError(f"no track {track!r}; tracks: {', '.join(TRACKS)}")
        pods = self._pods[track]
        states = [p.state for p in pods]
        return TrackStatus(
            ready_pods=states.count(PodState.READY),
            not_ready_pods=states.count(PodState.STARTING) + states.count(PodState.RESTARTING),
            failed_pods=states.count(PodState.FAILED),
            restarts=sum(p.restarts for p in pods),
        )

    def pids(self, track: str) -> list[int]:
        """The process ids of the track's live processes."""
        return [
            p.process.pid
            for p in self._pods[track]
            if p.process is not None and p.process.returncode is None
        ]

    def exited_at(self, track: str) -> float | None:
        """When a process of the track last exited without being asked (a crash), if ever."""
        times = [p.exited_at for p in self._pods[track] if p.exited_at is not None]
        return max(times, default=self._exited.get(track))

    def last_stderr(self, track: str) -> list[str]:
        """The last stderr lines of the track's newest process."""
        pods = self._pods[track]
        return list(pods[-1].stderr) if pods else []

    # --- the port -------------------------------------------------------------------

    async def start_stable(self) -> str:
        """Start the stable process (once; later calls return its address)."""
        async with self._lock:
            live = [p for p in self._pods["stable"] if p.state is PodState.READY]
            if live:
                return live[-1].url
            pod = self._pod("stable", self.stable_config, self.stable_config.port)
            await self._start(pod)
            return pod.url

    async def bring_up(self, rollout: RolloutRef) -> None:
        async with self._lock:
            current = self._pods["canary"]
            if current and current[-1].state is PodState.READY:
                return  # already up: a resumed rollout asks again
            await self._stop_track("canary")
            self._canary_generation += 1
            await self._start(self._pod("canary", self.canary_config, self._canary_port))

    async def promote(self, rollout: RolloutRef) -> None:
        async with self._lock:
            if self._promoted_generation == self._canary_generation:
                return  # this canary already is the stable: a retried promotion
            config = replace(
                self.canary_config,
                namespace=self.stable_config.namespace,
                workload=self.stable_config.workload,
                host=self.stable_config.host,
                port=0,
            )
            old = list(self._pods["stable"])
            new = self._pod("stable", config, 0)
            await self._start(new)
            try:
                await self._announce(new.url)
            except Exception as e:
                await new.stop(self.stop_timeout)
                self._pods["stable"].remove(new)
                raise WorkloadError(
                    f"the router did not take the new stable {new.url}: {e}"
                ) from e
            self._promoted_generation = self._canary_generation
            await asyncio.gather(*(self._stop_pod(p) for p in old))

    async def retire(self, rollout: RolloutRef) -> None:
        async with self._lock:
            await self._stop_track("canary")

    async def stop_all(self) -> None:
        """Stop every process of every track and wait for them to exit."""
        async with self._lock:
            await asyncio.gather(*(self._stop_track(track) for track in TRACKS))

    # --- internals ------------------------------------------------------------------

    def _pod(self, track: str, config: ServiceConfig, port: int) -> _Pod:
        return _Pod(
            track=track,
            config=config,
            port=port,
            python=self.python,
            ready_timeout=self.ready_timeout,
            restart=self.restart_crashed,
            backoff=self.restart_backoff,
            spawned=self.spawned_pids,
        )

    async def _start(self, pod: _Pod) -> None:
        """Start `pod` and add it to its track; a pod that fails to start is not kept."""
        self._pods[pod.track].append(pod)
        try:
            await pod.start()
        except BaseException:
            self._pods[pod.track].remove(pod)
            raise

    async def _stop_pod(self, pod: _Pod) -> None:
        try:
            await pod.stop(self.stop_timeout)
        finally:
            if pod.exited_at is not None:  # a crash stays on record after its pod is gone
                self._exited[pod.track] = max(pod.exited_at, self._exited.get(pod.track, 0.0))
            with contextlib.suppress(ValueError):
                self._pods[pod.track].remove(pod)

    async def _stop_track(self, track: str) -> None:
        await asyncio.gather(*(self._stop_pod(p) for p in list(self._pods[track])))

    async def _announce(self, url: str) -> None:
        if self.on_stable_moved is None:
            return
        result = self.on_stable_moved(url)
        if inspect.isawaitable(result):
            await result


class PodStatusSource:
    """`engine.ports.MetricSource` for the pod metrics, from a `ProcessWorkloads`' bookkeeping.

    Answers `ready_pods`, `not_ready_pods`, `failed_pods` and `restarts` of
    the request's track (stable or canary; the workload name is not looked
    at, since one manager runs one rollout), as they are at the call: `at` is
    not looked at either. A request for any other metric or track is left out
    of the answer; the caller routes only these four metrics here. There is
    no history, so `fetch_range` answers empty series.
    """

    METRICS = frozenset(POD_METRICS)

    def __init__(self, workloads: ProcessWorkloads) -> None:
        self.workloads = workloads

    def _serves(self, request: MetricRequest) -> bool:
        return request.metric in self.METRICS and request.target.track in TRACKS

    async def fetch(
        self, at: float, requests: Sequence[MetricRequest]
    ) -> Mapping[MetricRequest, float | None]:
        out: dict[MetricRequest, float | None] = {}
        for request in requests:
            if self._serves(request):
                status = self.workloads.status(request.target.track)
                out[request] = float(status.value(request.metric))
        return out

    async def fetch_range(
        self, start: float, end: float, step: float, requests: Sequence[MetricRequest]
    ) -> Mapping[MetricRequest, list[tuple[float, float | None]]]:
        return {request: [] for request in requests if self._serves(request)}
