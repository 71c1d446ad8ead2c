"""The controller on the real control plane: CanaryDeployments from creation to the end.

The controller runs as its ServiceAccount (`controller_api`, exactly
deploy/rbac.yaml's rights) against a real kube-apiserver; the real Deployment
and ReplicaSet controllers make the pods and the fake nodes make them ready.
Traffic goes through the real `GatewayApiRouter` on an HTTPRoute the test
creates (with the Gateway API's own CEL validation and defaulting); metrics
come from a `ReplaySource`. The test reads what a user would, as the admin:
the objects, their Events, every change of an object as a watch delivers it
(`History`), and the requests the controller made (the API server's audit
log). The engine runs on the event loop's clock with short intervals, so a
whole release takes a few seconds.

Two tests stay on the API double (tests/kube/apiserver.py), for faults a real
server will not produce on demand; their docstrings say which.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, cast

import pytest
import pytest_asyncio
from kubernetes.aio import client, watch
from kubernetes.aio.client.exceptions import ApiException

from adapters.kube.controller import (
    FINALIZER,
    Controller,
    Policies,
    RolloutRouters,
    RolloutWorkloads,
)
from adapters.kube.events import EventAudit, EventRecorder
from adapters.kube.models import CanaryDeployment
from adapters.kube.store import StatusStore
from adapters.kube.workloads import KubeWorkloads
from adapters.metrics.replay import ReplaySource
from adapters.traffic.gateway_api import GatewayApiRouter, canary_weights
from engine.audit import MemoryAudit
from engine.loop import Engine, LoopClock
from engine.policystore import PolicyStore
from tests.cluster.controlplane import CONTROLLER_USER, ControlPlane
from tests.cluster.kube import Objects, audit_events, eventually
from tests.kube.apiserver import ApiServer

POLICY = "latency: p99 > 300ms for 1s -> rollback\n"
HEALTHY = {"canary.p99": "0.1x1000", "stable.p99": "0.1x1000"}
SLOW = {"canary.p99": "0.1x3 0.5x1000", "stable.p99": "0.1x1000"}
CD = ("codedance.io", "v1alpha1", "canarydeployments")
ROUTES = ("gateway.networking.k8s.io", "v1", "httproutes")
DEPLOYMENTS = ("apps", "v1", "deployments")
WRITES = frozenset({"create", "update", "patch", "delete"})

JsonObject = dict[str, Any]


def stable_deployment(app: str = "web", namespace: str = "default") -> JsonObject:
    labels = {"app": app, "codedance.io/track": "stable"}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": app, "namespace": namespace, "labels": {"app": app}},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": app, "image": f"{app}:1"}]},
            },
        },
    }


def http_route(app: str = "web", namespace: str = "default") -> JsonObject:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": app, "namespace": namespace},
        "spec": {
            "parentRefs": [{"name": "gateway"}],
            "rules": [{"backendRefs": [{"name": app, "port": 80}]}],
        },
    }


def canary(name: str = "web-release", namespace: str = "default", **spec: Any) -> JsonObject:
    body: JsonObject = {
        "targetRef": {"name": "web"},
        "version": {"images": {"web": "web:2"}},
        "strategy": {
            "type": "steps",
            "steps": [25, 50],
            "stepDuration": "300ms",
            "scaleDownDelay": "0s",
        },
        "traffic": {"provider": "gateway-api", "service": "web", "httpRoute": "web"},
        "policy": {"name": "latency"},
        "analysis": {"interval": "100ms"},
    }
    body.update(spec)
    return {
        "apiVersion": "codedance.io/v1alpha1",
        "kind": "CanaryDeployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": body,
    }


def image_of(deployment: JsonObject) -> str:
    return str(deployment["spec"]["template"]["spec"]["containers"][0]["image"])


def rv_of(obj: JsonObject) -> int:
    # etcd revisions: one counter for the whole store, so they order changes of
    # different objects too (Kubernetes calls them opaque; this test relies on
    # the etcd-backed server it runs on)
    return int(obj["metadata"]["resourceVersion"])


class History:
    """Every change of one resource in a namespace, in order, as a watch delivers it.

    Started before the test acts, so nothing is missed; a write that changes
    nothing is not a change (the API server stores nothing, and neither does
    this). `changes(name)` is (type, object) of each ADDED, MODIFIED, DELETED.
    """

    def __init__(self, api: client.ApiClient, namespace: str, resource: tuple[str, ...]) -> None:
        self._api = client.CustomObjectsApi(api)
        self.namespace = namespace
        self.resource = resource
        self.events: list[tuple[str, JsonObject]] = []
        self.changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> History:
        group, version, plural = self.resource
        listed = cast(
            JsonObject,
            await self._api.list_namespaced_custom_object(group, version, self.namespace, plural),
        )
        for obj in listed.get("items") or []:
            self.events.append(("ADDED", obj))
        rv = str(listed["metadata"]["resourceVersion"])
        self._task = asyncio.ensure_future(self._follow(rv))
        return self

    async def _follow(self, rv: str) -> None:
        group, version, plural = self.resource
        while True:
            stream = watch.Watch()  # type: ignore[no-untyped-call]
            try:
                async for event in stream.stream(  # type: ignore[no-untyped-call]
                    self._api.list_namespaced_custom_object,
                    group,
                    version,
                    self.namespace,
                    plural,
                    resource_version=rv,
                    timeout_seconds=300,
                ):
                    obj = event["raw_object"]
                    rv = str(obj["metadata"]["resourceVersion"])
                    self.events.append((event["type"], obj))
                    self.changed.set()
            finally:
                await stream.close()  # type: ignore[no-untyped-call]

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def changes(self, name: str) -> list[tuple[str, JsonObject]]:
        return [(kind, obj) for kind, obj in self.events if obj["metadata"]["name"] == name]


def route_weight(route: JsonObject) -> int:
    name = route["metadata"]["name"]
    weights = canary_weights(route, name, f"{name}-canary")
    return weights[0] if weights else 0


def controller_writes(
    plane: ControlPlane, namespace: str, resource: str, name: str | None = None
) -> list[Any]:
    """The write requests the controller's ServiceAccount made, from the audit log."""
    for _ in range(50):
        try:
            events = audit_events(plane.audit_log, CONTROLLER_USER)
            break
        except json.JSONDecodeError:  # the API server is writing the last line
            time.sleep(0.01)
    else:
        events = audit_events(plane.audit_log, CONTROLLER_USER)
    return [
        e
        for e in events
        if e.verb in WRITES
        and e.resource == resource
        and e.namespace == namespace
        and (name is None or e.name == name)
    ]


class Rig:
    """The controller wired as `codedance controller` wires it, on `api`."""

    def __init__(
        self,
        api: client.ApiClient,
        policies: Path,
        series: dict[str, str],
        namespace: str,
        instance: str = "",
    ) -> None:
        self.api = api
        self.namespace = namespace
        self.clock = LoopClock()
        store = PolicyStore(policies)
        assert store.load().ok
        self.policies = Policies(store)
        self.audit_log = MemoryAudit()
        self.events = EventRecorder(api, clock=self.clock, instance=instance)
        audit = EventAudit(self.audit_log, self.events)
        routers, workloads = RolloutRouters(), RolloutWorkloads()
        self.source = ReplaySource(series, interval=0.1, start=0.0)
        self.engine = Engine(
            policies=self.policies,
            metrics=self.source,
            router=routers,
            workloads=workloads,
            store=StatusStore(api, clock=self.clock),
            audit=audit,
            clock=self.clock,
            metrics_window=1.0,
        )

        def router_for(cd: CanaryDeployment) -> GatewayApiRouter:
            traffic = cd.spec.traffic
            stable = traffic.service or cd.spec.target_ref.name
            return GatewayApiRouter(
                api,
                http_route=traffic.http_route or stable,
                stable_service=stable,
                canary_service=traffic.canary_service or f"{stable}-canary",
            )

        def workloads_for(cd: CanaryDeployment) -> KubeWorkloads:
            version = cd.spec.version
            return KubeWorkloads(
                api,
                images=version.images,
                pod_template_patch=version.pod_template_patch,
                clock=self.clock,
                poll_every=0.05,
                ready_timeout=30,
            )

        self.controller = Controller(
            api,
            engine=self.engine,
            policies=self.policies,
            routers=routers,
            workloads=workloads,
            router_for=router_for,
            workloads_for=workloads_for,
            audit=audit,
            clock=self.clock,
            namespace=namespace,
            retry_after=0.05,
        )

    def actions_by(self, actor: str) -> list[Any]:
        """The audit entries of one actor (a person, the policy, the controller)."""
        return [e for e in self.audit_log.entries if e.actor == actor]


class Cluster:
    """What a user sees in one namespace, read as the admin."""

    def __init__(self, admin: client.ApiClient, namespace: str, plane: ControlPlane) -> None:
        self.admin = admin
        self.namespace = namespace
        self.plane = plane
        self.objects = Objects(admin, namespace)
        self._custom = client.CustomObjectsApi(admin)

    async def read(self, resource: tuple[str, ...], name: str) -> JsonObject | None:
        group, version, plural = resource
        try:
            found = await self._custom.get_namespaced_custom_object(
                group, version, self.namespace, plural, name
            )
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        return dict(cast(JsonObject, found))

    async def create(self, obj: JsonObject) -> JsonObject:
        obj = {**obj, "metadata": {**obj["metadata"], "namespace": self.namespace}}
        return await self.objects.create(obj)

    async def status(self, name: str = "web-release") -> JsonObject:
        obj = await self.read(CD, name)
        assert obj is not None
        return dict(obj.get("status") or {})

    async def phase(self, name: str = "web-release") -> str | None:
        return (await self.status(name)).get("phase")

    async def until_phase(self, phase: str, name: str = "web-release", timeout: float = 30) -> None:
        async def reached() -> bool:
            return await self.phase(name) == phase

        await eventually(reached, timeout=timeout, every=0.05)

    async def events_of(self, name: str = "web-release") -> list[tuple[str, str, str]]:
        listed = await client.CoreV1Api(self.admin).list_namespaced_event(
            self.namespace, field_selector=f"involvedObject.name={name}"
        )
        ordered = sorted(listed.items, key=lambda e: int(e.metadata.resource_version or 0))
        return [(str(e.type), str(e.reason), str(e.message)) for e in ordered]

    async def drop_finalizers(self) -> None:
        """After the controller stopped: let the namespace's deletion finish."""
        group, version, plural = CD
        listed = cast(
            JsonObject,
            await self._custom.list_namespaced_custom_object(
                group, version, self.namespace, plural
            ),
        )
        for obj in listed.get("items") or []:
            if obj["metadata"].get("finalizers"):
                with contextlib.suppress(ApiException):
                    await self.objects.patch(
                        "codedance.io/v1alpha1",
                        "CanaryDeployment",
                        obj["metadata"]["name"],
                        {"metadata": {"finalizers": None}},
                    )


async def seed(cluster: Cluster, app: str = "web") -> None:
    """The user's stable Deployment (ready before the release starts) and HTTPRoute."""
    await cluster.create(stable_deployment(app))
    await cluster.create(http_route(app))

    async def available() -> bool:
        dep = await cluster.read(DEPLOYMENTS, app)
        return bool(dep and (dep.get("status") or {}).get("availableReplicas") == 2)

    await eventually(available, every=0.05)


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "policies"
    directory.mkdir()
    (directory / "latency.rules").write_text(POLICY, encoding="utf-8")
    return directory


@pytest_asyncio.fixture
async def cluster(
    admin_api: client.ApiClient, namespace: str, control_plane: ControlPlane
) -> AsyncIterator[Cluster]:
    view = Cluster(admin_api, namespace, control_plane)
    await seed(view)
    yield view
    await view.drop_finalizers()


@contextlib.asynccontextmanager
async def running(rig: Rig) -> AsyncIterator[Rig]:
    engine = asyncio.ensure_future(rig.engine.run())
    controller = asyncio.ensure_future(rig.controller.run())
    try:
        yield rig
    finally:
        await rig.controller.stop()  # it ends its open watch: a real server's stays open
        await asyncio.wait_for(controller, 5)
        await rig.engine.stop()
        await asyncio.wait_for(engine, 5)


@pytest.mark.asyncio
async def test_a_release_runs_from_creation_to_succeeded_as_a_user_reads_it(
    cluster: Cluster, controller_api: client.ApiClient, policy_dir: Path
) -> None:
    canaries = await History(cluster.admin, cluster.namespace, DEPLOYMENTS).start()
    routes = await History(cluster.admin, cluster.namespace, ROUTES).start()
    try:
        async with running(Rig(controller_api, policy_dir, HEALTHY, cluster.namespace)) as rig:
            await cluster.create(canary())
            await cluster.until_phase("Succeeded")

            status = await cluster.status()
            assert status["observedGeneration"] == 1 and status["step"] >= 1
            conditions = {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}
            assert conditions["Ready"] == ("True", "Succeeded")
            assert conditions["Degraded"][0] == "False"
            assert "continue" in status["lastVerdict"] or status["lastVerdict"] == ""
            obj = await cluster.read(CD, "web-release")
            assert obj is not None and FINALIZER in obj["metadata"]["finalizers"]

            # the stable Deployment runs the new version; the canary is gone; traffic on stable
            stable = await cluster.read(DEPLOYMENTS, "web")
            assert stable is not None and image_of(stable) == "web:2"

            async def canary_gone() -> bool:
                return await cluster.read(DEPLOYMENTS, "web-canary") is None

            assert await canary_gone()
            route = await cluster.read(ROUTES, "web")
            assert route is not None
            assert [r["name"] for r in route["spec"]["rules"][0]["backendRefs"]] == ["web"]

            # the canary Deployment was up (ready, with the new version) before traffic moved
            moved = [rv_of(o) for _, o in routes.changes("web") if route_weight(o) > 0]
            ready = [
                rv_of(o)
                for kind, o in canaries.changes("web-canary")
                if kind != "DELETED"
                and image_of(o) == "web:2"
                and (o.get("status") or {}).get("readyReplicas") == 2
            ]
            assert moved and ready and min(ready) < min(moved)
            # the steps' weights, in order, each written once
            weights = [route_weight(o) for _, o in routes.changes("web")]
            assert [w for w in weights if w not in (0, 100)] == [25, 50], weights

            # the audit line and its Event follow the status write that entered the phase
            async def succeeded_said() -> bool:
                return "Succeeded" in [reason for _, reason, _ in await cluster.events_of()]

            await eventually(succeeded_said)
            events = await cluster.events_of()
            reasons = [reason for _, reason, _ in events]
            for reason in ("Initializing", "Progressing", "Promoting", "Succeeded"):
                assert reason in reasons, reasons
            assert all(kind == "Normal" for kind, _, _ in events)
            assert [e.to_phase.value for e in rig.audit_log.entries][-1] == "Succeeded"
    finally:
        await canaries.stop()
        await routes.stop()


@pytest.mark.asyncio
async def test_a_release_whose_canary_is_slow_ends_rolled_back_with_the_reason(
    cluster: Cluster, controller_api: client.ApiClient, policy_dir: Path
) -> None:
    async with running(Rig(controller_api, policy_dir, SLOW, cluster.namespace)) as rig:
        rig.source.start = rig.clock.now()  # sample 0 of the recording is now
        await cluster.create(canary())
        await cluster.until_phase("RolledBack")
        status = await cluster.status()
        assert status["weight"] == 0
        assert "latency" in status["lastVerdict"] and "canary.p99" in status["lastVerdict"]
        conditions = {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}
        assert conditions["Degraded"] == ("True", "RolledBack")
        assert conditions["Ready"][0] == "False"

        async def rolled_back_said() -> bool:
            return "RolledBack" in [r for _, r, _ in await cluster.events_of()]

        await eventually(rolled_back_said)
        warnings = [(r, m) for kind, r, m in await cluster.events_of() if kind == "Warning"]
        assert any(r == "RollingBack" and "canary.p99" in m for r, m in warnings), warnings
        assert await cluster.read(DEPLOYMENTS, "web-canary") is None
        stable = await cluster.read(DEPLOYMENTS, "web")
        assert stable is not None and image_of(stable) == "web:1"
        route = await cluster.read(ROUTES, "web")
        assert route is not None and route_weight(route) == 0


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"policy": {"name": "nonexistent"}}, "no policy named 'nonexistent'"),
        ({"targetRef": {"name": "missing"}}, "Deployment {namespace}/missing does not exist"),
        (
            {"traffic": {"service": "web", "httpRoute": "web"}},
            "spec.traffic.provider is required on a cluster",
        ),
    ],
)
async def test_an_invalid_release_gets_a_condition_and_touches_no_traffic(
    cluster: Cluster,
    controller_api: client.ApiClient,
    policy_dir: Path,
    change: dict[str, Any],
    words: str,
) -> None:
    async with running(Rig(controller_api, policy_dir, HEALTHY, cluster.namespace)) as rig:
        await cluster.create(canary(**change))

        async def conditions() -> list[JsonObject]:
            return list((await cluster.status()).get("conditions") or [])

        ready = next(c for c in await eventually(conditions) if c["type"] == "Ready")
        assert (ready["status"], ready["reason"]) == ("False", "InvalidSpec")
        assert words.format(namespace=cluster.namespace) in ready["message"]

        async def said() -> list[tuple[str, str]]:
            return [(k, r) for k, r, _ in await cluster.events_of()]

        await eventually(said)
        # the watch delivers the controller's own status write back: reconciled, not said again
        await eventually(lambda: _after_own_write(rig))
        await rig.controller.idle()
        assert await said() == [("Warning", "InvalidSpec")]
        plane, ns = cluster.plane, cluster.namespace
        assert controller_writes(plane, ns, "httproutes") == []
        assert controller_writes(plane, ns, "deployments") == []
        assert await cluster.read(DEPLOYMENTS, "web-canary") is None
        obj = await cluster.read(CD, "web-release")
        assert obj is not None and not obj["metadata"].get("finalizers")


async def _after_own_write(rig: Rig) -> bool:
    """The controller has seen the resourceVersion its status write made."""
    group, version, plural = CD
    obj = await client.CustomObjectsApi(rig.api).get_namespaced_custom_object(
        group, version, rig.namespace, plural, "web-release"
    )
    seen = rig.controller.resource_version
    return bool(seen) and int(seen or 0) >= rv_of(cast(JsonObject, obj))


@pytest.mark.asyncio
async def test_deleting_a_release_mid_rollout_restores_stable_traffic_before_the_finalizer_goes(
    cluster: Cluster, controller_api: client.ApiClient, policy_dir: Path
) -> None:
    routes = await History(cluster.admin, cluster.namespace, ROUTES).start()
    releases = await History(cluster.admin, cluster.namespace, CD).start()
    try:
        async with running(Rig(controller_api, policy_dir, HEALTHY, cluster.namespace)) as rig:
            steps = {"type": "steps", "steps": [30, 60], "stepDuration": "1h"}
            await cluster.create(canary(strategy=steps))

            async def at_30() -> bool:
                route = await cluster.read(ROUTES, "web")
                return route is not None and route_weight(route) == 30

            await eventually(at_30)
            await cluster.objects.delete("codedance.io/v1alpha1", "CanaryDeployment", "web-release")

            async def gone() -> bool:
                return await cluster.read(CD, "web-release") is None

            await eventually(gone)
            route = await cluster.read(ROUTES, "web")
            assert route is not None
            refs = route["spec"]["rules"][0]["backendRefs"]
            assert [r["name"] for r in refs] == ["web"]  # the canary backendRef removed
            assert await cluster.read(DEPLOYMENTS, "web-canary") is None

            # weight 0 was written while the object (and its finalizer) still existed
            async def deleted() -> list[int]:
                return [rv_of(o) for k, o in releases.changes("web-release") if k == "DELETED"]

            deleted_at = (await eventually(deleted))[0]
            changes = routes.changes("web")
            at = next(i for i, (_, o) in enumerate(changes) if route_weight(o) == 30)
            zero = next(rv_of(o) for _, o in changes[at:] if route_weight(o) == 0)
            assert zero < deleted_at
            before = [o for _, o in releases.changes("web-release") if rv_of(o) < zero]
            assert FINALIZER in (before[-1]["metadata"].get("finalizers") or [])
            assert before[-1]["metadata"].get("deletionTimestamp")  # deletion had begun
            assert "web-release" not in [k.split("/")[1] for k in rig.engine.keys()]  # noqa: SIM118
            assert any(r == "RolledBack" for _, r, _ in await cluster.events_of())
    finally:
        await routes.stop()
        await releases.stop()


# --- on the API double: faults a real server will not produce on demand -------------------

DOUBLE_NS = "default"


def play_deployment_controller(apiserver: ApiServer) -> None:
    """The double has no Deployment controller: every Deployment is ready at once."""

    def react(event: str, obj: JsonObject) -> None:
        if event == "DELETED":
            return
        meta, replicas = obj["metadata"], obj["spec"].get("replicas", 1)
        status = {
            "observedGeneration": meta["generation"],
            "replicas": replicas,
            "readyReplicas": replicas,
            "availableReplicas": replicas,
            "updatedReplicas": replicas,
        }
        if obj.get("status") != status:
            apiserver.set_status("deployments", meta["name"], status, namespace=DOUBLE_NS)

    apiserver.on_write("deployments", react)


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


@pytest_asyncio.fixture
async def on_the_double(
    apiserver: ApiServer, kube_client: client.ApiClient, policy_dir: Path
) -> AsyncIterator[Rig]:
    play_deployment_controller(apiserver)
    apiserver.seed(stable_deployment(namespace=DOUBLE_NS))
    apiserver.seed(http_route(namespace=DOUBLE_NS))
    rig = Rig(kube_client, policy_dir, HEALTHY, DOUBLE_NS)
    engine = asyncio.ensure_future(rig.engine.run())
    controller = asyncio.ensure_future(rig.controller.run())
    try:
        yield rig
    finally:
        await rig.controller.stop()
        apiserver.close_watches()
        await asyncio.wait_for(controller, 5)
        await rig.engine.stop()
        await asyncio.wait_for(engine, 5)


def double_phase(apiserver: ApiServer) -> Callable[[], str | None]:
    def phase() -> str | None:
        obj = apiserver.read("canarydeployments", "web-release", DOUBLE_NS)
        return ((obj or {}).get("status") or {}).get("phase")

    return phase


@pytest.mark.asyncio
async def test_a_watch_answering_410_is_resumed_by_listing_again(
    apiserver: ApiServer, on_the_double: Rig
) -> None:
    """The double: a 410 Gone on a live watch at a chosen moment, which a real server
    will not give on demand."""
    rig = on_the_double
    await until(lambda: len(apiserver.watches) == 1)
    relists = rig.controller.relists
    apiserver.expire_next_watch()
    apiserver.close_watches()
    await until(lambda: rig.controller.relists > relists)
    apiserver.seed(canary(namespace=DOUBLE_NS))
    phase = double_phase(apiserver)
    await until(lambda: phase() == "Succeeded")


@pytest.mark.asyncio
async def test_stale_resource_version_conflicts_on_status_writes_are_retried(
    apiserver: ApiServer, on_the_double: Rig
) -> None:
    """The double: two 409 Conflicts on status writes at a chosen moment, which a real
    server gives only when another writer happens to race."""
    apiserver.conflict_next_write(times=2, path="*/canarydeployments/*/status")
    apiserver.seed(canary(namespace=DOUBLE_NS))
    phase = double_phase(apiserver)
    await until(lambda: phase() == "Succeeded")
    failed = apiserver.writes("canarydeployments", status=True, ok=False)
    assert [c.status for c in failed] == [409, 409]
