"""Small helpers for tests on the real control plane: objects as dicts, waiting, the audit log.

In: an admin `kubernetes.aio` ApiClient and a namespace. Out: `Objects`
(create, read, patch, delete any kind by apiVersion and kind, through the
dynamic client, as plain dicts), `eventually` (poll a condition with a
deadline, never a bare sleep), and `audit_events` (what a given user really
asked of the API server, from its audit log; `settled_requests` waits until
the log holds every request made so far).
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes.aio import client
from kubernetes.aio.client.exceptions import ApiException
from kubernetes.aio.dynamic import DynamicClient

from tests.cluster.controlplane import ControlPlane

JsonObject = dict[str, Any]


async def eventually(
    check: Callable[[], Awaitable[Any]], timeout: float = 30.0, every: float = 0.1
) -> Any:
    """Poll `check` until it returns something true, and return that; fail after `timeout`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: Any = None
    while True:
        last = await check()
        if last:
            return last
        if loop.time() > deadline:
            raise AssertionError(f"still {last!r} after {timeout}s: {check.__qualname__}")
        await asyncio.sleep(every)


class Objects:
    """Any Kubernetes object as a dict, in one namespace unless told otherwise."""

    def __init__(self, api: client.ApiClient, namespace: str) -> None:
        self.api = api
        self.namespace = namespace
        self._dynamic: DynamicClient | None = None

    async def _resource(self, api_version: str, kind: str) -> Any:
        if self._dynamic is None:
            self._dynamic = await DynamicClient(self.api)  # type: ignore[no-untyped-call]
        return await self._dynamic.resources.get(api_version=api_version, kind=kind)

    async def create(self, obj: JsonObject, namespace: str | None = None) -> JsonObject:
        resource = await self._resource(obj["apiVersion"], obj["kind"])
        ns = namespace or obj.get("metadata", {}).get("namespace") or self.namespace
        created = await self._dynamic.create(resource, body=obj, namespace=ns)  # type: ignore[union-attr]
        return dict(created.to_dict())

    async def read(
        self, api_version: str, kind: str, name: str, namespace: str | None = None
    ) -> JsonObject | None:
        resource = await self._resource(api_version, kind)
        try:
            found = await self._dynamic.get(  # type: ignore[union-attr]
                resource, name=name, namespace=namespace or self.namespace
            )
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        return dict(found.to_dict())

    async def list(
        self, api_version: str, kind: str, label_selector: str = "", namespace: str | None = None
    ) -> list[JsonObject]:
        resource = await self._resource(api_version, kind)
        found = await self._dynamic.get(  # type: ignore[union-attr]
            resource, namespace=namespace or self.namespace, label_selector=label_selector
        )
        return [dict(item) for item in found.to_dict()["items"]]

    async def patch(
        self,
        api_version: str,
        kind: str,
        name: str,
        patch: JsonObject,
        namespace: str | None = None,
    ) -> JsonObject:
        resource = await self._resource(api_version, kind)
        patched = await self._dynamic.patch(  # type: ignore[union-attr]
            resource,
            body=patch,
            name=name,
            namespace=namespace or self.namespace,
            content_type="application/merge-patch+json",
        )
        return dict(patched.to_dict())

    async def delete(
        self, api_version: str, kind: str, name: str, namespace: str | None = None
    ) -> None:
        resource = await self._resource(api_version, kind)
        try:
            await self._dynamic.delete(  # type: ignore[union-attr]
                resource, name=name, namespace=namespace or self.namespace
            )
        except ApiException as error:
            if error.status != 404:
                raise


@dataclass(frozen=True)
class AuditEvent:
    """One request as the API server recorded it (audit level Metadata)."""

    user: str
    verb: str
    group: str
    resource: str
    subresource: str
    namespace: str
    name: str
    code: int
    # RBAC's word on the request: a 403 with "allow" came from admission, not RBAC
    decision: str = ""

    @classmethod
    def parse(cls, line: str) -> AuditEvent:
        event = json.loads(line)
        ref = event.get("objectRef") or {}
        return cls(
            user=event["user"]["username"],
            verb=event["verb"],
            group=ref.get("apiGroup", ""),
            resource=ref.get("resource", ""),
            subresource=ref.get("subresource", ""),
            namespace=ref.get("namespace", ""),
            name=ref.get("name", ""),
            code=int((event.get("responseStatus") or {}).get("code", 0)),
            decision=(event.get("annotations") or {}).get("authorization.k8s.io/decision", ""),
        )


def audit_events(log: Path, user: str | None = None) -> list[AuditEvent]:
    """Every completed request in the audit log, of `user` if given."""
    events = []
    try:
        text = log.read_text()
    except FileNotFoundError:
        return []
    # the API server may be writing the last line as we read: only whole lines count
    complete = text[: text.rfind("\n") + 1]
    for line in complete.splitlines():
        if not line.strip():
            continue
        event = AuditEvent.parse(line)
        if user is None or event.user == user:
            events.append(event)
    return events


async def settled_requests(
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
