"""The canary Deployment's life through `KubeWorkloads`, over HTTP against the API double.

A reactor plays the Deployment controller: it marks a Deployment's pods ready
(or not) after each write, as a cluster would. The bounded retries of
`adapters.kube.retry` are checked here too, through the faults the double injects.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
from kubernetes.aio import client

from adapters.kube import retry
from adapters.kube.workloads import TRACK_LABEL, KubeWorkloads, WorkloadError, merge_patch
from engine.ports import RolloutRef
from tests.kube.apiserver import ApiServer

NS = "default"
REF = RolloutRef(namespace=NS, name="web-release", stable="web", canary="web-canary")


class FakeClock:
    """Time that passes only when someone waits; every wait is recorded."""

    def __init__(self) -> None:
        self.t = 1000.0
        self.waits: list[float] = []

    def now(self) -> float:
        return self.t

    async def sleep_until(self, t: float) -> None:
        self.waits.append(t - self.t)
        self.t = max(self.t, t)


def stable(replicas: int | None = 3, *, track: bool = False) -> dict[str, Any]:
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
        "metadata": {"name": "web", "namespace": NS, "labels": {"app": "web"}},
        "spec": spec,
    }


def play_deployment_controller(apiserver: ApiServer, *, ready: bool = True) -> None:
    """After each change, report the Deployment rolled out (or stuck at 0 ready)."""

    def react(event: str, obj: dict[str, Any]) -> None:
        if event == "DELETED":
            return
        meta, replicas = obj["metadata"], obj["spec"].get("replicas", 1)
        status: dict[str, Any] = {"observedGeneration": meta["generation"], "replicas": replicas}
        if ready:
            status |= {"readyReplicas": replicas, "updatedReplicas": replicas}
        else:
            status["conditions"] = [
                {
                    "type": "Available",
                    "status": "False",
                    "reason": "MinimumReplicasUnavailable",
                    "message": "Deployment does not have minimum availability.",
                }
            ]
        apiserver.set_status("deployments", meta["name"], status, namespace=NS)

    apiserver.on_write("deployments", react)


def workloads(api: client.ApiClient, clock: FakeClock, **kw: Any) -> KubeWorkloads:
    kw.setdefault("images", {"web": "web:2"})
    return KubeWorkloads(api, clock=clock, ready_timeout=10, **kw)


@pytest.mark.asyncio
async def test_bring_up_creates_a_ready_canary_and_leaves_the_stable_alone(
    apiserver: ApiServer, kube_client: client.ApiClient
) -> None:
    apiserver.seed(stable())
    play_deployment_controller(apiserver)
    before = apiserver.read("deployments", "web", NS)

    await workloads(kube_client, FakeClock()).bring_up(REF)

    canary = apiserver.read("deployments", "web-canary", NS)
    assert canary is not None
    assert canary["spec"]["replicas"] == 3
    assert canary["spec"]["selector"]["matchLabels"] == {"app": "web", TRACK_LABEL: "canary"}
    pod = canary["spec"]["template"]
    assert pod["metadata"]["labels"] == {"app": "web", TRACK_LABEL: "canary"}
    assert [c["image"] for c in pod["spec"]["containers"]] == ["web:2", "proxy:1"]
    labels = canary["metadata"]["labels"]
    assert labels["app.kubernetes.io/managed-by"] == "codedance"
    assert labels["codedance.io/rollout"] == "web-release"
    assert canary["status"]["readyReplicas"] == 3
    # the stable Deployment was only read: not one write, so its pods never restarted
    assert apiserver.writes("deployments", name="web") == []
    assert apiserver.read("deployments", "web", NS) == before


@pytest.mark.asyncio
async def test_the_canary_overrides_a_stable_track_label_so_a_track_selector_isolates_it(
    apiserver: ApiServer, kube_client: client.ApiClient
) -> None:
    apiserver.seed(stable(track=True))
    play_deployment_controller(apiserver)
    await workloads(kube_client, FakeClock()).bring_up(REF)
    canary = apiserver.read("deployments", "web-canary", NS)
    assert canary is not None
    assert canary["spec"]["template"]["metadata"]["labels"][TRACK_LABEL] == "canary"
    stable_pods = apiserver.read("deployments", "web", NS)
    assert stable_pods is not None
    assert stable_pods["spec"]["template"]["metadata"]["labels"][TRACK_LABEL] == "stable"


@pytest.mark.asyncio
async def test_a_stable_without_replicas_gives_a_canary_of_one(
    apiserver: ApiServer, kube_client: client.ApiClient
) -> None:
    apiserver.seed(stable(replicas=None))
    play_deployment_controller(apiserver)
    await workloads(kube_client, FakeClock()).bring_up(REF)
    canary = apiserver.read("deployments", "web-canary", NS)
    assert canary is not None and canary["spec"]["replicas"] == 1


@pytest.mark.asyncio
async def test_a_pod_template_patch_merges_containers_by_name(
    apiserver: ApiServer, kube_client: client.ApiClient
) -> None:
    apiserver.seed(stable())
    play_deployment_controller(apiserver)
    patch = {
        "spec": {
            "containers": [
                {"name": "web", "image": "web:3", "env": [{"name": "MODE", "value": "b"}]}
            ]
        }
    }
    await workloads(kube_client, FakeClock(), images=None, pod_template_patch=patch).bring_up(REF)
    canary = apiserver.read("deployments", "web-canary", NS)
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
    apiserver: ApiServer, kube_client: client.ApiClient
) -> None:
    apiserver.seed(stable())
    play_deployment_controller(apiserver)
    clock = FakeClock()
    await workloads(kube_client, clock).bring_up(REF)
    await workloads(kube_client, clock).bring_up(REF)  # a restarted controller: no change
    await workloads(kube_client, clock, images={"web": "web:4"}).bring_up(REF)
    canary = apiserver.read("deployments", "web-canary", NS)
    assert canary is not None
    assert canary["spec"]["template"]["spec"]["containers"][0]["image"] == "web:4"
    creates = [c for c in apiserver.writes("deployments", name=None) if c.method == "POST"]
    assert len(creates) == 1
    assert canary["metadata"]["generation"] == 2  # the repeat wrote nothing new


@pytest.mark.asyncio
async def test_a_canary_that_never_gets_ready_fails_with_the_reason(
    apiserver: ApiServer, kube_client: client.ApiClient
) -> None:
    apiserver.seed(stable())
    play_deployment_controller(apiserver, ready=False)
    clock = FakeClock()
    with pytest.raises(WorkloadError) as caught:
        await workloads(kube_client, clock).bring_up(REF)
    message = str(caught.value)
    assert "web-canary not ready after 10s" in message
    assert "0/3 ready" in message and "MinimumReplicasUnavailable" in message
    assert clock.t == pytest.approx(1010.0)


@pytest.mark.asyncio
async def test_a_progress_deadline_fails_at_once(
    apiserver: ApiServer, kube_client: client.ApiClient
) -> None:
    apiserver.seed(stable())

    def stuck(event: str, obj: dict[str, Any]) -> None:
        if event != "DELETED":
            apiserver.set_status(
                "deployments",
                obj["metadata"]["name"],
                {
                    "observedGeneration": obj["metadata"]["generation"],
                    "conditions": [
                        {
                            "type": "Progressing",
                            "status": "False",
                            "reason": "ProgressDeadlineExceeded",
                            "message": 'ReplicaSet "web-canary-5d9" has timed out progressing.',
                        }
                    ],
                },
                namespace=NS,
            )

    apiserver.on_write("deployments", stuck)
    clock = FakeClock()
    with pytest.raises(WorkloadError, match=r"failed to roll out: .*timed out progressing"):
        await workloads(kube_client, clock).bring_up(REF)
    assert clock.t < 1010.0


@pytest.mark.asyncio
async def test_a_missing_stable_or_container_is_a_readable_error(
    apiserver: ApiServer, kube_client: client.ApiClient
) -> None:
    with pytest.raises(WorkloadError, match="Deployment default/web not found"):
        await workloads(kube_client, FakeClock()).bring_up(REF)
    apiserver.seed(stable())
    with pytest.raises(WorkloadError, match="no container named api"):
        await workloads(kube_client, FakeClock(), images={"api": "x"}).bring_up(REF)
    assert apiserver.writes("deployments") == []


@pytest.mark.asyncio
async def test_promote_updates_the_stable_template_and_waits_for_its_rollout(
    apiserver: ApiServer, kube_client: client.ApiClient
) -> None:
    apiserver.seed(stable(track=True))
    play_deployment_controller(apiserver)
    manager = workloads(kube_client, FakeClock())
    await manager.bring_up(REF)
    assert apiserver.writes("deployments", name="web") == []
    await manager.promote(REF)
    web = apiserver.read("deployments", "web", NS)
    assert web is not None
    assert [c["image"] for c in web["spec"]["template"]["spec"]["containers"]] == [
        "web:2",
        "proxy:1",
    ]
    # the stable keeps its own labels and selector: no canary label leaks into it
    assert web["spec"]["template"]["metadata"]["labels"] == {"app": "web", TRACK_LABEL: "stable"}
    assert web["spec"]["selector"] == {"matchLabels": {"app": "web"}}
    assert web["status"]["observedGeneration"] == web["metadata"]["generation"] == 2
    await manager.retire(REF)
    assert apiserver.read("deployments", "web-canary", NS) is None
    await manager.retire(REF)  # already gone: fine


@pytest.mark.asyncio
async def test_promote_re_reads_and_retries_on_a_conflict(
    apiserver: ApiServer, kube_client: client.ApiClient
) -> None:
    apiserver.seed(stable())
    play_deployment_controller(apiserver)
    apiserver.conflict_next_write(times=2, path="*/deployments/web")
    await workloads(kube_client, FakeClock()).promote(REF)
    web = apiserver.read("deployments", "web", NS)
    assert web is not None
    assert web["spec"]["template"]["spec"]["containers"][0]["image"] == "web:2"
    assert len(apiserver.writes("deployments", name="web", status=False, ok=False)) == 2


@pytest.mark.asyncio
async def test_429_and_5xx_are_retried_after_the_servers_delay(
    apiserver: ApiServer, kube_client: client.ApiClient
) -> None:
    apiserver.seed(stable())
    play_deployment_controller(apiserver)
    apiserver.fail(429, method="POST", retry_after=3)
    apiserver.fail(503, method="POST")
    clock = FakeClock()
    await workloads(kube_client, clock).bring_up(REF)
    assert apiserver.read("deployments", "web-canary", NS) is not None
    assert clock.waits[:2] == [3.0, retry.backoff(2)]


@pytest.mark.asyncio
async def test_retries_are_bounded_and_other_errors_are_not_retried(
    apiserver: ApiServer, kube_client: client.ApiClient
) -> None:
    apiserver.seed(stable())
    apiserver.fail(500, method="GET", times=10)
    clock = FakeClock()
    with pytest.raises(WorkloadError, match="cannot read Deployment default/web: 500"):
        await workloads(kube_client, clock).bring_up(REF)
    gets = [c for c in apiserver.calls if c.method == "GET" and c.name == "web"]
    assert len(gets) == retry.ATTEMPTS
    assert clock.waits == [retry.backoff(n) for n in range(1, retry.ATTEMPTS)]

    apiserver.fail(403, method="DELETE")
    with pytest.raises(WorkloadError, match="cannot delete"):
        await workloads(kube_client, clock).retire(REF)
    assert len([c for c in apiserver.calls if c.method == "DELETE"]) == 1


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
