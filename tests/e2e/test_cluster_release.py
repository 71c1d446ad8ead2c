"""Releases on the real control plane, driven by the real `codedance controller` process.

The controller runs as its ServiceAccount with exactly `deploy/rbac.yaml`'s
rights; the objects come from `kubectl apply`, as a user would make them.
Three releases run at once in one namespace, one per traffic provider:

- Gateway API (`examples/local-cluster.yaml`, applied as it is): promoted; the
  stable Deployment rolls out the new image and the canary is gone;
- Istio, host based: the canary crash-loops on the fake nodes and the
  `pod_health` policy rolls it back; the stable pods are never restarted;
- NGINX Ingress: the CanaryDeployment is deleted mid-release; the finalizer
  returns traffic to stable and removes what the release made.

The last test compares what the controller asked of the API server during
the whole session (the API server's audit log) with what `deploy/rbac.yaml`
grants: nothing refused, and every grant used or explained.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from codedance.cli import main
from tests.cluster.controlplane import CONTROLLER_NAMESPACE, CONTROLLER_USER, ROOT, ControlPlane
from tests.cluster.kube import audit_events

NS = "demo"  # the namespace of examples/local-cluster.yaml
EXAMPLE = ROOT / "examples" / "local-cluster.yaml"
CRASH = {"fakelet.codedance.io/crash-after": "4s"}  # ready, then crash-looping


def wait_for(check: Callable[[], Any], what: str, timeout: float = 90.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.2)


class Cluster:
    """kubectl as admin, in the release namespace, with JSON out."""

    def __init__(self, plane: ControlPlane, log: Path) -> None:
        self.plane = plane
        self.log = log

    def wait_for(self, check: Callable[[], Any], what: str, timeout: float = 90.0) -> Any:
        """`wait_for`, with the releases' status and the controller's log in the failure."""
        try:
            return wait_for(check, what, timeout)
        except AssertionError as error:
            status = self.plane.kubectl("-n", NS, "get", "canarydeployments", "-o", "yaml")
            log = "\n".join(self.log.read_text(errors="replace").splitlines()[-60:])
            raise AssertionError(f"{error}\n{status}\n--- controller log ---\n{log}") from None

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        try:
            text = self.plane.kubectl("-n", NS, "get", kind, name, "-o", "json")
        except Exception as error:
            if "NotFound" in str(error):
                return None
            raise
        return dict(json.loads(text))

    def pods(self, selector: str) -> list[dict[str, Any]]:
        text = self.plane.kubectl("-n", NS, "get", "pods", "-l", selector, "-o", "json")
        return list(json.loads(text)["items"])

    def apply(self, documents: list[dict[str, Any]]) -> None:
        self.plane.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(documents))

    def phase(self, name: str) -> str:
        found = self.get("canarydeployment", name)
        return str(((found or {}).get("status") or {}).get("phase") or "")


def workload(name: str) -> list[dict[str, Any]]:
    """A stable Deployment and its two Services, as the example has them."""
    labels = {"app": name, "codedance.io/track": "stable"}
    services = [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": service, "namespace": NS},
            "spec": {
                "selector": {"app": name, "codedance.io/track": track},
                "ports": [{"port": 80, "targetPort": 8080}],
            },
        }
        for service, track in ((name, "stable"), (f"{name}-canary", "canary"))
    ]
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": name, "image": f"example.com/{name}:1"}]},
            },
        },
    }
    return [deployment, *services]


def canary_deployment(name: str, traffic: dict[str, Any], version: dict[str, Any]) -> Any:
    return {
        "apiVersion": "codedance.io/v1alpha1",
        "kind": "CanaryDeployment",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "targetRef": {"kind": "Deployment", "name": name},
            "version": version,
            "strategy": {"type": "linear", "stepDuration": "3s", "scaleDownDelay": "2s"},
            "traffic": traffic,
            "policy": {"name": "pod_health"},
            "analysis": {"interval": "1s"},
        },
    }


def istio_release() -> list[dict[str, Any]]:
    virtual_service = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "api", "namespace": NS},
        "spec": {
            "hosts": ["api"],
            "http": [
                {
                    "name": "primary",
                    "route": [
                        {"destination": {"host": "api"}, "weight": 100},
                        {"destination": {"host": "api-canary"}, "weight": 0},
                    ],
                }
            ],
        },
    }
    patch = {
        "metadata": {"annotations": CRASH},
        "spec": {"containers": [{"name": "api", "image": "example.com/api:2"}]},
    }
    release = canary_deployment(
        "api",
        {
            "provider": "istio",
            "service": "api",
            "canaryService": "api-canary",
            "virtualService": "api",
            "route": "primary",
        },
        {"podTemplatePatch": patch},
    )
    return [*workload("api"), virtual_service, release]


def nginx_release() -> list[dict[str, Any]]:
    ingress = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": {"name": "shop", "namespace": NS},
        "spec": {
            "ingressClassName": "nginx",
            "rules": [
                {
                    "host": "shop.example.com",
                    "http": {
                        "paths": [
                            {
                                "path": "/",
                                "pathType": "Prefix",
                                "backend": {"service": {"name": "shop", "port": {"number": 80}}},
                            }
                        ]
                    },
                }
            ],
        },
    }
    release = canary_deployment(
        "shop",
        {
            "provider": "nginx-ingress",
            "ingress": "shop",
            "service": "shop",
            "canaryService": "shop-canary",
        },
        {"images": {"shop": "example.com/shop:2"}},
    )
    release["spec"]["strategy"]["stepDuration"] = "30s"  # deleted long before it ends
    return [*workload("shop"), ingress, release]


@pytest.fixture(scope="module")
def releases(
    control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    """The controller process and the three releases, started once for this module."""
    log = tmp_path_factory.mktemp("controller") / "controller.log"
    cluster = Cluster(control_plane, log)
    control_plane.kubectl("apply", "-f", str(EXAMPLE))
    cluster.apply(istio_release())
    cluster.apply(nginx_release())
    env = dict(os.environ, POD_NAMESPACE=CONTROLLER_NAMESPACE, PYTHONPATH=str(ROOT))
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "codedance.cli",
                "controller",
                f"--kubeconfig={control_plane.kubeconfig('controller')}",
                f"--policies={ROOT / 'rules'}",
                "--listen=127.0.0.1:0",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
        )
    try:
        yield cluster
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
        if process.returncode not in (0, -15):
            print(log.read_text())
        control_plane.kubectl("delete", "namespace", NS, "--wait=false")


def traffic(plane: ControlPlane, name: str) -> dict[str, Any]:
    """`codedance traffic NAME --json`, run as a person would, read as a document."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["traffic", name, "-n", NS, "--json", f"--kubeconfig={plane.kubeconfig()}"])
    assert code == 0
    return dict(json.loads(out.getvalue()))


def test_gateway_api_release_is_promoted(releases: Cluster) -> None:
    # at every step the requests really reaching canary pods are the status's weight
    matched: set[int] = set()
    mismatched: dict[int, float] = {}
    while releases.phase("web") not in ("Succeeded", "RolledBack", "Failed"):
        view = traffic(releases.plane, "web")
        assert all("both-tracks" not in b["flags"] for b in view["backends"]), view
        weight = view["statusWeight"]
        if view["phase"] != "Progressing" or weight is None:
            continue
        # the status is saved just before the route is written: a sample may fall between
        if abs(view["share"]["canary"] - weight) <= 1:
            matched.add(weight)
        else:
            mismatched[weight] = view["share"]["canary"]
    assert matched == {5, 10, 25, 50, 75, 100}, (matched, mismatched)
    assert releases.phase("web") == "Succeeded"
    stable = releases.get("deployment", "web")
    assert stable is not None
    images = [c["image"] for c in stable["spec"]["template"]["spec"]["containers"]]
    assert images == ["registry.example.com/web:2.0.0"]

    def rolled_out() -> bool:
        status = (releases.get("deployment", "web") or {}).get("status") or {}
        return status.get("updatedReplicas") == status.get("availableReplicas") == 2

    releases.wait_for(rolled_out, "the stable Deployment to roll out the new image")
    releases.wait_for(
        lambda: releases.get("deployment", "web-canary") is None, "the canary to retire"
    )
    route = releases.get("httproute", "web")
    assert route is not None
    weights = {
        ref["name"]: ref.get("weight", 1) for ref in route["spec"]["rules"][0]["backendRefs"]
    }
    assert weights.get("web") == 100
    assert weights.get("web-canary", 0) == 0
    # all requests on stable pods, which run the new version
    after = traffic(releases.plane, "web")
    assert after["share"]["canary"] == 0 and after["share"]["stable"] == 100, after
    versions = {g["version"] for b in after["backends"] for g in b["groups"] if g["ready"]}
    assert versions == {"registry.example.com/web:2.0.0"}, after


def test_istio_crashing_canary_is_rolled_back_without_touching_stable(releases: Cluster) -> None:
    before = {pod["metadata"]["uid"] for pod in releases.pods("app=api,codedance.io/track=stable")}
    assert len(before) == 2
    releases.wait_for(lambda: releases.phase("api") == "RolledBack", "api to be rolled back")
    found = releases.get("canarydeployment", "api")
    assert found is not None
    assert "crashloop" in json.dumps(found["status"])
    service = releases.get("virtualservice", "api")
    assert service is not None
    route = service["spec"]["http"][0]["route"]
    assert {r["destination"]["host"]: r.get("weight", 0) for r in route} == {
        "api": 100,
        "api-canary": 0,
    }
    after = {pod["metadata"]["uid"] for pod in releases.pods("app=api,codedance.io/track=stable")}
    assert after == before, "stable pods were restarted"
    stable = releases.get("deployment", "api")
    assert stable is not None
    assert stable["spec"]["template"]["spec"]["containers"][0]["image"] == "example.com/api:1"
    after = traffic(releases.plane, "api")  # no request reaches a canary pod
    assert after["share"]["canary"] == 0 and after["share"]["stable"] == 100, after


def test_nginx_release_deleted_mid_release_restores_stable(releases: Cluster) -> None:
    def canary_weight() -> int:
        found = releases.get("canarydeployment", "shop") or {}
        return int((found.get("status") or {}).get("weight") or 0)

    releases.wait_for(lambda: canary_weight() > 0, "shop to send traffic to its canary")
    assert releases.get("ingress", "shop-canary") is not None
    # bob, who may approve, holds the release; the controller runs his command
    paused = subprocess.run(
        [
            sys.executable,
            "-m",
            "codedance.cli",
            "pause",
            "shop",
            "-n",
            NS,
            f"--kubeconfig={releases.plane.kubeconfig('bob')}",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert paused.returncode == 0, paused.stderr
    releases.wait_for(lambda: releases.phase("shop") == "Paused", "shop to be paused")
    releases.plane.kubectl("-n", NS, "delete", "canarydeployment", "shop", "--timeout=60s")
    assert releases.get("canarydeployment", "shop") is None
    releases.wait_for(
        lambda: releases.get("ingress", "shop-canary") is None, "the canary Ingress to go"
    )
    releases.wait_for(lambda: releases.get("deployment", "shop-canary") is None, "the canary to go")
    stable = releases.get("deployment", "shop")
    assert stable is not None
    assert stable["spec"]["template"]["spec"]["containers"][0]["image"] == "example.com/shop:1"


# -- what the controller asked for, against what deploy/rbac.yaml grants ------------

# Grants the audit log cannot show in use, each with the reason it stays.
JUSTIFIED: dict[tuple[str, str, str], str] = {
    ("get", "networking.istio.io", "destinationrules"): (
        "subset-based Istio routing reads the DestinationRule's subsets "
        "(tests/adapters/traffic/test_istio.py); no release above routes by subset"
    ),
    ("update", "codedance.io", "canarydeployments/finalizers"): (
        "no request uses it: the OwnerReferencesPermissionEnforcement admission plugin "
        "checks it when the canary Deployment or Ingress is created with blockOwnerDeletion "
        "(tests/kube/test_ownership.py shows the create refused without it)"
    ),
}


def granted(manifest: Path) -> dict[tuple[str, str, str], str]:
    """(verb, group, resource[/subresource]) -> scope ("cluster" or the Role's namespace)."""
    grants: dict[tuple[str, str, str], str] = {}
    for document in yaml.safe_load_all(manifest.read_text()):
        if not document or document["kind"] not in ("ClusterRole", "Role"):
            continue
        scope = (
            "cluster" if document["kind"] == "ClusterRole" else document["metadata"]["namespace"]
        )
        for rule in document["rules"]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    for verb in rule["verbs"]:
                        grants[(verb, group, resource)] = scope
    return grants


def test_controller_uses_exactly_the_shipped_rbac(releases: Cluster) -> None:
    # every release above has finished, so the log holds the whole story
    releases.wait_for(lambda: releases.phase("web") == "Succeeded", "web to be promoted")
    releases.wait_for(lambda: releases.phase("api") == "RolledBack", "api to be rolled back")
    releases.wait_for(lambda: releases.get("deployment", "web-canary") is None, "web's canary")
    releases.wait_for(lambda: releases.get("deployment", "api-canary") is None, "api's canary")
    grants = granted(ROOT / "deploy" / "rbac.yaml")
    events = audit_events(releases.plane.audit_log, CONTROLLER_USER)
    # RBAC's refusals only: a 403 from admission (NamespaceLifecycle refuses Events in
    # a namespace being deleted, as tests/kube/test_deletion.py does mid-release) was
    # authorized, and the audit log says so
    refused = sorted(
        {
            (e.verb, e.group, e.resource, e.subresource, e.namespace)
            for e in events
            if e.code == 403 and e.decision != "allow"
        }
    )
    assert refused == [], f"the controller was refused: {refused}"
    used: dict[tuple[str, str, str], set[str]] = {}
    for event in events:
        if not event.resource:
            continue  # discovery and version: open to every authenticated user
        resource = f"{event.resource}/{event.subresource}" if event.subresource else event.resource
        used.setdefault((event.verb, event.group, resource), set()).add(event.namespace)
    missing = sorted(set(used) - set(grants))
    assert missing == [], f"used but not granted: {missing}"
    for key, namespaces in used.items():
        if grants[key] != "cluster":
            assert namespaces == {grants[key]}, f"{key} used outside its Role's namespace"
    unused = sorted(set(grants) - set(used) - set(JUSTIFIED))
    assert unused == [], f"granted but never used (remove, or justify in JUSTIFIED): {unused}"
