"""BuiltinRouter: an exact split, forwarding, weight changes under load, a crashing canary.

Two small aiohttp apps on 127.0.0.1 stand in for the stable and canary
processes; each answers with its name, so a test counts who served a request.
`Upstream` and `run_load` are shared with the nginx tests.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from adapters.local.proxy import BuiltinRouter, SmoothWeighted
from adapters.local.trafficstats import TrafficStats
from engine.loop import LoopClock
from engine.ports import RolloutRef, TrafficRouter

REF = RolloutRef("shop", "checkout", "checkout", "checkout-canary")


class Upstream:
    """A stand-in service: `GET /...` answers its name; `/echo` describes the request,
    `/status/CODE` answers CODE, `/slow` takes half a second."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.served = 0
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _answer(self, request: web.Request) -> web.Response:
        self.served += 1
        body = await request.read()
        if request.path.startswith("/status/"):
            return web.Response(status=int(request.path.rsplit("/", 1)[1]), text=self.name)
        if request.path == "/slow":
            await asyncio.sleep(0.5)
        if request.path == "/echo":
            described = {
                "method": request.method,
                "raw_path": request.raw_path,
                "body": body.decode(),
                "headers": dict(request.headers),
            }
            return web.json_response(described, headers={"X-Codedance-Version": self.name})
        response = web.Response(text=self.name, headers={"X-Codedance-Version": self.name})
        response.headers.add("Set-Cookie", "a=1")
        response.headers.add("Set-Cookie", "b=2")
        return response

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._answer)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        """Close the listening socket and every connection, as a crashed process would."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()


@pytest_asyncio.fixture
async def stable() -> AsyncIterator[Upstream]:
    app = Upstream("stable")
    await app.start()
    yield app
    await app.stop()


@pytest_asyncio.fixture
async def canary() -> AsyncIterator[Upstream]:
    app = Upstream("canary")
    await app.start()
    yield app
    await app.stop()


async def count_answers(url: str, n: int) -> Counter[str]:
    """Who answered each of `n` requests sent one after another."""
    answers: Counter[str] = Counter()
    async with aiohttp.ClientSession() as session:
        for _ in range(n):
            async with session.get(url) as response:
                assert response.status == 200
                answers[await response.text()] += 1
    return answers


@dataclass
class Load:
    """What a load run saw: answers by upstream name and every failure."""

    answers: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.answers.values()) + len(self.failures)


async def run_load(
    url: str, rate: float, during: Callable[[], Awaitable[None]], settle: float = 0.3
) -> Load:
    """Send GETs at `rate` per second (concurrently) while `during()` runs, then `settle` more."""
    load = Load()
    stop = asyncio.Event()

    async def one(session: aiohttp.ClientSession) -> None:
        try:
            async with session.get(url) as response:
                text = await response.text()
                if response.status == 200:
                    load.answers[text] += 1
                else:
                    load.failures.append(f"{response.status}: {text.strip()}")
        except aiohttp.ClientError as e:
            load.failures.append(repr(e))

    async def generate(session: aiohttp.ClientSession) -> None:
        tasks: list[asyncio.Task[None]] = []
        start = time.monotonic()
        k = 0
        while not stop.is_set():
            tasks.append(asyncio.ensure_future(one(session)))
            k += 1
            delay = start + k / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        await asyncio.gather(*tasks)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        generator = asyncio.ensure_future(generate(session))
        await asyncio.sleep(settle)
        try:
            await during()
            await asyncio.sleep(settle)
        finally:
            stop.set()
            await generator
    return load


# --- routing -------------------------------------------------------------------------


@pytest.mark.parametrize("weight", range(101))
def test_smooth_round_robin_is_exact_over_any_100_requests(weight: int) -> None:
    split = SmoothWeighted(weight)
    picks = [split.pick() == "canary" for _ in range(300)]
    for start in range(0, 201, 7):
        assert sum(picks[start : start + 100]) == weight
    if 0 < weight < 50:  # spread out: never two canary requests in a row
        assert not any(a and b for a, b in itertools.pairwise(picks))


@pytest_asyncio.fixture
async def router(stable: Upstream, canary: Upstream) -> AsyncIterator[BuiltinRouter]:
    stats = TrafficStats(LoopClock())
    proxy = BuiltinRouter("127.0.0.1", 0, stable.url, canary.url, stats)
    await proxy.start()
    yield proxy
    await proxy.stop()


@pytest.mark.asyncio
@pytest.mark.parametrize("weight", [0, 5, 25, 100])
async def test_exact_split(router: BuiltinRouter, weight: int) -> None:
    await router.set_weight(REF, weight)
    assert await router.get_weight(REF) == weight
    answers = await count_answers(router.url + "/", 200)
    assert answers["canary"] == 2 * weight
    assert answers["stable"] == 200 - 2 * weight
    assert router.stats.count("canary") == 2 * weight


@pytest.mark.asyncio
async def test_forwards_method_path_query_body_and_end_to_end_headers(
    router: BuiltinRouter,
) -> None:
    await router.set_weight(REF, 100)
    async with aiohttp.ClientSession() as session:
        async with session.post(
            router.url + "/echo?x=1&y=a%20b",
            data=b"order=42",
            headers={"X-Request-Id": "r-1", "Proxy-Authorization": "secret"},
        ) as response:
            assert response.status == 200
            assert response.headers["X-Codedance-Version"] == "canary"
            seen = json.loads(await response.text())
        async with session.get(router.url + "/") as response:
            assert response.headers.getall("Set-Cookie") == ["a=1", "b=2"]
    assert (seen["method"], seen["raw_path"], seen["body"]) == (
        "POST",
        "/echo?x=1&y=a%20b",
        "order=42",
    )
    headers = {name.lower(): value for name, value in seen["headers"].items()}
    assert headers["x-request-id"] == "r-1"
    assert "proxy-authorization" not in headers  # hop-by-hop
    assert headers["x-forwarded-for"] == "127.0.0.1"
    assert headers["host"] == f"127.0.0.1:{router.port}"  # as the client sent it


async def check_status_comes_back(
    url: str, stats: TrafficStats, flush: Callable[[], object] = lambda: None
) -> None:
    """Statuses pass through unchanged and land in the stats (after `flush`)."""
    async with aiohttp.ClientSession() as session:
        for status in (200, 404, 503, 503):
            async with session.delete(f"{url}/status/{status}") as response:
                assert response.status == status
                assert await response.text() == "stable"
    flush()
    now = stats.clock.now()
    assert stats.value("stable", "success_rate", 60, now) == pytest.approx(0.25)
    assert stats.value("stable", "error_rate", 60, now) == pytest.approx(0.5)


async def check_in_flight_finishes(router: TrafficRouter, url: str) -> None:
    """A slow request to the canary still gets the canary's answer after weight 0."""
    await router.set_weight(REF, 100)
    async with aiohttp.ClientSession() as session:
        slow = asyncio.ensure_future(session.get(url + "/slow"))
        await asyncio.sleep(0.15)
        await router.set_weight(REF, 0)
        async with await slow as response:
            assert response.status == 200
            assert await response.text() == "canary"
        async with session.get(url + "/") as response:
            assert await response.text() == "stable"


@pytest.mark.asyncio
async def test_the_upstream_status_comes_back(router: BuiltinRouter) -> None:
    await check_status_comes_back(router.url, router.stats)


@pytest.mark.asyncio
async def test_requests_in_flight_finish_when_the_weight_changes(router: BuiltinRouter) -> None:
    await check_in_flight_finishes(router, router.url)


@pytest.mark.asyncio
async def test_weight_changes_under_load_lose_no_request(router: BuiltinRouter) -> None:
    async def change() -> None:
        for weight in (10, 50, 0, 90, 25, 100, 5, 60, 0, 30):
            await router.set_weight(REF, weight)
            assert await router.get_weight(REF) == weight
            await asyncio.sleep(0.1)

    load = await run_load(router.url + "/", 100, change)
    assert load.failures == []
    assert load.total >= 100
    assert load.answers["canary"] > 0 and load.answers["stable"] > 0


@pytest.mark.asyncio
async def test_a_crashed_canary_is_retried_on_stable_and_counted(
    router: BuiltinRouter, canary: Upstream
) -> None:
    await router.set_weight(REF, 50)

    async def crash() -> None:
        await asyncio.sleep(0.3)
        await canary.stop()
        await asyncio.sleep(0.5)

    load = await run_load(router.url + "/", 100, crash)
    assert load.failures == []
    assert load.answers["canary"] > 0  # served before the crash
    now = router.stats.clock.now()
    error_rate = router.stats.value("canary", "error_rate", 60, now)
    assert error_rate is not None and error_rate > 0.2
    assert router.stats.value("stable", "error_rate", 60, now) == 0.0


@pytest.mark.asyncio
async def test_a_post_that_never_reached_the_canary_is_retried(
    router: BuiltinRouter, canary: Upstream
) -> None:
    await router.set_weight(REF, 100)
    await canary.stop()
    async with (
        aiohttp.ClientSession() as session,
        session.post(router.url + "/echo", data=b"x") as response,
    ):
        assert response.status == 200
        assert response.headers["X-Codedance-Version"] == "stable"


@pytest.mark.asyncio
async def test_set_stable_swaps_the_upstream(router: BuiltinRouter) -> None:
    replacement = Upstream("stable-v2")
    await replacement.start()
    try:
        await router.set_stable(replacement.url)
        answers = await count_answers(router.url + "/", 20)
        assert answers == Counter({"stable-v2": 20})
        assert router.stats.count("stable") == 20
    finally:
        await replacement.stop()


@pytest.mark.asyncio
async def test_bad_weights_and_urls_are_refused(router: BuiltinRouter) -> None:
    await router.set_weight(REF, 20)
    for weight in (-1, 101):
        with pytest.raises(ValueError, match="0 to 100"):
            await router.set_weight(REF, weight)
    with pytest.raises(ValueError, match="http://HOST:PORT"):
        await router.set_stable("ftp://127.0.0.1:21")
    assert await router.get_weight(REF) == 20
