"""`codedance traffic` on the real control plane, run as a person runs it: a subprocess.

In: per test a fresh namespace holding a stable Deployment (2 pods, labelled
`codedance.io/track: stable`), its stable and canary Services, a canary
Deployment made by the product's own `KubeWorkloads.bring_up`, a routing
object per provider (HTTPRoute, VirtualService, NGINX stable and canary
Ingresses) giving the canary 25%, and a CanaryDeployment whose status says
weight 25. The fake nodes make the pods ready, so the Services have real
EndpointSlices. Out: assertions on `codedance traffic --json` (the canary
share equals the routing weight; a Service selecting only `app: web` is
flagged as reaching both tracks and leaks canary traffic), on the human
output's summary line, and on the one-line errors with exit 2.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kubernetes.aio import client

from adapters.kube import retry
from adapters.kube.models import GROUP, PLURAL, VERSION
from adapters.kube.workloads import KubeWorkloads
from engine.ports import RolloutRef
from tests.cluster.kube import Objects, eventually

pytestmark = pytest.mark.asyncio(loop_scope="function")

CANARY_WEIGHT = 25
KubeconfigAs = Callable[[str, str], Path]


async def codedance(*args: str) -> tuple[int, str, str]:
    """`codedance ARGS...` in a new process: (exit code, stdout, stderr)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "codedance.cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def traffic_json(kubeconfig: Path, name: str = "web") -> dict[str, Any]:
    code, out, err = await codedance("traffic", name, "--kubeconfig", str(kubeconfig), "--json")
    assert code == 0, err
    return dict(json.loads(out))


def service(name: str, selector: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name},
        "spec": {"selector": selector, "ports": [{"port": 80, "targetPort": 8080}]},
    }


def stable_deployment() -> dict[str, Any]:
    labels = {"app": "web", "codedance.io/track": "stable"}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web", "labels": {"app": "web"}},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "web", "image": "example.com/web:1"}]},
            },
        },
    }


def http_route(backends: list[tuple[str, int]]) -> dict[str, Any]:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "web"},
        "spec": {
            "parentRefs": [{"name": "gateway"}],
            "rules": [{"backendRefs": [{"name": n, "port": 80, "weight": w} for n, w in backends]}],
        },
    }


def virtual_service(canary_weight: int) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "web"},
        "spec": {
            "hosts": ["web"],
            "http": [
                {
                    "name": "primary",
                    "route": [
                        {"destination": {"host": "web"}, "weight": 100 - canary_weight},
                        {"destination": {"host": "web-canary"}, "weight": canary_weight},
                    ],
                }
            ],
        },
    }


def ingress(name: str, backend: str, annotations: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": {"name": name, "annotations": annotations},
        "spec": {
            "ingressClassName": "nginx",
            "rules": [
                {
                    "host": "web.example.com",
                    "http": {
                        "paths": [
                            {
                                "path": "/",
                                "pathType": "Prefix",
                                "backend": {"service": {"name": backend, "port": {"number": 80}}},
                            }
                        ]
                    },
                }
            ],
        },
    }


def routing_objects(provider: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """`spec.traffic` and the routing objects giving the canary CANARY_WEIGHT percent."""
    if provider == "gateway-api":
        route = http_route([("web", 100 - CANARY_WEIGHT), ("web-canary", CANARY_WEIGHT)])
        return {"provider": provider, "httpRoute": "web"}, [route]
    if provider == "istio":
        traffic = {"provider": provider, "virtualService": "web", "route": "primary"}
        return traffic, [virtual_service(CANARY_WEIGHT)]
    nginx = "nginx.ingress.kubernetes.io"
    canary = {f"{nginx}/canary": "true", f"{nginx}/canary-weight": str(CANARY_WEIGHT)}
    return {"provider": provider, "ingress": "web"}, [
        ingress("web", "web", {}),
        ingress("web-canary", "web-canary", canary),
    ]


def canary_deployment(traffic: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "CanaryDeployment",
        "metadata": {"name": "web"},
        "spec": {
            "targetRef": {"kind": "Deployment", "name": "web"},
            "version": {"images": {"web": "example.com/web:2"}},
            "traffic": {"service": "web", "canaryService": "web-canary", **traffic},
            "policy": {"name": "pod_health"},
        },
    }


async def ready_endpoints(objects: Objects, service_name: str) -> int:
    slices = await objects.list(
        "discovery.k8s.io/v1", "EndpointSlice", f"kubernetes.io/service-name={service_name}"
    )
    return sum(
        1
        for s in slices
        for e in s.get("endpoints") or []
        if (e.get("conditions") or {}).get("ready") is not False
    )


async def release(
    api: client.ApiClient, namespace: str, traffic: dict[str, Any], routing: list[dict[str, Any]]
) -> Objects:
    """The stable and canary workloads, their Services, the routing objects, the release."""
    objects = Objects(api, namespace)
    await objects.create(stable_deployment())
    await objects.create(service("web", {"app": "web", "codedance.io/track": "stable"}))
    await objects.create(service("web-canary", {"app": "web", "codedance.io/track": "canary"}))
    for obj in routing:
        await objects.create(obj)
    await objects.create(canary_deployment(traffic))
    await client.CustomObjectsApi(api).patch_namespaced_custom_object_status(
        GROUP,
        VERSION,
        namespace,
        PLURAL,
        "web",
        {"status": {"phase": "Progressing", "weight": CANARY_WEIGHT}},
        _content_type="application/merge-patch+json",
    )
    workloads = KubeWorkloads(
        api,
        images={"web": "example.com/web:2"},
        clock=retry.LoopClock(),
        ready_timeout=60,
        poll_every=0.1,
    )
    await workloads.bring_up(
        RolloutRef(namespace=namespace, name="web", stable="web", canary="web-canary")
    )

    async def both_tracks_ready() -> bool:
        stable = await ready_endpoints(objects, "web")
        canary = await ready_endpoints(objects, "web-canary")
        return stable == 2 and canary == 2

    await eventually(both_tracks_ready, timeout=60)
    return objects


@pytest.mark.parametrize("provider", ["gateway-api", "istio", "nginx-ingress"])
async def test_canary_share_is_the_routing_weight(
    provider: str, admin_api: client.ApiClient, namespace: str, kubeconfig_as: KubeconfigAs
) -> None:
    traffic, routing = routing_objects(provider)
    await release(admin_api, namespace, traffic, routing)
    kubeconfig = kubeconfig_as("admin", namespace)

    view = await traffic_json(kubeconfig)

    assert view["provider"] == provider
    assert view["statusWeight"] == CANARY_WEIGHT
    assert abs(view["share"]["canary"] - CANARY_WEIGHT) <= 1, view
    assert abs(view["share"]["stable"] - (100 - CANARY_WEIGHT)) <= 1, view
    by_service = {b["service"]: b for b in view["backends"]}
    assert set(by_service) == {"web", "web-canary"}
    assert by_service["web"]["groups"] == [
        {"track": "stable", "version": "example.com/web:1", "ready": 2}
    ]
    assert by_service["web-canary"]["groups"] == [
        {"track": "canary", "version": "example.com/web:2", "ready": 2}
    ]
    assert all(b["flags"] == [] for b in view["backends"]), view
    assert view["problems"] == []

    code, out, err = await codedance("traffic", "web", "--kubeconfig", str(kubeconfig))
    assert code == 0, err
    assert f"canary share 25.0% (status weight {CANARY_WEIGHT}%)" in out
    assert "web-canary" in out and "example.com/web:2" in out


async def test_a_service_selecting_both_tracks_is_flagged(
    admin_api: client.ApiClient, namespace: str, kubeconfig_as: KubeconfigAs
) -> None:
    # every request to `web-all`, canary weight 0: yet its selector takes canary pods too
    route = http_route([("web-all", 100), ("web-canary", 0)])
    objects = await release(admin_api, namespace, {"provider": "gateway-api"}, [route])
    await objects.create(service("web-all", {"app": "web"}))
    await eventually(lambda: _equals(ready_endpoints(objects, "web-all"), 4), timeout=60)

    code, out, err = await codedance(
        "traffic", "web", "-n", namespace, "--kubeconfig", str(kubeconfig_as("admin", "default"))
    )
    assert code == 0, err
    assert "both-tracks" in out

    view = await traffic_json(kubeconfig_as("admin", namespace))
    by_service = {b["service"]: b for b in view["backends"]}
    assert by_service["web-all"]["flags"] == ["both-tracks"]
    assert {g["track"] for g in by_service["web-all"]["groups"]} == {"canary", "stable"}
    assert by_service["web-canary"]["flags"] == []
    # 2 stable and 2 canary pods behind a weight of 100: half the requests reach the canary
    assert abs(view["share"]["canary"] - 50) <= 1, view
    assert any("both canary and stable" in p for p in view["problems"])


async def _equals(value: Any, expected: Any) -> bool:
    return bool(await value == expected)


async def test_a_backend_without_ready_endpoints_is_flagged(
    admin_api: client.ApiClient, namespace: str, kubeconfig_as: KubeconfigAs
) -> None:
    route = http_route([("web", 90), ("web-canary", 10)])
    objects = Objects(admin_api, namespace)
    await objects.create(stable_deployment())
    await objects.create(service("web", {"app": "web", "codedance.io/track": "stable"}))
    await objects.create(service("web-canary", {"app": "web", "codedance.io/track": "canary"}))
    await objects.create(route)
    await objects.create(canary_deployment({"provider": "gateway-api"}))
    await eventually(lambda: _equals(ready_endpoints(objects, "web"), 2), timeout=60)

    view = await traffic_json(kubeconfig_as("admin", namespace))

    by_service = {b["service"]: b for b in view["backends"]}
    assert by_service["web-canary"]["flags"] == ["no-ready-endpoints"]
    assert view["share"]["unserved"] == pytest.approx(10.0)
    assert view["share"]["canary"] == 0.0
    assert view["statusWeight"] is None


async def one_line_error(*args: str) -> str:
    code, out, err = await codedance(*args)
    assert code == 2, (out, err)
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("codedance traffic: "), err
    return lines[0]


async def test_errors_are_one_line_and_exit_2(
    admin_api: client.ApiClient, namespace: str, kubeconfig_as: KubeconfigAs, tmp_path: Path
) -> None:
    admin = str(kubeconfig_as("admin", namespace))
    line = await one_line_error("traffic", "nope", "--kubeconfig", admin)
    assert f"no CanaryDeployment {namespace}/nope" in line

    # the release names an HTTPRoute nobody made
    objects = Objects(admin_api, namespace)
    await objects.create(canary_deployment({"provider": "gateway-api", "httpRoute": "absent"}))
    line = await one_line_error("traffic", "web", "--kubeconfig", admin)
    assert f"HTTPRoute {namespace}/absent" in line and "not found" in line

    # bob may read CanaryDeployments but not HTTPRoutes
    await objects.create(http_route([("web", 100)]) | {"metadata": {"name": "absent"}})
    bob = str(kubeconfig_as("bob", namespace))
    line = await one_line_error("traffic", "web", "--kubeconfig", bob)
    assert "403" in line and "httproutes" in line

    line = await one_line_error("traffic", "web", "--kubeconfig", str(tmp_path / "missing"))
    assert "no kubeconfig" in line
