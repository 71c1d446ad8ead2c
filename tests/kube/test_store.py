"""Rollout state on the CanaryDeployment status subresource, through `StatusStore`.

The double enforces deploy/crd.yaml's schema, so every status written here
is one the real API server would take.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
from kubernetes.aio import client

from adapters.kube.models import status_from, status_of
from adapters.kube.store import StatusStore, StoreError
from engine.model import Phase, RolloutStatus, VerdictRecord
from engine.ports import RolloutStore
from tests.kube.apiserver import ApiServer

NS = "default"
KEY = "default/web"
CANARY_DEPLOYMENT: dict[str, Any] = {
    "apiVersion": "codedance.io/v1alpha1",
    "kind": "CanaryDeployment",
    "metadata": {"name": "web", "namespace": NS},
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


def conditions_of(apiserver: ApiServer) -> dict[str, dict[str, Any]]:
    obj = apiserver.read("canarydeployments", "web", NS)
    assert obj is not None
    return {c["type"]: c for c in obj["status"]["conditions"]}


@pytest.mark.parametrize("status", STATUSES, ids=lambda s: s.phase.value)
def test_status_from_reverses_status_of(status: RolloutStatus) -> None:
    assert status_from(status_of(status, generation=4)) == status


def test_status_from_an_empty_subresource_is_none() -> None:
    assert status_from({}) is None


@pytest.mark.asyncio
@pytest.mark.parametrize("status", STATUSES, ids=lambda s: s.phase.value)
async def test_save_then_load_gives_the_status_back(
    apiserver: ApiServer, kube_client: client.ApiClient, status: RolloutStatus
) -> None:
    apiserver.seed(CANARY_DEPLOYMENT)
    store = StatusStore(kube_client, clock=FakeClock())
    assert isinstance(store, RolloutStore)
    assert await store.load(KEY) is None  # nothing saved yet
    await store.save(KEY, status)
    assert await store.load(KEY) == status
    # a new store (a restarted controller) reads the same
    assert await StatusStore(kube_client).load(KEY) == status
    assert len(apiserver.writes("canarydeployments", status=True)) == 1
    assert apiserver.writes("canarydeployments", status=False) == []


@pytest.mark.asyncio
async def test_conditions_and_observed_generation_as_a_user_reads_them(
    apiserver: ApiServer, kube_client: client.ApiClient
) -> None:
    apiserver.seed(CANARY_DEPLOYMENT)
    changed = copy.deepcopy(CANARY_DEPLOYMENT)
    changed["spec"]["version"]["images"]["web"] = "example.com/web:v3"
    apiserver.seed(changed)  # a spec change: generation 2
    clock = FakeClock()
    store = StatusStore(kube_client, clock=clock)
    await store.save(KEY, progressing())
    obj = apiserver.read("canarydeployments", "web", NS)
    assert obj is not None and obj["status"]["observedGeneration"] == 2
    first = conditions_of(apiserver)
    assert {k: (c["status"], c["reason"]) for k, c in first.items()} == {
        "Ready": ("False", "Progressing"),
        "Progressing": ("True", "Progressing"),
        "Degraded": ("False", "Progressing"),
    }
    assert first["Progressing"]["message"] == "continue: every rule holds"
    assert first["Progressing"]["lastTransitionTime"] == "2026-01-01T00:00:00Z"

    clock.t += 600
    await store.save(KEY, progressing().model_copy(update={"step": 3, "weight": 50}))
    assert conditions_of(apiserver) == first  # nothing a condition says changed

    clock.t += 600
    await store.save(KEY, STATUSES[3])
    after = conditions_of(apiserver)
    assert after["Degraded"]["status"] == "True"
    assert after["Degraded"]["lastTransitionTime"] == "2026-01-01T00:20:00Z"
    assert after["Progressing"]["status"] == "False"
    assert after["Ready"]["lastTransitionTime"] == first["Ready"]["lastTransitionTime"]
    assert after["Degraded"]["reason"] == "RolledBack"
    assert after["Degraded"]["message"] == "rolled back"


@pytest.mark.asyncio
async def test_a_stale_resource_version_is_re_read_and_retried(
    apiserver: ApiServer, kube_client: client.ApiClient
) -> None:
    apiserver.seed(CANARY_DEPLOYMENT)
    store = StatusStore(kube_client, clock=FakeClock())
    apiserver.conflict_next_write(times=2)
    await store.save(KEY, progressing())
    assert await store.load(KEY) == progressing()
    assert len(apiserver.writes("canarydeployments", status=True, ok=False)) == 2
    # every attempt sent the resourceVersion it had just read
    sent = [
        c.body["metadata"]["resourceVersion"]
        for c in apiserver.writes("canarydeployments", ok=None)
    ]
    assert all(sent)

    apiserver.conflict_next_write(times=10)
    with pytest.raises(StoreError, match="kept changing"):
        await store.save(KEY, STATUSES[2])


@pytest.mark.asyncio
async def test_a_missing_object_and_a_bad_key(
    apiserver: ApiServer, kube_client: client.ApiClient
) -> None:
    store = StatusStore(kube_client, clock=FakeClock())
    assert await store.load(KEY) is None
    with pytest.raises(StoreError, match="CanaryDeployment default/web not found"):
        await store.save(KEY, progressing())
    with pytest.raises(ValueError, match="namespace/name"):
        await store.load("web")
