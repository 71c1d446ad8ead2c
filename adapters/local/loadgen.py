"""Steady HTTP traffic for a local release: a URL and a rate in, one record per request out.

`LoadGenerator(url, rate)` sends `GET url` at a steady rate: request k is
due at start + k / rate, on the clock's absolute times, not a sleep after
each response, so a slow answer never lowers the rate. Requests run
concurrently, at most `max_in_flight` at once; a request due while that many
are still waiting is not sent and counts in `skipped` (an open-loop load
generator that queued them would only hide the overload, then burst).

Each response (or failure) becomes a `Record`: when it was sent (clock
seconds), its latency (seconds, measured on the monotonic clock), the status
(None when no response came: connection refused or reset, or the `timeout`
passed), and the `X-Codedance-Version` / `X-Codedance-Track` headers the
sample service sets, so a run can tell which track answered. Counters:
`sent`, `failed` (not 2xx, or no response), `by_track` and `by_version`
(answered requests per header value; `"?"` when the header is missing).

Usage:

    load = LoadGenerator("http://127.0.0.1:8080/", 50)
    load.start()
    ...
    await load.stop()          # waits for the responses still in flight
    load.records_since(t)      # what was sent at or after t

`clock` is an `engine.ports.Clock`; the default follows the wall clock. Pass
the engine's clock to get send times on the engine's time line.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, deque
from dataclasses import dataclass

import aiohttp

from adapters.local.service import INJECTED_HEADER, TRACK_HEADER, VERSION_HEADER
from engine.ports import Clock

UNKNOWN = "?"


class WallClock:
    """Epoch seconds, and a wait for one on the event loop."""

    def now(self) -> float:
        return time.time()

    async def sleep_until(self, t: float) -> None:
        delay = t - time.time()
        if delay > 0:
            await asyncio.sleep(delay)


@dataclass(frozen=True, slots=True)
class Record:
    """One request: when it was sent, how long it took, and who answered."""

    sent_at: float
    latency: float
    status: int | None
    version: str | None = None
    track: str | None = None
    error: str | None = None
    injected: bool = False  # a 500 the service gave on purpose

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


class LoadGenerator:
    """Sends GET requests to `url` at `rate_per_second`; see the module docstring."""

    def __init__(
        self,
        url: str,
        rate_per_second: float,
        *,
        timeout: float = 5.0,
        clock: Clock | None = None,
        max_in_flight: int = 100,
        max_records: int = 100_000,
    ) -> None:
        if not rate_per_second > 0:
            raise ValueError(f"the rate must be positive, not {rate_per_second}")
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.url = url
        self.rate = float(rate_per_second)
        self.timeout = timeout
        self.clock: Clock = clock or WallClock()
        self.max_in_flight = max_in_flight
        self.records: deque[Record] = deque(maxlen=max_records)
        self.sent = 0
        self.failed = 0
        self.skipped = 0
        self.by_track: Counter[str] = Counter()
        self.by_version: Counter[str] = Counter()
        self.max_seen_in_flight = 0
        self._inflight: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        self._scheduler: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._scheduler is not None

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    @property
    def completed(self) -> int:
        """Requests that have a record (answered, refused or timed out)."""
        return self.sent - len(self._inflight)

    def start(self) -> None:
        """Begin sending, the first request now; call on a running event loop."""
        if self._scheduler is not None:
            raise RuntimeError("the load generator is already running")
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout),
            connector=aiohttp.TCPConnector(limit=self.max_in_flight),
        )
        self._scheduler = asyncio.ensure_future(self._schedule(self.clock.now()))

    async def stop(self) -> None:
        """Stop sending and wait for the responses in flight (each bounded by `timeout`)."""
        scheduler, self._scheduler = self._scheduler, None
        if scheduler is not None:
            scheduler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await scheduler
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def __aenter__(self) -> LoadGenerator:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def records_since(self, t: float) -> list[Record]:
        """The records of requests sent at or after clock time `t`, oldest first."""
        return [r for r in self.records if r.sent_at >= t]

    async def _schedule(self, start: float) -> None:
        k = 0
        while True:
            # each due time is computed from the start, so rounding never drifts the rate
            due = start + k / self.rate
            if due > self.clock.now():
                await self.clock.sleep_until(due)
            else:
                await asyncio.sleep(0)  # catching up: still let the responses be read
            k += 1
            if len(self._inflight) >= self.max_in_flight:
                self.skipped += 1
                continue
            self.sent += 1
            task = asyncio.ensure_future(self._one(self.clock.now()))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)
            self.max_seen_in_flight = max(self.max_seen_in_flight, len(self._inflight))

    async def _one(self, sent_at: float) -> None:
        session = self._session
        assert session is not None
        began = time.perf_counter()
        try:
            async with session.get(self.url) as response:
                await response.read()
                record = Record(
                    sent_at=sent_at,
                    latency=time.perf_counter() - began,
                    status=response.status,
                    version=response.headers.get(VERSION_HEADER),
                    track=response.headers.get(TRACK_HEADER),
                    injected=response.headers.get(INJECTED_HEADER) == "1",
                )
        except (aiohttp.ClientError, TimeoutError) as e:
            record = Record(
                sent_at=sent_at,
                latency=time.perf_counter() - began,
                status=None,
                error=f"{type(e).__name__}: {e}" if str(e) else type(e).__name__,
            )
        self._count(record)

    def _count(self, record: Record) -> None:
        self.records.append(record)
        if not record.ok:
            self.failed += 1
        if record.status is not None:
            self.by_track[record.track or UNKNOWN] += 1
            self.by_version[record.version or UNKNOWN] += 1
