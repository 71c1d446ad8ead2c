"""The sample HTTP service a local canary release ships: command-line flags in, a server out.

Run it as

    python -m adapters.local.service --port 0 --version v2 --track canary \\
        --workload web-canary --latency 0.4 --jitter 0.02 --error-share 0.3 \\
        --bad-after 30 --crash-after 20

It prints one line, `READY port=PORT pid=PID`, on stdout once it listens
(with `--port 0` the port is the one the OS chose), then serves:

    GET /healthz   200 "ok"
    GET /stats     JSON {"version", "track", "requests", "errors", "faulty_since"}
    GET /metrics   Prometheus exposition of its own registry (below)
    GET <other>    200 "hello from VERSION (TRACK)", or 500 when a fault says so

Every response carries `X-Codedance-Version` and `X-Codedance-Track`; a 500
the service gave on purpose also carries `X-Codedance-Injected: 1`.

Faults. `--latency S` (extra delay per request), `--error-share X` (a share of
requests answer 500) and `--crash-after S` (the process exits abruptly, code
3, S seconds after the faults start) are the faults. They start `--bad-after`
seconds after the server listens, or at once without it, so a demo can show
healthy steps before the canary turns bad; `faulty_since` in `/stats` is the
epoch second they started, null before (and for a service without faults).
`--jitter S` is not a fault: a uniform 0..S delay on every request, healthy
or not, the noise of a normal service.

Errors are counted, not drawn: request n of the faulty period (n = 1, 2, ...,
in arrival order, the special paths not counted) answers 500 exactly when
floor(n * share) > floor((n - 1) * share). Any first N faulty requests hold
exactly floor(N * share) errors, spread evenly (share 0.3 fails requests 4,
7, 10, 14, ...), so a test can count them; the share is kept as an exact
fraction of the decimal given.

Metrics, labelled `namespace`, `workload` and `track` with the flags' values
(the identity labels the `plain` catalog of `adapters.metrics.catalog`
matches on), for a Prometheus that scrapes the process directly:

    http_request_duration_seconds{namespace,workload,track}       histogram
    http_requests_total{namespace,workload,track,code}            counter

(A scrape configuration that also sets `namespace` or `workload` as target
labels needs `honor_labels: true`, or Prometheus renames these to
`exported_*`.)

Shutdown. SIGTERM or SIGINT stops accepting connections, lets requests in
flight finish (up to `--drain-timeout` seconds), and exits 0, so retiring a
process behind a router that no longer sends to it loses no request. With
`--exit-on-stdin-close` the service does the same when its stdin reaches end
of file: a parent that holds the pipe and dies takes its services with it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)

VERSION_HEADER = "X-Codedance-Version"
TRACK_HEADER = "X-Codedance-Track"
# On a 500 the service failed on purpose: tells an injected fault from one on the way.
INJECTED_HEADER = "X-Codedance-Injected"
CRASH_EXIT_CODE = 3

# Finer than prometheus_client's defaults around the few hundred milliseconds
# that latency policies usually draw their line at.
LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75,
    1.0, 1.5, 2.0, 3.0, 5.0, 10.0,
)
_SPECIAL = frozenset({"/healthz", "/stats", "/metrics"})


@dataclass(frozen=True, slots=True)
class Behaviour:
    """What the service is and how it misbehaves; see the module docstring."""

    version: str
    track: str = "stable"
    namespace: str = "default"
    workload: str = "web"
    latency: float = 0.0
    jitter: float = 0.0
    error_share: Fraction = Fraction(0)
    bad_after: float | None = None
    crash_after: float | None = None
    seed: int | None = None

    @property
    def has_faults(self) -> bool:
        return self.latency > 0 or self.error_share > 0 or self.crash_after is not None


class SampleService:
    """The request handling and the bookkeeping of one running service.

    `started` is the epoch second the server began listening; the faults
    begin `bad_after` seconds later. `clock` gives epoch seconds.
    """

    def __init__(
        self,
        behaviour: Behaviour,
        *,
        started: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.behaviour = behaviour
        self.started = started
        self._clock = clock
        self._random = random.Random(behaviour.seed)
        self.requests = 0
        self.errors = 0
        self._faulty_requests = 0
        self.registry = CollectorRegistry()
        identity = ("namespace", "workload", "track")
        values = (behaviour.namespace, behaviour.workload, behaviour.track)
        self._duration = Histogram(
            "http_request_duration_seconds",
            "Time from a request's arrival to its response, in seconds.",
            identity,
            registry=self.registry,
            buckets=LATENCY_BUCKETS,
        ).labels(*values)
        counter = Counter(
            "http_requests",
            "Requests answered, by HTTP status code.",
            (*identity, "code"),
            registry=self.registry,
        )
        # Both codes exist from the start: a counter that first appears at 1
        # loses that first increase in Prometheus' rate().
        self._answered = {code: counter.labels(*values, str(code)) for code in (200, 500)}

    @property
    def fault_start(self) -> float | None:
        """When the faults begin (epoch seconds), or None for a service without faults."""
        if not self.behaviour.has_faults:
            return None
        return self.started + (self.behaviour.bad_after or 0.0)

    def faulty_since(self, now: float | None = None) -> float | None:
        start = self.fault_start
        now = self._clock() if now is None else now
        return start if start is not None and now >= start else None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/stats", self._stats)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/{tail:.*}", self._serve)
        app.on_response_prepare.append(self._identify)
        return app

    def _next_is_error(self) -> bool:
        """The counted error schedule of the module docstring."""
        self._faulty_requests += 1
        n, share = self._faulty_requests, self.behaviour.error_share
        return math.floor(n * share) > math.floor((n - 1) * share)

    async def _serve(self, request: web.Request) -> web.Response:
        arrived = time.perf_counter()
        self.requests += 1
        b = self.behaviour
        delay = self._random.uniform(0.0, b.jitter) if b.jitter > 0 else 0.0
        error = False
        if self.faulty_since() is not None:
            delay += b.latency
            error = self._next_is_error()
        if delay > 0:
            await asyncio.sleep(delay)
        status = 500 if error else 200
        if error:
            self.errors += 1
            text = f"{b.version} ({b.track}) failed, as configured\n"
        else:
            text = f"hello from {b.version} ({b.track})\n"
        self._answered[status].inc()
        self._duration.observe(time.perf_counter() - arrived)
        response = web.Response(status=status, text=text)
        if error:
            response.headers[INJECTED_HEADER] = "1"
        return response

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _stats(self, request: web.Request) -> web.Response:
        body = {
            "version": self.behaviour.version,
            "track": self.behaviour.track,
            "requests": self.requests,
            "errors": self.errors,
            "faulty_since": self.faulty_since(),
            "started": self.started,
        }
        return web.Response(text=json.dumps(body), content_type="application/json")

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def _identify(self, request: web.Request, response: web.StreamResponse) -> None:
        response.headers[VERSION_HEADER] = self.behaviour.version
        response.headers[TRACK_HEADER] = self.behaviour.track


# --- the command --------------------------------------------------------------------


def _seconds(text: str) -> float:
    value = float(text)
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds >= 0")
    return value


def _share(text: str) -> Fraction:
    try:
        value = Fraction(text.strip())
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not a share between 0 and 1")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text} is not a port (0..65535)")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m adapters.local.service",
        description="A sample HTTP service with configurable faults, for local canary releases.",
    )
    p.add_argument("--port", type=_port, required=True, help="port to listen on; 0 picks one")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--version", required=True, help="the version this process runs, e.g. v2")
    p.add_argument("--namespace", default="default")
    p.add_argument("--workload", default="web")
    p.add_argument("--track", default="stable", help="stable or canary")
    p.add_argument("--latency", type=_seconds, default=0.0, help="fault: extra seconds a request")
    p.add_argument("--jitter", type=_seconds, default=0.0, help="uniform 0..S extra, always")
    p.add_argument("--error-share", type=_share, default=Fraction(0), help="fault: share of 500s")
    p.add_argument("--crash-after", type=_seconds, default=None, help="fault: exit 3 S s in")
    p.add_argument("--bad-after", type=_seconds, default=None, help="faults start S s in")
    p.add_argument("--seed", type=int, default=None, help="seed of the jitter")
    p.add_argument(
        "--drain-timeout", type=_seconds, default=5.0,
        help="seconds requests in flight get at shutdown (0: no limit)",
    )
    p.add_argument("--exit-on-stdin-close", action="store_true")
    return p


def _behaviour(args: argparse.Namespace) -> Behaviour:
    return Behaviour(
        version=args.version,
        track=args.track,
        namespace=args.namespace,
        workload=args.workload,
        latency=args.latency,
        jitter=args.jitter,
        error_share=args.error_share,
        bad_after=args.bad_after,
        crash_after=args.crash_after,
        seed=args.seed,
    )


def _say(text: str) -> None:
    """A line on stderr; a reader that went away (a dead parent's pipe) is no error."""
    try:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def _crash(seconds: float) -> None:
    _say(f"crashing now, {seconds:g}s after the faults started (--crash-after)")
    os._exit(CRASH_EXIT_CODE)  # abruptly, as a crashing process does: no cleanup, no drain


def _watch_stdin(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    fd = sys.stdin.fileno()

    def readable() -> None:
        try:
            data = os.read(fd, 4096)
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(fd)
            stop.set()
            _say("stdin closed: shutting down")

    loop.add_reader(fd, readable)


async def serve(args: argparse.Namespace) -> int:
    """Listen, print READY, serve until told to stop; the process's exit code."""
    loop = asyncio.get_running_loop()
    behaviour = _behaviour(args)
    service = SampleService(behaviour, started=time.time())
    runner = web.AppRunner(service.app(), access_log=None, shutdown_timeout=args.drain_timeout)
    await runner.setup()
    try:
        site = web.TCPSite(runner, args.host, args.port)
        await site.start()
    except OSError as e:
        await runner.cleanup()
        _say(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}")
        return 1
    port = args.port
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            port = int(address[1])
            break
    service.started = time.time()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if args.exit_on_stdin_close:
        _watch_stdin(loop, stop)
    fault_start = service.fault_start
    if behaviour.crash_after is not None and fault_start is not None:
        delay = fault_start - service.started + behaviour.crash_after
        loop.call_later(delay, _crash, behaviour.crash_after)
    _say(f"{behaviour.version} ({behaviour.track}) listening on {args.host}:{port}")
    print(f"READY port={port} pid={os.getpid()}", flush=True)
    await stop.wait()
    _say("stopping: no new connections, draining requests in flight")
    await runner.cleanup()
    _say("stopped")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return asyncio.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())
