"""Rollout state on the CanaryDeployment's status subresource, as a `RolloutStore`.

In: an API client; keys `namespace/name` naming a CanaryDeployment; the
engine's `RolloutStatus`. Out: `save` writes it to `.status` (through
`/status`, so the spec is never touched) as `status_of` shapes it, with the
spec's generation as `observedGeneration` and three conditions a user and
`kubectl wait` read:

- Ready: True once the rollout Succeeded;
- Progressing: True while the rollout is under way (from Pending to Promoting
  or RollingBack);
- Degraded: True when it rolls back, rolled back or failed.

Each has the phase as its reason and the status's message (else the last
verdict's explanation) as its message; `lastTransitionTime` changes only when
the condition's status does. `load` reads it back (`status_from`), None when
the object or its status does not exist yet.

Every write carries the resourceVersion read: when the controller (or a
person's `codedance pause`) wrote in between, the API answers 409 and the
status is re-read and written again, at most `CONFLICT_ATTEMPTS` times.
"""

from __future__ import annotations

import datetime
import functools
from typing import Any, cast

from kubernetes.aio import client
from kubernetes.aio.client.exceptions import ApiException

from adapters.kube import retry
from adapters.kube.models import GROUP, PLURAL, VERSION, status_from, status_of
from engine.model import Phase, RolloutStatus
from engine.ports import Clock

CONFLICT_ATTEMPTS = 5
ACTIVE = frozenset(
    {
        Phase.PENDING,
        Phase.INITIALIZING,
        Phase.PROGRESSING,
        Phase.PAUSED,
        Phase.WAITING_FOR_APPROVAL,
        Phase.PROMOTING,
        Phase.ROLLING_BACK,
    }
)
DEGRADED = frozenset({Phase.ROLLING_BACK, Phase.ROLLED_BACK, Phase.FAILED})


class StoreError(Exception):
    """The status could not be read or written; the message says which object and why."""


def split_key(key: str) -> tuple[str, str]:
    namespace, sep, name = key.partition("/")
    if not sep or not namespace or not name:
        raise ValueError(f"a rollout key is namespace/name, not {key!r}")
    return namespace, name


def rfc3339(seconds: float) -> str:
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def conditions(
    status: RolloutStatus, old: list[dict[str, Any]], *, now: float, generation: int | None
) -> list[dict[str, Any]]:
    """Ready, Progressing and Degraded for a status, keeping unchanged transition times."""
    verdict = status.last_verdict
    message = status.message or (verdict.explanation if verdict is not None else "")
    reason = status.phase.value
    previous = {c.get("type"): c for c in old}
    out = []
    for kind, true in (
        ("Ready", status.phase is Phase.SUCCEEDED),
        ("Progressing", status.phase in ACTIVE),
        ("Degraded", status.phase in DEGRADED),
    ):
        value = "True" if true else "False"
        before = previous.get(kind) or {}
        since = before.get("lastTransitionTime") if before.get("status") == value else None
        condition: dict[str, Any] = {
            "type": kind,
            "status": value,
            "reason": reason,
            "message": message,
            "lastTransitionTime": since or rfc3339(now),
        }
        if generation is not None:
            condition["observedGeneration"] = generation
        out.append(condition)
    return out


class StatusStore:
    """`RolloutStore` on CanaryDeployment objects."""

    def __init__(self, api_client: client.ApiClient, *, clock: Clock | None = None) -> None:
        self._api = client.CustomObjectsApi(api_client)
        self._clock: Clock = clock or retry.LoopClock()

    async def load(self, key: str) -> RolloutStatus | None:
        namespace, name = split_key(key)
        obj = await self._read(namespace, name)
        if obj is None:
            return None
        return status_from(obj.get("status") or {})

    async def save(self, key: str, status: RolloutStatus) -> None:
        namespace, name = split_key(key)
        for _ in range(CONFLICT_ATTEMPTS):
            obj = await self._read(namespace, name)
            if obj is None:
                raise StoreError(f"CanaryDeployment {key} not found")
            meta = obj.get("metadata") or {}
            generation = meta.get("generation")
            written = status_of(status, generation=generation)
            old = (obj.get("status") or {}).get("conditions") or []
            written["conditions"] = conditions(
                status, old, now=self._clock.now(), generation=generation
            )
            body = {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": obj.get("kind"),
                "metadata": {
                    "name": name,
                    "namespace": namespace,
                    "resourceVersion": meta.get("resourceVersion"),
                },
                "status": written,
            }
            try:
                await retry.call(
                    functools.partial(
                        self._api.replace_namespaced_custom_object_status,
                        GROUP,
                        VERSION,
                        namespace,
                        PLURAL,
                        name,
                        body,
                    ),
                    clock=self._clock,
                )
                return
            except ApiException as error:
                if not retry.is_conflict(error):
                    raise StoreError(
                        f"cannot write the status of CanaryDeployment {key}: "
                        f"{error.status} {error.reason}"
                    ) from None
        raise StoreError(
            f"CanaryDeployment {key} kept changing: {CONFLICT_ATTEMPTS} conflicting writes"
        )

    async def _read(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            obj = await retry.call(
                lambda: self._api.get_namespaced_custom_object(
                    GROUP, VERSION, namespace, PLURAL, name
                ),
                clock=self._clock,
            )
        except ApiException as error:
            if retry.is_not_found(error):
                return None
            raise StoreError(
                f"cannot read CanaryDeployment {namespace}/{name}: {error.status} {error.reason}"
            ) from None
        return dict(cast("dict[str, Any]", obj))
