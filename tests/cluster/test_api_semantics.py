"""What the real API server does that our code relies on, and that our old double did not show.

Each test states one behaviour of kube-apiserver that Codedance depends on:
the status subresource and `generation`, pruning and defaulting of the
CanaryDeployment schema, the schema's own refusals (enum, bounds, date-time
format), the Gateway API CRD's CEL rules, list-map keys, immutable
selectors. If a Kubernetes upgrade changed one of them, the test says which.
"""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes.aio import client
from kubernetes.aio.client.exceptions import ApiException

from tests.cluster.kube import Objects

CD = ("codedance.io/v1alpha1", "CanaryDeployment")


def canary_deployment(name: str = "web", **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "targetRef": {"name": "web"},
        "version": {"images": {"web": "web:2"}},
        "traffic": {"provider": "gateway-api", "service": "web", "httpRoute": "web"},
        "policy": {"name": "latency"},
    }
    body.update(spec)
    return {
        "apiVersion": CD[0],
        "kind": CD[1],
        "metadata": {"name": name},
        "spec": body,
    }


async def refused(objects: Objects, obj: dict[str, Any]) -> str:
    with pytest.raises(ApiException) as error:
        await objects.create(obj)
    assert error.value.status == 422, error.value
    return str(error.value.body)


@pytest.mark.asyncio
async def test_status_subresource_and_generation(
    admin_api: client.ApiClient, namespace: str
) -> None:
    objects = Objects(admin_api, namespace)
    created = await objects.create(canary_deployment())
    assert created["metadata"]["generation"] == 1
    custom = client.CustomObjectsApi(admin_api)
    # status sent to the main resource is dropped; the spec change bumps generation
    created["status"] = {"phase": "Progressing"}
    created["spec"]["version"]["images"]["web"] = "web:3"
    updated = await custom.replace_namespaced_custom_object(
        "codedance.io", "v1alpha1", namespace, "canarydeployments", "web", created
    )
    assert "status" not in updated or not updated["status"]
    assert updated["metadata"]["generation"] == 2
    # a status write changes neither the spec nor the generation
    updated["status"] = {"phase": "Progressing", "weight": 5}
    updated["spec"]["version"]["images"]["web"] = "web:4"
    written = await custom.replace_namespaced_custom_object_status(
        "codedance.io", "v1alpha1", namespace, "canarydeployments", "web", updated
    )
    assert written["status"]["weight"] == 5
    assert written["spec"]["version"]["images"]["web"] == "web:3"
    assert written["metadata"]["generation"] == 2


@pytest.mark.asyncio
async def test_schema_prunes_unknown_fields_and_applies_defaults(
    admin_api: client.ApiClient, namespace: str
) -> None:
    objects = Objects(admin_api, namespace)
    obj = canary_deployment(surprise={"x": 1})
    created = await objects.create(obj)
    assert "surprise" not in created["spec"]
    assert created["spec"]["dryRun"] is False
    assert created["spec"]["skipAnalysis"] is False


@pytest.mark.asyncio
async def test_schema_refuses_out_of_range_values(
    admin_api: client.ApiClient, namespace: str
) -> None:
    objects = Objects(admin_api, namespace)
    body = await refused(objects, canary_deployment(strategy={"type": "steps", "steps": [150]}))
    assert "spec.strategy.steps[0]" in body
    body = await refused(objects, canary_deployment(traffic={"provider": 7}))
    assert "spec.traffic.provider" in body


@pytest.mark.asyncio
async def test_status_date_time_format_is_enforced(
    admin_api: client.ApiClient, namespace: str
) -> None:
    objects = Objects(admin_api, namespace)
    created = await objects.create(canary_deployment())
    custom = client.CustomObjectsApi(admin_api)
    created["status"] = {
        "conditions": [
            {
                "type": "Ready",
                "status": "True",
                "reason": "Started",
                "message": "",
                "lastTransitionTime": "yesterday",
            }
        ]
    }
    with pytest.raises(ApiException) as error:
        await custom.replace_namespaced_custom_object_status(
            "codedance.io", "v1alpha1", namespace, "canarydeployments", "web", created
        )
    assert error.value.status == 422
    assert "lastTransitionTime" in str(error.value.body)


@pytest.mark.asyncio
async def test_gateway_api_cel_rules_run(admin_api: client.ApiClient, namespace: str) -> None:
    objects = Objects(admin_api, namespace)
    refs = [{"name": f"web-{i}", "port": 80} for i in range(17)]
    body = await refused(
        objects,
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "HTTPRoute",
            "metadata": {"name": "web"},
            "spec": {"parentRefs": [{"name": "gw"}], "rules": [{"backendRefs": refs}]},
        },
    )
    assert "backendRefs" in body
    # a CEL rule: a path match of type PathPrefix must start with "/"
    body = await refused(
        objects,
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "HTTPRoute",
            "metadata": {"name": "web"},
            "spec": {
                "parentRefs": [{"name": "gw"}],
                "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": "api"}}]}],
            },
        },
    )
    assert "must be an absolute path" in body


@pytest.mark.asyncio
async def test_list_map_keys_are_unique(admin_api: client.ApiClient, namespace: str) -> None:
    objects = Objects(admin_api, namespace)
    container = {"name": "web", "image": "web:1"}
    body = await refused(
        objects,
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "web"},
            "spec": {
                "selector": {"matchLabels": {"app": "web"}},
                "template": {
                    "metadata": {"labels": {"app": "web"}},
                    "spec": {"containers": [container, dict(container)]},
                },
            },
        },
    )
    assert "Duplicate value" in body


@pytest.mark.asyncio
async def test_condition_types_are_unique(admin_api: client.ApiClient, namespace: str) -> None:
    objects = Objects(admin_api, namespace)
    created = await objects.create(canary_deployment())
    ready = {
        "type": "Ready",
        "status": "True",
        "reason": "Started",
        "lastTransitionTime": "2026-01-01T00:00:00Z",
    }
    created["status"] = {"conditions": [ready, dict(ready, status="False")]}
    with pytest.raises(ApiException) as error:
        await client.CustomObjectsApi(admin_api).replace_namespaced_custom_object_status(
            "codedance.io", "v1alpha1", namespace, "canarydeployments", "web", created
        )
    assert error.value.status == 422
    assert "Duplicate value" in str(error.value.body)


@pytest.mark.asyncio
async def test_deployment_selector_is_immutable(
    admin_api: client.ApiClient, namespace: str
) -> None:
    objects = Objects(admin_api, namespace)
    labels = {"app": "web"}
    await objects.create(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "web"},
            "spec": {
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {"containers": [{"name": "web", "image": "web:1"}]},
                },
            },
        }
    )
    with pytest.raises(ApiException) as error:
        await objects.patch(
            "apps/v1",
            "Deployment",
            "web",
            {
                "spec": {
                    "selector": {"matchLabels": {"app": "web", "codedance.io/track": "stable"}},
                    "template": {"metadata": {"labels": {"codedance.io/track": "stable"}}},
                }
            },
        )
    assert error.value.status == 422
    assert "field is immutable" in str(error.value.body)
