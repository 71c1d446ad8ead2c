"""The controller over HTTP against the API double: CanaryDeployments from creation to the end.

The real `kubernetes.aio` client talks to the double; a reactor plays the
Deployment controller (pods ready after each write); traffic goes through
the real `GatewayApiRouter` on an HTTPRoute the test creates, so every weight
is an object write the test can count; metrics come from a `ReplaySource`.
The engine runs on the event loop's clock (`LoopClock`), with short
intervals, so a whole release takes about a second.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from kubernetes.aio import client

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
from tests.kube.apiserver import ApiServer

NS = "default"
POLICY = "latency: p99 > 300ms for 1s -> rollback\n"
HEALTHY = {"canary.p99": "0.1x1000", "stable.p99": "0.1x1000"}
SLOW = {"canary.p99": "0.1x3 0.5x1000", "stable.p99": "0.1x1000"}


def stable_deployment() -> dict[str, Any]:
    labels = {"app": "web", "codedance.io/track": "stable"}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web", "namespace": NS, "labels": {"app": "web"}},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "web", "image": "web:1"}]},
            },
        },
    }


def http_route() -> dict[str, Any]:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "web", "namespace": NS},
        "spec": {
            "parentRefs": [{"name": "gateway"}],
            "rules": [{"backendRefs": [{"name": "web", "port": 80}]}],
        },
    }


def canary(name: str = "web-release", **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "targetRef": {"name": "web"},
        "version": {"images": {"web": "web:2"}},
        "strategy": {"type": "steps", "steps": [25, 50], "stepDuration": "300ms"},
        "traffic": {"provider": "gateway-api", "service": "web", "httpRoute": "web"},
        "policy": {"name": "latency"},
        "analysis": {"interval": "100ms"},
    }
    body.update(spec)
    return {
        "apiVersion": "codedance.io/v1alpha1",
        "kind": "CanaryDeployment",
        "metadata": {"name": name, "namespace": NS},
        "spec": body,
    }


def play_deployment_controller(apiserver: ApiServer) -> None:
    def react(event: str, obj: dict[str, Any]) -> None:
        if event == "DELETED":
            return
        meta, replicas = obj["metadata"], obj["spec"].get("replicas", 1)
        status = {
            "observedGeneration": meta["generation"],
            "replicas": replicas,
            "readyReplicas": replicas,
            "updatedReplicas": replicas,
        }
        if obj.get("status") != status:
            apiserver.set_status("deployments", meta["name"], status, namespace=NS)

    apiserver.on_write("deployments", react)


class Rig:
    """The controller wired as `codedance controller` wires it, on one API double."""

    def __init__(
        self, apiserver: ApiServer, api: client.ApiClient, policies: Path, series: dict[str, str]
    ) -> None:
        self.apiserver = apiserver
        self.clock = LoopClock()
        store = PolicyStore(policies)
        assert store.load().ok
        self.policies = Policies(store)
        self.audit_log = MemoryAudit()
        self.events = EventRecorder(api, clock=self.clock)
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
                poll_every=0.02,
                ready_timeout=5,
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
            namespace=NS,
            retry_after=0.05,
        )

    def status(self, name: str = "web-release") -> dict[str, Any]:
        obj = self.apiserver.read("canarydeployments", name, NS)
        assert obj is not None
        return dict(obj.get("status") or {})

    def events_of(self, name: str = "web-release") -> list[tuple[str, str, str]]:
        return [
            (e["type"], e["reason"], e["message"])
            for e in self.apiserver.list_objects("v1/events", NS)
            if e["involvedObject"]["name"] == name
        ]

    def route_weights(self) -> list[int]:
        route = self.apiserver.read("httproutes", "web", NS)
        assert route is not None
        return canary_weights(route, "web", "web-canary")

    def route_writes(self) -> int:
        return len(self.apiserver.writes("httproutes", status=False))

    async def until(self, predicate: Any, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(0.01)


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "policies"
    directory.mkdir()
    (directory / "latency.rules").write_text(POLICY, encoding="utf-8")
    return directory


@contextlib.asynccontextmanager
async def running(rig: Rig) -> AsyncIterator[Rig]:
    engine = asyncio.ensure_future(rig.engine.run())
    controller = asyncio.ensure_future(rig.controller.run())
    try:
        yield rig
    finally:
        await rig.controller.stop()
        rig.apiserver.close_watches()
        await asyncio.wait_for(controller, 5)
        await rig.engine.stop()
        await asyncio.wait_for(engine, 5)


def setup(apiserver: ApiServer) -> None:
    play_deployment_controller(apiserver)
    apiserver.seed(stable_deployment())
    apiserver.seed(http_route())


@pytest_asyncio.fixture
async def healthy(
    apiserver: ApiServer, kube_client: client.ApiClient, policy_dir: Path
) -> AsyncIterator[Rig]:
    setup(apiserver)
    async with running(Rig(apiserver, kube_client, policy_dir, HEALTHY)) as rig:
        yield rig


@pytest.mark.asyncio
async def test_a_release_runs_from_creation_to_succeeded_as_a_user_reads_it(healthy: Rig) -> None:
    rig = healthy
    rig.apiserver.seed(canary())
    await rig.until(lambda: rig.status().get("phase") == "Succeeded")

    status = rig.status()
    assert status["observedGeneration"] == 1 and status["step"] >= 1
    conditions = {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}
    assert conditions["Ready"] == ("True", "Succeeded")
    assert conditions["Degraded"][0] == "False"
    assert "continue" in status["lastVerdict"] or status["lastVerdict"] == ""
    obj = rig.apiserver.read("canarydeployments", "web-release", NS)
    assert obj is not None and FINALIZER in obj["metadata"]["finalizers"]

    # the stable Deployment now runs the new version; the canary is gone; traffic on stable
    stable = rig.apiserver.read("deployments", "web", NS)
    assert stable is not None
    assert stable["spec"]["template"]["spec"]["containers"][0]["image"] == "web:2"
    assert rig.apiserver.read("deployments", "web-canary", NS) is None
    route = rig.apiserver.read("httproutes", "web", NS)
    assert route is not None and [r["name"] for r in route["spec"]["rules"][0]["backendRefs"]] == [
        "web"
    ]
    # the canary Deployment was up, with the new version, before traffic moved
    history = rig.apiserver.objects["apps/v1/deployments", NS, "web-canary"].history
    assert any(
        v is not None and v["spec"]["template"]["spec"]["containers"][0]["image"] == "web:2"
        for v in history
    )

    # the audit line and its Event follow the status write that entered the phase
    await rig.until(lambda: "Succeeded" in [reason for _, reason, _ in rig.events_of()])
    reasons = [reason for _, reason, _ in rig.events_of()]
    for reason in ("Initializing", "Progressing", "Promoting", "Succeeded"):
        assert reason in reasons, reasons
    assert all(kind == "Normal" for kind, _, _ in rig.events_of())
    assert [e.to_phase.value for e in rig.audit_log.entries][-1] == "Succeeded"


@pytest.mark.asyncio
async def test_a_release_whose_canary_is_slow_ends_rolled_back_with_the_reason(
    apiserver: ApiServer, kube_client: client.ApiClient, policy_dir: Path
) -> None:
    setup(apiserver)
    async with running(Rig(apiserver, kube_client, policy_dir, SLOW)) as rig:
        rig.source.start = rig.clock.now()  # sample 0 of the recording is now
        apiserver.seed(canary())
        await rig.until(lambda: rig.status().get("phase") == "RolledBack")
        status = rig.status()
        assert status["weight"] == 0
        assert "latency" in status["lastVerdict"] and "canary.p99" in status["lastVerdict"]
        conditions = {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}
        assert conditions["Degraded"] == ("True", "RolledBack")
        assert conditions["Ready"][0] == "False"
        await rig.until(lambda: "RolledBack" in [r for _, r, _ in rig.events_of()])
        warnings = [(r, m) for kind, r, m in rig.events_of() if kind == "Warning"]
        assert any(r == "RollingBack" and "canary.p99" in m for r, m in warnings), warnings
        assert apiserver.read("deployments", "web-canary", NS) is None
        stable = apiserver.read("deployments", "web", NS)
        assert stable is not None
        assert stable["spec"]["template"]["spec"]["containers"][0]["image"] == "web:1"


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"policy": {"name": "nonexistent"}}, "no policy named 'nonexistent'"),
        ({"targetRef": {"name": "missing"}}, "Deployment default/missing does not exist"),
    ],
)
async def test_an_invalid_release_gets_a_condition_and_touches_no_traffic(
    healthy: Rig, change: dict[str, Any], words: str
) -> None:
    rig = healthy
    rig.apiserver.seed(canary(**change))
    await rig.until(lambda: bool(rig.status().get("conditions")))
    ready = next(c for c in rig.status()["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "InvalidSpec")
    assert words in ready["message"]
    await rig.controller.idle()
    assert rig.route_writes() == 0
    assert rig.apiserver.read("deployments", "web-canary", NS) is None
    assert [(k, r) for k, r, _ in rig.events_of()] == [("Warning", "InvalidSpec")]
    obj = rig.apiserver.read("canarydeployments", "web-release", NS)
    assert obj is not None and not obj["metadata"].get("finalizers")


@pytest.mark.asyncio
async def test_deleting_a_release_mid_rollout_restores_stable_traffic_before_the_finalizer_goes(
    apiserver: ApiServer, kube_client: client.ApiClient, policy_dir: Path
) -> None:
    setup(apiserver)
    seen: list[tuple[list[int], bool]] = []

    def on_route(event: str, obj: dict[str, Any]) -> None:
        cd = apiserver.read("canarydeployments", "web-release", NS)
        seen.append(
            (
                canary_weights(obj, "web", "web-canary"),
                cd is not None and FINALIZER in (cd["metadata"].get("finalizers") or []),
            )
        )

    apiserver.on_write("httproutes", on_route)
    async with running(Rig(apiserver, kube_client, policy_dir, HEALTHY)) as rig:
        apiserver.seed(canary(strategy={"type": "steps", "steps": [30, 60], "stepDuration": "1h"}))
        await rig.until(lambda: rig.route_weights() == [30])
        await kube_client_delete(kube_client)
        await rig.until(lambda: apiserver.read("canarydeployments", "web-release", NS) is None)
        route = apiserver.read("httproutes", "web", NS)
        assert route is not None
        refs = route["spec"]["rules"][0]["backendRefs"]
        assert [r["name"] for r in refs] == ["web"]  # the canary backendRef removed
        assert apiserver.read("deployments", "web-canary", NS) is None
        # weight 0 was written while the object (and its finalizer) still existed
        zero = [i for i, (w, _) in enumerate(seen) if w == [0]]
        assert zero and seen[zero[0]][1]
        assert "web-release" not in [k.split("/")[1] for k in rig.engine.keys()]  # noqa: SIM118
        assert any(r == "RolledBack" for _, r, _ in rig.events_of())


async def kube_client_delete(api: client.ApiClient) -> None:
    await client.CustomObjectsApi(api).delete_namespaced_custom_object(
        "codedance.io", "v1alpha1", NS, "canarydeployments", "web-release"
    )


@pytest.mark.asyncio
async def test_a_watch_answering_410_is_resumed_by_listing_again(healthy: Rig) -> None:
    rig = healthy
    await rig.until(lambda: len(rig.apiserver.watches) == 1)
    relists = rig.controller.relists
    rig.apiserver.expire_next_watch()
    rig.apiserver.close_watches()
    await rig.until(lambda: rig.controller.relists > relists)
    rig.apiserver.seed(canary())
    await rig.until(lambda: rig.status().get("phase") == "Succeeded")


@pytest.mark.asyncio
async def test_stale_resource_version_conflicts_on_status_writes_are_retried(
    healthy: Rig,
) -> None:
    rig = healthy
    rig.apiserver.conflict_next_write(times=2, path="*/canarydeployments/*/status")
    rig.apiserver.seed(canary())
    await rig.until(lambda: rig.status().get("phase") == "Succeeded")
    failed = rig.apiserver.writes("canarydeployments", status=True, ok=False)
    assert [c.status for c in failed] == [409, 409]
