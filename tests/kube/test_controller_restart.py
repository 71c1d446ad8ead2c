"""Kill and resume on the real control plane: the controller stopped abruptly, then started afresh.

A "kill" cancels every task of one controller stack at once (the engine's run
loop, the watch, the per-object workers, the effects in flight) and closes its
HTTP client, the nearest asyncio comes to a process dying; the API server
keeps its state. A fresh controller and engine, with a fresh client (as the
controller's ServiceAccount), then resume every rollout from its status.

Points are seeded: either a random delay, or "right after the k-th HTTPRoute
write the API server accepted": the stack's client holds the writer at the
moment the answer arrives, so the kill lands between a weight's write and its
read-back.

What "no step applied twice" means, as asserted: every step weight of the
strategy (25 and 50 here) is stored on the HTTPRoute exactly once per rollout,
across all incarnations. The test's own watch of the routes sees every change
the API server stored, in order; the audit log's count of the controller's
accepted route writes must equal the number of changes, so no write vanished
as a repeat of the weight already there. A step weight written by the killed
run but not yet read back by it counts as applied: the API stored it, and the
resumed run reads the route before writing, so it must not write it again; a
step committed to the status whose write never reached the API is written
once by the resumed run (not skipped). Weights 0 and 100 are excluded:
bringing the canary up at 0, promotion (100, then 0) and rollback are
confirmed, idempotent moves that a resumed run carries out again from the
start.
"""

from __future__ import annotations

import asyncio
import random
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from kubernetes.aio import client

from tests.cluster.controlplane import ControlPlane
from tests.cluster.fixtures import api_client, create_namespace
from tests.cluster.kube import eventually
from tests.kube.test_controller import (
    CD,
    DEPLOYMENTS,
    HEALTHY,
    POLICY,
    ROUTES,
    Cluster,
    History,
    Rig,
    controller_writes,
    http_route,
    image_of,
    route_weight,
    stable_deployment,
)

STEPS = [25, 50]
ROLLOUTS = 5
# 50 kill points, as on the double; a trial is several seconds of real rollouts, so
# trials run AT_ONCE at a time, each in its own namespace with its own seeded points
TRIALS = 10
KILLS_PER_TRIAL = 5
AT_ONCE = 5
SEED = 7000
FINAL = frozenset({"Succeeded", "RolledBack", "Failed"})
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def names(i: int) -> tuple[str, str]:
    """The stable Deployment (also Service and HTTPRoute) and the CanaryDeployment of rollout i."""
    return f"web{i}", f"web{i}-release"


async def seed_world(cluster: Cluster, count: int) -> None:
    """The stable Deployments (available before anything starts) and their HTTPRoutes."""
    for i in range(count):
        app, _ = names(i)
        await cluster.create(stable_deployment(app))
        await cluster.create(http_route(app))

    async def available() -> bool:
        for i in range(count):
            dep = await cluster.read(DEPLOYMENTS, names(i)[0])
            if not dep or (dep.get("status") or {}).get("availableReplicas") != 2:
                return False
        return True

    await eventually(available, every=0.05)


def release(i: int) -> dict[str, Any]:
    app, name = names(i)
    return {
        "apiVersion": "codedance.io/v1alpha1",
        "kind": "CanaryDeployment",
        "metadata": {"name": name},
        "spec": {
            "targetRef": {"name": app},
            "version": {"images": {app: f"{app}:2"}},
            "strategy": {
                "type": "steps",
                "steps": STEPS,
                "stepDuration": "300ms",
                "scaleDownDelay": "0s",
            },
            "traffic": {"provider": "gateway-api", "service": app, "httpRoute": app},
            "policy": {"name": "latency"},
            "analysis": {"interval": "100ms"},
        },
    }


class TrafficLog:
    """The canary weight of every change the API server stored on each HTTPRoute, in order."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.routes = History(cluster.admin, cluster.namespace, ROUTES)

    async def start(self) -> TrafficLog:
        await self.routes.start()
        return self

    async def stop(self) -> None:
        await self.routes.stop()

    @property
    def by_route(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for kind, obj in self.routes.events:
            if kind == "MODIFIED":
                out.setdefault(obj["metadata"]["name"], []).append(route_weight(obj))
        return out

    async def all_writes_seen(self) -> None:
        """Every route write of the controller that the API server accepted is a change seen
        here, and every change seen is such a write.

        A write in flight when its stack was killed has no answer: the API server
        records it as 504 (the client hung up, "context canceled") whether or not
        it stored it, so each of those may or may not be a change.
        """

        def bounds(app: str) -> tuple[int, int, int]:
            writes = controller_writes(
                self.cluster.plane, self.cluster.namespace, "httproutes", app
            )
            accepted = sum(1 for w in writes if 200 <= w.code < 300)
            unanswered = sum(1 for w in writes if w.code == 504)
            return accepted, len(self.by_route.get(app, [])), accepted + unanswered

        async def consistent() -> bool:
            return all(low <= seen <= high for low, seen, high in map(bounds, self._apps()))

        try:
            await eventually(consistent, timeout=5)
        except AssertionError:
            found = {app: (bounds(app), self.by_route.get(app)) for app in self._apps()}
            raise AssertionError(f"(accepted, changes, accepted + unanswered): {found}") from None

    def _apps(self) -> list[str]:
        return sorted({obj["metadata"]["name"] for _, obj in self.routes.events})


class RouteWrites:
    """Accepted HTTPRoute writes counted as their answers reach a stack's client; `hold_after(k)`
    stops the writer of the k-th right there, between the write and its read-back."""

    def __init__(self) -> None:
        self.total = 0
        self._hold: tuple[int, asyncio.Event] | None = None

    def hold_after(self, k: int) -> asyncio.Event:
        reached = asyncio.Event()
        self._hold = (k, reached)
        return reached

    async def accepted(self) -> None:
        self.total += 1
        if self._hold is not None and self.total >= self._hold[0]:
            self._hold[1].set()
            self._hold = None
            await asyncio.Future()  # until the kill cancels this writer


class Stack:
    """One controller process: its own client, engine and controller, started and killed."""

    def __init__(self, api: client.ApiClient, policies: Path, namespace: str) -> None:
        self.api = api
        self.rig = Rig(api, policies, HEALTHY, namespace, instance=api.user_agent)
        self.tasks: list[asyncio.Task[None]] = []

    @classmethod
    async def create(
        cls,
        plane: ControlPlane,
        policies: Path,
        namespace: str,
        *,
        user_agent: str = "codedance",
        route_writes: RouteWrites | None = None,
    ) -> Stack:
        api = await api_client(plane, "controller")
        api.user_agent = user_agent
        rest = api.rest_client
        send = rest.request

        async def request(method: str, url: str, *args: Any, **kwargs: Any) -> Any:
            answer = await send(method, url, *args, **kwargs)  # type: ignore[no-untyped-call]
            if route_writes is not None and method in ("PUT", "PATCH") and "/httproutes/" in url:
                await route_writes.accepted()
            return answer

        rest.request = request  # type: ignore[method-assign]
        return cls(api, policies, namespace)

    def start(self) -> None:
        self.tasks = [
            asyncio.ensure_future(self.rig.engine.run()),
            asyncio.ensure_future(self.rig.controller.run()),
        ]

    async def kill(self) -> None:
        """Every task of this stack cancelled at once; nothing finishes, nothing is flushed."""
        rig = self.rig
        doomed = [
            *self.tasks,
            *rig.controller._workers.values(),
            *rig.engine._inflight,
        ]
        for task in doomed:
            task.cancel()
        await asyncio.gather(*doomed, return_exceptions=True)
        await self.api.close()  # type: ignore[no-untyped-call]

    async def stop(self, *, close: bool = True) -> None:
        """A clean stop, for the end of a test; `close`: the client too."""
        await self.rig.controller.stop()
        await self.rig.engine.stop()
        await asyncio.wait_for(asyncio.gather(*self.tasks, return_exceptions=True), 10)
        if close:
            await self.api.close()  # type: ignore[no-untyped-call]


async def outcome(cluster: Cluster, i: int) -> dict[str, Any]:
    """What a user sees at the end of rollout i: phase, step, weight, route, workloads."""
    app, name = names(i)
    cd = await cluster.read(CD, name)
    route = await cluster.read(ROUTES, app)
    stable = await cluster.read(DEPLOYMENTS, app)
    assert cd is not None and route is not None and stable is not None
    status = cd.get("status") or {}
    return {
        "phase": status.get("phase"),
        "step": status.get("step"),
        "weight": status.get("weight"),
        "route": route["spec"],
        "stable_image": image_of(stable),
        "canary_exists": await cluster.read(DEPLOYMENTS, f"{app}-canary") is not None,
    }


async def phases(cluster: Cluster, count: int) -> list[str | None]:
    return [await cluster.phase(names(i)[1]) for i in range(count)]


def all_final(cluster: Cluster, count: int) -> Callable[[], Awaitable[bool]]:
    async def final() -> bool:
        return all(p in FINAL for p in await phases(cluster, count))

    return final


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "policies"
    directory.mkdir()
    (directory / "latency.rules").write_text(POLICY, encoding="utf-8")
    return directory


class Namespaces:
    """Fresh namespaces for one test, each with the world of `count` rollouts; all deleted after."""

    def __init__(self, admin: client.ApiClient, plane: ControlPlane) -> None:
        self.admin = admin
        self.plane = plane
        self.made: list[Cluster] = []

    async def new(self, count: int) -> Cluster:
        name = f"t-{secrets.token_hex(4)}"
        await create_namespace(self.admin, name)
        cluster = Cluster(self.admin, name, self.plane)
        self.made.append(cluster)
        await seed_world(cluster, count)
        return cluster

    async def delete_all(self) -> None:
        for cluster in self.made:
            await cluster.drop_finalizers()
            await client.CoreV1Api(self.admin).delete_namespace(cluster.namespace)


async def clean_run(namespaces: Namespaces, policies: Path) -> list[dict[str, Any]]:
    cluster = await namespaces.new(ROLLOUTS)
    stack = await Stack.create(namespaces.plane, policies, cluster.namespace)
    stack.start()
    try:
        for i in range(ROLLOUTS):
            await cluster.create(release(i))
        await eventually(all_final(cluster, ROLLOUTS), timeout=30, every=0.1)
    finally:
        await stack.stop()
    return [await outcome(cluster, i) for i in range(ROLLOUTS)]


async def killed_run(
    namespaces: Namespaces,
    policies: Path,
    rng: random.Random,
    kill_log: list[tuple[str, list[str | None]]],
) -> tuple[list[dict[str, Any]], dict[str, list[int]]]:
    cluster = await namespaces.new(ROLLOUTS)
    traffic = await TrafficLog(cluster).start()
    writes = RouteWrites()
    try:
        for i in range(ROLLOUTS):
            await cluster.create(release(i))
        for _ in range(KILLS_PER_TRIAL):
            stack = await Stack.create(
                namespaces.plane, policies, cluster.namespace, route_writes=writes
            )
            stack.start()
            trigger: asyncio.Future[Any]
            if rng.random() < 0.5:
                delay = rng.uniform(0.0, 0.4)
                point = f"after {delay:.2f}s"
                trigger = asyncio.ensure_future(asyncio.sleep(delay))
            else:
                k = writes.total + rng.randint(1, 3)
                point = f"after traffic write {k}"
                trigger = asyncio.ensure_future(writes.hold_after(k).wait())
            finished = asyncio.ensure_future(
                eventually(all_final(cluster, ROLLOUTS), timeout=30, every=0.1)
            )
            await asyncio.wait({trigger, finished}, return_when=asyncio.FIRST_COMPLETED)
            trigger.cancel()
            finished.cancel()
            await stack.kill()
            kill_log.append((point, await phases(cluster, ROLLOUTS)))
        stack = await Stack.create(namespaces.plane, policies, cluster.namespace)
        stack.start()
        try:
            await eventually(all_final(cluster, ROLLOUTS), timeout=30, every=0.1)
        finally:
            await stack.stop()
        await traffic.all_writes_seen()
        return [await outcome(cluster, i) for i in range(ROLLOUTS)], traffic.by_route
    finally:
        await traffic.stop()


@pytest.mark.asyncio
async def test_rollouts_killed_at_fifty_random_points_end_as_an_uninterrupted_run(
    admin_api: client.ApiClient, control_plane: ControlPlane, policy_dir: Path
) -> None:
    namespaces = Namespaces(admin_api, control_plane)

    async def trial(n: int) -> tuple[list[Any], list[dict[str, Any]], dict[str, list[int]]]:
        kills: list[tuple[str, list[str | None]]] = []
        outcomes, writes = await killed_run(namespaces, policy_dir, random.Random(SEED + n), kills)
        return kills, outcomes, writes

    try:
        expected = await clean_run(namespaces, policy_dir)
        assert all(o["phase"] == "Succeeded" for o in expected), expected
        results = []
        for first in range(0, TRIALS, AT_ONCE):
            batch = range(first, min(TRIALS, first + AT_ONCE))
            results += await asyncio.gather(*(trial(n) for n in batch))
    finally:
        await namespaces.delete_all()
    for n, (kills, outcomes, writes) in enumerate(results):
        context = f"trial {n}, kills: {kills}"
        for i in range(ROLLOUTS):
            assert outcomes[i] == expected[i], f"rollout {i}, {context}"
            app, _ = names(i)
            counts = {w: writes.get(app, []).count(w) for w in STEPS}
            # every step weight applied exactly once: never repeated, never skipped
            assert counts == {w: 1 for w in STEPS}, f"{app}: {writes.get(app)}, {context}"
    every_kill = [k for kills, _, _ in results for k in kills]
    assert len(every_kill) == TRIALS * KILLS_PER_TRIAL
    # the points are spread across the rollouts, not after their end
    mid = [k for k in every_kill if any(p not in FINAL for p in k[1])]
    assert len(mid) >= 0.8 * len(every_kill), every_kill


@pytest.mark.asyncio
async def test_a_spec_change_mid_rollout_restarts_the_analysis_from_step_zero(
    admin_api: client.ApiClient, control_plane: ControlPlane, policy_dir: Path
) -> None:
    namespaces = Namespaces(admin_api, control_plane)
    try:
        cluster = await namespaces.new(1)
        traffic = await TrafficLog(cluster).start()
        releases = await History(cluster.admin, cluster.namespace, CD).start()
        app, name = names(0)

        def phases_seen() -> list[tuple[Any, ...]]:
            """(observedGeneration, phase, step, weight) of each stored status, in order."""
            seen: list[tuple[Any, ...]] = []
            for _, obj in releases.changes(name):
                status = obj.get("status") or {}
                if status.get("phase"):
                    entry = (
                        status.get("observedGeneration"),
                        status["phase"],
                        status.get("step"),
                        status.get("weight"),
                    )
                    if not seen or seen[-1] != entry:
                        seen.append(entry)
            return seen

        body = release(0)
        body["spec"]["strategy"] = {"type": "steps", "steps": [30, 60], "stepDuration": "1h"}
        await cluster.create(body)
        stack = await Stack.create(control_plane, policy_dir, cluster.namespace)
        stack.start()
        try:

            async def at_30() -> bool:
                return traffic.by_route.get(app, [])[-1:] == [30]

            await eventually(at_30)
            assert await phases(cluster, 1) == ["Progressing"]
            before = len(phases_seen())
            await cluster.objects.patch(
                "codedance.io/v1alpha1",
                "CanaryDeployment",
                name,
                {"spec": {"version": {"images": {app: f"{app}:3"}}}},
            )

            async def restarted() -> bool:
                return (2, "Progressing", 0, 30) in phases_seen()[before:]

            await eventually(restarted)
            await eventually(at_30)
            after = [p for g, p, _, _ in phases_seen()[before:] if g == 2]
            # back to Pending, the canary brought up again, then step 0 at step 0's weight
            assert after[:3] == ["Pending", "Initializing", "Progressing"], phases_seen()
            # stable traffic first (weight 0, confirmed), then step 0 of the new generation
            assert traffic.by_route[app][-2:] == [0, 30], traffic.by_route
            canary = await cluster.read(DEPLOYMENTS, f"{app}-canary")
            assert canary is not None and image_of(canary) == f"{app}:3"
            stable = await cluster.read(DEPLOYMENTS, app)
            assert stable is not None and image_of(stable) == f"{app}:1"
            restarts = [e for e in stack.rig.audit_log.entries if e.action == "restart"]
            assert len(restarts) == 1 and "generation 2" in restarts[0].explanation
            assert restarts[0].to_phase.value == "Pending"

            async def said() -> bool:
                return any(
                    "spec changed" in m and "generation 2" in m
                    for _, _, m in await cluster.events_of(name)
                )

            await eventually(said, timeout=5)
            await traffic.all_writes_seen()
        finally:
            await stack.stop()
            await traffic.stop()
            await releases.stop()
    finally:
        await namespaces.delete_all()
