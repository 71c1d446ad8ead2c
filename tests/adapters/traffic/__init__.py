"""Tests of the Kubernetes traffic routers, and the helpers they share on the real control plane.

- `assert_golden(provider, step, obj, namespace)` compares an object as the
  real API server stored it, without the metadata the server manages
  (resourceVersion, uid, creationTimestamp, generation, managedFields) and
  with the test's fresh namespace written as `shop`, with
  `tests/adapters/golden/<provider>/<step>.yaml` (one YAML object per file,
  keys in the order the server returned them). Everything else the server
  stores is in the file: its defaults, and the key order it chose (a custom
  resource's keys come back sorted, whatever order the user wrote).
  `CODEDANCE_UPDATE_GOLDEN=1 pytest tests/adapters/traffic` writes the files
  instead; review the diff before keeping it.
- `controller_requests(control_plane, namespace, resource)`: what the
  controller's ServiceAccount asked of the API server in that namespace, from
  the audit log; `settled(...)` returns them once the log holds every request
  made so far (the server writes an event as a request completes), and
  `writes(events)` keeps the writes as (verb, name, code).
- `InstantClock`: the engine's clock for a read-back retry that should not wait.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml
from kubernetes.aio import client

from tests.cluster.controlplane import CONTROLLER_USER, ControlPlane
from tests.cluster.kube import AuditEvent, audit_events, settled_requests

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
SERVER_SET = ("resourceVersion", "uid", "creationTimestamp", "generation", "managedFields")
GOLDEN_NAMESPACE = "shop"
WRITE_VERBS = ("create", "update", "patch", "delete")


def without_server_fields(obj: dict[str, Any]) -> dict[str, Any]:
    """A copy of `obj` without the metadata the API server manages."""
    out = copy.deepcopy(obj)
    meta = out.get("metadata") or {}
    for key in SERVER_SET:
        meta.pop(key, None)
    return out


def assert_golden(provider: str, step: str, obj: dict[str, Any], namespace: str) -> None:
    path = GOLDEN / provider / f"{step}.yaml"
    text = yaml.safe_dump(without_server_fields(obj), sort_keys=False)
    # The namespace is fresh per test (t-<8 hex digits>), so no other text contains it.
    text = text.replace(namespace, GOLDEN_NAMESPACE)
    if os.environ.get("CODEDANCE_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return
    assert path.exists(), f"{path} is missing; run with CODEDANCE_UPDATE_GOLDEN=1 to write it"
    assert text == path.read_text(encoding="utf-8"), f"{obj.get('kind')} differs from {path}"


def controller_requests(
    control_plane: ControlPlane, namespace: str, resource: str, name: str | None = None
) -> list[AuditEvent]:
    """The controller's requests for `resource` (and `name`) in `namespace`, in order."""
    return [
        event
        for event in audit_events(control_plane.audit_log, CONTROLLER_USER)
        if event.namespace == namespace
        and event.resource == resource
        and (name is None or event.name == name)
    ]


async def settled(
    control_plane: ControlPlane, controller_api: client.ApiClient, namespace: str, resource: str
) -> list[AuditEvent]:
    """The controller's requests for `resource` so far, once the audit log holds them all."""
    found = await settled_requests(control_plane, controller_api, CONTROLLER_USER, namespace)
    return [event for event in found if event.resource == resource]


def writes(events: list[AuditEvent]) -> list[tuple[str, str, int]]:
    """(verb, name, HTTP code) of each write among `events`."""
    return [(e.verb, e.name, e.code) for e in events if e.verb in WRITE_VERBS]


class InstantClock:
    """The engine's clock for a retry that should not wait."""

    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t

    async def sleep_until(self, t: float) -> None:
        self.t = max(self.t, t)
