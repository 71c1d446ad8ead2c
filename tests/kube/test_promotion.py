"""Promotion and rollback without a gap, on the real control plane.

The engine's sequences (`engine.rollback.promote` / `roll_back`) drive the
product's `KubeWorkloads` and `GatewayApiRouter` as the controller's
ServiceAccount; the real Deployment controller rolls the stable out, the fake
nodes make pods ready late (`ready-after`) or never (`never-ready`). The
router and the workload manager are wrapped to look at the cluster (as admin)
at the moment the product writes a weight or retires the canary, and the
API server's audit log gives the order of the product's writes.

What must hold: traffic leaves the canary only once the stable is fully rolled
out (updated == ready == available == desired, no old replica, generation
observed); the canary is deleted only the scale-down delay after that; a
stable that gives up (progressDeadlineSeconds) gets its previous version back
and the promotion fails with `WorkloadFailed` while traffic is still on the
canary; a rollback moves traffic to stable before the canary goes.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from kubernetes.aio import client

from adapters.kube import retry
from adapters.kube.workloads import PROMOTED_FROM, KubeWorkloads
from adapters.traffic.gateway_api import GatewayApiRouter
from engine import rollback
from engine.ports import RolloutRef, WorkloadFailed
from tests.cluster.controlplane import CONTROLLER_USER, ControlPlane
from tests.cluster.kube import Objects, eventually, settled_requests

APPS = "apps/v1"
GATEWAY = "gateway.networking.k8s.io/v1"
DELAY = 2.0

pytestmark = pytest.mark.asyncio


def ref(namespace: str) -> RolloutRef:
    return RolloutRef(namespace, "web-release", "web", "web-canary", "web", "web")


def stable(namespace: str, **spec: Any) -> dict[str, Any]:
    labels = {"app": "web", "codedance.io/track": "stable"}
    return {
        "apiVersion": APPS,
        "kind": "Deployment",
        "metadata": {"name": "web", "namespace": namespace},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "web", "image": "web:1"}]},
            },
            **spec,
        },
    }


def route(namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": GATEWAY,
        "kind": "HTTPRoute",
        "metadata": {"name": "web", "namespace": namespace},
        "spec": {
            "parentRefs": [{"name": "gateway"}],
            "rules": [{"backendRefs": [{"name": "web", "port": 80, "weight": 100}]}],
        },
    }


def rolled_out(dep: dict[str, Any]) -> bool:
    want, status = dep["spec"]["replicas"], dep.get("status") or {}
    return bool(
        status.get("observedGeneration", 0) >= dep["metadata"]["generation"]
        and status.get("updatedReplicas", 0) == want
        and status.get("readyReplicas", 0) == want
        and status.get("availableReplicas", 0) == want
        and status.get("replicas", 0) == want
    )


class Watched:
    """The product's router and workloads, with what the cluster looked like at each move."""

    def __init__(self, objects: Objects, router: GatewayApiRouter, workloads: KubeWorkloads):
        self.objects, self.router, self.workloads = objects, router, workloads
        self.moves: list[tuple[str, float, Any]] = []

    async def _stable(self) -> dict[str, Any]:
        dep = await self.objects.read(APPS, "Deployment", "web")
        assert dep is not None
        return dep

    # TrafficRouter, RouteCleanup
    async def set_weight(self, rollout: RolloutRef, weight: int) -> None:
        self.moves.append((f"weight {weight}", time.monotonic(), await self._stable()))
        await self.router.set_weight(rollout, weight)

    async def get_weight(self, rollout: RolloutRef) -> int:
        return await self.router.get_weight(rollout)

    async def remove(self, rollout: RolloutRef) -> None:
        await self.router.remove(rollout)

    # WorkloadManager, PromotionUndo
    async def bring_up(self, rollout: RolloutRef) -> None:
        await self.workloads.bring_up(rollout)

    async def promote(self, rollout: RolloutRef) -> None:
        self.moves.append(("promote", time.monotonic(), None))
        await self.workloads.promote(rollout)

    async def restore_stable(self, rollout: RolloutRef) -> None:
        await self.workloads.restore_stable(rollout)

    async def retire(self, rollout: RolloutRef) -> None:
        canary = await self.objects.read(APPS, "Deployment", "web-canary")
        self.moves.append(("retire", time.monotonic(), canary))
        await self.workloads.retire(rollout)

    def times(self, what: str) -> list[float]:
        return [t for name, t, _ in self.moves if name == what]

    def seen(self, what: str) -> list[Any]:
        return [obj for name, _, obj in self.moves if name == what]


async def setup(
    admin_api: client.ApiClient,
    controller_api: client.ApiClient,
    namespace: str,
    patch: dict[str, Any] | None,
    **stable_spec: Any,
) -> tuple[Objects, Watched, retry.LoopClock]:
    objects = Objects(admin_api, namespace)
    await objects.create(stable(namespace, **stable_spec))
    await objects.create(route(namespace))

    async def stable_ready() -> bool:
        dep = await objects.read(APPS, "Deployment", "web")
        return dep is not None and rolled_out(dep)

    await eventually(stable_ready)
    clock = retry.LoopClock()
    router = GatewayApiRouter(
        controller_api, http_route="web", stable_service="web", canary_service="web-canary"
    )
    # the canary comes up with the plain new image; `patch` is what promotion writes
    up = KubeWorkloads(controller_api, images={"web": "web:2"}, clock=clock, poll_every=0.1)
    await up.bring_up(ref(namespace))
    product = KubeWorkloads(
        controller_api,
        images={"web": "web:2"},
        pod_template_patch=patch,
        clock=clock,
        poll_every=0.1,
        ready_timeout=60,
    )
    watched = Watched(objects, router, product)
    await rollback.set_weight_confirmed(watched, ref(namespace), 50, clock)
    return objects, watched, clock


async def weight(objects: Objects) -> dict[str, int]:
    found = await objects.read(GATEWAY, "HTTPRoute", "web")
    assert found is not None
    refs = found["spec"]["rules"][0]["backendRefs"]
    return {r["name"]: r.get("weight", 1) for r in refs}


async def test_traffic_leaves_the_canary_only_once_the_slow_stable_is_available(
    control_plane: ControlPlane,
    admin_api: client.ApiClient,
    controller_api: client.ApiClient,
    namespace: str,
) -> None:
    slow = {"metadata": {"annotations": {"fakelet.codedance.io/ready-after": "5s"}}}
    objects, watched, clock = await setup(
        admin_api, controller_api, namespace, slow, minReadySeconds=1
    )

    await rollback.promote(watched, watched, ref(namespace), clock, delay=DELAY)

    (promoted_at,) = watched.times("promote")
    (to_stable_at,) = watched.times("weight 0")
    (retired_at,) = watched.times("retire")
    # the canary had everything from the start of the promotion ...
    (at_promotion,) = watched.seen("weight 100")
    assert at_promotion["spec"]["template"]["spec"]["containers"][0]["image"] == "web:1"
    # ... until the new stable was rolled out: new pods ready after 5 s, available 1 s later
    (stable_then,) = watched.seen("weight 0")
    assert rolled_out(stable_then), stable_then["status"]
    assert stable_then["spec"]["template"]["spec"]["containers"][0]["image"] == "web:2"
    assert PROMOTED_FROM not in (stable_then["metadata"].get("annotations") or {})
    assert to_stable_at - promoted_at >= 5.0
    # the canary was still there DELAY seconds after traffic left it, then it went
    (canary_then,) = watched.seen("retire")
    assert canary_then is not None and canary_then["metadata"].get("deletionTimestamp") is None
    assert retired_at - to_stable_at >= DELAY
    assert await weight(objects) == {"web": 100}

    # the API server saw the writes in that order
    events = await settled_requests(control_plane, controller_api, CONTROLLER_USER, namespace)
    writes = [
        (e.verb, e.resource, e.name)
        for e in events
        if e.verb in ("update", "delete") and e.resource in ("deployments", "httproutes")
    ]
    stable_writes = [i for i, w in enumerate(writes) if w == ("update", "deployments", "web")]
    delete = writes.index(("delete", "deployments", "web-canary"))
    route_writes = [i for i, w in enumerate(writes) if w[1] == "httproutes"]
    # weight 50 and 100 before the stable changes; weight 0 after; the canary goes last
    assert route_writes[1] < stable_writes[0]
    assert any(stable_writes[-1] < i < delete for i in route_writes)
    assert delete == len(writes) - 1 or all(w[1] == "httproutes" for w in writes[delete + 1 :])


async def test_a_stable_that_never_becomes_available_fails_the_promotion_and_rolls_back(
    admin_api: client.ApiClient, controller_api: client.ApiClient, namespace: str
) -> None:
    broken = {"metadata": {"annotations": {"fakelet.codedance.io/fault": "never-ready"}}}
    objects, watched, clock = await setup(
        admin_api, controller_api, namespace, broken, progressDeadlineSeconds=3
    )
    before = await objects.read(APPS, "Deployment", "web")
    assert before is not None

    with pytest.raises(WorkloadFailed) as failed:
        await rollback.promote(watched, watched, ref(namespace), clock, delay=DELAY)

    message = str(failed.value)
    assert "progressDeadlineSeconds" in message and "previous version is restored" in message
    # traffic never left the canary; the canary is still there
    assert watched.times("weight 0") == [] and watched.times("retire") == []
    assert await weight(objects) == {"web": 0, "web-canary": 100}
    # the stable runs its previous template again, and all of it is available
    after = await objects.read(APPS, "Deployment", "web")
    assert after is not None and rolled_out(after), after.get("status")
    assert after["spec"]["template"] == before["spec"]["template"]
    assert PROMOTED_FROM not in (after["metadata"].get("annotations") or {})

    # what the engine does next: the rollback; it finds nothing left to restore
    await rollback.roll_back(watched, watched, ref(namespace), clock, delay=DELAY)
    (to_stable_at,) = watched.times("weight 0")
    (retired_at,) = watched.times("retire")
    assert retired_at - to_stable_at >= DELAY
    assert await weight(objects) == {"web": 100}
    restored = await objects.read(APPS, "Deployment", "web")
    assert restored is not None and restored["spec"]["template"] == before["spec"]["template"]


async def test_a_rollback_keeps_the_canary_until_traffic_is_on_stable_and_the_delay_passed(
    admin_api: client.ApiClient, controller_api: client.ApiClient, namespace: str
) -> None:
    objects, watched, clock = await setup(admin_api, controller_api, namespace, None)

    await rollback.roll_back(watched, watched, ref(namespace), clock, delay=DELAY)

    (to_stable_at,) = watched.times("weight 0")
    (retired_at,) = watched.times("retire")
    (canary_then,) = watched.seen("retire")
    assert canary_then is not None and canary_then["status"].get("readyReplicas") == 2
    assert retired_at - to_stable_at >= DELAY
    # the stable was never written: a rollback with no promotion under way restores nothing
    after = await objects.read(APPS, "Deployment", "web")
    assert after is not None and after["metadata"]["generation"] == 1
    assert await weight(objects) == {"web": 100}

    async def canary_gone() -> bool:
        return await objects.read(APPS, "Deployment", "web-canary") is None

    await eventually(canary_gone)
