"""An in-process reverse proxy that splits traffic between stable and canary.

In: the address to listen on, the stable and canary base URLs, and the
`TrafficStats` to record into. Out: the engine's `TrafficRouter` port
(`set_weight`, `get_weight`) over a running aiohttp proxy, plus `set_stable`
and `set_canary` to swap an upstream (at promotion the stable process is
replaced by one running the new version).

Routing is smooth weighted round robin, the algorithm nginx's upstream module
uses: with weights (100 - w, w) the canary gets exactly w of any 100
consecutive requests, spread out rather than in a burst, and weight 0 (100)
never sends a request to the canary (stable). A weight change takes effect
from the next request; requests in flight finish where they started.

Each request is forwarded with its method, path, query, body and end-to-end
headers (Host as the client sent it, plus X-Forwarded-For); the upstream's
status, headers and body come back the same way. Every attempt is recorded in
the stats with its track. When the canary cannot be reached (it crashed), the
request is sent to stable once, as nginx does with `proxy_next_upstream error
timeout`: the client sees stable's answer and the stats see the canary's
failure. As in nginx, a request that may not be
repeated (POST, PATCH) is retried only if it never reached the canary.
"""

from __future__ import annotations

import time
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from adapters.local.trafficstats import TrafficStats
from engine.ports import RolloutRef

# RFC 9110 7.6.1: these describe one connection, never forwarded.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)

# Methods nginx retries after the request was sent (see proxy_next_upstream non_idempotent).
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


def check_weight(weight: int) -> int:
    if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= 100:
        raise ValueError(f"a canary weight is a whole number from 0 to 100, not {weight!r}")
    return weight


def check_url(url: str, what: str) -> str:
    """`url` without a trailing slash, if it is an http:// URL with a host."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as e:
        raise ValueError(f"the {what} URL {url!r} is not valid: {e}") from None
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"the {what} URL {url!r} must look like http://HOST:PORT")
    return url.rstrip("/")


class SmoothWeighted:
    """nginx's smooth weighted round robin over (stable, canary) with weights (100 - w, w)."""

    def __init__(self, weight: int = 0) -> None:
        self.weight = check_weight(weight)
        self._current = {"stable": 0, "canary": 0}

    def set(self, weight: int) -> None:
        self.weight = check_weight(weight)
        # a fresh cycle, as nginx starts one when a reload builds new peers
        self._current = {"stable": 0, "canary": 0}

    def pick(self) -> str:
        if self.weight == 0:
            return "stable"
        if self.weight == 100:
            return "canary"
        weights = {"stable": 100 - self.weight, "canary": self.weight}
        for track, w in weights.items():
            self._current[track] += w
        # ties go to stable: it is listed first, as in the nginx upstream block
        best = max(self._current, key=lambda t: (self._current[t], t == "stable"))
        self._current[best] -= sum(weights.values())
        return best


class _Unreachable(Exception):
    """The upstream failed before answering; `sent` when the request may have reached it."""

    def __init__(self, track: str, sent: bool, cause: BaseException) -> None:
        super().__init__(f"{track} upstream failed: {cause!r}")
        self.track = track
        self.sent = sent


def _request_headers(request: web.Request) -> CIMultiDict[str]:
    named = {token.strip().lower() for token in request.headers.get("Connection", "").split(",")}
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in request.headers.items():
        lower = name.lower()
        if lower in HOP_BY_HOP or lower in named or lower == "content-length":
            continue
        headers.add(name, value)
    peer = request.remote or ""
    forwarded = request.headers.get("X-Forwarded-For")
    headers["X-Forwarded-For"] = f"{forwarded}, {peer}" if forwarded else peer
    return headers


def _response_headers(response: aiohttp.ClientResponse) -> CIMultiDict[str]:
    named = {token.strip().lower() for token in response.headers.get("Connection", "").split(",")}
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in response.headers.items():
        lower = name.lower()
        # the body is passed on whole, so its length is recomputed
        if lower in HOP_BY_HOP or lower in named or lower == "content-length":
            continue
        headers.add(name, value)
    return headers


class BuiltinRouter:
    """A reverse proxy on `listen_host:listen_port` (0: a free port) in this process.

    Usage::

        router = BuiltinRouter("127.0.0.1", 0, "http://127.0.0.1:8001",
                               "http://127.0.0.1:8002", stats)
        await router.start()
        await router.set_weight(ref, 10)   # 10 of every 100 requests to the canary
        ...
        await router.stop()

    It serves one rollout: the `RolloutRef` passed to the port's methods is not consulted.
    """

    def __init__(
        self,
        listen_host: str,
        listen_port: int,
        stable_url: str,
        canary_url: str,
        stats: TrafficStats,
        *,
        connect_timeout: float = 2.0,
        read_timeout: float = 60.0,
    ) -> None:
        self.listen_host = listen_host
        self.listen_port = listen_port
        self.stats = stats
        self._upstreams = {
            "stable": check_url(stable_url, "stable"),
            "canary": check_url(canary_url, "canary"),
        }
        self._split = SmoothWeighted(0)
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=connect_timeout, sock_read=read_timeout
        )
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._port = listen_port

    # --- lifecycle ----------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port it listens on (the one picked, when constructed with 0)."""
        return self._port

    @property
    def url(self) -> str:
        return f"http://{self.listen_host}:{self._port}"

    @property
    def stable_url(self) -> str:
        return self._upstreams["stable"]

    @property
    def canary_url(self) -> str:
        return self._upstreams["canary"]

    async def start(self) -> None:
        if self._runner is not None:
            return
        self._session = aiohttp.ClientSession(
            timeout=self._timeout,
            auto_decompress=False,  # bodies pass through as the upstream encoded them
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=None),
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=5.0)
        await runner.setup()
        site = web.TCPSite(runner, self.listen_host, self.listen_port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            await self._session.close()
            self._session = None
            raise
        self._runner = runner
        self._port = int(runner.addresses[0][1])

    async def stop(self) -> None:
        """Stop listening; requests in flight get a few seconds to finish."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def __aenter__(self) -> BuiltinRouter:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- the TrafficRouter port ---------------------------------------------------

    async def set_weight(self, rollout: RolloutRef, weight: int) -> None:
        self._split.set(weight)

    async def get_weight(self, rollout: RolloutRef) -> int:
        """The weight routing applies to the next request."""
        return self._split.weight

    async def set_stable(self, url: str) -> None:
        """Send stable's share to `url` from the next request on."""
        self._upstreams["stable"] = check_url(url, "stable")

    async def set_canary(self, url: str) -> None:
        self._upstreams["canary"] = check_url(url, "canary")

    # --- proxying -----------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = _request_headers(request)
        track = self._split.pick()
        try:
            return await self._forward(track, request, headers, body)
        except _Unreachable as failed:
            retry = track == "canary" and (not failed.sent or request.method in IDEMPOTENT)
            if not retry:
                return web.Response(status=502, text=f"{track} upstream unreachable\n")
        try:
            return await self._forward("stable", request, headers, body)
        except _Unreachable:
            return web.Response(status=502, text="no upstream reachable\n")

    async def _forward(
        self, track: str, request: web.Request, headers: CIMultiDict[str], body: bytes
    ) -> web.Response:
        session = self._session
        if session is None:
            raise RuntimeError("the proxy is not started")
        url = URL(self._upstreams[track] + request.raw_path, encoded=True)
        started = time.perf_counter()
        try:
            async with session.request(
                request.method,
                url,
                headers=headers,
                data=body or None,
                allow_redirects=False,
                skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
            ) as upstream:
                payload = await upstream.read()
                status = upstream.status
                answer_headers = _response_headers(upstream)
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as e:
            self.stats.record(track, time.perf_counter() - started, None)
            raise _Unreachable(track, sent=False, cause=e) from e
        except (TimeoutError, aiohttp.ClientError) as e:
            # dropped mid-request: the upstream may have acted on it
            self.stats.record(track, time.perf_counter() - started, None)
            raise _Unreachable(track, sent=True, cause=e) from e
        self.stats.record(track, time.perf_counter() - started, status)
        return web.Response(status=status, headers=answer_headers, body=payload)
