"""Pod health per track from `PodStatusSource`, against the real control plane.

The source acts as the controller's ServiceAccount (`controller_api`). Two
kinds of pods are used:

- pods the real Deployment/ReplicaSet controllers make, which the fake nodes
  run, make ready, crash or fail as their template asks;
- pods the test places on a node no fake kubelet serves ("elsewhere"), whose
  status the test writes through /status exactly as a kubelet would, so that
  every state (exit codes, restart counts, a pod stuck terminating) is exact.
  They are force-deleted at the end, as no kubelet will ever confirm it.

The API double stays for one fault a real server will not give on demand: a
500 answering the pod list.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from kubernetes.aio import client

from adapters.kube.pods import PodStatusSource, selector_text
from engine.ports import MetricRequest, MetricSource, Target
from tests.cluster.controlplane import CONTROLLER_USER, ControlPlane
from tests.cluster.fixtures import api_client
from tests.cluster.kube import Objects, eventually, settled_requests
from tests.kube.apiserver import ApiServer

METRICS = ("ready_pods", "not_ready_pods", "failed_pods", "restarts")
STABLE_LABELS = {"app": "web"}
CANARY_LABELS = {"app": "web", "codedance.io/track": "canary"}
ELSEWHERE = "elsewhere"  # a node no fake kubelet serves
FAULT = "fakelet.codedance.io/fault"
READY_AFTER = "fakelet.codedance.io/ready-after"


def stable_of(namespace: str) -> Target:
    return Target(namespace, "web", "stable")


def canary_of(namespace: str) -> Target:
    return Target(namespace, "web-canary", "canary")


def deployment(
    name: str,
    labels: dict[str, str],
    *,
    replicas: int = 0,
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels, "annotations": annotations or {}},
                "spec": {"containers": [{"name": "web", "image": "web:1"}]},
            },
        },
    }


def pod_status(
    *,
    ready: bool = True,
    phase: str = "Running",
    restarts: int = 0,
    state: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A pod's status as a kubelet writes it."""
    at = "2026-01-01T00:00:00Z"
    running = state is None or "running" in state
    container = {
        "name": "web",
        "image": "web:1",
        "imageID": "fake://web:1",
        "ready": ready,
        "started": running,
        "restartCount": restarts,
        "state": state or {"running": {"startedAt": at}},
    }
    flag = "True" if ready else "False"
    return {
        "phase": phase,
        "hostIP": "10.250.9.1",
        "podIP": "10.245.0.1",
        "startTime": at,
        "containerStatuses": [container],
        "conditions": [
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": at},
            {"type": "ContainersReady", "status": flag, "lastTransitionTime": at},
            {"type": "Ready", "status": flag, "lastTransitionTime": at},
        ],
    }


class Placed:
    """Pods on a node without a kubelet, their status written by the test."""

    def __init__(self, api: client.ApiClient, namespace: str) -> None:
        self.core = client.CoreV1Api(api)
        self.namespace = namespace

    async def pod(
        self, name: str, labels: dict[str, str], *, restart_policy: str = "Always", **status: Any
    ) -> None:
        body: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "labels": labels},
            "spec": {
                "nodeName": ELSEWHERE,
                "restartPolicy": restart_policy,
                "containers": [{"name": "web", "image": "web:1"}],
            },
        }
        await self.core.create_namespaced_pod(self.namespace, body)
        await self.set_status(name, pod_status(**status))

    async def set_status(self, name: str, status: dict[str, Any]) -> None:
        await self.core.patch_namespaced_pod_status(
            name,
            self.namespace,
            {"status": status},
            _content_type="application/merge-patch+json",
        )

    async def clean(self) -> None:
        await self.core.delete_collection_namespaced_pod(
            self.namespace, field_selector=f"spec.nodeName={ELSEWHERE}", grace_period_seconds=0
        )


@pytest_asyncio.fixture
async def placed(admin_api: client.ApiClient, namespace: str) -> AsyncIterator[Placed]:
    pods = Placed(admin_api, namespace)
    yield pods
    await pods.clean()


def requests(target: Target) -> list[MetricRequest]:
    return [MetricRequest(target, metric, 60.0) for metric in METRICS]


async def seed_cluster(objects: Objects, placed: Placed) -> None:
    """Two Deployments (scaled to zero: only the pods below exist) and their tracks' pods."""
    await objects.create(deployment("web", STABLE_LABELS))
    await objects.create(deployment("web-canary", CANARY_LABELS))
    for i in range(3):
        await placed.pod(f"web-{i}", STABLE_LABELS, restarts=i)
    await placed.pod("web-old", STABLE_LABELS, restarts=9)
    await placed.pod(
        "web-job",
        STABLE_LABELS,
        restart_policy="Never",
        ready=False,
        phase="Succeeded",
        state={"terminated": {"exitCode": 0, "reason": "Completed"}},
    )
    await placed.pod("web-canary-a", CANARY_LABELS)
    await placed.pod(
        "web-canary-b",
        CANARY_LABELS,
        ready=False,
        restarts=4,
        state={"waiting": {"reason": "CrashLoopBackOff"}},
    )
    await placed.pod(
        "web-canary-c",
        CANARY_LABELS,
        ready=False,
        state={"waiting": {"reason": "ContainerCreating"}},
    )
    await placed.pod(
        "web-canary-d",
        CANARY_LABELS,
        restart_policy="Never",
        ready=False,
        phase="Failed",
        state={"terminated": {"exitCode": 137, "reason": "OOMKilled"}},
    )
    await placed.pod("other", {"app": "other"}, ready=False)


@pytest.mark.asyncio
async def test_each_track_counts_only_its_own_pods(
    admin_api: client.ApiClient, controller_api: client.ApiClient, namespace: str, placed: Placed
) -> None:
    await seed_cluster(Objects(admin_api, namespace), placed)
    # bound to a node, a deleted pod stays, terminating, until its kubelet confirms
    await placed.core.delete_namespaced_pod("web-old", namespace)
    terminating = await placed.core.read_namespaced_pod("web-old", namespace)
    assert terminating.metadata is not None
    assert terminating.metadata.deletion_timestamp is not None
    source = PodStatusSource(controller_api)
    assert isinstance(source, MetricSource)
    values = await source.fetch(
        0.0, requests(stable_of(namespace)) + requests(canary_of(namespace))
    )
    by_key = {(r.target.track, r.metric): v for r, v in values.items()}
    assert by_key == {
        # the stable selector `app=web` matches canary pods too: they are left out
        ("stable", "ready_pods"): 3,
        ("stable", "not_ready_pods"): 0,
        ("stable", "failed_pods"): 0,
        ("stable", "restarts"): 0 + 1 + 2,
        ("canary", "ready_pods"): 1,
        ("canary", "not_ready_pods"): 3,
        ("canary", "failed_pods"): 2,
        ("canary", "restarts"): 4,
    }


@pytest.mark.asyncio
async def test_one_list_per_workload_per_fetch_and_other_metrics_omitted(
    control_plane: ControlPlane,
    admin_api: client.ApiClient,
    controller_api: client.ApiClient,
    namespace: str,
    placed: Placed,
) -> None:
    await seed_cluster(Objects(admin_api, namespace), placed)
    source = PodStatusSource(controller_api)
    stable, canary = stable_of(namespace), canary_of(namespace)
    p99 = MetricRequest(canary, "p99", 60.0)
    for _ in range(2):
        values = await source.fetch(0.0, [*requests(stable), *requests(canary), p99])
        assert p99 not in values and len(values) == 8
    asked = await settled_requests(control_plane, controller_api, CONTROLLER_USER, namespace)
    lists = [e for e in asked if e.resource == "pods"]
    assert [(e.verb, e.code) for e in lists] == [("list", 200)] * 4  # two workloads, two fetches
    reads = [e for e in asked if e.resource == "deployments"]
    assert sorted((e.verb, e.name) for e in reads) == [("get", "web"), ("get", "web-canary")]


@pytest.mark.asyncio
async def test_values_follow_the_pods(
    admin_api: client.ApiClient, controller_api: client.ApiClient, namespace: str, placed: Placed
) -> None:
    await seed_cluster(Objects(admin_api, namespace), placed)
    source = PodStatusSource(controller_api)
    ready = MetricRequest(canary_of(namespace), "ready_pods", 60.0)
    assert (await source.fetch(0.0, [ready]))[ready] == 1
    await placed.set_status("web-canary-c", pod_status())  # its container started, ready
    assert (await source.fetch(1.0, [ready]))[ready] == 2


@pytest.mark.asyncio
async def test_values_follow_a_real_rollout(
    admin_api: client.ApiClient, controller_api: client.ApiClient, namespace: str
) -> None:
    """Pods the Deployment controller makes: slow to get ready, then a crash loop."""
    objects = Objects(admin_api, namespace)
    slow = {READY_AFTER: "2s"}
    await objects.create(deployment("web-canary", CANARY_LABELS, replicas=2, annotations=slow))
    source = PodStatusSource(controller_api)
    canary = canary_of(namespace)

    async def counts() -> dict[str, float | None]:
        return {r.metric: v for r, v in (await source.fetch(0.0, requests(canary))).items()}

    async def starting() -> bool:
        return await counts() == {
            "ready_pods": 0,
            "not_ready_pods": 2,
            "failed_pods": 0,
            "restarts": 0,
        }

    async def all_ready() -> bool:
        return await counts() == {
            "ready_pods": 2,
            "not_ready_pods": 0,
            "failed_pods": 0,
            "restarts": 0,
        }

    await eventually(starting)
    await eventually(all_ready)

    # a new template that crash-loops: the surge pod fails and restarts, the old ones serve
    crash = {"spec": {"template": {"metadata": {"annotations": {FAULT: "crash"}}}}}
    await objects.patch("apps/v1", "Deployment", "web-canary", crash)

    async def crashing() -> dict[str, float | None] | None:
        now = await counts()
        return now if now["failed_pods"] == 1 and (now["restarts"] or 0) >= 1 else None

    first = await eventually(crashing)
    assert first["ready_pods"] == 2 and first["not_ready_pods"] == 1

    async def more_restarts() -> bool:
        return ((await counts())["restarts"] or 0) > (first["restarts"] or 0)

    await eventually(more_restarts)


@pytest.mark.asyncio
async def test_unknown_when_the_workload_is_missing_or_cannot_be_read(
    control_plane: ControlPlane,
    admin_api: client.ApiClient,
    controller_api: client.ApiClient,
    namespace: str,
) -> None:
    objects = Objects(admin_api, namespace)
    source = PodStatusSource(controller_api)
    missing = requests(Target(namespace, "nope", "canary"))
    assert set((await source.fetch(0.0, missing)).values()) == {None}
    # not remembered as missing: a Deployment created later is found next time
    await objects.create(deployment("nope", CANARY_LABELS))
    assert set((await source.fetch(1.0, missing)).values()) == {0}
    # bob may not read Deployments: RBAC answers 403, and the values are unknown
    async with await api_client(control_plane, "bob") as bob:
        assert set((await PodStatusSource(bob).fetch(0.0, missing)).values()) == {None}
    assert await PodStatusSource(controller_api).fetch_range(0.0, 60.0, 10.0, missing) == {}


@pytest.mark.asyncio
async def test_unknown_when_the_pod_list_fails(
    apiserver: ApiServer, kube_client: client.ApiClient
) -> None:
    """The double: a 500 answering the pod list, which a real server will not give on demand."""
    apiserver.seed(deployment("web-canary", CANARY_LABELS))
    source = PodStatusSource(kube_client)
    canary = Target("default", "web-canary", "canary")
    assert set((await source.fetch(0.0, requests(canary))).values()) == {0}
    apiserver.fail(500, method="GET", path="*/pods")
    values = await source.fetch(0.0, requests(canary))
    assert set(values.values()) == {None}


def test_selector_text_keeps_expressions_and_excludes_the_canary() -> None:
    selector = {
        "matchLabels": {"app": "web"},
        "matchExpressions": [
            {"key": "tier", "operator": "In", "values": ["a", "b"]},
            {"key": "legacy", "operator": "DoesNotExist"},
        ],
    }
    assert selector_text(selector) == ("app=web,tier in (a,b),!legacy,codedance.io/track!=canary")
    assert selector_text({"matchLabels": {"codedance.io/track": "canary"}}) == (
        "codedance.io/track=canary"
    )
