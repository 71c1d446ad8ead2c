"""What goes wrong with a user's traffic object, and how the routers react to it.

In: an object's identity and the API's answers. Out:

- `TrafficObjectError`: the one error a router raises about an object, with a
  message that names it and, when the object is malformed, the field
  ("VirtualService shop/checkout: spec.http[0].route has no destination for
  host checkout-canary"), and `TrafficObjectNotFound` ("VirtualService
  shop/checkout not found");
- `api_error`: an `ApiException` of the Kubernetes client turned into that
  error, so the engine logs one line, never a dump of HTTP headers; a write
  the API server refuses (422 Invalid: the CRD's schema or CEL rules, or a
  built-in kind's validation) names the field the server named
  ("HTTPRoute shop/checkout: spec.rules[1].backendRefs is refused by the API
  server: Too many: 17: must have at most 16 items");
- `retry_on_conflict`: read, change and write again when the API answers
  409 because someone wrote between our read and our write (every write
  carries the resourceVersion it read: optimistic concurrency);
- `check_weight`: the ValueError for a weight outside 0..100;
- `RevertWatch`: remembers the weight each object was last given, and reports
  once when the object says otherwise, which means someone else (GitOps, a
  person, another controller) put other weights back.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from kubernetes.aio.client.exceptions import ApiException

from engine.ports import ObjectGone

log = logging.getLogger("codedance.traffic")

T = TypeVar("T")

# How often a write is tried again after a 409 before the router gives up;
# the engine retries a failed step anyway, with backoff.
CONFLICT_ATTEMPTS = 5

RevertCallback = Callable[[str, int, int], None]
"""`on_revert(object_name, expected, found)`: called once per revert seen."""


@dataclass(frozen=True, slots=True)
class ObjectName:
    """A Kubernetes object as messages name it: `VirtualService shop/checkout`."""

    kind: str
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"

    @classmethod
    def of(cls, obj: Mapping[str, Any], kind: str | None = None) -> ObjectName:
        meta = obj.get("metadata") or {}
        return cls(
            kind or str(obj.get("kind", "object")),
            str(meta.get("namespace", "")),
            str(meta.get("name", "")),
        )


class TrafficObjectError(Exception):
    """A user's object is missing, malformed, or could not be read or written.

    `field` is the path of the offending field (`spec.http[0].route`), None
    when the problem is the whole object.
    """

    def __init__(self, obj: ObjectName, problem: str, field: str | None = None) -> None:
        self.object = obj
        self.field = field
        self.problem = problem
        where = f"{field} " if field else ""
        super().__init__(f"{obj}: {where}{problem}")


class TrafficObjectNotFound(TrafficObjectError, ObjectGone):
    """The object does not exist (the API answered 404)."""

    def __init__(self, obj: ObjectName) -> None:
        super().__init__(obj, "not found")
        self.args = (f"{obj} not found",)


def check_weight(weight: int) -> None:
    """A weight the engine asks for is a whole percentage; anything else is a bug, not a state."""
    if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= 100:
        raise ValueError(f"weight {weight!r} is not an integer between 0 and 100")


def _api_message(e: ApiException) -> str:
    """The `message` of a Kubernetes Status body, else the HTTP reason."""
    body = e.body
    if isinstance(body, bytes | str) and body:
        try:
            status = json.loads(body)
        except ValueError:
            status = None
        if isinstance(status, dict) and status.get("message"):
            return str(status["message"])
    return str(e.reason or "")


# The real API server adds this cause to a CRD's 422 when schema errors kept it from
# running the CEL rules; it says nothing about the object, so the error leaves it out.
_NOT_CHECKED = "some validation rules were not checked"


def _causes(e: ApiException) -> list[tuple[str, str]]:
    """(field, message) of each cause in a 422 Status' details, in the server's order."""
    try:
        status = json.loads(e.body) if isinstance(e.body, bytes | str) and e.body else None
    except ValueError:
        return []
    details = status.get("details") if isinstance(status, dict) else None
    causes = details.get("causes") if isinstance(details, dict) else None
    found = []
    for cause in causes if isinstance(causes, list) else []:
        if not isinstance(cause, dict):
            continue
        field, message = str(cause.get("field") or ""), str(cause.get("message") or "")
        if _NOT_CHECKED in message:
            continue
        found.append(("" if field == "<nil>" else field, message))
    return found


def api_error(obj: ObjectName, e: ApiException, doing: str) -> TrafficObjectError:
    """The router's error for an API failure while `doing` something to `obj`."""
    if e.status == 404:
        return TrafficObjectNotFound(obj)
    causes = _causes(e) if e.status == 422 else []
    if causes:
        # The object we wrote is invalid: name the server's field, not the HTTP exchange.
        (field, message), rest = causes[0], causes[1:]
        problem = f"is refused by the API server: {message}"
        problem += "".join(f"; {f or 'the object'}: {m}" for f, m in rest)
        return TrafficObjectError(obj, problem, field or None)
    return TrafficObjectError(obj, f"{doing} failed: HTTP {e.status}: {_api_message(e)}")


async def retry_on_conflict(
    obj: ObjectName, attempt: Callable[[], Awaitable[T]], attempts: int = CONFLICT_ATTEMPTS
) -> T:
    """Run `attempt` (read, change, write) again while the write meets a 409."""
    for n in range(1, attempts + 1):
        try:
            return await attempt()
        except ApiException as e:
            if e.status != 409:
                raise
            log.info("%s changed between read and write (attempt %d); reading it again", obj, n)
    raise TrafficObjectError(obj, f"changed by another writer {attempts} times in a row")


class RevertWatch:
    """The weight last written to each object, and the reverts seen since.

    A router calls `wrote` after every write (and after a write it skipped
    because the object already had the weights), and `saw` with the weight
    it reads. When the object differs from what was written, `saw` returns
    True and calls `on_revert` (once for each different weight found, so the
    engine's retries do not report the same revert again and again).
    """

    def __init__(self, on_revert: RevertCallback | None = None) -> None:
        self._on_revert = on_revert or _log_revert
        self._expected: dict[ObjectName, int] = {}
        self._reported: dict[ObjectName, int] = {}

    def expected(self, obj: ObjectName) -> int | None:
        return self._expected.get(obj)

    def wrote(self, obj: ObjectName, weight: int) -> None:
        self._expected[obj] = weight
        self._reported.pop(obj, None)

    def saw(self, obj: ObjectName, found: int) -> bool:
        expected = self._expected.get(obj)
        if expected is None or expected == found:
            self._reported.pop(obj, None)
            return False
        if self._reported.get(obj) != found:
            self._reported[obj] = found
            self._on_revert(str(obj), expected, found)
        return True

    def forget(self, obj: ObjectName) -> None:
        self._expected.pop(obj, None)
        self._reported.pop(obj, None)


def _log_revert(object_name: str, expected: int, found: int) -> None:
    log.warning(
        "%s was changed by someone else: canary weight %d, we set %d; re-applying",
        object_name,
        found,
        expected,
    )
