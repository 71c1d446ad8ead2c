"""Kill and resume: the controller stopped abruptly at random points, then started afresh.

A "kill" cancels every task of one controller stack at once (the engine's run
loop, the watch, the per-object workers, the effects in flight) and closes its
HTTP client, the nearest asyncio comes to a process dying; the API double
keeps its state, as the API server would. A fresh controller and engine, with
a fresh client, then resume every rollout from its status.

Points are seeded: either a random delay, or "right after the k-th traffic
write the double stored" (an `on_write` reactor), which lands the kill
between a weight's write and its read-back.

What "no step applied twice" means, as asserted: every step weight of the
strategy (25 and 50 here) is written to the HTTPRoute exactly once per
rollout, across all incarnations. A step weight written by the killed run but
not yet read back by it counts as applied: the API stored it, and the resumed
run reads the route before writing, so it must not write it again; a step
committed to the status whose write never reached the API is written once by
the resumed run (not skipped). Weights 0 and 100 are excluded: bringing the
canary up at 0, promotion (100, then 0) and rollback are confirmed, idempotent
moves that a resumed run carries out again from the start.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kubernetes.aio import client

from adapters.traffic.gateway_api import canary_weights
from tests.kube.apiserver import ApiServer, register_standard_resources
from tests.kube.test_controller import HEALTHY, NS, POLICY, Rig, play_deployment_controller

STEPS = [25, 50]
ROLLOUTS = 5
TRIALS = 10
KILLS_PER_TRIAL = 5
FINAL = frozenset({"Succeeded", "RolledBack", "Failed"})


def names(i: int) -> tuple[str, str]:
    """The stable Deployment (also Service and HTTPRoute) and the CanaryDeployment of rollout i."""
    return f"web{i}", f"web{i}-release"


def seed_world(apiserver: ApiServer, count: int) -> None:
    play_deployment_controller(apiserver)
    for i in range(count):
        app, _ = names(i)
        labels = {"app": app, "codedance.io/track": "stable"}
        apiserver.seed(
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": app, "namespace": NS, "labels": {"app": app}},
                "spec": {
                    "replicas": 2,
                    "selector": {"matchLabels": labels},
                    "template": {
                        "metadata": {"labels": labels},
                        "spec": {"containers": [{"name": app, "image": f"{app}:1"}]},
                    },
                },
            }
        )
        apiserver.seed(
            {
                "apiVersion": "gateway.networking.k8s.io/v1",
                "kind": "HTTPRoute",
                "metadata": {"name": app, "namespace": NS},
                "spec": {
                    "parentRefs": [{"name": "gateway"}],
                    "rules": [{"backendRefs": [{"name": app, "port": 80}]}],
                },
            }
        )


def release(i: int) -> dict[str, Any]:
    app, name = names(i)
    return {
        "apiVersion": "codedance.io/v1alpha1",
        "kind": "CanaryDeployment",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "targetRef": {"name": app},
            "version": {"images": {app: f"{app}:2"}},
            "strategy": {"type": "steps", "steps": STEPS, "stepDuration": "300ms"},
            "traffic": {"provider": "gateway-api", "service": app, "httpRoute": app},
            "policy": {"name": "latency"},
            "analysis": {"interval": "100ms"},
        },
    }


class TrafficLog:
    """The canary weight of every stored HTTPRoute write, per route, in order."""

    def __init__(self, apiserver: ApiServer) -> None:
        self.by_route: dict[str, list[int]] = {}
        self.total = 0
        self._waiters: list[tuple[int, asyncio.Event]] = []
        apiserver.on_write("httproutes", self._record)

    def _record(self, event: str, obj: dict[str, Any]) -> None:
        if event == "DELETED":
            return
        app = obj["metadata"]["name"]
        weights = canary_weights(obj, app, f"{app}-canary")
        self.by_route.setdefault(app, []).append(weights[0] if weights else 0)
        self.total += 1
        for n, event_ in self._waiters:
            if self.total >= n:
                event_.set()

    def after(self, n: int) -> asyncio.Event:
        """An event set once the n-th write (counting from the start) is stored."""
        done = asyncio.Event()
        if self.total >= n:
            done.set()
        self._waiters.append((n, done))
        return done


class Stack:
    """One controller process: its own client, engine and controller, started and killed."""

    def __init__(self, apiserver: ApiServer, policies: Path, user_agent: str = "codedance") -> None:
        configuration = client.Configuration(host=str(apiserver.url).rstrip("/"))
        self.api = client.ApiClient(configuration)
        self.api.user_agent = user_agent
        self.rig = Rig(apiserver, self.api, policies, HEALTHY)
        self.tasks: list[asyncio.Task[None]] = []

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
        self.rig.apiserver.close_watches()
        await self.rig.engine.stop()
        await asyncio.wait_for(asyncio.gather(*self.tasks, return_exceptions=True), 5)
        if close:
            await self.api.close()  # type: ignore[no-untyped-call]


def outcome(apiserver: ApiServer, i: int) -> dict[str, Any]:
    """What a user sees at the end of rollout i: phase, step, weight, route, workloads."""
    app, name = names(i)
    cd = apiserver.read("canarydeployments", name, NS)
    route = apiserver.read("httproutes", app, NS)
    stable = apiserver.read("deployments", app, NS)
    assert cd is not None and route is not None and stable is not None
    status = cd.get("status") or {}
    return {
        "phase": status.get("phase"),
        "step": status.get("step"),
        "weight": status.get("weight"),
        "route": route["spec"],
        "stable_image": stable["spec"]["template"]["spec"]["containers"][0]["image"],
        "canary_exists": apiserver.read("deployments", f"{app}-canary", NS) is not None,
    }


def phases(apiserver: ApiServer, count: int) -> list[str | None]:
    out = []
    for i in range(count):
        cd = apiserver.read("canarydeployments", names(i)[1], NS)
        out.append(((cd or {}).get("status") or {}).get("phase"))
    return out


async def until(predicate: Callable[[], bool], timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


def all_final(apiserver: ApiServer, count: int) -> Callable[[], bool]:
    return lambda: all(p in FINAL for p in phases(apiserver, count))


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "policies"
    directory.mkdir()
    (directory / "latency.rules").write_text(POLICY, encoding="utf-8")
    return directory


async def clean_run(policies: Path) -> list[dict[str, Any]]:
    async with ApiServer() as apiserver:
        register_standard_resources(apiserver)
        seed_world(apiserver, ROLLOUTS)
        stack = Stack(apiserver, policies)
        stack.start()
        try:
            for i in range(ROLLOUTS):
                apiserver.seed(release(i))
            await until(all_final(apiserver, ROLLOUTS), 15)
        finally:
            await stack.stop()
        assert not apiserver.errors
        return [outcome(apiserver, i) for i in range(ROLLOUTS)]


async def killed_run(
    policies: Path, rng: random.Random, kill_log: list[tuple[str, list[str | None]]]
) -> tuple[list[dict[str, Any]], dict[str, list[int]]]:
    async with ApiServer() as apiserver:
        register_standard_resources(apiserver)
        seed_world(apiserver, ROLLOUTS)
        traffic = TrafficLog(apiserver)
        for i in range(ROLLOUTS):
            apiserver.seed(release(i))
        for _ in range(KILLS_PER_TRIAL):
            stack = Stack(apiserver, policies)
            stack.start()
            if rng.random() < 0.5:
                delay = rng.uniform(0.0, 0.4)
                point = f"after {delay:.2f}s"
                trigger: asyncio.Future[Any] = asyncio.ensure_future(asyncio.sleep(delay))
            else:
                k = traffic.total + rng.randint(1, 3)
                point = f"after traffic write {k}"
                trigger = asyncio.ensure_future(traffic.after(k).wait())
            finished = asyncio.ensure_future(until(all_final(apiserver, ROLLOUTS), 15))
            await asyncio.wait({trigger, finished}, return_when=asyncio.FIRST_COMPLETED)
            trigger.cancel()
            finished.cancel()
            kill_log.append((point, phases(apiserver, ROLLOUTS)))
            await stack.kill()
        stack = Stack(apiserver, policies)
        stack.start()
        try:
            await until(all_final(apiserver, ROLLOUTS), 15)
        finally:
            await stack.stop()
        assert not apiserver.errors and not apiserver.reactor_errors
        return [outcome(apiserver, i) for i in range(ROLLOUTS)], traffic.by_route


@pytest.mark.asyncio
async def test_rollouts_killed_at_fifty_random_points_end_as_an_uninterrupted_run(
    policy_dir: Path,
) -> None:
    expected = await clean_run(policy_dir)
    assert all(o["phase"] == "Succeeded" for o in expected), expected
    rng = random.Random(7)
    kills: list[tuple[str, list[str | None]]] = []
    for trial in range(TRIALS):
        outcomes, writes = await killed_run(policy_dir, rng, kills)
        context = f"trial {trial}, kills: {kills[-KILLS_PER_TRIAL:]}"
        for i in range(ROLLOUTS):
            assert outcomes[i] == expected[i], f"rollout {i}, {context}"
            app, _ = names(i)
            counts = {w: writes.get(app, []).count(w) for w in STEPS}
            # every step weight applied exactly once: never repeated, never skipped
            assert counts == {w: 1 for w in STEPS}, f"{app}: {writes.get(app)}, {context}"
    assert len(kills) == TRIALS * KILLS_PER_TRIAL
    # the points are spread across the rollouts, not after their end
    mid = [k for k in kills if any(p not in FINAL for p in k[1])]
    assert len(mid) >= 40, kills


@pytest.mark.asyncio
async def test_a_spec_change_mid_rollout_restarts_the_analysis_from_step_zero(
    policy_dir: Path,
) -> None:
    async with ApiServer() as apiserver:
        register_standard_resources(apiserver)
        seed_world(apiserver, 1)
        traffic = TrafficLog(apiserver)
        app, name = names(0)
        phases_seen: list[tuple[Any, ...]] = []  # observedGeneration, phase, step, weight

        def on_status(event: str, obj: dict[str, Any]) -> None:
            status = obj.get("status") or {}
            if status.get("phase"):
                seen = (
                    status.get("observedGeneration"),
                    status["phase"],
                    status.get("step"),
                    status.get("weight"),
                )
                if not phases_seen or phases_seen[-1] != seen:
                    phases_seen.append(seen)

        apiserver.on_write("canarydeployments", on_status)
        body = release(0)
        body["spec"]["strategy"] = {"type": "steps", "steps": [30, 60], "stepDuration": "1h"}
        apiserver.seed(body)
        stack = Stack(apiserver, policy_dir)
        stack.start()
        try:
            await until(lambda: traffic.by_route.get(app, [])[-1:] == [30], 10)
            assert phases(apiserver, 1) == ["Progressing"]
            before = len(phases_seen)
            await client.CustomObjectsApi(stack.api).patch_namespaced_custom_object(
                "codedance.io",
                "v1alpha1",
                NS,
                "canarydeployments",
                name,
                {"spec": {"version": {"images": {app: f"{app}:3"}}}},
            )

            def restarted() -> bool:
                return (2, "Progressing", 0, 30) in phases_seen[before:]

            await until(restarted, 10)
            await until(lambda: traffic.by_route[app][-1:] == [30], 10)
            after = [p for g, p, _, _ in phases_seen[before:] if g == 2]
            # back to Pending, the canary brought up again, then step 0 at step 0's weight
            assert after[:3] == ["Pending", "Initializing", "Progressing"], phases_seen
            # stable traffic first (weight 0, confirmed), then step 0 of the new generation
            assert traffic.by_route[app][-2:] == [0, 30], traffic.by_route
            canary = apiserver.read("deployments", f"{app}-canary", NS)
            assert canary is not None
            assert canary["spec"]["template"]["spec"]["containers"][0]["image"] == f"{app}:3"
            stable = apiserver.read("deployments", app, NS)
            assert stable is not None
            assert stable["spec"]["template"]["spec"]["containers"][0]["image"] == f"{app}:1"
            restarts = [e for e in stack.rig.audit_log.entries if e.action == "restart"]
            assert len(restarts) == 1 and "generation 2" in restarts[0].explanation
            assert restarts[0].to_phase.value == "Pending"

            def said() -> bool:
                return any(
                    "spec changed" in m and "generation 2" in m
                    for _, _, m in stack.rig.events_of(name)
                )

            await until(said, 5)
        finally:
            await stack.stop()
