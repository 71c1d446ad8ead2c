"""Rollout state on the CanaryDeployment status subresource, through `StatusStore`.

Against the real control plane: deploy/crd.yaml is installed there, so the
real API server validates, prunes and versions every status written here.
The store acts as the controller's ServiceAccount (`controller_api`, exactly
deploy/rbac.yaml's rights); the test sets up and checks as admin. Conflicts
come from a real second writer between the store's read and its write.
"""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes.aio import client

from adapters.kube.models import status_from, status_of
from adapters.kube.store import StatusStore, StoreError
from engine.model import Phase, RolloutStatus, VerdictRecord
from engine.ports import RolloutStore
from tests.cluster.controlplane import CONTROLLER_USER, ControlPlane
from tests.cluster.kube import Objects, settled_requests
from tests.kube.realcluster import before_each

API_VERSION = "codedance.io/v1alpha1"
KIND = "CanaryDeployment"
CANARY_DEPLOYMENT: dict[str, Any] = {
    "apiVersion": "codedance.io/v1alpha1",
    "kind": "CanaryDeployment",
    "metadata": {"name": "web"},
    "spec": {
        "targetRef": {"kind": "Deployment", "name": "web"},
        "version": {"images": {"web": "example.com/web:v2"}},
        "policy": {"name": "default"},
    },
}


class FakeClock:
    def __init__(self, t: float = 1_767_225_600.0) -> None:
        self.t = t

    def now(self) -> float:
        return self.t

    async def sleep_until(self, t: float) -> None:
        self.t = max(self.t, t)


def progressing() -> RolloutStatus:
    return RolloutStatus(
        phase=Phase.PROGRESSING,
        step=2,
        weight=25,
        started_at=1_767_225_600.0,
        step_started_at=1_767_225_720.5,
        policy_hash="9f2c",
        pending_since={"latency": 1_767_225_750.0, "line 7": 1_767_225_760.25},
        last_verdict=VerdictRecord(
            at=1_767_225_720.5,
            action="continue",
            rule=None,
            health=97.0,
            explanation="continue: every rule holds",
        ),
        approved_step=1,
    )


STATUSES = [
    RolloutStatus(),
    progressing(),
    RolloutStatus(
        phase=Phase.PAUSED,
        step=1,
        weight=10,
        started_at=5.0,
        step_started_at=5.0,
        paused_at=20.25,
        paused_by="alice",
        message="paused by alice",
    ),
    RolloutStatus(
        phase=Phase.ROLLED_BACK,
        started_at=5.0,
        step_started_at=65.0,
        message="rolled back",
        last_verdict=VerdictRecord(
            at=65.0,
            action="rollback",
            rule="latency",
            health=12.0,
            explanation="rollback: latency: canary.p99 = 412ms > 300ms",
        ),
    ),
]


async def conditions_of(objects: Objects) -> dict[str, dict[str, Any]]:
    obj = await objects.read(API_VERSION, KIND, "web")
    assert obj is not None
    return {c["type"]: c for c in obj["status"]["conditions"]}


async def status_writes(
    plane: ControlPlane, api: client.ApiClient, namespace: str
) -> list[tuple[str, str, int]]:
    """The controller's writes to CanaryDeployments, as (verb, subresource, code)."""
    events = await settled_requests(plane, api, CONTROLLER_USER, namespace)
    return [
        (e.verb, e.subresource, e.code)
        for e in events
        if e.resource == "canarydeployments" and e.verb in ("create", "update", "patch", "delete")
    ]


@pytest.mark.parametrize("status", STATUSES, ids=lambda s: s.phase.value)
def test_status_from_reverses_status_of(status: RolloutStatus) -> None:
    assert status_from(status_of(status, generation=4)) == status


def test_status_from_an_empty_subresource_is_none() -> None:
    assert status_from({}) is None


@pytest.mark.asyncio
@pytest.mark.parametrize("status", STATUSES, ids=lambda s: s.phase.value)
async def test_save_then_load_gives_the_status_back(
    control_plane: ControlPlane,
    admin_api: client.ApiClient,
    controller_api: client.ApiClient,
    namespace: str,
    status: RolloutStatus,
) -> None:
    objects = Objects(admin_api, namespace)
    created = await objects.create(CANARY_DEPLOYMENT)
    key = f"{namespace}/web"
    store = StatusStore(controller_api, clock=FakeClock())
    assert isinstance(store, RolloutStore)
    assert await store.load(key) is None  # nothing saved yet
    await store.save(key, status)
    assert await store.load(key) == status
    # a new store (a restarted controller) reads the same
    assert await StatusStore(controller_api).load(key) == status
    assert await status_writes(control_plane, controller_api, namespace) == [
        ("update", "status", 200)
    ]
    # the spec was not touched: the server kept it and did not bump the generation
    after = await objects.read(API_VERSION, KIND, "web")
    assert after is not None
    assert after["spec"] == created["spec"]
    assert after["metadata"]["generation"] == created["metadata"]["generation"] == 1


@pytest.mark.asyncio
async def test_conditions_and_observed_generation_as_a_user_reads_them(
    admin_api: client.ApiClient, controller_api: client.ApiClient, namespace: str
) -> None:
    objects = Objects(admin_api, namespace)
    await objects.create(CANARY_DEPLOYMENT)
    changed = {"spec": {"version": {"images": {"web": "example.com/web:v3"}}}}
    patched = await objects.patch(API_VERSION, KIND, "web", changed)
    assert patched["metadata"]["generation"] == 2  # a spec change
    clock = FakeClock()
    store = StatusStore(controller_api, clock=clock)
    key = f"{namespace}/web"
    await store.save(key, progressing())
    obj = await objects.read(API_VERSION, KIND, "web")
    assert obj is not None and obj["status"]["observedGeneration"] == 2
    first = await conditions_of(objects)
    assert {k: (c["status"], c["reason"]) for k, c in first.items()} == {
        "Ready": ("False", "Progressing"),
        "Progressing": ("True", "Progressing"),
        "Degraded": ("False", "Progressing"),
    }
    assert first["Progressing"]["message"] == "continue: every rule holds"
    assert first["Progressing"]["lastTransitionTime"] == "2026-01-01T00:00:00Z"
    assert {c["observedGeneration"] for c in first.values()} == {2}

    clock.t += 600
    await store.save(key, progressing().model_copy(update={"step": 3, "weight": 50}))
    assert await conditions_of(objects) == first  # nothing a condition says changed

    clock.t += 600
    await store.save(key, STATUSES[3])
    after = await conditions_of(objects)
    assert after["Degraded"]["status"] == "True"
    assert after["Degraded"]["lastTransitionTime"] == "2026-01-01T00:20:00Z"
    assert after["Progressing"]["status"] == "False"
    assert after["Ready"]["lastTransitionTime"] == first["Ready"]["lastTransitionTime"]
    assert after["Degraded"]["reason"] == "RolledBack"
    assert after["Degraded"]["message"] == "rolled back"


@pytest.mark.asyncio
async def test_a_stale_resource_version_is_re_read_and_retried(
    control_plane: ControlPlane,
    admin_api: client.ApiClient,
    controller_api: client.ApiClient,
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    objects = Objects(admin_api, namespace)
    await objects.create(CANARY_DEPLOYMENT)
    key = f"{namespace}/web"
    store = StatusStore(controller_api, clock=FakeClock())
    sent: list[str] = []
    limit = 2

    async def a_person_pauses(body: Any) -> bool:
        # between the store's read and its write, someone annotates the object
        sent.append(body["metadata"]["resourceVersion"])
        patch = {"metadata": {"annotations": {"codedance.io/command": f"pause-{len(sent)}"}}}
        await objects.patch(API_VERSION, KIND, "web", patch)
        return len(sent) < limit

    before_each(
        controller_api,
        monkeypatch,
        "PUT",
        f"/namespaces/{namespace}/canarydeployments/web/status",
        a_person_pauses,
    )
    await store.save(key, progressing())
    assert await store.load(key) == progressing()
    assert await status_writes(control_plane, controller_api, namespace) == [
        ("update", "status", 409),
        ("update", "status", 409),
        ("update", "status", 200),
    ]
    # every attempt sent the resourceVersion it had just read, a newer one each time
    assert len(sent) == 2 and all(sent) and sent[0] != sent[1]
    obj = await objects.read(API_VERSION, KIND, "web")
    assert obj is not None
    assert obj["metadata"]["annotations"]["codedance.io/command"] == "pause-2"

    limit = 100
    before_each(
        controller_api,
        monkeypatch,
        "PUT",
        f"/namespaces/{namespace}/canarydeployments/web/status",
        a_person_pauses,
    )
    with pytest.raises(StoreError, match="kept changing"):
        await store.save(key, STATUSES[2])
    assert await store.load(key) == progressing()  # nothing half-written


@pytest.mark.asyncio
async def test_a_missing_object_and_a_bad_key(
    controller_api: client.ApiClient, namespace: str
) -> None:
    store = StatusStore(controller_api, clock=FakeClock())
    key = f"{namespace}/web"
    assert await store.load(key) is None
    with pytest.raises(StoreError, match=f"CanaryDeployment {namespace}/web not found"):
        await store.save(key, progressing())
    with pytest.raises(ValueError, match="namespace/name"):
        await store.load("web")
