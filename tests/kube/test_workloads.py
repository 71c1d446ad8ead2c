"""The canary Deployment's life through `KubeWorkloads`, against the real control plane.

The product acts as the controller's ServiceAccount (`controller_api`, exactly
deploy/rbac.yaml's rights); the test sets up and checks as admin. The real
Deployment and ReplicaSet controllers make the pods and write each
Deployment's status, and the fake nodes make the pods ready (or not, when a
pod template asks for a fault). What the product asked of the API server is
read back from its audit log.

The API double (tests/kube/apiserver.py) stays only for the faults a real
server will not give on demand: 429 and 5xx at a chosen moment.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from kubernetes.aio import client

from adapters.kube import retry
from adapters.kube.workloads import (
    PROMOTED_FROM,
    TRACK_LABEL,
    KubeWorkloads,
    WorkloadError,
    deadline_exceeded,
    merge_patch,
    readiness,
)
from engine.ports import RolloutRef
from tests.cluster.controlplane import CONTROLLER_USER, ControlPlane
from tests.cluster.fixtures import api_client
from tests.cluster.kube import Objects, eventually, settled_requests
from tests.kube.apiserver import ApiServer
from tests.kube.realcluster import before_each

APPS = "apps/v1"
FAULT = "fakelet.codedance.io/fault"
READY_AFTER = "fakelet.codedance.io/ready-after"
WRITES = frozenset({"create", "update", "patch", "delete", "deletecollection"})


def ref(namespace: str) -> RolloutRef:
    return RolloutRef(namespace=namespace, name="web-release", stable="web", canary="web-canary")


class FakeClock:
    """Time that passes only when someone waits; every wait is recorded.

    With a `gate`, a wait first (really) waits until the gate holds: fake time
    then passes only once the cluster has done what the test waits for.
    """

    def __init__(self, gate: Callable[[], Awaitable[Any]] | None = None) -> None:
        self.t = 1000.0
        self.waits: list[float] = []
        self.gate = gate

    def now(self) -> float:
        return self.t

    async def sleep_until(self, t: float) -> None:
        if self.gate is not None:
            await eventually(self.gate)
        self.waits.append(t - self.t)
        self.t = max(self.t, t)


def stable(
    replicas: int | None = 3, *, track: bool = False, namespace: str = "default"
) -> dict[str, Any]:
    pod_labels = {"app": "web", **({TRACK_LABEL: "stable"} if track else {})}
    spec: dict[str, Any] = {
        "selector": {"matchLabels": {"app": "web"}},
        "template": {
            "metadata": {"labels": pod_labels},
            "spec": {
                "containers": [
                    {"name": "web", "image": "web:1", "env": [{"name": "MODE", "value": "a"}]},
                    {"name": "sidecar", "image": "proxy:1"},
                ]
            },
        },
    }
    if replicas is not None:
        spec["replicas"] = replicas
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web", "namespace": namespace, "labels": {"app": "web"}},
        "spec": spec,
    }


def workloads(api: client.ApiClient, **kw: Any) -> KubeWorkloads:
    """The product on the real cluster: real time, polling often so the tests stay quick."""
    kw.setdefault("images", {"web": "web:2"})
    kw.setdefault("clock", retry.LoopClock())
    kw.setdefault("ready_timeout", 60)
    return KubeWorkloads(api, poll_every=0.1, **kw)


def on_double(api: client.ApiClient, clock: FakeClock, **kw: Any) -> KubeWorkloads:
    kw.setdefault("images", {"web": "web:2"})
    return KubeWorkloads(api, clock=clock, ready_timeout=10, **kw)


async def rolled_out(objects: Objects, name: str) -> dict[str, Any] | None:
    """The Deployment once its controller reports every replica updated, ready, and alone."""
    dep = await objects.read(APPS, "Deployment", name)
    if dep is None:
        return None
    want, status = dep["spec"]["replicas"], dep.get("status") or {}
    done = (
        status.get("observedGeneration", 0) >= dep["metadata"]["generation"]
        and status.get("updatedReplicas", 0) == want
        and status.get("readyReplicas", 0) == want
        and status.get("replicas", 0) == want
    )
    return dep if done else None


async def live_pods(objects: Objects, selector: str) -> list[dict[str, Any]]:
    pods = await objects.list("v1", "Pod", label_selector=selector)
    return [p for p in pods if not p["metadata"].get("deletionTimestamp")]


def is_ready(pod: dict[str, Any]) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


async def deployment_writes(
    plane: ControlPlane, api: client.ApiClient, namespace: str, name: str | None = None
) -> list[tuple[str, str, int]]:
    """The controller's writes to Deployments in `namespace` (of `name`), as (verb, name, code)."""
    events = await settled_requests(plane, api, CONTROLLER_USER, namespace)
    return [
        (e.verb, e.name, e.code)
        for e in events
        if e.resource == "deployments" and e.verb in WRITES and (name is None or e.name == name)
    ]


@pytest.mark.asyncio
async def test_bring_up_creates_a_ready_canary_and_leaves_the_stable_alone(
    control_plane: ControlPlane,
    admin_api: client.ApiClient,
    controller_api: client.ApiClient,
    namespace: str,
) -> None:
    objects = Objects(admin_api, namespace)
    await objects.create(stable(namespace=namespace))
    before = await eventually(lambda: rolled_out(objects, "web"))
    stable_pods = {p["metadata"]["uid"] for p in await live_pods(objects, "app=web")}
    assert len(stable_pods) == 3

    await workloads(controller_api).bring_up(ref(namespace))

    canary = await objects.read(APPS, "Deployment", "web-canary")
    assert canary is not None
    assert canary["spec"]["replicas"] == 3
    assert canary["spec"]["selector"]["matchLabels"] == {"app": "web", TRACK_LABEL: "canary"}
    pod = canary["spec"]["template"]
    assert pod["metadata"]["labels"] == {"app": "web", TRACK_LABEL: "canary"}
    assert [c["image"] for c in pod["spec"]["containers"]] == ["web:2", "proxy:1"]
    labels = canary["metadata"]["labels"]
    assert labels["app.kubernetes.io/managed-by"] == "codedance"
    assert labels["codedance.io/rollout"] == "web-release"
    # bring_up returned once the real Deployment controller counted 3 ready canary pods
    assert canary["status"]["readyReplicas"] == 3
    canary_pods = await live_pods(objects, f"{TRACK_LABEL}=canary")
    assert len(canary_pods) == 3 and all(is_ready(p) for p in canary_pods)
    assert {c["image"] for p in canary_pods for c in p["spec"]["containers"]} == {
        "web:2",
        "proxy:1",
    }
    # the stable Deployment was only read: not one write, so its pods never restarted
    assert await deployment_writes(control_plane, controller_api, namespace, "web") == []
    after = await objects.read(APPS, "Deployment", "web")
    assert after is not None
    assert after["spec"] == before["spec"]
    assert after["metadata"]["generation"] == before["metadata"]["generation"]
    stable_now = await live_pods(objects, f"app=web,{TRACK_LABEL}!=canary")
    assert {p["metadata"]["uid"] for p in stable_now} == stable_pods


@pytest.mark.asyncio
async def test_the_canary_overrides_a_stable_track_label_so_a_track_selector_isolates_it(
    admin_api: client.ApiClient, controller_api: client.ApiClient, namespace: str
) -> None:
    objects = Objects(admin_api, namespace)
    await objects.create(stable(track=True, namespace=namespace))
    await workloads(controller_api).bring_up(ref(namespace))
    canary = await objects.read(APPS, "Deployment", "web-canary")
    assert canary is not None
    assert canary["spec"]["template"]["metadata"]["labels"][TRACK_LABEL] == "canary"
    stable_dep = await objects.read(APPS, "Deployment", "web")
    assert stable_dep is not None
    assert stable_dep["spec"]["template"]["metadata"]["labels"][TRACK_LABEL] == "stable"
    # a Service selecting the stable track selects only the stable's pods
    await eventually(lambda: rolled_out(objects, "web"))
    tracked = await live_pods(objects, f"app=web,{TRACK_LABEL}=stable")
    assert len(tracked) == 3
    assert {c["image"] for p in tracked for c in p["spec"]["containers"]} == {"web:1", "proxy:1"}


@pytest.mark.asyncio
@pytest.mark.parametrize("replicas", [None, 0], ids=["unset", "zero"])
async def test_a_stable_without_replicas_gives_a_canary_of_one(
    admin_api: client.ApiClient,
    controller_api: client.ApiClient,
    namespace: str,
    replicas: int | None,
) -> None:
    objects = Objects(admin_api, namespace)
    created = await objects.create(stable(replicas=replicas, namespace=namespace))
    # the real API server defaults an unset spec.replicas to 1; 0 is a scaled-down stable
    assert created["spec"]["replicas"] == (1 if replicas is None else 0)
    await workloads(controller_api).bring_up(ref(namespace))
    canary = await objects.read(APPS, "Deployment", "web-canary")
    assert canary is not None and canary["spec"]["replicas"] == 1
    assert canary["status"]["readyReplicas"] == 1


@pytest.mark.asyncio
async def test_a_pod_template_patch_merges_containers_by_name(
    admin_api: client.ApiClient, controller_api: client.ApiClient, namespace: str
) -> None:
    objects = Objects(admin_api, namespace)
    await objects.create(stable(namespace=namespace))
    patch = {
        "spec": {
            "containers": [
                {"name": "web", "image": "web:3", "env": [{"name": "MODE", "value": "b"}]}
            ]
        }
    }
    await workloads(controller_api, images=None, pod_template_patch=patch).bring_up(ref(namespace))
    canary = await objects.read(APPS, "Deployment", "web-canary")
    assert canary is not None
    web, sidecar = canary["spec"]["template"]["spec"]["containers"]
    assert (web["image"], web["env"], sidecar["image"]) == (
        "web:3",
        [{"name": "MODE", "value": "b"}],
        "proxy:1",
    )


def test_merge_patch_deletes_with_null_and_replaces_unnamed_lists() -> None:
    target = {"a": 1, "b": {"c": 2, "d": [1, 2]}, "e": 3}
    assert merge_patch(target, {"b": {"d": [3]}, "e": None}) == {"a": 1, "b": {"c": 2, "d": [3]}}
    assert target["e"] == 3  # the target is not changed in place


@pytest.mark.asyncio
async def test_bring_up_again_updates_the_canary_in_place(
    control_plane: ControlPlane,
    admin_api: client.ApiClient,
    controller_api: client.ApiClient,
    namespace: str,
) -> None:
    objects = Objects(admin_api, namespace)
    await objects.create(stable(namespace=namespace))
    await workloads(controller_api).bring_up(ref(namespace))
    await workloads(controller_api).bring_up(ref(namespace))  # a restarted controller
    await workloads(controller_api, images={"web": "web:4"}).bring_up(ref(namespace))
    canary = await objects.read(APPS, "Deployment", "web-canary")
    assert canary is not None
    assert canary["spec"]["template"]["spec"]["containers"][0]["image"] == "web:4"
    writes = await deployment_writes(control_plane, controller_api, namespace)
    assert [w for w in writes if w[0] == "create"] == [("create", "web-canary", 201)]
    assert canary["metadata"]["generation"] == 2  # the repeat wrote nothing new
    # and it rolled out: every canary pod runs the new image and is ready
    canary_pods = await live_pods(objects, f"{TRACK_LABEL}=canary")
    assert len(canary_pods) == 3 and all(is_ready(p) for p in canary_pods)
    assert {p["spec"]["containers"][0]["image"] for p in canary_pods} == {"web:4"}


@pytest.mark.asyncio
async def test_a_canary_that_never_gets_ready_fails_with_the_reason(
    admin_api: client.ApiClient, controller_api: client.ApiClient, namespace: str
) -> None:
    objects = Objects(admin_api, namespace)
    await objects.create(stable(namespace=namespace))

    async def reported() -> bool:
        # fake time passes only once the Deployment controller has reported on the canary
        dep = await objects.read(APPS, "Deployment", "web-canary")
        status = (dep or {}).get("status") or {}
        return bool(
            dep is not None
            and status.get("observedGeneration", 0) >= dep["metadata"]["generation"]
            and status.get("conditions")
        )

    clock = FakeClock(gate=reported)
    never = {"metadata": {"annotations": {FAULT: "never-ready"}}}
    with pytest.raises(WorkloadError) as caught:
        await workloads(
            controller_api, clock=clock, ready_timeout=10, pod_template_patch=never
        ).bring_up(ref(namespace))
    message = str(caught.value)
    assert "web-canary not ready after 10s" in message
    assert "0/3 ready" in message and "MinimumReplicasUnavailable" in message
    assert clock.t == pytest.approx(1010.0)


@pytest.mark.asyncio
async def test_a_progress_deadline_fails_at_once_and_a_new_version_still_rolls_out(
    admin_api: client.ApiClient, controller_api: client.ApiClient, namespace: str
) -> None:
    objects = Objects(admin_api, namespace)
    body = stable(replicas=1, namespace=namespace)
    body["spec"]["progressDeadlineSeconds"] = 2  # the canary copies it
    await objects.create(body)
    never = {"metadata": {"annotations": {FAULT: "never-ready"}}}
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(WorkloadError, match=r"failed to roll out .*timed out progressing"):
        await workloads(controller_api, ready_timeout=60, pod_template_patch=never).bring_up(
            ref(namespace)
        )
    assert loop.time() - started < 30  # the controller's verdict, not our timeout

    # the next version replaces the stuck one; the old ProgressDeadlineExceeded stays on
    # the status until the controller sees the new generation, and must not fail it
    await workloads(controller_api, images={"web": "web:3"}).bring_up(ref(namespace))
    canary = await objects.read(APPS, "Deployment", "web-canary")
    assert canary is not None and canary["status"]["readyReplicas"] == 1


@pytest.mark.asyncio
async def test_a_missing_stable_or_container_is_a_readable_error(
    control_plane: ControlPlane,
    admin_api: client.ApiClient,
    controller_api: client.ApiClient,
    namespace: str,
) -> None:
    with pytest.raises(WorkloadError, match=f"Deployment {namespace}/web not found"):
        await workloads(controller_api).bring_up(ref(namespace))
    await Objects(admin_api, namespace).create(stable(namespace=namespace))
    with pytest.raises(WorkloadError, match="no container named api"):
        await workloads(controller_api, images={"api": "x"}).bring_up(ref(namespace))
    assert await deployment_writes(control_plane, controller_api, namespace) == []


@pytest.mark.asyncio
async def test_promote_updates_the_stable_template_and_waits_for_its_rollout(
    control_plane: ControlPlane,
    admin_api: client.ApiClient,
    controller_api: client.ApiClient,
    namespace: str,
) -> None:
    objects = Objects(admin_api, namespace)
    await objects.create(stable(track=True, namespace=namespace))
    await eventually(lambda: rolled_out(objects, "web"))
    # new pods take a moment to get ready, so a rolling update passes through states
    # where old and new pods are ready together: promote must wait them all out
    slow = {"metadata": {"annotations": {READY_AFTER: "500ms"}}}
    manager = workloads(controller_api, pod_template_patch=slow)
    await manager.bring_up(ref(namespace))
    assert await deployment_writes(control_plane, controller_api, namespace, "web") == []
    await manager.promote(ref(namespace))
    web = await objects.read(APPS, "Deployment", "web")
    assert web is not None
    assert [c["image"] for c in web["spec"]["template"]["spec"]["containers"]] == [
        "web:2",
        "proxy:1",
    ]
    # the stable keeps its own labels and selector: no canary label leaks into it
    assert web["spec"]["template"]["metadata"]["labels"] == {"app": "web", TRACK_LABEL: "stable"}
    assert web["spec"]["selector"] == {"matchLabels": {"app": "web"}}
    # the new template, then the kept previous template dropped from the annotations:
    # a Deployment's generation counts annotation changes too
    assert web["metadata"]["generation"] == 3
    assert PROMOTED_FROM not in (web["metadata"].get("annotations") or {})
    # promote returned only when every stable pod ran the new version and was ready
    pods = await live_pods(objects, f"app=web,{TRACK_LABEL}=stable")
    assert len(pods) == 3 and all(is_ready(p) for p in pods)
    assert {p["spec"]["containers"][0]["image"] for p in pods} == {"web:2"}

    await manager.retire(ref(namespace))
    assert await objects.read(APPS, "Deployment", "web-canary") is None

    async def canary_pods_gone() -> bool:
        return await objects.list("v1", "Pod", label_selector=f"{TRACK_LABEL}=canary") == []

    await eventually(canary_pods_gone)  # the garbage collector takes its ReplicaSet and pods
    await manager.retire(ref(namespace))  # already gone: fine


@pytest.mark.asyncio
async def test_promote_re_reads_and_retries_on_a_conflict(
    control_plane: ControlPlane,
    admin_api: client.ApiClient,
    controller_api: client.ApiClient,
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    objects = Objects(admin_api, namespace)
    await objects.create(stable(replicas=1, namespace=namespace))
    # settled first: while pods start, the Deployment controller's status writes change the
    # resourceVersion too and would add conflicts of their own
    await eventually(lambda: rolled_out(objects, "web"))
    writers = 0

    async def someone_else_writes(body: Any) -> bool:
        # between the product's read and its write, another writer changes the stable
        nonlocal writers
        writers += 1
        patch = {"metadata": {"annotations": {"example.com/writer": str(writers)}}}
        await objects.patch(APPS, "Deployment", "web", patch)
        return writers < 2

    before_each(
        controller_api,
        monkeypatch,
        "PUT",
        f"/namespaces/{namespace}/deployments/web",
        someone_else_writes,
    )
    await workloads(controller_api).promote(ref(namespace))
    web = await objects.read(APPS, "Deployment", "web")
    assert web is not None
    assert web["spec"]["template"]["spec"]["containers"][0]["image"] == "web:2"
    # re-read, re-applied: the other writer's change is kept
    assert web["metadata"]["annotations"]["example.com/writer"] == "2"
    writes = await deployment_writes(control_plane, controller_api, namespace, "web")
    # the new version after the other writer's two conflicts, then the kept previous
    # template dropped. The other writer's annotations count in a Deployment's
    # generation, so the Deployment controller's status write that follows may cost
    # one more 409: re-read and retried like the others.
    codes = [code for verb, name, code in writes if (verb, name) == ("update", "web")]
    assert len(codes) == len(writes)
    assert codes[:2] == [409, 409]
    assert codes.count(200) == 2 and codes[-1] == 200
    assert set(codes) == {409, 200} and len(codes) <= 6


@pytest.mark.asyncio
async def test_429_and_5xx_are_retried_after_the_servers_delay(
    apiserver: ApiServer, kube_client: client.ApiClient
) -> None:
    """The double: a 429 (with Retry-After) and a 503 at chosen moments, which a real server
    will not give on demand.

    The double runs no Deployment controller, so the canary never gets ready here and the
    bring-up ends in the not-ready error; readiness is tested against the real server above.
    """
    apiserver.seed(stable())
    apiserver.fail(429, method="POST", retry_after=3)
    apiserver.fail(503, method="POST")
    clock = FakeClock()
    with pytest.raises(WorkloadError, match="web-canary not ready after 10s"):
        await on_double(kube_client, clock).bring_up(ref("default"))
    assert apiserver.read("deployments", "web-canary", "default") is not None
    posts = [c.status for c in apiserver.calls if c.method == "POST"]
    assert posts == [429, 503, 201]
    assert clock.waits[:2] == [3.0, retry.backoff(2)]


@pytest.mark.asyncio
async def test_retries_are_bounded(apiserver: ApiServer, kube_client: client.ApiClient) -> None:
    """The double: a run of 500s at a chosen moment, which a real server will not give on demand."""
    apiserver.seed(stable())
    apiserver.fail(500, method="GET", times=10)
    clock = FakeClock()
    with pytest.raises(WorkloadError, match="cannot read Deployment default/web: 500"):
        await on_double(kube_client, clock).bring_up(ref("default"))
    gets = [c for c in apiserver.calls if c.method == "GET" and c.name == "web"]
    assert len(gets) == retry.ATTEMPTS
    assert clock.waits == [retry.backoff(n) for n in range(1, retry.ATTEMPTS)]


@pytest.mark.asyncio
async def test_other_errors_are_not_retried(
    control_plane: ControlPlane, admin_api: client.ApiClient, namespace: str
) -> None:
    objects = Objects(admin_api, namespace)
    await objects.create(stable(replicas=1, namespace=namespace))
    # alice may read Deployments but not delete them: RBAC answers 403
    async with await api_client(control_plane, "alice") as alice:
        clock = FakeClock()
        with pytest.raises(WorkloadError, match=f"cannot delete Deployment {namespace}/web-canary"):
            await workloads(alice, clock=clock).retire(ref(namespace))
        events = await settled_requests(control_plane, alice, "alice", namespace)
    assert [(e.verb, e.code) for e in events if e.verb == "delete"] == [("delete", 403)]
    assert clock.waits == []


def test_readiness_reads_a_status_as_the_api_server_writes_it() -> None:
    """Cases a real rollout passes through too quickly to catch on demand."""

    def dep(generation: int, **status: Any) -> dict[str, Any]:
        return {"metadata": {"generation": generation}, "spec": {"replicas": 3}, "status": status}

    # the server omits zero counts: no updatedReplicas is none updated, not "as many as ready"
    assert not readiness(dep(2, observedGeneration=2, replicas=3, readyReplicas=3))[0]
    # mid-rollout: 3 updated and 3 ready, but one ready pod is old and one new one is not
    mid = dep(2, observedGeneration=2, replicas=4, updatedReplicas=3, readyReplicas=3)
    done, where = readiness(mid)
    assert not done and "1 old replicas still running" in where
    ready = dep(2, observedGeneration=2, replicas=3, updatedReplicas=3, readyReplicas=3)
    # ready but not yet for minReadySeconds: not available, not done
    assert not readiness(ready)[0]
    settled = dep(
        2,
        observedGeneration=2,
        replicas=3,
        updatedReplicas=3,
        readyReplicas=3,
        availableReplicas=3,
    )
    assert readiness(settled)[0]
    # a deadline the controller declared for the generation before is not the new one's
    stuck = [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}]
    assert not deadline_exceeded(dep(3, observedGeneration=2, conditions=stuck))
    assert deadline_exceeded(dep(3, observedGeneration=3, conditions=stuck))


def test_backoff_grows_and_is_capped() -> None:
    delays = [retry.backoff(n) for n in range(1, 10)]
    assert delays == sorted(delays) and delays[0] == retry.BASE_DELAY
    assert max(delays) == retry.CAP


def test_a_stable_copy_is_not_shared() -> None:
    original = stable()
    snapshot = copy.deepcopy(original)
    merge_patch(
        original, {"spec": {"template": {"spec": {"containers": [{"name": "web", "image": "x"}]}}}}
    )
    assert original == snapshot
