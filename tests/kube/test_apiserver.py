"""The Kubernetes API double (tests/kube/apiserver.py) seen through the real client.

Every test talks to the double with `kubernetes.aio` over HTTP on 127.0.0.1 and
checks what a controller or traffic adapter relies on: status codes and Status
objects, resourceVersion and generation, the status subresource, watches and
their resumption, finalizers, selectors, injected faults, the request journal and
schema validation. The last tests check the schema helpers (tests/kube/schemas.py)
and the vendored schema files themselves.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import re
from collections.abc import Callable, Coroutine
from typing import Any

import kubernetes_validate
import pytest
from kubernetes.aio import client, watch

from tests.kube import schemas
from tests.kube.apiserver import ApiServer

NS = "default"
ISTIO = ("networking.istio.io", "v1")
GATEWAY = ("gateway.networking.k8s.io", "v1")


def virtual_service(name: str = "reviews", canary: int = 0, **meta: Any) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": name, **meta},
        "spec": {
            "hosts": ["reviews"],
            "http": [
                {
                    "name": "primary",
                    "route": [
                        {
                            "destination": {"host": "reviews", "subset": "stable"},
                            "weight": 100 - canary,
                        },
                        {"destination": {"host": "reviews", "subset": "canary"}, "weight": canary},
                    ],
                }
            ],
        },
    }


def http_route(name: str = "web") -> dict[str, Any]:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "parentRefs": [{"name": "gateway"}],
            "rules": [
                {
                    "backendRefs": [
                        {"name": "web-stable", "port": 80, "weight": 90},
                        {"name": "web-canary", "port": 80, "weight": 10},
                    ]
                }
            ],
        },
    }


def ingress(name: str = "web") -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": {
            "name": name,
            "namespace": NS,
            "annotations": {"nginx.ingress.kubernetes.io/canary": "true"},
        },
        "spec": {
            "ingressClassName": "nginx",
            "rules": [
                {
                    "host": "web.example",
                    "http": {
                        "paths": [
                            {
                                "path": "/",
                                "pathType": "Prefix",
                                "backend": {
                                    "service": {"name": "web-canary", "port": {"number": 80}}
                                },
                            }
                        ]
                    },
                }
            ],
        },
    }


def deployment(name: str = "web", image: str = "web:1") -> client.V1Deployment:
    labels = {"app": name}
    return client.V1Deployment(
        metadata=client.V1ObjectMeta(name=name, labels=labels),
        spec=client.V1DeploymentSpec(
            replicas=2,
            selector=client.V1LabelSelector(match_labels=labels),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels=labels),
                spec=client.V1PodSpec(containers=[client.V1Container(name=name, image=image)]),
            ),
        ),
    )


def status_of(error: client.ApiException) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(error.body or "")
    assert body["kind"] == "Status" and body["code"] == error.status
    return body


async def raises(call: Coroutine[Any, Any, Any]) -> client.ApiException:
    with pytest.raises(client.ApiException) as caught:
        await call
    return caught.value


def custom(api: client.ApiClient) -> Any:
    """CustomObjectsApi, typed loosely: it answers plain dicts (declared as `object`)."""
    return client.CustomObjectsApi(api)


def new_watch() -> watch.Watch:
    return watch.Watch()  # type: ignore[no-untyped-call]


def stored(apiserver: ApiServer, ref: str, name: str) -> dict[str, Any]:
    obj = apiserver.read(ref, name, NS)
    assert obj is not None, f"{ref} {name} is not stored"
    return obj


async def create_vs(api: client.ApiClient, body: dict[str, Any]) -> dict[str, Any]:
    created: dict[str, Any] = await custom(api).create_namespaced_custom_object(
        *ISTIO, NS, "virtualservices", body
    )
    return created


# ------------------------------------------------------------- create, get, replace


@pytest.mark.asyncio
async def test_create_answers_201_and_a_second_create_409(
    apiserver: ApiServer, kube_client: client.ApiClient
) -> None:
    answer = await custom(kube_client).create_namespaced_custom_object_with_http_info(
        *ISTIO, NS, "virtualservices", virtual_service()
    )
    assert answer.status_code == 201
    meta = answer.data["metadata"]
    assert meta["namespace"] == NS and meta["generation"] == 1
    assert meta["uid"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", meta["creationTimestamp"])
    assert int(meta["resourceVersion"]) == apiserver.resource_version

    error = await raises(create_vs(kube_client, virtual_service()))
    assert error.status == 409
    assert status_of(error)["reason"] == "AlreadyExists"
    assert status_of(error)["details"] == {
        "name": "reviews",
        "group": "networking.istio.io",
        "kind": "virtualservices",
    }
    assert [call.status for call in apiserver.calls] == [201, 409]


@pytest.mark.asyncio
async def test_get_of_a_missing_object_is_a_404_status(kube_client: client.ApiClient) -> None:
    error = await raises(client.AppsV1Api(kube_client).read_namespaced_deployment("nope", NS))
    assert error.status == 404
    body = status_of(error)
    assert body["reason"] == "NotFound"
    assert body["message"] == 'deployments.apps "nope" not found'
    assert body["details"] == {"name": "nope", "group": "apps", "kind": "deployments"}


@pytest.mark.asyncio
async def test_replace_with_a_stale_resource_version_is_a_409_conflict(
    apiserver: ApiServer, kube_client: client.ApiClient
) -> None:
    apps = client.AppsV1Api(kube_client)
    created: Any = await apps.create_namespaced_deployment(NS, deployment())
    await apps.patch_namespaced_deployment("web", NS, {"spec": {"replicas": 5}})  # someone else

    stale = copy.deepcopy(created)
    stale.spec.replicas = 3
    error = await raises(apps.replace_namespaced_deployment("web", NS, stale))
    assert error.status == 409 and status_of(error)["reason"] == "Conflict"
    assert "the object has been modified" in status_of(error)["message"]
    assert stored(apiserver, "deployments", "web")["spec"]["replicas"] == 5

    fresh: Any = await apps.read_namespaced_deployment("web", NS)
    fresh.spec.replicas = 3
    answer: Any = await apps.replace_namespaced_deployment_with_http_info("web", NS, fresh)
    assert answer.status_code == 200  # a replace is never a create for deployments
    assert int(answer.data.metadata.resource_version) > int(fresh.metadata.resource_version)
    assert answer.data.spec.replicas == 3

    missing = await raises(apps.replace_namespaced_deployment("other", NS, deployment("other")))
    assert missing.status == 404


@pytest.mark.asyncio
async def test_a_custom_resource_replace_needs_a_resource_version(
    kube_client: client.ApiClient,
) -> None:
    await create_vs(kube_client, virtual_service())
    error = await raises(
        custom(kube_client).replace_namespaced_custom_object(
            *ISTIO, NS, "virtualservices", "reviews", virtual_service(canary=10)
        )
    )
    assert error.status == 422
    assert status_of(error)["details"]["causes"][0]["field"] == "metadata.resourceVersion"


@pytest.mark.asyncio
async def test_events_may_be_created_by_put_with_201(kube_client: client.ApiClient) -> None:
    core = client.CoreV1Api(kube_client)
    event = client.CoreV1Event(
        metadata=client.V1ObjectMeta(name="web.1"),
        reason="Promoted",
        message="weight 100",
        involved_object=client.V1ObjectReference(kind="CanaryDeployment", name="web"),
    )
    answer = await core.replace_namespaced_event_with_http_info("web.1", NS, event)
    assert answer.status_code == 201
    again = await core.replace_namespaced_event_with_http_info("web.1", NS, event)
    assert again.status_code == 200


# ------------------------------------------------- resourceVersion, generation, status


@pytest.mark.asyncio
async def test_status_subresource_and_generation(
    apiserver: ApiServer, kube_client: client.ApiClient
) -> None:
    api = custom(kube_client)
    created = await create_vs(kube_client, {**virtual_service(), "status": {"ignored": True}})
    assert "status" not in created  # status is only written through /status
    rv = int(created["metadata"]["resourceVersion"])

    # The main endpoint ignores .status; a label change is not a spec change.
    labelled = await api.patch_namespaced_custom_object(
        *ISTIO,
        NS,
        "virtualservices",
        "reviews",
        {"metadata": {"labels": {"team": "web"}}, "status": {"observedGeneration": 7}},
    )
    assert "status" not in labelled and labelled["metadata"]["generation"] == 1
    assert int(labelled["metadata"]["resourceVersion"]) > rv

    # /status changes only .status, and never the generation.
    with_status = await api.patch_namespaced_custom_object_status(
        *ISTIO,
        NS,
        "virtualservices",
        "reviews",
        {"status": {"observedGeneration": 1}, "spec": {"hosts": ["ignored"]}},
    )
    assert with_status["status"] == {"observedGeneration": 1}
    assert with_status["spec"]["hosts"] == ["reviews"]
    assert with_status["metadata"]["generation"] == 1
    assert [call.method for call in apiserver.writes("virtualservices", status=True)] == ["PATCH"]

    # A spec change bumps the generation and keeps the status.
    moved = await api.patch_namespaced_custom_object(
        *ISTIO,
        NS,
        "virtualservices",
        "reviews",
        [
            {"op": "replace", "path": "/spec/http/0/route/1/weight", "value": 10},
            {"op": "replace", "path": "/spec/http/0/route/0/weight", "value": 90},
        ],
        _content_type="application/json-patch+json",
    )
    assert moved["metadata"]["generation"] == 2 and moved["status"] == {"observedGeneration": 1}

    # A write that changes nothing stores nothing: same resourceVersion, no new version.
    history = apiserver.objects["networking.istio.io/v1/virtualservices", NS, "reviews"].history
    versions = len(history)
    same = await api.patch_namespaced_custom_object(
        *ISTIO, NS, "virtualservices", "reviews", {"spec": {"hosts": ["reviews"]}}
    )
    assert same["metadata"]["resourceVersion"] == moved["metadata"]["resourceVersion"]
    assert len(history) == versions


@pytest.mark.asyncio
async def test_deployment_status_through_the_typed_client(kube_client: client.ApiClient) -> None:
    apps = client.AppsV1Api(kube_client)
    await apps.create_namespaced_deployment(NS, deployment())
    current: Any = await apps.read_namespaced_deployment_status("web", NS)
    current.status = client.V1DeploymentStatus(
        observed_generation=1, ready_replicas=2, replicas=2, updated_replicas=2
    )
    updated: Any = await apps.replace_namespaced_deployment_status("web", NS, current)
    assert updated.status.ready_replicas == 2 and updated.metadata.generation == 1

    # A strategic merge patch, as kubectl sends (a merge patch to the double).
    image = {"spec": {"template": {"spec": {"containers": [{"name": "web", "image": "web:2"}]}}}}
    patched: Any = await apps.patch_namespaced_deployment("web", NS, image)
    assert patched.metadata.generation == 2 and patched.status.ready_replicas == 2
    assert patched.spec.template.spec.containers[0].image == "web:2"


@pytest.mark.asyncio
async def test_patch_content_types(kube_client: client.ApiClient) -> None:
    api = custom(kube_client)
    await create_vs(kube_client, virtual_service())
    failed_test = await raises(
        api.patch_namespaced_custom_object(
            *ISTIO,
            NS,
            "virtualservices",
            "reviews",
            [{"op": "test", "path": "/spec/http/0/route/1/weight", "value": 50}],
            _content_type="application/json-patch+json",
        )
    )
    assert failed_test.status == 422
    strategic = await raises(
        api.patch_namespaced_custom_object(
            *ISTIO,
            NS,
            "virtualservices",
            "reviews",
            {"spec": {"hosts": ["x"]}},
            _content_type="application/strategic-merge-patch+json",
        )
    )
    assert strategic.status == 415  # custom resources have no strategic merge patch
    older = await api.get_namespaced_custom_object(
        "networking.istio.io", "v1beta1", NS, "virtualservices", "reviews"
    )
    assert older["apiVersion"] == "networking.istio.io/v1beta1"  # served versions share storage


# ------------------------------------------------------------------------- watch


async def collect(
    stream: watch.Watch, source: Callable[..., Any], count: int, **kwargs: Any
) -> list[tuple[str, str, str]]:
    """(type, name, resourceVersion) of the first `count` events."""
    seen: list[tuple[str, str, str]] = []
    async with stream:
        events = stream.stream(  # type: ignore[no-untyped-call]
            source, *ISTIO, NS, "virtualservices", **kwargs
        )
        async for event in events:
            meta = event["raw_object"]["metadata"]
            seen.append((event["type"], meta["name"], meta["resourceVersion"]))
            if len(seen) == count:
                break
    return seen


@pytest.mark.asyncio
async def test_watch_from_a_resource_version_streams_the_changes_after_it(
    apiserver: ApiServer, kube_client: client.ApiClient
) -> None:
    api = custom(kube_client)
    await create_vs(kube_client, virtual_service("before"))
    listed = await api.list_namespaced_custom_object(*ISTIO, NS, "virtualservices")
    since = listed["metadata"]["resourceVersion"]
    watching = asyncio.create_task(
        collect(
            new_watch(),
            api.list_namespaced_custom_object,
            3,
            resource_version=since,
            timeout_seconds=5,
        )
    )
    await apiserver.wait_for(lambda: len(apiserver.watches) == 1)
    await create_vs(kube_client, virtual_service())
    await api.patch_namespaced_custom_object(
        *ISTIO, NS, "virtualservices", "reviews", {"metadata": {"labels": {"a": "b"}}}
    )
    await api.delete_namespaced_custom_object(*ISTIO, NS, "virtualservices", "reviews")
    events = await asyncio.wait_for(watching, 5)
    assert [(kind, name) for kind, name, _ in events] == [
        ("ADDED", "reviews"),
        ("MODIFIED", "reviews"),
        ("DELETED", "reviews"),
    ]
    versions = [int(rv) for _, _, rv in events]
    assert versions == sorted(versions) and versions[0] > int(since)
    await apiserver.wait_for(lambda: not apiserver.watches)  # the client hung up


@pytest.mark.asyncio
async def test_a_selected_watch_sees_objects_enter_and_leave_the_selection(
    apiserver: ApiServer, kube_client: client.ApiClient
) -> None:
    api = custom(kube_client)
    watching = asyncio.create_task(
        collect(
            new_watch(),
            api.list_namespaced_custom_object,
            2,
            label_selector="track=canary",
            resource_version=str(apiserver.resource_version),
            timeout_seconds=5,
        )
    )
    await apiserver.wait_for(lambda: len(apiserver.watches) == 1)
    await create_vs(kube_client, virtual_service("other"))  # never selected: no event
    await create_vs(kube_client, virtual_service(labels={"track": "stable"}))
    for track in ("canary", "stable"):
        await api.patch_namespaced_custom_object(
            *ISTIO, NS, "virtualservices", "reviews", {"metadata": {"labels": {"track": track}}}
        )
    events = await asyncio.wait_for(watching, 5)
    assert [(kind, name) for kind, name, _ in events] == [
        ("ADDED", "reviews"),
        ("DELETED", "reviews"),
    ]


@pytest.mark.asyncio
async def test_a_watch_without_a_position_starts_with_the_current_objects(
    kube_client: client.ApiClient,
) -> None:
    await create_vs(kube_client, virtual_service("a"))
    await create_vs(kube_client, virtual_service("b"))
    events = await collect(
        new_watch(), custom(kube_client).list_namespaced_custom_object, 2, timeout_seconds=5
    )
    assert [(kind, name) for kind, name, _ in events] == [("ADDED", "a"), ("ADDED", "b")]


@pytest.mark.asyncio
async def test_a_compacted_resource_version_answers_410_and_a_relist_resumes(
    apiserver: ApiServer, kube_client: client.ApiClient
) -> None:
    api = custom(kube_client)
    old = (await create_vs(kube_client, virtual_service("a")))["metadata"]["resourceVersion"]
    await create_vs(kube_client, virtual_service("b"))
    apiserver.compact()
    error = await raises(
        collect(
            new_watch(),
            api.list_namespaced_custom_object,
            1,
            resource_version=old,
            timeout_seconds=5,
        )
    )
    assert error.status == 410 and "too old resource version" in str(error.reason)

    relisted = await api.list_namespaced_custom_object(*ISTIO, NS, "virtualservices")
    assert [item["metadata"]["name"] for item in relisted["items"]] == ["a", "b"]
    watching = asyncio.create_task(
        collect(
            new_watch(),
            api.list_namespaced_custom_object,
            1,
            resource_version=relisted["metadata"]["resourceVersion"],
            timeout_seconds=5,
        )
    )
    await apiserver.wait_for(lambda: len(apiserver.watches) == 1)
    await create_vs(kube_client, virtual_service("c"))
    assert [name for _, name, _ in await asyncio.wait_for(watching, 5)] == ["c"]


@pytest.mark.asyncio
async def test_the_next_watch_can_be_told_to_answer_410(
    apiserver: ApiServer, kube_client: client.ApiClient
) -> None:
    apiserver.expire_next_watch()
    error = await raises(
        collect(
            new_watch(),
            custom(kube_client).list_namespaced_custom_object,
            1,
            resource_version=str(apiserver.resource_version),
            timeout_seconds=5,
        )
    )
    assert error.status == 410
    assert [call.query.get("watch") for call in apiserver.calls] == ["true"]


@pytest.mark.asyncio
async def test_a_closed_watch_is_resumed_by_the_client_without_losing_events(
    apiserver: ApiServer, kube_client: client.ApiClient
) -> None:
    api = custom(kube_client)
    start = str(apiserver.resource_version)
    watching = asyncio.create_task(
        collect(new_watch(), api.list_namespaced_custom_object, 3, resource_version=start)
    )  # no timeout: re-watches
    await apiserver.wait_for(lambda: len(apiserver.watches) == 1)
    await create_vs(kube_client, virtual_service("a"))
    apiserver.close_watches()  # the stream still carries "a" before it ends
    await apiserver.wait_for(lambda: len([c for c in apiserver.calls if c.method == "GET"]) == 2)
    await create_vs(kube_client, virtual_service("b"))
    await create_vs(kube_client, virtual_service("c"))
    events = await asyncio.wait_for(watching, 5)
    assert [name for _, name, _ in events] == ["a", "b", "c"]
    resumed = [c for c in apiserver.calls if c.method == "GET"][1]
    assert resumed.query["resourceVersion"] == events[0][2]  # from the last event it saw


# ---------------------------------------------------------------- delete, selectors


@pytest.mark.asyncio
async def test_finalizers_hold_a_deleted_object_until_they_are_removed(
    apiserver: ApiServer, kube_client: client.ApiClient
) -> None:
    api = custom(kube_client)
    await create_vs(kube_client, virtual_service(finalizers=["codedance.io/restore-traffic"]))
    await api.delete_namespaced_custom_object(*ISTIO, NS, "virtualservices", "reviews")
    held = await api.get_namespaced_custom_object(*ISTIO, NS, "virtualservices", "reviews")
    assert held["metadata"]["deletionTimestamp"]

    more = await raises(
        api.patch_namespaced_custom_object(
            *ISTIO,
            NS,
            "virtualservices",
            "reviews",
            {"metadata": {"finalizers": ["codedance.io/restore-traffic", "other"]}},
        )
    )
    assert more.status == 422

    await api.patch_namespaced_custom_object(
        *ISTIO, NS, "virtualservices", "reviews", {"metadata": {"finalizers": None}}
    )
    gone = await raises(api.get_namespaced_custom_object(*ISTIO, NS, "virtualservices", "reviews"))
    assert gone.status == 404
    assert apiserver.objects["networking.istio.io/v1/virtualservices", NS, "reviews"].deleted

    await create_vs(kube_client, virtual_service("plain"))
    await api.delete_namespaced_custom_object(*ISTIO, NS, "virtualservices", "plain")
    assert apiserver.read("virtualservices", "plain", NS) is None


@pytest.mark.asyncio
async def test_label_selectors(kube_client: client.ApiClient) -> None:
    core = client.CoreV1Api(kube_client)
    for name, labels in [
        ("s", {"app": "web", "track": "stable"}),
        ("c", {"app": "web", "track": "canary"}),
        ("o", {"app": "other"}),
    ]:
        await core.create_namespaced_config_map(
            NS, client.V1ConfigMap(metadata=client.V1ObjectMeta(name=name, labels=labels))
        )

    async def names(selector: str) -> list[str]:
        found: Any = await core.list_namespaced_config_map(NS, label_selector=selector)
        return [item.metadata.name for item in found.items]

    assert await names("track=canary") == ["c"]
    assert await names("track!=canary") == ["o", "s"]
    assert await names("track in (canary, stable)") == ["c", "s"]
    assert await names("track notin (canary)") == ["o", "s"]
    assert await names("track") == ["c", "s"]
    assert await names("!track") == ["o"]
    assert await names("app=web,track==stable") == ["s"]
    bad = await raises(names("track in canary"))
    assert bad.status == 400

    page: Any = await core.list_namespaced_config_map(NS, limit=2)
    assert [item.metadata.name for item in page.items] == ["c", "o"]
    rest: Any = await core.list_namespaced_config_map(
        NS, limit=2, _continue=page.metadata._continue
    )
    assert [item.metadata.name for item in rest.items] == ["s"]


@pytest.mark.asyncio
async def test_a_cluster_scoped_resource_registered_at_runtime(
    apiserver: ApiServer, kube_client: client.ApiClient
) -> None:
    apiserver.register(
        "example.com", "v1", "widgets", "Widget", namespaced=False, status_subresource=False
    )
    api = custom(kube_client)
    body = {
        "apiVersion": "example.com/v1",
        "kind": "Widget",
        "metadata": {"name": "w", "namespace": "ignored"},
        "spec": {"size": 1},
    }
    created = await api.create_cluster_custom_object("example.com", "v1", "widgets", body)
    assert "namespace" not in created["metadata"]
    read = await api.get_cluster_custom_object("example.com", "v1", "widgets", "w")
    assert read["spec"] == {"size": 1}
    listed = await api.list_cluster_custom_object("example.com", "v1", "widgets")
    assert [item["metadata"]["name"] for item in listed["items"]] == ["w"]
    namespaced = await raises(
        api.get_namespaced_custom_object("example.com", "v1", NS, "widgets", "w")
    )
    assert namespaced.status == 404
    unknown = await raises(api.list_cluster_custom_object("example.com", "v1", "gadgets"))
    assert unknown.status == 404


@pytest.mark.asyncio
async def test_delete_preconditions_generate_name_dry_run_and_field_selectors(
    apiserver: ApiServer, kube_client: client.ApiClient
) -> None:
    core = client.CoreV1Api(kube_client)
    made: Any = await core.create_namespaced_config_map(
        NS,
        client.V1ConfigMap(metadata=client.V1ObjectMeta(generate_name="policy-"), data={"a": "1"}),
    )
    name = made.metadata.name
    assert re.fullmatch(r"policy-[bcdfghjklmnpqrstvwxz2456789]{5}", name)

    before = apiserver.resource_version
    await core.patch_namespaced_config_map(name, NS, {"data": {"a": "2"}}, dry_run="All")
    assert apiserver.resource_version == before
    assert stored(apiserver, "configmaps", name)["data"] == {"a": "1"}

    only: Any = await core.list_namespaced_config_map(NS, field_selector=f"metadata.name={name}")
    assert [item.metadata.name for item in only.items] == [name]
    unsupported = await raises(core.list_namespaced_config_map(NS, field_selector="data.a=1"))
    assert unsupported.status == 400

    stale = client.V1DeleteOptions(preconditions=client.V1Preconditions(resource_version="1"))
    refused = await raises(core.delete_namespaced_config_map(name, NS, body=stale))
    assert refused.status == 409
    await core.delete_namespaced_config_map(name, NS)
    assert apiserver.read("configmaps", name, NS) is None


@pytest.mark.asyncio
async def test_a_kmock_reaction_answers_before_the_emulation(
    apiserver: ApiServer, kube_client: client.ApiClient
) -> None:
    apps = client.AppsV1Api(kube_client)
    await apps.create_namespaced_deployment(NS, deployment())
    apiserver["get /apis/apps/v1/namespaces/default/deployments/web"] << 418
    teapot = await raises(apps.read_namespaced_deployment("web", NS))
    assert teapot.status == 418
    listed: Any = await apps.list_namespaced_deployment(NS)  # other requests reach the emulation
    assert [item.metadata.name for item in listed.items] == ["web"]


# -------------------------------------------------------------- faults, journal


@pytest.mark.asyncio
async def test_injected_faults_reach_the_client(
    apiserver: ApiServer, kube_client: client.ApiClient
) -> None:
    apps = client.AppsV1Api(kube_client)
    await apps.create_namespaced_deployment(NS, deployment())
    apiserver.fail(429, method="GET", path="/apis/apps/v1/namespaces/*/deployments/web", times=2)
    for _ in range(2):
        throttled = await raises(apps.read_namespaced_deployment("web", NS))
        assert throttled.status == 429 and (throttled.headers or {})["Retry-After"] == "1"
        assert status_of(throttled)["reason"] == "TooManyRequests"
    read: Any = await apps.read_namespaced_deployment("web", NS)
    assert read.metadata.name == "web"

    apiserver.fail(500, method="PATCH")
    broken = await raises(apps.patch_namespaced_deployment("web", NS, {"spec": {"replicas": 9}}))
    assert broken.status == 500
    assert stored(apiserver, "deployments", "web")["spec"]["replicas"] == 2

    apiserver.conflict_next_write()
    raced = await raises(apps.patch_namespaced_deployment("web", NS, {"spec": {"replicas": 9}}))
    assert raced.status == 409 and status_of(raced)["reason"] == "Conflict"
    retried: Any = await apps.patch_namespaced_deployment("web", NS, {"spec": {"replicas": 9}})
    assert retried.spec.replicas == 9


@pytest.mark.asyncio
async def test_requests_are_recorded_for_counting_writes(
    apiserver: ApiServer, kube_client: client.ApiClient
) -> None:
    api = custom(kube_client)
    await create_vs(kube_client, virtual_service())
    for weight in (10, 50, 100):
        await api.patch_namespaced_custom_object(
            *ISTIO,
            NS,
            "virtualservices",
            "reviews",
            [
                {"op": "replace", "path": "/spec/http/0/route/1/weight", "value": weight},
                {"op": "replace", "path": "/spec/http/0/route/0/weight", "value": 100 - weight},
            ],
            _content_type="application/json-patch+json",
        )
    apiserver.fail(503, method="PATCH")
    await raises(api.patch_namespaced_custom_object(*ISTIO, NS, "virtualservices", "reviews", {}))
    await api.get_namespaced_custom_object(*ISTIO, NS, "virtualservices", "reviews")

    patches = [
        call
        for call in apiserver.writes("virtualservices", name="reviews")
        if call.method == "PATCH"
    ]
    assert [call.body[0]["value"] for call in patches] == [10, 50, 100]
    assert len(apiserver.writes("virtualservices")) == 4  # the create and three patches
    assert len(apiserver.writes("virtualservices", ok=False)) == 1
    assert len(apiserver["patch"]) == 4  # kmock's own view of the same journal
    history = apiserver.objects["networking.istio.io/v1/virtualservices", NS, "reviews"].history
    weights = [
        version["spec"]["http"][0]["route"][1]["weight"] if version else None for version in history
    ]
    assert weights == [0, 10, 50, 100]


# ------------------------------------------------------------ validation (422, 400)


@pytest.mark.asyncio
async def test_schema_violations_are_422_invalid_naming_the_field(
    apiserver: ApiServer, kube_client: client.ApiClient
) -> None:
    misspelt = virtual_service()
    misspelt["spec"]["http"][0]["route"][1]["wieght"] = 10
    error = await raises(create_vs(kube_client, misspelt))
    assert error.status == 422 and status_of(error)["reason"] == "Invalid"
    cause = status_of(error)["details"]["causes"][0]
    assert cause["field"] == "spec.http[0].route[1].wieght"
    assert 'VirtualService.networking.istio.io "reviews" is invalid' in status_of(error)["message"]

    # The typed client checks its models before sending; CustomObjectsApi sends raw dicts
    # to any group, built-in ones included, so the server's own checks are what is tested.
    def create_ingress(body: dict[str, Any]) -> Any:
        return custom(kube_client).create_namespaced_custom_object(
            "networking.k8s.io", "v1", NS, "ingresses", body
        )

    no_path_type = ingress()
    del no_path_type["spec"]["rules"][0]["http"]["paths"][0]["pathType"]
    error = await raises(create_ingress(no_path_type))
    assert error.status == 422
    assert (
        status_of(error)["details"]["causes"][0]["field"] == "spec.rules[0].http.paths[0].pathType"
    )

    numeric = ingress()
    numeric["metadata"]["annotations"]["nginx.ingress.kubernetes.io/canary-weight"] = 20
    assert (await raises(create_ingress(numeric))).status == 400
    networking = client.NetworkingV1Api(kube_client)
    typed = client.V1Ingress.from_dict(ingress())
    assert typed is not None
    created: Any = await networking.create_namespaced_ingress(NS, typed)
    assert created.metadata.name == "web"

    route = await custom(kube_client).create_namespaced_custom_object(
        *GATEWAY, NS, "httproutes", http_route()
    )
    assert route["spec"]["rules"][0]["backendRefs"][0]["kind"] == "Service"  # CRD defaults

    def no_wildcards(obj: Any) -> None:
        if "*" in obj["spec"]["hosts"]:
            raise ValueError("a wildcard host is not allowed here")

    apiserver.register(*ISTIO, "virtualservices", "VirtualService", schema=no_wildcards)
    wildcard = virtual_service("all")
    wildcard["spec"]["hosts"] = ["*"]
    error = await raises(create_vs(kube_client, wildcard))
    assert error.status == 422 and "wildcard" in status_of(error)["message"]


# ----------------------------------------------- client set-up paths, helpers


@pytest.mark.asyncio
async def test_kubeconfig_loading_and_leases(
    apiserver: ApiServer, kubeconfig_client: client.ApiClient
) -> None:
    leases = client.CoordinationV1Api(kubeconfig_client)
    lease = client.V1Lease(
        metadata=client.V1ObjectMeta(name="codedance"),
        spec=client.V1LeaseSpec(holder_identity="a", lease_duration_seconds=15),
    )
    created: Any = await leases.create_namespaced_lease(NS, lease)
    created.spec.holder_identity = "b"
    await leases.replace_namespaced_lease("codedance", NS, created)
    created.spec.holder_identity = "c"  # a second replica with the old resourceVersion
    assert (await raises(leases.replace_namespaced_lease("codedance", NS, created))).status == 409
    held: Any = await leases.read_namespaced_lease("codedance", NS)
    assert held.spec.holder_identity == "b"
    assert list(apiserver)[-1].headers["Authorization"] == "Bearer test-token"


@pytest.mark.asyncio
async def test_discovery_and_version(kube_client: client.ApiClient) -> None:
    groups = await client.ApisApi(kube_client).get_api_versions()
    assert {"codedance.io", "networking.istio.io", "apps"} <= {g.name for g in groups.groups}
    core = await client.CoreV1Api(kube_client).get_api_resources()
    assert {"pods", "pods/status", "events"} <= {r.name for r in core.resources}
    version = await client.VersionApi(kube_client).get_code()
    assert f"{version.major}.{version.minor}" == schemas.KUBERNETES_VERSION.rsplit(".", 1)[0]


@pytest.mark.asyncio
async def test_a_reactor_plays_the_deployment_controller(
    apiserver: ApiServer, kube_client: client.ApiClient
) -> None:
    def ready(event: str, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        if (
            event != "DELETED"
            and obj.get("status", {}).get("observedGeneration") != meta["generation"]
        ):
            replicas = obj["spec"]["replicas"]
            apiserver.set_status(
                "deployments",
                meta["name"],
                {
                    "observedGeneration": meta["generation"],
                    "replicas": replicas,
                    "readyReplicas": replicas,
                    "updatedReplicas": replicas,
                },
                namespace=NS,
            )

    apiserver.on_write("apps/v1/deployments", ready)
    apps = client.AppsV1Api(kube_client)
    created: Any = await apps.create_namespaced_deployment(NS, deployment())
    assert created.status is None  # the controller acts after the write, as in a cluster
    await apiserver.wait_for(
        lambda: stored(apiserver, "deployments", "web").get("status", {}).get("readyReplicas") == 2
    )
    read: Any = await apps.read_namespaced_deployment("web", NS)
    assert read.status.ready_replicas == 2


@pytest.mark.asyncio
async def test_seeded_objects_keep_their_status_and_reach_watchers(
    apiserver: ApiServer, kube_client: client.ApiClient
) -> None:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web-1", "labels": {"track": "canary"}},
        "spec": {"containers": [{"name": "web", "image": "web:2"}]},
        "status": {"phase": "Running"},
    }
    core = client.CoreV1Api(kube_client)
    watching = asyncio.create_task(
        collect_pods(core, resource_version=str(apiserver.resource_version))
    )
    await apiserver.wait_for(lambda: len(apiserver.watches) == 1)
    seeded = apiserver.seed(pod)
    assert seeded["metadata"]["namespace"] == NS and seeded["status"] == {"phase": "Running"}
    apiserver.seed({**pod, "status": {"phase": "Failed"}})
    read: Any = await core.read_namespaced_pod("web-1", NS)
    assert read.status.phase == "Failed"
    assert await asyncio.wait_for(watching, 5) == [("ADDED", "Running"), ("MODIFIED", "Failed")]
    assert apiserver.writes() == []  # seeding is set-up, not a request


async def collect_pods(core: client.CoreV1Api, **kwargs: Any) -> list[tuple[str, str]]:
    seen: list[tuple[str, str]] = []
    async with new_watch() as stream:
        events = stream.stream(core.list_namespaced_pod, NS, timeout_seconds=5, **kwargs)
        async for event in events:
            seen.append((event["type"], event["object"].status.phase))
            if len(seen) == 2:
                break
    return seen


# ------------------------------------------------------------------ schema helpers


def test_schema_helpers_accept_valid_objects() -> None:
    schemas.validate_custom(virtual_service(canary=10))
    schemas.validate_custom(http_route())
    schemas.validate_builtin(ingress())
    older = virtual_service()
    older["apiVersion"] = "networking.istio.io/v1beta1"
    schemas.validate_custom(older)


@pytest.mark.parametrize(
    ("mutate", "field", "reason"),
    [
        (
            lambda o: o["spec"]["http"][0]["route"][0].update(weight="ninety"),
            "spec.http[0].route[0].weight",
            "is not of type 'integer'",
        ),
        (
            lambda o: o["spec"]["http"][0].update(retry={"attempts": 3}),
            "spec.http[0].retry",
            "unknown field",
        ),
        (lambda o: o["spec"].update(hosts="reviews"), "spec.hosts", "is not of type 'array'"),
    ],
)
def test_custom_schema_violations_name_the_field(
    mutate: Callable[[dict[str, Any]], None], field: str, reason: str
) -> None:
    obj = virtual_service()
    mutate(obj)
    with pytest.raises(schemas.SchemaViolation) as caught:
        schemas.validate_custom(obj)
    assert caught.value.field == field and reason in caught.value.reason
    assert str(caught.value).startswith(f"VirtualService 'reviews': {field}: ")


def test_http_route_and_ingress_violations_name_the_field() -> None:
    route = http_route()
    route["spec"]["rules"][0]["backendRefs"][1]["weight"] = 1_000_001
    with pytest.raises(
        schemas.SchemaViolation, match=r"spec\.rules\[0\]\.backendRefs\[1\]\.weight"
    ):
        schemas.validate_custom(route)
    bad = ingress()
    bad["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["port"]["nmber"] = 80
    with pytest.raises(schemas.SchemaViolation) as caught:
        schemas.validate_builtin(bad)
    assert caught.value.field == "spec.rules[0].http.paths[0].backend.service.port.nmber"
    # The cached validator agrees with kubernetes-validate's own entry point.
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, schemas.KUBERNETES_VERSION, strict=True)
    kubernetes_validate.validate(ingress(), schemas.KUBERNETES_VERSION, strict=True)


def test_unknown_kinds_have_no_schema() -> None:
    with pytest.raises(schemas.SchemaNotFound):
        schemas.validate_custom({"apiVersion": "example.com/v1", "kind": "Widget"})
    with pytest.raises(schemas.SchemaNotFound):
        schemas.validate_builtin({"apiVersion": "v1", "kind": "Widget"})


def test_strict_schema_follows_the_readme_rules() -> None:
    strict = schemas.strict_schema(schemas.CRD_FILES["networking.istio.io", "VirtualService"], "v1")
    text = json.dumps(strict)
    assert "x-kubernetes-" not in text and '"nullable"' not in text
    route = strict["properties"]["spec"]["properties"]["http"]["items"]["properties"]["route"]
    assert route["items"]["additionalProperties"] is False
    assert "additionalProperties" not in strict["properties"]["status"]  # preserve-unknown-fields
    raw = schemas.openapi_schema(schemas.CRD_FILES["networking.istio.io", "VirtualService"], "v1")
    http = raw["properties"]["spec"]["properties"]["http"]["items"]["properties"]
    converted = strict["properties"]["spec"]["properties"]["http"]["items"]["properties"]
    assert http["mirrorPercent"].get("nullable") is True
    assert converted["mirrorPercent"]["type"] == ["integer", "null"]


def test_vendored_schemas_match_their_checksums() -> None:
    readme = (schemas.SCHEMA_DIR / "README.md").read_text(encoding="utf-8")
    listed = dict(
        (path, digest) for digest, path in re.findall(r"`([0-9a-f]{64})` for `([^`]+)`", readme)
    )
    vendored = {
        str(path.relative_to(schemas.SCHEMA_DIR))
        for path in schemas.CRD_FILES.values()
        if path.is_relative_to(schemas.SCHEMA_DIR)
    }
    assert set(listed) == vendored
    for path, digest in listed.items():
        assert hashlib.sha256((schemas.SCHEMA_DIR / path).read_bytes()).hexdigest() == digest, path
