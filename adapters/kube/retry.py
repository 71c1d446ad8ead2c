"""Bounded retries of Kubernetes API calls that the server asks us to repeat.

In: a coroutine function making one API call, a clock, and how many attempts.
Out: its result, or the last `ApiException` once the attempts are spent.

What is retried: 429 Too Many Requests (after the server's Retry-After when
it sends one: API Priority and Fairness says when to come back) and 5xx (an
overloaded or restarting API server, an etcd timeout), with exponential
backoff capped at `cap` seconds. Everything else is the caller's answer to
handle: a 404 means something, and a 409 Conflict means another writer got
there first, which only the caller can fix by reading again and re-applying
its change (`is_conflict` tells it apart).

The clock is the engine's `Clock` port, so a test waits on fake time; adapters
whose constructor has no clock use `LoopClock`, the event loop's own time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from kubernetes.aio.client.exceptions import ApiException

from engine.ports import Clock

T = TypeVar("T")

ATTEMPTS = 5
BASE_DELAY = 0.5
CAP = 10.0


class LoopClock:
    """Wall-clock seconds, waiting with `asyncio.sleep` (so a faked loop clock applies)."""

    def now(self) -> float:
        return time.time()

    async def sleep_until(self, t: float) -> None:
        delay = t - self.now()
        if delay > 0:
            await asyncio.sleep(delay)


def status_code(error: ApiException) -> int:
    return int(error.status or 0)


def is_retryable(error: ApiException) -> bool:
    code = status_code(error)
    return code == 429 or code >= 500


def is_conflict(error: ApiException) -> bool:
    return status_code(error) == 409


def is_not_found(error: ApiException) -> bool:
    return status_code(error) == 404


def retry_after(error: ApiException) -> float | None:
    """The server's Retry-After in seconds, None when absent or not a number of seconds."""
    headers = error.headers or {}
    value = headers.get("Retry-After")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None  # an HTTP date: the API server never sends one, so backoff decides
    return seconds if seconds >= 0 else None


def backoff(attempt: int, *, base: float = BASE_DELAY, cap: float = CAP) -> float:
    """The wait before retry number `attempt` (1, 2, ...): base, 2 base, 4 base ... at most cap."""
    return float(min(cap, base * 2 ** (attempt - 1)))


async def call(
    fn: Callable[[], Awaitable[T]],
    *,
    attempts: int = ATTEMPTS,
    clock: Clock,
    base: float = BASE_DELAY,
    cap: float = CAP,
) -> T:
    """`await fn()`, again after a 429 or a 5xx, at most `attempts` times in all."""
    if attempts < 1:
        raise ValueError(f"attempts must be at least 1, not {attempts}")
    attempt = 1
    while True:
        try:
            return await fn()
        except ApiException as error:
            if not is_retryable(error) or attempt >= attempts:
                raise
            delay = backoff(attempt, base=base, cap=cap)
            asked = retry_after(error) if status_code(error) == 429 else None
            if asked is not None:
                # the server's own estimate wins, but a huge one must not stall a rollout
                delay = min(asked, cap)
            await clock.sleep_until(clock.now() + delay)
            attempt += 1
