"""Offline schema checks for the objects Codedance writes to Kubernetes.

In: a Kubernetes object as a dict. Out: nothing when it is valid, or a
`SchemaViolation` whose message starts with the path of the bad field
(`spec.http[0].route[1].weight: 150 is greater than the maximum of 100`).

- Custom resources (`validate_custom`) are checked against their published CRD:
  the vendored Istio and Gateway API files under `tests/schemas/` (see the
  README there for source, version and license) and the project's own
  `deploy/crd.yaml` for CanaryDeployment once that file exists. A CRD's
  openAPIV3Schema is made strict by `strict_schema` as the README explains.
- Built-in kinds (`validate_builtin`) are checked with the strict schemas that
  the `kubernetes-validate` package ships, for the newest Kubernetes version it
  knows (`KUBERNETES_VERSION`).

Like the API server, structural defaults (`apply_defaults`) are applied before a
custom resource is validated. CEL rules (`x-kubernetes-validations`) are not
checked. Loaded schemas and built validators are cached per file and version:
the files are read-only test data.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import jsonschema.exceptions
import referencing
import referencing.jsonschema
import yaml
from kubernetes_validate import utils as kubernetes_validate

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_DIR = ROOT / "tests" / "schemas"
CANARY_CRD = ROOT / "deploy" / "crd.yaml"

# (API group, kind) -> the file holding that kind's CustomResourceDefinition.
CRD_FILES: dict[tuple[str, str], Path] = {
    ("networking.istio.io", "VirtualService"): (
        SCHEMA_DIR / "istio" / "virtualservices.networking.istio.io.yaml"
    ),
    ("networking.istio.io", "DestinationRule"): (
        SCHEMA_DIR / "istio" / "destinationrules.networking.istio.io.yaml"
    ),
    ("gateway.networking.k8s.io", "HTTPRoute"): (
        SCHEMA_DIR / "gateway-api" / "gateway.networking.k8s.io_httproutes.yaml"
    ),
    ("codedance.io", "CanaryDeployment"): CANARY_CRD,
}

KUBERNETES_VERSION: str = kubernetes_validate.latest_version()

Validator = Callable[[Mapping[str, Any]], None]


class SchemaViolation(ValueError):
    """An object does not match its schema.

    `field` is the dotted path of the offending field (`spec.rules[0].host`),
    `reason` what is wrong with it; `str()` gives both, prefixed with the
    object's kind and name when known.
    """

    def __init__(self, field: str, reason: str, *, kind: str = "", name: str = "") -> None:
        self.field = field
        self.reason = reason
        self.kind = kind
        self.name = name
        subject = f"{kind} {name!r}: " if kind and name else (f"{kind}: " if kind else "")
        super().__init__(f"{subject}{field or '<object>'}: {reason}")


class SchemaNotFound(LookupError):
    """No schema is known (or available yet) for an object's apiVersion and kind."""


def field_path(parts: Iterable[str | int]) -> str:
    """`["spec", "http", 0, "route"]` -> `spec.http[0].route`."""
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


@functools.cache
def _documents(path: Path) -> tuple[Any, ...]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C loader is 20x faster
    with path.open(encoding="utf-8") as handle:
        return tuple(doc for doc in yaml.load_all(handle, Loader=loader) if doc)


def crd(path: Path, kind: str | None = None) -> Mapping[str, Any]:
    """The CustomResourceDefinition in `path` (the one for `kind` if the file holds several)."""
    if not path.exists():
        raise SchemaNotFound(f"{path} does not exist")
    for doc in _documents(path):
        if not isinstance(doc, dict) or doc.get("kind") != "CustomResourceDefinition":
            continue
        if kind is None or doc.get("spec", {}).get("names", {}).get("kind") == kind:
            return doc
    raise SchemaNotFound(f"{path} holds no CustomResourceDefinition for kind {kind!r}")


def openapi_schema(path: Path, version: str, kind: str | None = None) -> dict[str, Any]:
    """A copy of the openAPIV3Schema of one served version of the CRD in `path`."""
    definition = crd(path, kind)
    for served in definition["spec"]["versions"]:
        if served["name"] == version:
            return copy.deepcopy(served["schema"]["openAPIV3Schema"])
    names = [served["name"] for served in definition["spec"]["versions"]]
    raise SchemaNotFound(f"{path.name} does not serve version {version!r} (it serves {names})")


def strict_schema(path: Path, version: str, kind: str | None = None) -> dict[str, Any]:
    """The CRD's openAPIV3Schema for `version` as strict JSON Schema (see `to_strict`)."""
    return _strict_root(openapi_schema(path, version, kind))


# Every object may carry these at its root; CRDs often leave them out of the schema
# (Istio's declare only spec and status) because the API server adds them itself.
_ROOT_FIELDS = {
    "apiVersion": {"type": "string"},
    "kind": {"type": "string"},
    "metadata": {"type": "object"},
}


def _strict_root(schema: Mapping[str, Any]) -> dict[str, Any]:
    strict: dict[str, Any] = to_strict(dict(schema))
    properties = strict.setdefault("properties", {})
    for name, sub in _ROOT_FIELDS.items():
        properties.setdefault(name, dict(sub))
    return strict


_JUNCTORS = frozenset({"allOf", "anyOf", "oneOf", "not"})
_DATA_KEYWORDS = frozenset({"default", "enum", "example", "const"})


def to_strict(schema: Any, *, in_junctor: bool = False) -> Any:
    """Turn a structural openAPIV3Schema into strict JSON Schema.

    Drops `x-kubernetes-*`, turns `nullable: true` into an added "null" type,
    and forbids unknown fields on objects that declare `properties`, except
    where `x-kubernetes-preserve-unknown-fields` keeps them and inside
    allOf/anyOf/oneOf/not (whose branches only restate checks on a few fields).
    """
    if isinstance(schema, list):
        return [to_strict(item, in_junctor=in_junctor) for item in schema]
    if not isinstance(schema, dict):
        return schema
    strict: dict[str, Any] = {}
    for key, value in schema.items():
        if key.startswith("x-kubernetes-") or key == "nullable":
            continue
        if key in _DATA_KEYWORDS or key == "required":
            strict[key] = copy.deepcopy(value)
        elif key in ("properties", "patternProperties"):
            strict[key] = {name: to_strict(sub) for name, sub in value.items()}
        else:
            strict[key] = to_strict(value, in_junctor=key in _JUNCTORS)
    if schema.get("nullable") is True:
        declared = strict.get("type")
        if isinstance(declared, str):
            strict["type"] = [declared, "null"]
        if "enum" in strict and None not in strict["enum"]:
            strict["enum"] = [*strict["enum"], None]
    keeps_unknown = schema.get("x-kubernetes-preserve-unknown-fields") is True
    declares = "properties" in schema and "additionalProperties" not in schema
    if declares and not keeps_unknown and not in_junctor:
        strict["additionalProperties"] = False
    return strict


def apply_defaults(schema: Mapping[str, Any], value: Any) -> None:
    """Fill in structural-schema defaults in `value`, in place, as the API server does."""
    if isinstance(value, dict):
        properties: Mapping[str, Any] = schema.get("properties") or {}
        for name, sub in properties.items():
            absent = name not in value or (value[name] is None and not sub.get("nullable"))
            if absent and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
        for name, sub in properties.items():
            if name in value:
                apply_defaults(sub, value[name])
        extra = schema.get("additionalProperties")
        if isinstance(extra, Mapping):
            for name, item in value.items():
                if name not in properties:
                    apply_defaults(extra, item)
    elif isinstance(value, list):
        items = schema.get("items")
        if isinstance(items, Mapping):
            for item in value:
                apply_defaults(items, item)


def _violation(
    error: jsonschema.exceptions.ValidationError,
    obj: Mapping[str, Any],
) -> SchemaViolation:
    """The most relevant error, with its path extended to the field actually at fault."""
    path: list[str | int] = list(error.absolute_path)
    reason = error.message
    instance = error.instance
    if error.validator == "additionalProperties" and isinstance(instance, dict):
        known = error.schema.get("properties", {}) if isinstance(error.schema, dict) else {}
        unknown = sorted(name for name in instance if name not in known)
        if unknown:
            path.append(unknown[0])
            reason = "unknown field"
            if unknown[1:]:
                reason += f" (also unknown: {', '.join(unknown[1:])})"
    elif error.validator == "required" and isinstance(instance, dict):
        missing = [name for name in error.validator_value if name not in instance]
        if missing:
            path.append(missing[0])
            reason = "required field is missing"
    metadata = obj.get("metadata")
    name = metadata.get("name", "") if isinstance(metadata, Mapping) else ""
    return SchemaViolation(field_path(path), reason, kind=str(obj.get("kind", "")), name=name)


def _check(validator: jsonschema.protocols.Validator, obj: Mapping[str, Any]) -> None:
    error = jsonschema.exceptions.best_match(validator.iter_errors(obj))
    if error is not None:
        raise _violation(error, obj)


def openapi_validator(schema: Mapping[str, Any]) -> Validator:
    """A strict validator for one CRD version's openAPIV3Schema (defaults applied first)."""
    validator = jsonschema.Draft202012Validator(_strict_root(schema))

    def validate(obj: Mapping[str, Any]) -> None:
        defaulted = copy.deepcopy(dict(obj))
        apply_defaults(schema, defaulted)
        _check(validator, defaulted)

    return validate


@functools.cache
def _custom_validator(path: Path, version: str, kind: str) -> Validator:
    return openapi_validator(openapi_schema(path, version, kind))


def validate_custom(obj: Mapping[str, Any]) -> None:
    """Check a VirtualService, DestinationRule, HTTPRoute or CanaryDeployment strictly."""
    api_version = str(obj.get("apiVersion", ""))
    kind = str(obj.get("kind", ""))
    group, _, version = api_version.rpartition("/")
    path = CRD_FILES.get((group, kind))
    if path is None:
        raise SchemaNotFound(f"no CRD schema is kept for {kind} ({api_version})")
    if not path.exists():
        raise SchemaNotFound(
            f"{path.relative_to(ROOT)} does not exist, so {kind} ({api_version}) cannot be checked"
        )
    _custom_validator(path, version, kind)(obj)


@functools.cache
def _builtin_validator(api_version: str, kind: str) -> jsonschema.protocols.Validator:
    # The same files and resolution as kubernetes_validate.validate(..., strict=True),
    # built once per kind: that function re-reads 1.8 MB of definitions on every call.
    folder = f"kubernetes-json-schema/v{KUBERNETES_VERSION}-local-strict"
    # rbac.authorization.k8s.io/v1 -> rbac-v1, apps/v1 -> apps-v1, v1 -> v1
    group, _, version = api_version.rpartition("/")
    suffix = f"{group.split('.')[0]}-{version}" if group else version
    try:
        schema = kubernetes_validate.schema_contents(
            f"{folder}/{kind.lower()}-{suffix}.json", KUBERNETES_VERSION
        )
    except FileNotFoundError:
        raise SchemaNotFound(
            f"kubernetes-validate has no schema for {kind} ({api_version}) "
            f"in Kubernetes {KUBERNETES_VERSION}"
        ) from None
    definitions = kubernetes_validate.schema_contents(
        f"{folder}/_definitions.json", KUBERNETES_VERSION
    )
    registry: referencing.Registry[Any] = referencing.Registry()
    registry = referencing.Resource.from_contents(schema) @ registry
    registry = referencing.Resource.from_contents(definitions) @ registry
    return jsonschema.Draft202012Validator(schema, registry=registry)


def validate_builtin(obj: Mapping[str, Any]) -> None:
    """Check a built-in kind (Ingress, Deployment, Service, Lease, ...) strictly."""
    _check(_builtin_validator(str(obj.get("apiVersion", "")), str(obj.get("kind", ""))), obj)
