"""Pod health from the Kubernetes API, as a `MetricSource`.

In: an API client, and metric requests whose target names a namespace and a
Deployment (the track's workload). Out: per request, one of

- `ready_pods`: pods whose Ready condition is True;
- `not_ready_pods`: the other pods (failed ones included);
- `failed_pods`: pods in phase Failed, or with a container waiting in
  CrashLoopBackOff or terminated with a non-zero exit code;
- `restarts`: the sum of the pods' containers' restartCount.

Pods being deleted (an old ReplicaSet scaling down) and pods that completed
(phase Succeeded) are not counted. Other metrics are not this source's: they
are left out of the answer, so a composite source asks another one.

A Deployment's pods are those its selector matches. The selector is read once
per Deployment (Kubernetes does not let it change) and the pods are listed
once per (namespace, workload) per `fetch`, however many metrics ask about
them. A canary's pods carry `codedance.io/track: canary` and its selector
says so; a stable selector (say `app: web`) matches the canary's pods too, so
when a selector does not mention the track, `codedance.io/track!=canary` is
added to it. An API error or a missing Deployment makes its values None
(unknown): a source never invents a number. The API keeps no history, so
`fetch_range` answers nothing and the engine's windows fill as time passes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

from kubernetes.aio import client
from kubernetes.aio.client.exceptions import ApiException

from engine.ports import MetricRequest, MetricValues

TRACK_LABEL = "codedance.io/track"
METRICS = frozenset({"ready_pods", "not_ready_pods", "failed_pods", "restarts"})


def selector_text(selector: Mapping[str, Any]) -> str:
    """A Deployment's `spec.selector` as a label selector query, the canary's pods excluded
    when it does not mention the track."""
    terms: list[str] = []
    keys: set[str] = set()
    for key, value in (selector.get("matchLabels") or {}).items():
        terms.append(f"{key}={value}")
        keys.add(key)
    for expression in selector.get("matchExpressions") or []:
        key, op, values = expression["key"], expression["operator"], expression.get("values") or []
        keys.add(key)
        if op == "In":
            terms.append(f"{key} in ({','.join(values)})")
        elif op == "NotIn":
            terms.append(f"{key} notin ({','.join(values)})")
        elif op == "Exists":
            terms.append(key)
        elif op == "DoesNotExist":
            terms.append(f"!{key}")
    if TRACK_LABEL not in keys:
        terms.append(f"{TRACK_LABEL}!=canary")
    return ",".join(terms)


def count(pods: Sequence[client.V1Pod]) -> dict[str, float]:
    """The four numbers for a list of pods."""
    ready = not_ready = failed = restarts = 0
    for pod in pods:
        if pod.metadata is not None and pod.metadata.deletion_timestamp is not None:
            continue
        status = pod.status or client.V1PodStatus()
        if status.phase == "Succeeded":
            continue
        containers = [*(status.init_container_statuses or []), *(status.container_statuses or [])]
        restarts += sum(c.restart_count or 0 for c in containers)
        if any(c.type == "Ready" and c.status == "True" for c in status.conditions or []):
            ready += 1
            continue
        not_ready += 1
        if status.phase == "Failed" or any(_crashing(c) for c in containers):
            failed += 1
    return {
        "ready_pods": float(ready),
        "not_ready_pods": float(not_ready),
        "failed_pods": float(failed),
        "restarts": float(restarts),
    }


def _crashing(container: client.V1ContainerStatus) -> bool:
    state = container.state
    if state is None:
        return False
    if state.waiting is not None and state.waiting.reason == "CrashLoopBackOff":
        return True
    return state.terminated is not None and (state.terminated.exit_code or 0) != 0


class PodStatusSource:
    """`MetricSource` for the pod-health metrics of Deployments."""

    def __init__(self, api_client: client.ApiClient) -> None:
        self._core = client.CoreV1Api(api_client)
        self._objects = client.CustomObjectsApi(api_client)
        self._selectors: dict[tuple[str, str], str] = {}

    async def fetch(self, at: float, requests: Sequence[MetricRequest]) -> MetricValues:
        groups: dict[tuple[str, str], list[MetricRequest]] = {}
        for request in requests:
            if request.metric in METRICS:
                key = (request.target.namespace, request.target.workload)
                groups.setdefault(key, []).append(request)
        values: dict[MetricRequest, float | None] = {}
        for (namespace, workload), asked in groups.items():
            counts = await self._counts(namespace, workload)
            for request in asked:
                values[request] = counts[request.metric] if counts is not None else None
        return values

    async def fetch_range(
        self, start: float, end: float, step: float, requests: Sequence[MetricRequest]
    ) -> Mapping[MetricRequest, list[tuple[float, float | None]]]:
        return {}

    async def _counts(self, namespace: str, workload: str) -> dict[str, float] | None:
        selector = await self._selector(namespace, workload)
        if selector is None:
            return None
        try:
            pods = await self._core.list_namespaced_pod(namespace, label_selector=selector)
        except ApiException:
            return None
        return count(pods.items)

    async def _selector(self, namespace: str, workload: str) -> str | None:
        key = (namespace, workload)
        if key not in self._selectors:
            try:
                deployment = await self._objects.get_namespaced_custom_object(
                    "apps", "v1", namespace, "deployments", workload
                )
            except ApiException:
                return None  # not cached: a Deployment created later is found next time
            spec = cast("dict[str, Any]", deployment).get("spec") or {}
            self._selectors[key] = selector_text(spec.get("selector") or {})
        return self._selectors[key]
