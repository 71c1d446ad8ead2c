"""Kubernetes Events for rollout transitions: audit entries in, core v1 Events out.

In: an API client, and the engine's `AuditEntry` values (through `EventAudit`,
which wraps the audit sink the engine writes to) or a reason and message from
the controller (`EventRecorder.emit`). Out: one core v1 `Event` per entry,
attached to the CanaryDeployment (`involvedObject`), so `kubectl describe
canarydeployment NAME` and `kubectl get events` tell a user what happened and
why: the reason is the phase entered (`Progressing`, `RolledBack`) or, when
the phase stays, the action in CamelCase (`Repin`); the message is the
transition with its explanation, for example
`Progressing -> RollingBack (rollback by controller, weight 20): rollback:
latency: canary.p99 = 412ms > 300ms, true for 2m10s`.

Transitions into RollingBack, RolledBack and Failed, and refused specs, are
`Warning` events; the others `Normal`. The audit log is written first and is
the record: an Event that cannot be created is logged and dropped, since the
API server may shed Events under load and a rollout must not wait for them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from kubernetes.aio import client
from kubernetes.aio.client.exceptions import ApiException

from adapters.kube.models import GROUP, KIND, VERSION
from adapters.kube.store import rfc3339, split_key
from engine.model import AuditEntry, Phase
from engine.ports import AuditSink, Clock

log = logging.getLogger("codedance.kube.events")

COMPONENT = "codedance-controller"
REPORTING = "codedance.io/controller"
MESSAGE_LIMIT = 1024  # the API server refuses longer Event messages
WARNING_PHASES = frozenset({Phase.ROLLING_BACK, Phase.ROLLED_BACK, Phase.FAILED})


@dataclass(frozen=True, slots=True)
class Involved:
    """The object an Event is about."""

    namespace: str
    name: str
    uid: str = ""


def camel(word: str) -> str:
    """`repin` -> `Repin`, `spec-changed` -> `SpecChanged`: an Event reason."""
    return "".join(part[:1].upper() + part[1:] for part in word.replace("_", "-").split("-"))


def describe(entry: AuditEntry) -> tuple[str, str, str]:
    """(type, reason, message) of the Event for one audit entry."""
    if entry.from_phase is not entry.to_phase:
        reason = entry.to_phase.value
        move = f"{entry.from_phase.value} -> {entry.to_phase.value}"
    else:
        reason = camel(entry.action)
        move = entry.to_phase.value
    rule = f", rule {entry.rule}" if entry.rule else ""
    message = f"{move} ({entry.action} by {entry.actor}, weight {entry.weight}{rule})"
    if entry.explanation:
        message += f": {entry.explanation}"
    moved = entry.from_phase is not entry.to_phase
    kind = "Warning" if moved and entry.to_phase in WARNING_PHASES else "Normal"
    return kind, reason, message


class EventRecorder:
    """Creates Events about CanaryDeployments; `remember` gives it an object's uid."""

    def __init__(self, api_client: client.ApiClient, *, clock: Clock, instance: str = "") -> None:
        self._api = client.CoreV1Api(api_client)
        self._clock = clock
        self._instance = instance
        self._uids: dict[str, str] = {}
        self.failures = 0

    def remember(self, key: str, uid: str) -> None:
        self._uids[key] = uid

    def forget(self, key: str) -> None:
        self._uids.pop(key, None)

    async def emit(self, key: str, reason: str, message: str, *, warning: bool = False) -> None:
        namespace, name = split_key(key)
        if len(message) > MESSAGE_LIMIT:
            message = message[: MESSAGE_LIMIT - 3] + "..."
        stamp = rfc3339(self._clock.now())
        involved = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": KIND,
            "namespace": namespace,
            "name": name,
        }
        uid = self._uids.get(key)
        if uid:
            involved["uid"] = uid
        body: dict[str, object] = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{name}.", "namespace": namespace},
            "involvedObject": involved,
            "reason": reason,
            "message": message,
            "type": "Warning" if warning else "Normal",
            "source": {"component": COMPONENT},
            "reportingComponent": REPORTING,
            "reportingInstance": self._instance or COMPONENT,
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        try:
            await self._api.create_namespaced_event(namespace, body)  # type: ignore[arg-type]
        except ApiException as error:
            self.failures += 1
            log.warning(
                "could not record the event %s for %s: %s %s",
                reason,
                key,
                error.status,
                error.reason,
            )


class EventAudit:
    """An `AuditSink` that writes to `inner` and then creates the matching Event."""

    def __init__(self, inner: AuditSink, events: EventRecorder) -> None:
        self.inner = inner
        self.events = events

    async def record(self, entry: AuditEntry) -> None:
        await self.inner.record(entry)
        kind, reason, message = describe(entry)
        await self.events.emit(entry.rollout, reason, message, warning=kind == "Warning")
