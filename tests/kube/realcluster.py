"""Helpers for adapter tests on the real control plane: what a client asked, a writer between.

In: the session's `ControlPlane`, an API client, a namespace. Out:

- `requests_of(plane, api, user, namespace)`: the requests `user` made in
  `namespace` as the API server's audit log recorded them (verb, resource,
  subresource, name, answer code). The log is written after a response is
  sent, so it first makes one marked request of its own and waits until the
  log shows it: every request made before is then in the log as well.
- `before_each(api, monkeypatch, method, path_suffix, action)`: runs `action`
  (an admin write, say) just before each request of `api` with that method
  whose path ends with `path_suffix`; it gets the request body and returns
  whether the request should still hook (False stops hooking). This makes a
  real concurrent writer at a chosen moment, so the server answers a real 409.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import pytest
from kubernetes.aio import client
from kubernetes.aio.client.exceptions import ApiException

from tests.cluster.controlplane import ControlPlane
from tests.cluster.kube import AuditEvent, audit_events, eventually


async def requests_of(
    plane: ControlPlane, api: client.ApiClient, user: str, namespace: str
) -> list[AuditEvent]:
    """The requests `user` (who must be the one `api` acts as) made in `namespace`, in order."""
    mark = f"audit-mark-{secrets.token_hex(4)}"
    try:
        await client.CustomObjectsApi(api).get_namespaced_custom_object(
            "apps", "v1", namespace, "deployments", mark
        )
    except ApiException as error:
        if error.status not in (403, 404):
            raise

    async def marked() -> list[AuditEvent] | None:
        events = audit_events(plane.audit_log, user)
        if any(e.name == mark for e in events):
            return events
        return None

    events = await eventually(marked, timeout=10)
    return [e for e in events if e.namespace == namespace and e.name != mark]


Action = Callable[[Any], Awaitable[bool]]


def before_each(
    api: client.ApiClient,
    monkeypatch: pytest.MonkeyPatch,
    method: str,
    path_suffix: str,
    action: Action,
) -> None:
    """Run `action(body)` before each matching request of `api` while it keeps returning True."""
    original = api.call_api
    active = True

    async def call_api(verb: str, url: str, *args: Any, **kwargs: Any) -> Any:
        nonlocal active
        if active and verb == method and urlsplit(url).path.endswith(path_suffix):
            body = kwargs.get("body", args[1] if len(args) > 1 else None)
            active = await action(body)
        return await original(verb, url, *args, **kwargs)

    monkeypatch.setattr(api, "call_api", call_api)
