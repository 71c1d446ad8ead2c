"""Two controller replicas against one API double: only the Lease holder writes.

Each replica is a whole controller stack (its own HTTP client, engine and
controller, as `codedance controller` wires them) behind its own
`LeaseElector`, run the way `codedance controller` runs it: try the Lease
until it is won, then run the engine and the controller while it is held.
Each replica's client sends its own User-Agent; every request it sends is
journaled with that header as it leaves the client, so each write the double
stores can be attributed to the replica that made it.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import pytest

from adapters.kube.lease import LeaseElector
from engine.loop import LoopClock
from tests.kube.apiserver import ApiServer, register_standard_resources
from tests.kube.test_controller import NS
from tests.kube.test_controller_restart import (
    STEPS,
    Stack,
    TrafficLog,
    all_final,
    names,
    outcome,
    phases,
    release,
    seed_world,
    until,
)
from tests.kube.test_controller_restart import policy_dir as policy_dir

ROLLOUTS = 2
LEASE = "codedance-controller"
GUARDED = ("/canarydeployments", "/deployments", "/httproutes", "/events")
WRITES = {"POST", "PUT", "PATCH", "DELETE"}


class Replica:
    """One controller replica: a `Stack` that runs only while its elector holds the Lease."""

    def __init__(
        self, apiserver: ApiServer, policies: Path, identity: str, journal: list[Any]
    ) -> None:
        self.identity = identity
        self.stack = Stack(apiserver, policies, user_agent=f"codedance/{identity}")
        self.clock = LoopClock()
        self.elector = LeaseElector(
            self.stack.api,
            namespace=NS,
            name=LEASE,
            identity=identity,
            lease_seconds=2,
            renew_every=0.2,
            clock=self.clock,
        )
        self.led = False
        self.dead = False
        self.task: asyncio.Task[None] | None = None
        rest = self.stack.api.rest_client
        send = rest.request

        async def journaled(method: str, url: str, *args: Any, **kwargs: Any) -> Any:
            headers = kwargs.get("headers") or {}
            journal.append((headers.get("User-Agent"), method, url, self.elector.is_leader))
            return await send(method, url, *args, **kwargs)  # type: ignore[no-untyped-call]

        rest.request = journaled  # type: ignore[method-assign]

    def start(self) -> None:
        self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        # as codedance/controller_cmd.py: follow until the Lease is won, then lead while held
        while not await self.elector.step():
            await self.clock.sleep_until(self.clock.now() + 0.2)
        self.led = True
        self.stack.start()
        while self.elector.is_leader:
            await self.clock.sleep_until(self.clock.now() + 0.2)
            await self.elector.step()
        await self.stack.rig.controller.stop()
        await self.stack.rig.engine.stop()

    async def kill(self) -> None:
        """The replica's process dies: no release of the Lease, nothing flushed."""
        assert self.task is not None
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        await self.stack.kill()
        self.dead = True

    async def stop(self) -> None:
        if self.dead:
            return
        if self.task is not None and not self.task.done():
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        if self.led:
            await self.stack.stop(close=False)
            await self.elector.release()
        await self.stack.api.close()  # type: ignore[no-untyped-call]


def guarded_writes(journal: list[Any]) -> list[tuple[int, Any]]:
    """(position, entry) of the journal's writes of CanaryDeployments, Deployments,
    HTTPRoutes and Events."""
    return [
        (n, e) for n, e in enumerate(journal) if e[1] in WRITES and any(g in e[2] for g in GUARDED)
    ]


@pytest.mark.asyncio
async def test_only_the_lease_holder_writes_and_the_other_finishes_after_it_dies(
    policy_dir: Path,
) -> None:
    async with ApiServer() as apiserver:
        register_standard_resources(apiserver)
        seed_world(apiserver, ROLLOUTS)
        traffic = TrafficLog(apiserver)
        for i in range(ROLLOUTS):
            body = release(i)
            body["spec"]["strategy"]["stepDuration"] = "1s"
            apiserver.seed(body)
        journal: list[Any] = []
        a = Replica(apiserver, policy_dir, "replica-a", journal)
        b = Replica(apiserver, policy_dir, "replica-b", journal)
        a.start()
        await until(lambda: a.led, 5)
        b.start()
        try:
            app0, _ = names(0)
            await until(lambda: traffic.by_route.get(app0, [])[-1:] == [STEPS[0]], 10)
            assert a.led and not b.led
            assert phases(apiserver, ROLLOUTS) == ["Progressing"] * ROLLOUTS
            await asyncio.sleep(0.5)  # b keeps trying the Lease meanwhile
            assert not b.led
            await a.kill()
            killed_at = len(journal)
            await until(lambda: b.led, 10)
            await until(all_final(apiserver, ROLLOUTS), 15)
        finally:
            await b.stop()
            await a.stop()

        for i in range(ROLLOUTS):
            assert outcome(apiserver, i)["phase"] == "Succeeded"
            app, _ = names(i)
            counts = {w: traffic.by_route.get(app, []).count(w) for w in STEPS}
            assert counts == {w: 1 for w in STEPS}, traffic.by_route  # none repeated or skipped

        writes = guarded_writes(journal)
        by_a = [n for n, e in writes if e[0] == "codedance/replica-a"]
        by_b = [n for n, e in writes if e[0] == "codedance/replica-b"]
        assert by_a and by_b and len(by_a) + len(by_b) == len(writes)
        # every write was sent by a replica that held the Lease at that moment
        assert all(e[3] for _, e in writes), [e for _, e in writes if not e[3]]
        # b wrote nothing while a led; a wrote nothing after it died
        assert min(by_b) >= killed_at and max(by_a) < killed_at
        # the journal saw every write the double stored: none bypassed the replicas' clients
        stored = sum(
            len(apiserver.writes(ref, ok=None))
            for ref in ("canarydeployments", "deployments", "httproutes", "v1/events")
        )
        assert stored == len(writes)
        holders = {e[0] for e in journal if e[1] in WRITES and "/leases" in e[2]}
        assert holders == {"codedance/replica-a", "codedance/replica-b"}
