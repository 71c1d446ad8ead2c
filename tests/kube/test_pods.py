"""Pod health per track from `PodStatusSource`, over HTTP against the API double."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes.aio import client

from adapters.kube.pods import PodStatusSource, selector_text
from engine.ports import MetricRequest, MetricSource, Target
from tests.kube.apiserver import ApiServer

NS = "default"
STABLE = Target(NS, "web", "stable")
CANARY = Target(NS, "web-canary", "canary")
METRICS = ("ready_pods", "not_ready_pods", "failed_pods", "restarts")


def deployment(name: str, labels: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "web", "image": "web:1"}]},
            },
        },
    }


def pod(
    name: str,
    labels: dict[str, str],
    *,
    ready: bool = True,
    phase: str = "Running",
    restarts: int = 0,
    state: dict[str, Any] | None = None,
    deleting: bool = False,
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": NS, "labels": labels}
    if deleting:
        meta["finalizers"] = ["example.com/hold"]  # deleted, it stays while terminating
    container = {
        "name": "web",
        "image": "web:1",
        "imageID": "",
        "ready": ready,
        "restartCount": restarts,
        "state": state or {"running": {}},
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "spec": {"containers": [{"name": "web", "image": "web:1"}]},
        "status": {
            "phase": phase,
            "containerStatuses": [container],
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def requests(target: Target) -> list[MetricRequest]:
    return [MetricRequest(target, metric, 60.0) for metric in METRICS]


def seed_cluster(apiserver: ApiServer) -> None:
    stable, canary = {"app": "web"}, {"app": "web", "codedance.io/track": "canary"}
    apiserver.seed(deployment("web", stable))
    apiserver.seed(deployment("web-canary", canary))
    for i in range(3):
        apiserver.seed(pod(f"web-{i}", stable, restarts=i))
    apiserver.seed(pod("web-old", stable, deleting=True, restarts=9))
    apiserver.seed(pod("web-job", stable, ready=False, phase="Succeeded"))
    apiserver.seed(pod("web-canary-a", canary))
    apiserver.seed(
        pod(
            "web-canary-b",
            canary,
            ready=False,
            restarts=4,
            state={"waiting": {"reason": "CrashLoopBackOff"}},
        )
    )
    apiserver.seed(
        pod("web-canary-c", canary, ready=False, state={"waiting": {"reason": "ContainerCreating"}})
    )
    apiserver.seed(
        pod(
            "web-canary-d",
            canary,
            ready=False,
            phase="Failed",
            state={"terminated": {"exitCode": 137, "reason": "OOMKilled"}},
        )
    )
    apiserver.seed(pod("other", {"app": "other"}, ready=False))


@pytest.mark.asyncio
async def test_each_track_counts_only_its_own_pods(
    apiserver: ApiServer, kube_client: client.ApiClient
) -> None:
    seed_cluster(apiserver)
    await client.CoreV1Api(kube_client).delete_namespaced_pod("web-old", NS)
    terminating = apiserver.read("pods", "web-old", NS)
    assert terminating is not None and terminating["metadata"]["deletionTimestamp"]
    source = PodStatusSource(kube_client)
    assert isinstance(source, MetricSource)
    values = await source.fetch(0.0, requests(STABLE) + requests(CANARY))
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
    apiserver: ApiServer, kube_client: client.ApiClient
) -> None:
    seed_cluster(apiserver)
    source = PodStatusSource(kube_client)
    p99 = MetricRequest(CANARY, "p99", 60.0)
    for _ in range(2):
        values = await source.fetch(0.0, [*requests(STABLE), *requests(CANARY), p99])
        assert p99 not in values and len(values) == 8
    lists = [c for c in apiserver.calls if c.plural == "pods" and c.method == "GET"]
    assert len(lists) == 4  # two workloads, two fetches
    reads = [c for c in apiserver.calls if c.plural == "deployments"]
    assert len(reads) == 2  # a selector is read once


@pytest.mark.asyncio
async def test_values_follow_the_pods(apiserver: ApiServer, kube_client: client.ApiClient) -> None:
    seed_cluster(apiserver)
    source = PodStatusSource(kube_client)
    ready = MetricRequest(CANARY, "ready_pods", 60.0)
    assert (await source.fetch(0.0, [ready]))[ready] == 1
    apiserver.seed(pod("web-canary-c", {"app": "web", "codedance.io/track": "canary"}))
    assert (await source.fetch(1.0, [ready]))[ready] == 2


@pytest.mark.asyncio
async def test_unknown_when_the_workload_is_missing_or_the_api_fails(
    apiserver: ApiServer, kube_client: client.ApiClient
) -> None:
    seed_cluster(apiserver)
    source = PodStatusSource(kube_client)
    missing = requests(Target(NS, "nope", "canary"))
    assert set((await source.fetch(0.0, missing)).values()) == {None}
    apiserver.fail(500, method="GET", path="*/pods")
    values = await source.fetch(0.0, requests(CANARY))
    assert set(values.values()) == {None}
    assert await source.fetch_range(0.0, 60.0, 10.0, requests(CANARY)) == {}


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
