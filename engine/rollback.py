"""Traffic moves that must finish: rollback and promotion, each confirmed by read-back.

In: the router, the workload manager, the rollout's reference, a clock and
the scale-down delay. Out: nothing but side effects, done in an order that
never leaves traffic split after a failure and never sends a request to a pod
that is gone:

- rollback: a half-done promotion is undone first (`PromotionUndo`), then
  every request goes to stable, confirmed by reading the weight back; the
  canary is retired only `delay` seconds later, so proxies that still hold
  the old weights (an Envoy or an NGINX picking up its configuration a moment
  after the API accepted it) drain their requests to live pods. Each part is
  idempotent and retried with capped exponential backoff until it is
  confirmed, so a flaky API or a router that reverts a write does not leave
  the canary serving.
- promotion: the canary takes all traffic, the stable workload is updated to
  the new version and waited for until it is fully rolled out; only then does
  traffic return to the (now new) stable, and the canary is retired `delay`
  seconds after that. A stable that will not roll out (`WorkloadFailed`) is
  not retried: the exception goes to the caller, which rolls back.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from engine.ports import (
    Clock,
    PromotionUndo,
    RolloutRef,
    RouteCleanup,
    TrafficRouter,
    WorkloadFailed,
    WorkloadManager,
)

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
    fatal: tuple[type[Exception], ...] = (),
) -> None:
    """Run `attempt` until it succeeds; wait 0.5 s, 1 s, 2 s ... (at most 30 s) between tries.

    An exception of a `fatal` type is raised at once: retrying cannot help.
    """
    delay = first_delay
    n = 0
    while True:
        n += 1
        try:
            await attempt()
            return
        except fatal:
            raise
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
    await retry(
        f"setting weight {weight} for {rollout.namespace}/{rollout.name}",
        lambda: write_confirmed(router, rollout, weight),
        clock,
    )


async def write_confirmed(router: TrafficRouter, rollout: RolloutRef, weight: int) -> None:
    """Write a weight and read it back once; `Unconfirmed` when the router reports another."""
    await router.set_weight(rollout, weight)
    seen = await router.get_weight(rollout)
    if seen != weight:
        raise Unconfirmed(f"wrote weight {weight}, the router reports {seen}")


async def roll_back(
    router: TrafficRouter,
    workloads: WorkloadManager,
    rollout: RolloutRef,
    clock: Clock,
    *,
    delay: float = 0.0,
) -> None:
    """Stable restored, all traffic on it, then (`delay` seconds later) the canary retired."""
    if isinstance(workloads, PromotionUndo):
        # A promotion may have left the stable half the new version (a restart
        # while it failed): put its previous version back before it gets traffic.
        await retry(
            f"restoring the stable version of {rollout.namespace}/{rollout.name}",
            lambda: workloads.restore_stable(rollout),
            clock,
        )
    await set_weight_confirmed(router, rollout, 0, clock)
    await _drain(clock, delay)
    await _retire(router, workloads, rollout, clock)


async def _drain(clock: Clock, delay: float) -> None:
    """Wait for proxies to stop sending to the canary: a weight the API accepted is not yet
    the weight every proxy applies, and requests already sent must finish."""
    if delay > 0:
        await clock.sleep_until(clock.now() + delay)


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
    router: TrafficRouter,
    workloads: WorkloadManager,
    rollout: RolloutRef,
    clock: Clock,
    *,
    delay: float = 0.0,
) -> None:
    """Canary at 100, stable rolled out, traffic to stable, canary retired after `delay`.

    Raises `WorkloadFailed` when the stable will not roll out; traffic is then
    still on the canary, and the caller rolls back.
    """
    # All traffic stays on the canary while the stable's pods are replaced, so no
    # request meets a stable that is half old, half new (or not ready at all).
    await set_weight_confirmed(router, rollout, 100, clock)
    await retry(
        f"promoting {rollout.namespace}/{rollout.name}",
        lambda: workloads.promote(rollout),
        clock,
        fatal=(WorkloadFailed,),
    )
    await set_weight_confirmed(router, rollout, 0, clock)
    await _drain(clock, delay)
    await _retire(router, workloads, rollout, clock)
