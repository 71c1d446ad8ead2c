"""The controller's own HTTP endpoints: metrics for Prometheus, probes for Kubernetes.

In: a `PrometheusTelemetry` and two callbacks, `ready()` and `healthy()`.
Out: an aiohttp server with

    GET /metrics   the registry in Prometheus' text exposition format
    GET /healthz   200 "ok" while the process and its event loop answer;
                   503 when `healthy()` says no (the liveness probe restarts us)
    GET /readyz    200 "ready" when `ready()` says so, else 503 "not ready"

Usage:

    server = HealthServer(telemetry, ready=lambda: store.loaded and lease.known)
    await server.start()
    ...
    await server.stop()

The server runs on the event loop the engine runs on, so an answer from
`/healthz` is itself the proof that the loop is not blocked. Responses carry
fixed short texts and a plain `Server: codedance` header: a probe or scraper
learns the state, not the software, its version or an exception's message.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from adapters.telemetry.prometheus import PrometheusTelemetry

log = logging.getLogger("codedance.telemetry")

_TEXT = "text/plain"


class HealthServer:
    """Serves `/metrics`, `/healthz` and `/readyz`; `port` 0 binds a free port.

    `ready` and `healthy` are called on every probe, on the event loop, so
    they must be cheap and must not block. One that raises counts as "no".
    """

    def __init__(
        self,
        telemetry: PrometheusTelemetry,
        *,
        ready: Callable[[], bool],
        healthy: Callable[[], bool] | None = None,
        host: str = "0.0.0.0",
        port: int = 8080,
    ) -> None:
        self._telemetry = telemetry
        self._ready = ready
        self._healthy = healthy
        self._host = host
        self._port = port
        self._runner: web.AppRunner | None = None
        self._bound: int | None = None

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        """The port the server listens on (the one the OS chose, for port 0)."""
        if self._bound is None:
            raise RuntimeError("the health server is not running")
        return self._bound

    @property
    def running(self) -> bool:
        return self._runner is not None

    async def start(self) -> None:
        if self._runner is not None:
            raise RuntimeError("the health server is already running")
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.on_response_prepare.append(_hide_server)
        # probes arrive every few seconds; an access log line for each is noise
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=5.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self._host, self._port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._bound = _bound_port(runner, self._port)
        log.info("serving /metrics, /healthz and /readyz on %s:%d", self._host, self._bound)

    async def stop(self) -> None:
        """Close the listening socket and open connections; a no-op when not running."""
        runner, self._runner, self._bound = self._runner, None, None
        if runner is not None:
            await runner.cleanup()

    # --- handlers -----------------------------------------------------------------

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self._telemetry.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.Response:
        if self._healthy is not None and not _ask(self._healthy, "healthy"):
            return _text(503, "unhealthy")
        return _text(200, "ok")

    async def _readyz(self, request: web.Request) -> web.Response:
        if not _ask(self._ready, "ready"):
            return _text(503, "not ready")
        return _text(200, "ready")


def _ask(check: Callable[[], bool], name: str) -> bool:
    """The callback's answer; a failing callback is a "no", logged here, not sent."""
    try:
        return bool(check())
    except Exception:
        log.exception("the %s check failed", name)
        return False


def _text(status: int, text: str) -> web.Response:
    return web.Response(
        status=status,
        text=text + "\n",
        content_type=_TEXT,
        headers={"Cache-Control": "no-store"},
    )


async def _hide_server(request: web.Request, response: web.StreamResponse) -> None:
    # aiohttp fills in "Python/3.x aiohttp/3.x" only when the header is unset
    response.headers["Server"] = "codedance"


def _bound_port(runner: web.AppRunner, requested: int) -> int:
    for address in runner.addresses:
        # (host, port) for IPv4, (host, port, flowinfo, scope) for IPv6
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    return requested
