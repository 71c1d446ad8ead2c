"""Two controller replicas on the real control plane: only the Lease holder writes.

Each replica is a whole controller stack (its own HTTP client as the
controller's ServiceAccount, engine and controller, as `codedance controller`
wires them) behind its own `LeaseElector` on a Lease in the controller's
namespace `codedance` (where deploy/rbac.yaml lets it hold one), run the way
`codedance controller` runs it: try the Lease until it is won, then run the
engine and the controller while it is held. Each replica's client sends its
own User-Agent and journals every request as it leaves the client, with
whether the replica held the Lease then and whether an answer came back, so
each write can be attributed to the replica that made it; the API server's
audit log, which records every request with its User-Agent, checks that no
write bypassed the journals.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from pathlib import Path
from typing import Any

import pytest
from kubernetes.aio import client

from adapters.kube.lease import LeaseElector
from engine.loop import LoopClock
from tests.cluster.controlplane import CONTROLLER_NAMESPACE, CONTROLLER_USER, ControlPlane
from tests.cluster.kube import eventually
from tests.kube.test_controller_restart import (
    STEPS,
    Namespaces,
    Stack,
    TrafficLog,
    all_final,
    names,
    outcome,
    phases,
    release,
)
from tests.kube.test_controller_restart import policy_dir as policy_dir

ROLLOUTS = 2
GUARDED = ("/canarydeployments", "/deployments", "/httproutes", "/events")
GUARDED_RESOURCES = frozenset({"canarydeployments", "deployments", "httproutes", "events"})
WRITES = {"POST", "PUT", "PATCH", "DELETE"}
AUDITED_WRITES = {"create", "update", "patch", "delete"}


class Entry:
    """One request as it left a replica's client."""

    def __init__(self, agent: str, method: str, url: str, leader: bool) -> None:
        self.agent = agent
        self.method = method
        self.url = url
        self.leader = leader
        self.answered = False  # the API server's answer (any code) reached the client


class Replica:
    """One controller replica: a `Stack` that runs only while its elector holds the Lease."""

    def __init__(self, stack: Stack, identity: str, lease: str, journal: list[Entry]) -> None:
        self.identity = identity
        self.stack = stack
        self.clock = LoopClock()
        self.elector = LeaseElector(
            stack.api,
            namespace=CONTROLLER_NAMESPACE,
            name=lease,
            identity=identity,
            lease_seconds=2,
            renew_every=0.2,
            clock=self.clock,
        )
        self.led = False
        self.dead = False
        self.task: asyncio.Task[None] | None = None
        rest = stack.api.rest_client
        send = rest.request
        agent = stack.api.user_agent

        async def journaled(method: str, url: str, *args: Any, **kwargs: Any) -> Any:
            entry = Entry(agent, method, url, self.elector.is_leader)
            journal.append(entry)
            try:
                answer = await send(method, url, *args, **kwargs)  # type: ignore[no-untyped-call]
            except client.ApiException:
                entry.answered = True
                raise
            entry.answered = True
            return answer

        rest.request = journaled  # type: ignore[method-assign]

    @classmethod
    async def create(
        cls,
        plane: ControlPlane,
        policies: Path,
        namespace: str,
        identity: str,
        lease: str,
        journal: list[Entry],
    ) -> Replica:
        stack = await Stack.create(plane, policies, namespace, user_agent=f"codedance/{identity}")
        return cls(stack, identity, lease, journal)

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


def guarded_writes(journal: list[Entry]) -> list[tuple[int, Entry]]:
    """(position, entry) of the journal's writes of CanaryDeployments, Deployments,
    HTTPRoutes and Events."""
    return [
        (n, e)
        for n, e in enumerate(journal)
        if e.method in WRITES and any(g in e.url for g in GUARDED)
    ]


def audited_writes(plane: ControlPlane, namespace: str) -> dict[str, int]:
    """User-Agent -> the controller's writes of the guarded resources in `namespace` that
    reached the API server, from its audit log."""
    counts: dict[str, int] = {}
    for line in plane.audit_log.read_text().splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:  # the line being written now
            continue
        ref = event.get("objectRef") or {}
        if (
            event["user"]["username"] == CONTROLLER_USER
            and event["verb"] in AUDITED_WRITES
            and ref.get("namespace") == namespace
            and ref.get("resource") in GUARDED_RESOURCES
        ):
            agent = event.get("userAgent", "")
            counts[agent] = counts.get(agent, 0) + 1
    return counts


@pytest.mark.asyncio
async def test_only_the_lease_holder_writes_and_the_other_finishes_after_it_dies(
    admin_api: client.ApiClient, control_plane: ControlPlane, policy_dir: Path
) -> None:
    namespaces = Namespaces(admin_api, control_plane)
    lease = f"codedance-controller-{secrets.token_hex(4)}"  # one per test: a shared cluster
    journal: list[Entry] = []
    try:
        cluster = await namespaces.new(ROLLOUTS)
        ns = cluster.namespace
        traffic = await TrafficLog(cluster).start()
        for i in range(ROLLOUTS):
            body = release(i)
            body["spec"]["strategy"]["stepDuration"] = "1s"
            await cluster.create(body)
        a = await Replica.create(control_plane, policy_dir, ns, "replica-a", lease, journal)
        b = await Replica.create(control_plane, policy_dir, ns, "replica-b", lease, journal)
        a.start()
        try:
            await eventually(lambda: _true(a.led), timeout=5)
            b.start()
            app0, _ = names(0)

            async def first_step() -> bool:
                return traffic.by_route.get(app0, [])[-1:] == [STEPS[0]]

            await eventually(first_step)
            assert a.led and not b.led
            assert await phases(cluster, ROLLOUTS) == ["Progressing"] * ROLLOUTS
            await _b_keeps_trying(journal, lease)  # b keeps trying the Lease meanwhile
            assert not b.led
            await a.kill()
            killed_at = len(journal)
            await eventually(lambda: _true(b.led), timeout=10)
            await eventually(all_final(cluster, ROLLOUTS), timeout=30)
        finally:
            await b.stop()
            await a.stop()
            await traffic.stop()

        for i in range(ROLLOUTS):
            assert (await outcome(cluster, i))["phase"] == "Succeeded"
            app, _ = names(i)
            counts = {w: traffic.by_route.get(app, []).count(w) for w in STEPS}
            assert counts == {w: 1 for w in STEPS}, traffic.by_route  # none repeated or skipped
        await traffic.all_writes_seen()

        writes = guarded_writes(journal)
        by_a = [n for n, e in writes if e.agent == "codedance/replica-a"]
        by_b = [n for n, e in writes if e.agent == "codedance/replica-b"]
        assert by_a and by_b and len(by_a) + len(by_b) == len(writes)
        # every write was sent by a replica that held the Lease at that moment
        assert all(e.leader for _, e in writes), [e.url for _, e in writes if not e.leader]
        # b wrote nothing while a led; a wrote nothing after it died
        assert min(by_b) >= killed_at and max(by_a) < killed_at
        # the journals saw every write the API server received: none bypassed the clients.
        # A write a's death cut off may or may not have reached the server.
        cut_off = sum(1 for n in by_a if not journal[n].answered)

        async def audited() -> bool:
            seen = audited_writes(control_plane, ns)
            sent_a, sent_b = len(by_a), len(by_b)
            return (
                set(seen) <= {"codedance/replica-a", "codedance/replica-b"}
                and sent_a - cut_off <= seen.get("codedance/replica-a", 0) <= sent_a
                and seen.get("codedance/replica-b", 0) == sent_b
            )

        await eventually(audited, timeout=5)
        holders = {e.agent for e in journal if e.method in WRITES and "/leases" in e.url}
        assert holders == {"codedance/replica-a", "codedance/replica-b"}
    finally:
        await namespaces.delete_all()
        with contextlib.suppress(client.ApiException):
            await client.CoordinationV1Api(admin_api).delete_namespaced_lease(
                lease, CONTROLLER_NAMESPACE
            )


async def _true(value: bool) -> bool:
    return value


async def _b_keeps_trying(journal: list[Entry], lease: str) -> None:
    """b asks for the Lease again and again while a holds it (a few tries, not a sleep)."""

    async def tried() -> bool:
        reads = [
            e
            for e in journal
            if e.agent == "codedance/replica-b"
            and e.method == "GET"
            and f"/leases/{lease}" in e.url
        ]
        return len(reads) >= 3

    await eventually(tried, timeout=5)
