"""deploy/ and examples/: every manifest valid offline, the generated files current.

Built-in kinds are checked with kubernetes-validate's strict schemas, the
CanaryDeployments against deploy/crd.yaml's schema (`tests.kube.schemas`).
The CRD and the policy ConfigMap must equal what `codedance crd` and
`codedance policies-configmap` print now; RBAC, the controller's Deployment,
Service, NetworkPolicy, kustomization, Dockerfile and Grafana dashboard are
checked for what docs/operating.md promises about them.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

import dsl
from adapters.kube.crd import crd_manifest, structural
from adapters.kube.models import (
    CanaryDeployment,
    CanaryDeploymentStatus,
    Condition,
    status_of,
    to_rollout_spec,
)
from adapters.telemetry.prometheus import PrometheusTelemetry
from codedance.cli import main
from codedance.deploy_cmd import CONFIGMAP_NAME, crd_text, policies_configmap_text
from engine.model import Phase, RolloutStatus, VerdictRecord
from engine.strategy import strategy_of
from tests.kube.schemas import SchemaViolation, validate_builtin, validate_custom

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
EXAMPLES = ROOT / "examples"
RULES = ROOT / "rules"

Capture = pytest.CaptureFixture[str]


def documents(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


def manifests() -> Iterator[tuple[str, dict[str, Any]]]:
    for folder in (DEPLOY, EXAMPLES):
        for path in sorted(folder.glob("*.yaml")):
            if path.name == "kustomization.yaml":  # kustomize's own file, not an object
                continue
            for i, doc in enumerate(documents(path)):
                yield f"{path.relative_to(ROOT)}[{i}] {doc.get('kind')}", doc


def one(kind: str, path: Path) -> dict[str, Any]:
    found = [doc for doc in documents(path) if doc.get("kind") == kind]
    assert len(found) == 1, f"{path.name} should hold one {kind}"
    return found[0]


MANIFESTS = list(manifests())
CUSTOM_GROUPS = {"networking.istio.io", "gateway.networking.k8s.io"}


# ---------------------------------------------------------------- every manifest


@pytest.mark.parametrize("doc", [d for _, d in MANIFESTS], ids=[i for i, _ in MANIFESTS])
def test_every_manifest_validates_offline(doc: dict[str, Any]) -> None:
    if doc["kind"] == "CanaryDeployment":
        validate_custom(doc)
        CanaryDeployment.model_validate(doc)  # what the controller will read, too
    elif doc["apiVersion"].split("/")[0] in CUSTOM_GROUPS:
        validate_custom(doc)  # Istio and Gateway API objects: their vendored CRDs
    else:
        validate_builtin(doc)


def test_the_manifests_cover_every_kind_deploy_needs() -> None:
    kinds = {doc["kind"] for name, doc in MANIFESTS if name.startswith("deploy/")}
    assert kinds == {
        "Namespace", "CustomResourceDefinition", "ServiceAccount", "ClusterRole",
        "ClusterRoleBinding", "Role", "RoleBinding", "Deployment", "ConfigMap", "Service",
        "NetworkPolicy",
    }


# ---------------------------------------------------------------- generated files


def test_crd_file_is_the_generators_output() -> None:
    written = (DEPLOY / "crd.yaml").read_text(encoding="utf-8")
    assert written == crd_text(), "deploy/crd.yaml is stale: run `codedance crd > deploy/crd.yaml`"
    assert documents(DEPLOY / "crd.yaml") == [crd_manifest()]


def test_codedance_crd_prints_the_crd(capsys: Capture) -> None:
    assert main(["crd"]) == 0
    out, err = capsys.readouterr()
    assert out == crd_text()
    assert err == ""


def test_policy_configmap_is_the_generators_output(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    written = (DEPLOY / "policies-configmap.yaml").read_text(encoding="utf-8")
    assert written == policies_configmap_text("rules/", "codedance"), (
        "deploy/policies-configmap.yaml is stale: run `codedance policies-configmap "
        "--namespace codedance rules/ > deploy/policies-configmap.yaml`"
    )


def test_policy_configmap_holds_every_policy_as_written() -> None:
    configmap = one("ConfigMap", DEPLOY / "policies-configmap.yaml")
    files = {p.name: p.read_text(encoding="utf-8") for p in RULES.glob("*.rules")}
    assert files, "rules/ should hold policies"
    assert configmap["data"] == files


def test_policies_configmap_command(tmp_path: Path, capsys: Capture) -> None:
    (tmp_path / "checkout.rules").write_text("latency: p99 > 300ms for 2m -> rollback\n")
    (tmp_path / "checkout_test.yaml").write_text("not a policy\n")
    assert main(["policies-configmap", "--namespace", "shop", str(tmp_path)]) == 0
    out, _ = capsys.readouterr()
    (configmap,) = [d for d in yaml.safe_load_all(out) if d]
    assert configmap["metadata"] == {
        "name": CONFIGMAP_NAME, "namespace": "shop", "labels": configmap["metadata"]["labels"],
    }
    assert configmap["data"] == {"checkout.rules": "latency: p99 > 300ms for 2m -> rollback\n"}
    assert "  checkout.rules: |\n    latency: p99" in out  # policies read as themselves
    validate_builtin(configmap)


def test_policies_configmap_refuses_a_policy_with_errors(tmp_path: Path, capsys: Capture) -> None:
    (tmp_path / "good.rules").write_text("latency: p99 > 300ms for 2m -> rollback\n")
    (tmp_path / "bad.rules").write_text("latency: p99 > 5% for 2m -> rollback\n")
    assert main(["policies-configmap", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert f"{tmp_path / 'bad.rules'}:1:16: error[E201]" in err
    assert "good.rules" not in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{tmp}/missing"], "no such directory"),
        (["{tmp}"], "no .rules files"),
        (["--namespace", "Not_A_Namespace", "{tmp}"], "not a namespace name"),
    ],
)
def test_policies_configmap_usage_errors(
    tmp_path: Path, capsys: Capture, args: list[str], message: str
) -> None:
    argv = ["policies-configmap", *(a.format(tmp=tmp_path) for a in args)]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("codedance policies-configmap: ")
    assert message in err


# ---------------------------------------------------------------- the CRD


def _structural_problems(schema: Mapping[str, Any], path: str, in_junctor: bool) -> list[str]:
    """Breaches of the rules a CRD's structural schema must keep (a subset, the likely ones)."""
    problems = []
    for key in ("$ref", "$defs", "title", "const"):
        if key in schema:
            problems.append(f"{path}: {key}")
    if schema.get("additionalProperties") is False:
        problems.append(f"{path}: additionalProperties false")
    if "additionalProperties" in schema and "properties" in schema:
        problems.append(f"{path}: both properties and additionalProperties")
    if "default" in schema and schema["default"] is None:
        problems.append(f"{path}: a null default")
    if in_junctor:
        for key in ("type", "nullable", "default", "description", "additionalProperties"):
            if key in schema:
                problems.append(f"{path}: {key} inside anyOf/oneOf/allOf/not")
    elif "type" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        problems.append(f"{path}: no type")
    for name, sub in schema.get("properties", {}).items():
        problems += _structural_problems(sub, f"{path}.{name}", in_junctor)
    for key in ("items", "additionalProperties", "not"):
        if isinstance(schema.get(key), Mapping):
            inside = in_junctor or key == "not"
            problems += _structural_problems(schema[key], f"{path}.{key}", inside)
    for key in ("anyOf", "oneOf", "allOf"):
        for i, branch in enumerate(schema.get(key, [])):
            problems += _structural_problems(branch, f"{path}.{key}[{i}]", True)
    return problems


def test_crd_schema_is_structural() -> None:
    (version,) = crd_manifest()["spec"]["versions"]
    schema = version["schema"]["openAPIV3Schema"]
    assert _structural_problems(schema, "openAPIV3Schema", False) == []


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "object", "properties": {"a": {"type": "string", "if": {"minLength": 1}}}},
        {"anyOf": [{"type": "string"}, {"type": "integer"}, {"type": "null"}]},
    ],
    ids=["unknown keyword", "union of two types"],
)
def test_a_schema_the_api_server_cannot_take_fails_generation(schema: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="cannot express"):
        structural(schema)


def test_crd_names_status_subresource_and_columns() -> None:
    crd = crd_manifest()
    spec = crd["spec"]
    assert crd["metadata"]["name"] == "canarydeployments.codedance.io"
    assert (spec["group"], spec["scope"]) == ("codedance.io", "Namespaced")
    assert spec["names"]["shortNames"] == ["cdep"]
    assert "codedance" in spec["names"]["categories"]
    (version,) = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
    assert list(columns) == ["Phase", "Weight", "Step", "Health", "Last verdict", "Age"]
    schema = version["schema"]["openAPIV3Schema"]
    for column in columns.values():
        parts = column["jsonPath"].lstrip(".").split(".")
        if parts[0] == "metadata":
            assert column["type"] == "date"
            continue
        node = schema
        for part in parts:
            assert part in node.get("properties", {}), f"{column['jsonPath']} is not in the schema"
            node = node["properties"][part]
        assert node["type"] == column["type"], column["name"]


def test_crd_schema_keeps_the_models_bounds() -> None:
    (version,) = crd_manifest()["spec"]["versions"]
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    strategy = spec["properties"]["strategy"]["properties"]
    assert (strategy["maxWeight"]["minimum"], strategy["maxWeight"]["maximum"]) == (1, 100)
    assert strategy["steps"]["items"] == {"type": "integer", "minimum": 0, "maximum": 100}
    assert strategy["stepDuration"]["pattern"].startswith("^")
    assert spec["required"] == ["targetRef", "version", "policy"]
    patch = spec["properties"]["version"]["properties"]["podTemplatePatch"]
    assert patch["x-kubernetes-preserve-unknown-fields"] is True


def _undescribed(schema: Mapping[str, Any], path: str) -> Iterator[str]:
    for name, sub in schema.get("properties", {}).items():
        if not sub.get("description"):
            yield f"{path}.{name}"
        yield from _undescribed(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), Mapping):
        yield from _undescribed(schema["items"], f"{path}[]")


def test_every_field_is_described_for_kubectl_explain() -> None:
    (version,) = crd_manifest()["spec"]["versions"]
    properties = version["schema"]["openAPIV3Schema"]["properties"]
    assert [*_undescribed(properties["spec"], "spec"),
            *_undescribed(properties["status"], "status")] == []


# A valid CanaryDeployment, changed one way per case below.
VALID: dict[str, Any] = {
    "apiVersion": "codedance.io/v1alpha1",
    "kind": "CanaryDeployment",
    "metadata": {"name": "web", "namespace": "default"},
    "spec": {
        "targetRef": {"kind": "Deployment", "name": "web"},
        "version": {"images": {"web": "example.com/web:v2"}},
        "strategy": {"type": "linear", "stepDuration": "1m"},
        "traffic": {"provider": "istio", "virtualService": "web", "service": "web",
                    "canaryService": "web-canary"},
        "policy": {"name": "default"},
    },
}


def changed(path: str, value: Any) -> dict[str, Any]:
    """VALID with the field at dotted `path` set to `value` (removed for `...`)."""
    doc = copy.deepcopy(VALID)
    *parents, last = path.split(".")
    node = doc
    for part in parents:
        node = node.setdefault(part, {})
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return doc


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        (changed("spec.strategy.maxWeight", 150), "spec.strategy.maxWeight"),
        (changed("spec.strategy.steps", [10, 150]), "spec.strategy.steps[1]"),
        (changed("spec.targetRef", ...), "spec.targetRef"),
        (changed("spec.strategy.stepDuration", "5 minutes"), "spec.strategy.stepDuration"),
        (changed("spec.analysis.interval", "soon"), "spec.analysis.interval"),
        (changed("spec.analysis.maxPause", "10"), "spec.analysis.maxPause"),
        (changed("spec.targetRef.name", "Web_1"), "spec.targetRef.name"),
        (changed("spec.targetRef.kind", "StatefulSet"), "spec.targetRef.kind"),
        (changed("spec.traffic.provider", "linkerd"), "spec.traffic.provider"),
        (changed("spec.strategy.type", "bluegreen"), "spec.strategy.type"),
        (changed("spec.policy", {"name": "default", "inline": "p99 > 1s -> rollback"}),
         "spec.policy"),
        (changed("spec.policy", {}), "spec.policy"),
        (changed("spec.version", {}), "spec.version"),
        (changed("spec.version", {"images": {}}), "spec.version"),
        (changed("spec.traffic.weight", 10), "spec.traffic.weight"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_crd_schema_rejects_an_invalid_canary_deployment(doc: dict[str, Any], field: str) -> None:
    with pytest.raises(SchemaViolation) as caught:
        validate_custom(doc)
    assert caught.value.field.startswith(field), str(caught.value)
    with pytest.raises(ValidationError):  # the controller refuses it the same way
        CanaryDeployment.model_validate(doc)


def test_the_valid_canary_deployment_passes() -> None:
    validate_custom(VALID)
    CanaryDeployment.model_validate(VALID)


_DURATIONS = ["1m", "30s", "1m30s", "0.5s", "1.5h", "2d", "250ms", "1 m", "m", "10", "1x", "", "-"]


@settings(max_examples=150, deadline=None)
@given(
    strategy=st.fixed_dictionaries(
        {},
        optional={
            "type": st.sampled_from(["linear", "exponential", "manual", "steps", "canary"]),
            "steps": st.none() | st.lists(st.integers(-5, 120), max_size=4),
            "stepDuration": st.sampled_from(_DURATIONS),
            "maxWeight": st.none() | st.integers(-1, 120),
        },
    ),
    interval=st.sampled_from(_DURATIONS),
    version=st.sampled_from([
        {"images": {"web": "x:2"}}, {"podTemplatePatch": {"spec": {}}}, {"images": {}},
        {"podTemplatePatch": {}}, {"images": {}, "podTemplatePatch": {"spec": {}}}, {},
    ]),
    policy=st.sampled_from([{"name": "a"}, {"inline": "x"}, {"name": "a", "inline": "x"}, {},
                            {"name": "a b"}]),
)
def test_crd_schema_and_models_agree(
    strategy: dict[str, Any], interval: str, version: dict[str, Any], policy: dict[str, Any]
) -> None:
    # Explicit nulls in version and policy are left out: the schema cannot tell
    # a null field from a present one, so they pass it and the model refuses them.
    doc = copy.deepcopy(VALID)
    doc["spec"].update(strategy=strategy, version=version, policy=policy,
                       analysis={"interval": interval})
    try:
        validate_custom(doc)
        schema_ok = True
    except SchemaViolation:
        schema_ok = False
    try:
        CanaryDeployment.model_validate(doc)
        model_ok = True
    except ValidationError:
        model_ok = False
    assert schema_ok == model_ok


def _status(verdict: bool) -> RolloutStatus:
    if not verdict:
        return RolloutStatus()
    return RolloutStatus(
        phase=Phase.PROGRESSING, step=2, weight=25, started_at=1_767_225_600.0,
        step_started_at=1_767_225_720.5, paused_by=None, policy_hash="9f2c",
        pending_since={"latency": 1_767_225_750.0, "line 7": 1_767_225_760.25},
        last_verdict=VerdictRecord(
            at=1_767_225_780.0, action="continue", rule=None, health=97.4,
            explanation="continue: every rule holds",
        ),
    )


@pytest.mark.parametrize("verdict", [False, True], ids=["fresh", "with a verdict"])
def test_the_status_the_controller_writes_fits_the_crd(verdict: bool) -> None:
    status = status_of(_status(verdict), generation=3)
    status["conditions"] = [
        Condition(type="Ready", status="False", reason="Progressing", message="step 2 of 6",
                  last_transition_time="2026-01-01T00:00:00Z", observed_generation=3)
        .model_dump(by_alias=True)
    ]
    validate_custom({**VALID, "status": status})
    # the status model describes every field status_of writes, and nothing else
    aliases = {f.alias for f in CanaryDeploymentStatus.model_fields.values()}
    assert aliases == set(status)
    assert CanaryDeploymentStatus.model_validate(status).model_dump(by_alias=True) == status


def test_the_status_schema_checks_what_it_says() -> None:
    status = status_of(_status(True), generation=3) | {"weight": 150}
    with pytest.raises(SchemaViolation) as caught:
        validate_custom({**VALID, "status": status})
    assert caught.value.field == "status.weight"
    status = status_of(_status(True), generation=3) | {"phase": "Done"}
    with pytest.raises(SchemaViolation) as caught:
        validate_custom({**VALID, "status": status})
    assert caught.value.field == "status.phase"


# ---------------------------------------------------------------- examples


def example_rollouts() -> dict[str, dict[str, Any]]:
    return {
        path.name: doc
        for path in sorted(EXAMPLES.glob("*.yaml"))
        for doc in documents(path)
        if doc.get("kind") == "CanaryDeployment"
    }


def test_an_example_for_every_traffic_provider() -> None:
    traffic = [doc["spec"]["traffic"] for doc in example_rollouts().values()]
    providers = {t["provider"] for t in traffic}
    assert {"istio", "nginx-ingress", "gateway-api"} <= providers
    istio = [t for t in traffic if t["provider"] == "istio"]
    assert any("destinationRule" in t for t in istio), "a subset-based Istio example"
    assert any("canaryService" in t and "destinationRule" not in t for t in istio), (
        "a host-based Istio example"
    )


@pytest.mark.parametrize("name", sorted(example_rollouts()))
def test_examples_name_a_shipped_policy_and_a_strategy_that_builds(name: str) -> None:
    rollout = CanaryDeployment.model_validate(example_rollouts()[name])
    policy = rollout.spec.policy.name
    assert policy is not None
    path = RULES / f"{policy}.rules"
    assert path.exists(), f"{name} names policy {policy!r}, which rules/ does not hold"
    dsl.load(path.read_text(encoding="utf-8"), str(path))
    strategy_of(to_rollout_spec(rollout).strategy)


# ---------------------------------------------------------------- RBAC

WATCH = {"get", "list", "watch"}
CLUSTER_GRANTS = {
    ("codedance.io", "canarydeployments"): WATCH | {"update", "patch"},
    ("codedance.io", "canarydeployments/status"): {"update"},
    ("codedance.io", "canarydeployments/finalizers"): {"update"},
    ("apps", "deployments"): {"get", "create", "update", "delete"},
    ("", "pods"): {"list"},
    ("", "events"): {"create"},
    ("networking.istio.io", "virtualservices"): {"get", "update"},
    ("networking.istio.io", "destinationrules"): {"get"},
    ("networking.k8s.io", "ingresses"): {"get", "create", "update", "delete"},
    ("gateway.networking.k8s.io", "httproutes"): {"get", "update"},
}
LEASE_GRANTS = {("coordination.k8s.io", "leases"): {"get", "create", "update"}}


def grants(role: Mapping[str, Any]) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


def test_rbac_has_no_wildcards() -> None:
    for doc in documents(DEPLOY / "rbac.yaml"):
        for rule in doc.get("rules", []):
            for key in ("apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs"):
                assert not any("*" in value for value in rule.get(key, [])), (doc["kind"], rule)


def test_rbac_grants_exactly_what_the_controller_uses() -> None:
    rbac = DEPLOY / "rbac.yaml"
    assert grants(one("ClusterRole", rbac)) == CLUSTER_GRANTS
    role = one("Role", rbac)
    assert grants(role) == LEASE_GRANTS
    deployment = one("Deployment", DEPLOY / "deployment.yaml")
    assert role["metadata"]["namespace"] == deployment["metadata"]["namespace"]


def test_rbac_bindings_give_the_roles_to_the_controllers_account() -> None:
    rbac = DEPLOY / "rbac.yaml"
    account = one("ServiceAccount", rbac)["metadata"]
    pod = one("Deployment", DEPLOY / "deployment.yaml")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == account["name"]
    for binding_kind, role_kind in (("ClusterRoleBinding", "ClusterRole"), ("RoleBinding", "Role")):
        binding = one(binding_kind, rbac)
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": role_kind,
                                      "name": one(role_kind, rbac)["metadata"]["name"]}
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["name"],
                                        "namespace": account["namespace"]}]


def test_every_rbac_rule_says_why() -> None:
    lines = (DEPLOY / "rbac.yaml").read_text(encoding="utf-8").splitlines()
    rules = [i for i, line in enumerate(lines) if line.lstrip().startswith("- apiGroups:")]
    assert len(rules) == len(CLUSTER_GRANTS) + len(LEASE_GRANTS)
    for i in rules:
        assert lines[i - 1].lstrip().startswith("#"), f"rbac.yaml:{i + 1}: a rule without a comment"


# ---------------------------------------------------------------- the controller


def controller() -> tuple[dict[str, Any], dict[str, Any]]:
    deployment = one("Deployment", DEPLOY / "deployment.yaml")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return pod, container


def test_controller_runs_locked_down() -> None:
    pod, container = controller()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    effective = {**pod["securityContext"], **container["securityContext"]}
    assert effective["runAsNonRoot"] is True
    assert effective["runAsUser"] == 65532
    assert effective["readOnlyRootFilesystem"] is True
    assert effective["allowPrivilegeEscalation"] is False
    assert effective["capabilities"] == {"drop": ["ALL"]}
    assert effective["seccompProfile"] == {"type": "RuntimeDefault"}
    assert not effective.get("privileged", False)
    for kind in ("requests", "limits"):
        assert set(container["resources"][kind]) == {"cpu", "memory"}


def test_controller_command_probes_and_mounts() -> None:
    pod, container = controller()
    assert container["image"] == "codedance:0.1.0"
    assert container["args"] == ["controller", "--policies", "/etc/codedance/policies"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path
        assert ports.get(get["port"], get["port"]) == 8080
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    policies = mounts["/etc/codedance/policies"]
    # subPath mounts never see ConfigMap updates, and the policy store relies on them
    assert "subPath" not in policies and policies["readOnly"] is True
    configmap = one("ConfigMap", DEPLOY / "policies-configmap.yaml")["metadata"]
    assert volumes[policies["name"]]["configMap"]["name"] == configmap["name"]
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    assert set(mounts) == {"/etc/codedance/policies", "/tmp"}


def _selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def test_service_serves_metrics_from_the_controller() -> None:
    service = one("Service", DEPLOY / "service.yaml")
    deployment = one("Deployment", DEPLOY / "deployment.yaml")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert _selects(service["spec"]["selector"], labels)
    assert _selects(deployment["spec"]["selector"]["matchLabels"], labels)
    _, container = controller()
    (port,) = service["spec"]["ports"]
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert port["port"] == 8080 and named[port["targetPort"]] == 8080


def test_network_policy_allows_only_metrics_dns_api_server_and_prometheus() -> None:
    policy = one("NetworkPolicy", DEPLOY / "networkpolicy.yaml")["spec"]
    labels = one("Deployment", DEPLOY / "deployment.yaml")["spec"]["template"]["metadata"]["labels"]
    assert _selects(policy["podSelector"]["matchLabels"], labels)
    assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"]
    ingress = [(p["protocol"], p["port"]) for rule in policy["ingress"] for p in rule["ports"]]
    assert ingress == [("TCP", 8080)]
    egress = {(p["protocol"], p["port"]) for rule in policy["egress"] for p in rule["ports"]}
    assert egress == {("UDP", 53), ("TCP", 53), ("TCP", 443), ("TCP", 6443), ("TCP", 9090)}
    assert all("ports" in rule for rule in policy["egress"] + policy["ingress"])
    (dns,) = [r for r in policy["egress"] if {p["port"] for p in r["ports"]} == {53}]
    assert dns["to"][0]["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text(encoding="utf-8"))
    assert kustomization["kind"] == "Kustomization"
    listed = kustomization["resources"]
    on_disk = {p.name for p in DEPLOY.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(listed) == sorted(on_disk)
    assert listed.index("namespace.yaml") < listed.index("rbac.yaml")


# ---------------------------------------------------------------- Dockerfile

INSTRUCTIONS = {
    "FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME",
    "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL",
}


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per logical line: comments dropped, `\\` continuations joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        word, _, rest = (pending + stripped).partition(" ")
        out.append((word.upper(), " ".join(rest.split())))
        pending = ""
    assert pending == "", "the Dockerfile ends inside a continued line"
    return out


def test_dockerfile_structure() -> None:
    steps = dockerfile_instructions((DEPLOY / "Dockerfile").read_text(encoding="utf-8"))
    assert all(word in INSTRUCTIONS for word, _ in steps), steps
    assert steps[0][0] == "FROM"
    stages = [i for i, (word, _) in enumerate(steps) if word == "FROM"]
    assert all(steps[i][1].split()[0] == "python:3.11-slim" for i in stages)
    final = steps[stages[-1]:]
    assert [args for word, args in final if word == "USER"] == ["65532:65532"]
    assert [json.loads(args) for word, args in final if word == "ENTRYPOINT"] == [["codedance"]]
    for word, args in steps:
        if word == "COPY" and not args.startswith("--from"):
            *sources, _ = args.split()
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: not in the repository"


# ---------------------------------------------------------------- Grafana


def metric_samples() -> tuple[set[str], set[str]]:
    """(sample names, family names) of the controller's registry, every series present."""
    telemetry = PrometheusTelemetry(version="test")
    telemetry.verdict("rollback", "latency")
    telemetry.query(0.1, ok=False)
    telemetry.tick_lag(0.01)
    telemetry.policy_reload_failed("checkout")
    families = list(telemetry.registry.collect())
    return {s.name for f in families for s in f.samples}, {f.name for f in families}


def test_grafana_dashboard_charts_the_controllers_metrics() -> None:
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text(encoding="utf-8"))
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    exprs = [t["expr"] for p in panels for t in p["targets"]]
    assert all(t["datasource"]["uid"] == "${datasource}" for p in panels for t in p["targets"])
    used = {name for e in exprs for name in re.findall(r"\bcodedance_[a-z_]+\b", e)}
    samples, families = metric_samples()
    assert used <= samples, f"not exported: {sorted(used - samples)}"
    for family in families:
        assert any(name.startswith(family) for name in used), f"no panel shows {family}"
    phases = {p.value for p in Phase}
    for listed in re.findall(r'phase[!=]~"([^"]+)"', " ".join(exprs)):
        assert set(listed.split("|")) <= phases, listed
    quantiles = [e for e in exprs if "histogram_quantile" in e]
    assert {m for e in quantiles for m in re.findall(r"codedance_[a-z_]+_bucket", e)} == {
        "codedance_tick_lag_seconds_bucket", "codedance_metric_query_seconds_bucket",
    }
