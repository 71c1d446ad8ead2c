"""The CanaryDeployment CustomResourceDefinition, generated from the pydantic models.

In: the models of `adapters.kube.models` (their JSON Schema, by alias). Out:
`crd_manifest()`, the CustomResourceDefinition as a dict, which
`codedance crd` prints into `deploy/crd.yaml`.

Pydantic writes JSON Schema; the API server wants a structural OpenAPI v3
schema. `structural()` converts one into the other:

- every `$ref` is inlined and `$defs` and `title` are dropped (the API server
  resolves no references);
- `anyOf: [X, {type: null}]`, pydantic's `X | None`, becomes X with
  `nullable: true`;
- `const` becomes a one-value `enum` (OpenAPI v3.0 has no `const`);
- `additionalProperties: false` is dropped: an object with `properties`
  may not say it, and the API server prunes unknown fields anyway;
  `additionalProperties: true` (a free-form `dict[str, Any]`) becomes
  `x-kubernetes-preserve-unknown-fields: true`;
- a `null` default is dropped and null members of an object default are left
  out (the API server would store them as explicit nulls); the status keeps
  no defaults at all: the controller writes it, and a reader's model fills
  in what is missing;
- a description's line breaks become spaces (`kubectl explain` wraps it).

Descriptions, patterns, bounds, enums, required fields and the `anyOf`/`oneOf`
checks the models declare stay as written. A keyword the conversion does not
know raises `ValueError` at generation time: a model change that the API
server could not take fails `codedance crd` and its test, not a cluster.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from adapters.kube.models import (
    GROUP,
    KIND,
    PLURAL,
    SHORT_NAMES,
    SINGULAR,
    VERSION,
    CanaryDeployment,
    CanaryDeploymentStatus,
)

CRD_NAME = f"{PLURAL}.{GROUP}"
CATEGORIES = ["all", "codedance"]
LABELS = {"app.kubernetes.io/name": "codedance", "app.kubernetes.io/part-of": "codedance"}

# What `kubectl get canarydeployments` shows, besides the name.
PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase",
     "description": "where the rollout is"},
    {"name": "Weight", "type": "integer", "jsonPath": ".status.weight",
     "description": "the canary's share of traffic, in percent"},
    {"name": "Step", "type": "integer", "jsonPath": ".status.step",
     "description": "the current step of the strategy"},
    {"name": "Health", "type": "integer", "jsonPath": ".status.health",
     "description": "the last verdict's health score, 0 to 100"},
    {"name": "Last verdict", "type": "string", "jsonPath": ".status.lastVerdict",
     "description": "the last verdict's explanation"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]

# The keywords a structural schema may carry, in the order they are written out
# (a description first, so a reader of deploy/crd.yaml sees what before how).
_ORDER = (
    "description", "type", "format", "nullable", "enum", "default", "pattern",
    "minLength", "maxLength", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
    "multipleOf", "minItems", "maxItems", "uniqueItems", "minProperties", "maxProperties",
    "items", "properties", "required", "additionalProperties", "anyOf", "oneOf", "allOf",
    "not", "x-kubernetes-preserve-unknown-fields", "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys", "x-kubernetes-map-type", "x-kubernetes-int-or-string",
    "x-kubernetes-validations", "x-kubernetes-embedded-resource",
)
_KNOWN = frozenset(_ORDER)
_DROPPED = frozenset({"title", "$defs"})
_JUNCTORS = ("anyOf", "oneOf", "allOf")


def structural(schema: Mapping[str, Any], *, defaults: bool = True) -> dict[str, Any]:
    """A pydantic JSON Schema (with its `$defs`) as a structural OpenAPI v3 schema.

    `defaults=False` leaves every default out.
    """
    return _Converter(schema.get("$defs", {}), defaults).convert(schema)


class _Converter:
    def __init__(self, defs: Mapping[str, Any], defaults: bool) -> None:
        self.defs = defs
        self.defaults = defaults

    def convert(self, node: Mapping[str, Any]) -> dict[str, Any]:
        node = _unwrap_optional(_inline(node, self.defs), self.defs)
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key not in _DROPPED:
                self._keyword(out, key, value)
        return {key: out[key] for key in _ORDER if key in out}

    def _keyword(self, out: dict[str, Any], key: str, value: Any) -> None:
        if key == "const":
            out["enum"] = [value]
        elif key == "description":
            out["description"] = " ".join(str(value).split())
        elif key == "default":
            if value is not None and self.defaults:
                out["default"] = _without_nulls(value)
        elif key == "additionalProperties":
            if value is True:
                out["x-kubernetes-preserve-unknown-fields"] = True
            elif isinstance(value, Mapping):
                out["additionalProperties"] = self.convert(value)
            # False: objects with properties may not say it; the API server prunes
        elif key == "properties":
            out["properties"] = {name: self.convert(sub) for name, sub in value.items()}
        elif key in ("items", "not"):
            out[key] = self.convert(value)
        elif key in _JUNCTORS:
            out[key] = [self.convert(branch) for branch in value]
        elif key in _KNOWN:
            out[key] = copy.deepcopy(value)
        else:
            raise ValueError(f"the CRD schema cannot express the JSON Schema keyword {key!r}")


def _inline(node: Mapping[str, Any], defs: Mapping[str, Any]) -> Mapping[str, Any]:
    """The node with its `$ref` replaced by the definition; the node's own keys win."""
    ref = node.get("$ref")
    if ref is None:
        return node
    prefix = "#/$defs/"
    if not isinstance(ref, str) or not ref.startswith(prefix):
        raise ValueError(f"cannot inline the reference {ref!r}")
    target = _inline(defs[ref.removeprefix(prefix)], defs)
    return {**target, **{k: v for k, v in node.items() if k != "$ref"}}


def _unwrap_optional(node: Mapping[str, Any], defs: Mapping[str, Any]) -> Mapping[str, Any]:
    """`anyOf: [X, {type: null}]` -> X with `nullable: true` (the node's own keys win)."""
    branches = node.get("anyOf")
    if not isinstance(branches, list):
        return node
    kept = [b for b in branches if b != {"type": "null"}]
    if len(kept) == len(branches):
        return node
    if len(kept) != 1:
        raise ValueError(f"cannot express a union of {len(kept)} types and null")
    inner = _unwrap_optional(_inline(kept[0], defs), defs)
    rest = {k: v for k, v in node.items() if k != "anyOf"}
    return {**inner, **rest, "nullable": True}


def _without_nulls(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def openapi_schema() -> dict[str, Any]:
    """The openAPIV3Schema of the served version: the resource, spec and status."""
    resource = CanaryDeployment.model_json_schema(by_alias=True)
    spec = structural(resource)["properties"]["spec"]
    status = structural(CanaryDeploymentStatus.model_json_schema(by_alias=True), defaults=False)
    # The models' docstrings speak to programmers; these two show in `kubectl explain`.
    # (Both keys exist already, first in order, so the assignments keep the layout.)
    spec["description"] = (
        "What to release, and how: the stable Deployment, the new version, the strategy, "
        "the traffic provider and the policy."
    )
    status["description"] = (
        "The rollout as the controller last recorded it; a restarted controller resumes "
        "from it. Times are seconds since the epoch."
    )
    return {
        "description": (
            "A release request: Codedance moves traffic from the stable Deployment "
            "to the new version step by step while the policy holds, and promotes "
            "or rolls back."
        ),
        "type": "object",
        "properties": {
            # the API server fills these in and checks them itself
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
        "required": ["spec"],
    }


def crd_manifest() -> dict[str, Any]:
    """The CustomResourceDefinition that `deploy/crd.yaml` holds."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": CRD_NAME, "labels": dict(LABELS)},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": list(SHORT_NAMES),
                "categories": list(CATEGORIES),
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": copy.deepcopy(PRINTER_COLUMNS),
                    "schema": {"openAPIV3Schema": openapi_schema()},
                }
            ],
        },
    }
