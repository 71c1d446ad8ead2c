"""Traffic moves that must finish: rollback and promotion, each confirmed by read-back.

In: the router, the workload manager, the rollout's reference, a clock. Out:
nothing but side effects, done in an order that never leaves traffic split
after a failure:

- rollback: every request to stable first, confirmed by reading the weight
  back; only then is the canary retired. Each part is idempotent and retried
  with capped exponential backoff until it is confirmed, so a flaky API or a
  router that reverts a write does not leave the canary serving.
- promotion: the canary takes all traffic, the stable workload is updated to
  the new version and waits until it is ready, then traffic returns to the
  (now new) stable and the canary is retired.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from engine.ports import Clock, RolloutRef, RouteCleanup, TrafficRouter, WorkloadManager

log = logging.getLogger("codedance.engine")


class Unconfirmed(Exception):
    """The router still reports another weight than the one written."""


async def retry(
    what: str,
    attempt: Callable[[], Awaitable[None]],
    clock: Clock,
    *,
    first_delay: float = 0.5,
    max_delay: float = 30.0,
    attempts: int | None = None,
) -> None:
    """Run `attempt` until it succeeds; wait 0.5 s, 1 s, 2 s ... (at most 30 s) between tries."""
    delay = first_delay
    n = 0
    while True:
        n += 1
        try:
            await attempt()
            return
        except Exception as e:
            if attempts is not None and n >= attempts:
                raise
            log.warning("%s failed (attempt %d), retrying in %.1fs: %s", what, n, delay, e)
            await clock.sleep_until(clock.now() + delay)
            delay = min(max_delay, delay * 2)


async def set_weight_confirmed(
    router: TrafficRouter, rollout: RolloutRef, weight: int, clock: Clock
) -> None:
    """Write a weight and read it back; retried until the router reports it."""

    async def attempt() -> None:
        await router.set_weight(rollout, weight)
        seen = await router.get_weight(rollout)
        if seen != weight:
            raise Unconfirmed(f"wrote weight {weight}, the router reports {seen}")

    await retry(f"setting weight {weight} for {rollout.namespace}/{rollout.name}", attempt, clock)


async def roll_back(
    router: TrafficRouter, workloads: WorkloadManager, rollout: RolloutRef, clock: Clock
) -> None:
    await set_weight_confirmed(router, rollout, 0, clock)
    await _retire(router, workloads, rollout, clock)


async def _retire(
    router: TrafficRouter, workloads: WorkloadManager, rollout: RolloutRef, clock: Clock
) -> None:
    """The canary goes, then whatever the router kept for it (a canary Ingress)."""
    await retry(
        f"retiring the canary of {rollout.namespace}/{rollout.name}",
        lambda: workloads.retire(rollout),
        clock,
    )
    if isinstance(router, RouteCleanup):
        await retry(
            f"removing the canary route of {rollout.namespace}/{rollout.name}",
            lambda: router.remove(rollout),
            clock,
        )


async def promote(
    router: TrafficRouter, workloads: WorkloadManager, rollout: RolloutRef, clock: Clock
) -> None:
    await set_weight_confirmed(router, rollout, 100, clock)
    await retry(
        f"promoting {rollout.namespace}/{rollout.name}", lambda: workloads.promote(rollout), clock
    )
    await set_weight_confirmed(router, rollout, 0, clock)
    await _retire(router, workloads, rollout, clock)
