"""A Kubernetes API server double, served over HTTP on 127.0.0.1 for the real client.

In: HTTP requests from `kubernetes.aio` (CustomObjectsApi, AppsV1Api, ...), and
set-up calls from a test: `register` a resource, `seed` or `set_status` an
object, inject faults (`fail`, `conflict_next_write`, `expire_next_watch`,
`compact`, `close_watches`), play a cluster controller (`on_write`).
Out: the answers a real API server gives where Codedance depends on them, a
journal of every request with its answer (`calls`, `writes`), the stored
objects (`read`, `list_objects`, and `objects`, kmock's container with every
version), the open watches (`watches`), and `wait_for(predicate)`.

What a real server does and this one does too: create 201 (409 AlreadyExists),
get 200/404 with the same Status objects (reason, code, details), replace 200
(201 only for resources that allow create-on-update, such as Events), merge,
JSON and strategic-merge patches (the last treated as a merge patch, and 415
for custom resources as the real server answers), delete 200 with finalizers
holding the object (deletionTimestamp set) until they are removed; one global
resourceVersion bumped on every write and never on a no-op write; generation
bumped on spec changes only; uid and creationTimestamp; 409 Conflict on a stale
resourceVersion or failed delete precondition; 422 Invalid from a per-resource
validator (the CRD schemas of `tests/kube/schemas.py`); the status subresource
(`.../status` writes change only .status, the main endpoint ignores .status);
lists with resourceVersion, label selectors (=, ==, !=, in, notin, exists),
field selectors and limit/continue; watches from a resourceVersion with ADDED,
MODIFIED and DELETED events as newline-delimited JSON (an ERROR event with a 410
Status when the resourceVersion is compacted away); namespaced and cluster-scoped
resources, several served versions sharing one storage; discovery.

Where it differs on purpose: unknown fields are rejected (422) instead of pruned,
so an object our code writes with a misspelt field fails the test; CEL rules,
server-side apply, managedFields, namespaces' existence, garbage collection
(propagationPolicy is ignored) and the built-in controllers are not emulated.

kmock's parts (kmock 0.8, by the author of kopf): the HTTP server on loopback
(`kmock.Server`), request parsing and recording (every `kmock.Request`, and its
DSL for ad-hoc reactions such as `apiserver['get /apis/...'] << 503`, which go
before the emulation), discovery (`/api`, `/apis`, `/apis/{group}/{version}`
from `resources`), the object container with history (`ObjectsArray`), the
rendering of streamed answers (`kmock.Response`), and JSON patching (its
`jsonpatch` dependency). Ours: everything stateful. kmock's own
`KubernetesEmulator` keeps its state changes in `_handle` with simpler semantics
(a PATCH merges everything, no PUT, no resourceVersion, watches replay from the
start), which cannot be extended without replacing it, so the double builds on
its `KubernetesScaffold` instead.
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import copy
import datetime
import fnmatch
import json
import random
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import attrs
import jsonpatch
import kmock
from aiohttp import web

from tests.kube import schemas

JsonObject = dict[str, Any]
Validator = Callable[[Mapping[str, Any]], None]
Reactor = Callable[[str, JsonObject], None]

WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    410: "Expired",
    415: "UnsupportedMediaType",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}
_FAULT_MESSAGES = {
    429: "Too many requests, please try again later.",
    500: "Internal error occurred: injected fault",
    503: "the server is currently unable to handle the request",
    504: "the server was unable to return a response in the time allotted, "
    "but may still be processing the request",
}
_MODIFIED = (
    "the object has been modified; please apply your changes to the latest version and try again"
)
_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_SUBDOMAIN = re.compile(rf"{_DNS_LABEL}(\.{_DNS_LABEL})*")
_DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_NAME_PART = r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?"
_QUALIFIED = re.compile(rf"({_DNS_LABEL}(\.{_DNS_LABEL})*/)?{_NAME_PART}")
_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?")
_NAME_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # the API server's generateName alphabet
_SERVER_FIELDS = (
    "uid",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "generation",
    "resourceVersion",
)


# Kubernetes' own API groups: everything else is served from a CustomResourceDefinition.
BUILTIN_GROUPS = frozenset(
    {
        "",
        "apps",
        "batch",
        "autoscaling",
        "policy",
        "networking.k8s.io",
        "coordination.k8s.io",
        "events.k8s.io",
        "rbac.authorization.k8s.io",
        "storage.k8s.io",
        "apiextensions.k8s.io",
        "admissionregistration.k8s.io",
        "apiregistration.k8s.io",
        "scheduling.k8s.io",
        "node.k8s.io",
        "discovery.k8s.io",
        "certificates.k8s.io",
        "authentication.k8s.io",
        "authorization.k8s.io",
        "flowcontrol.apiserver.k8s.io",
        "resource.k8s.io",
    }
)


@dataclass(frozen=True, eq=False)
class ResourceType:
    """One registered resource: how it is addressed and which rules its writes follow."""

    group: str
    versions: tuple[str, ...]  # the first is the storage version
    plural: str
    kind: str
    namespaced: bool
    status_subresource: bool
    validator: Validator | None = None
    defaults: Mapping[str, Any] | None = None  # the CRD schema whose defaults are applied
    allow_create_on_update: bool = False
    field_labels: frozenset[str] = frozenset()
    name_rule: re.Pattern[str] = _SUBDOMAIN

    @property
    def custom(self) -> bool:
        return self.group not in BUILTIN_GROUPS

    @property
    def resource(self) -> kmock.resource:
        return kmock.resource(self.group, self.versions[0], self.plural)

    @property
    def qualified(self) -> str:
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def tracks_generation(self) -> bool:
        return self.status_subresource or self.custom

    def api_version(self, version: str | None = None) -> str:
        version = version or self.versions[0]
        return f"{self.group}/{version}" if self.group else version


@dataclass
class Call:
    """One request as the double received it, and the status it answered with."""

    method: str
    path: str
    query: dict[str, str]
    content_type: str
    body: Any
    group: str | None = None
    plural: str | None = None
    namespace: str | None = None
    name: str | None = None
    subresource: str | None = None
    status: int | None = None  # None while a watch is still streaming

    @property
    def is_write(self) -> bool:
        return self.method in WRITE_METHODS

    @property
    def ok(self) -> bool:
        return self.status is not None and self.status < 400


class ApiError(Exception):
    """An answer with a `Status` object, as the API server sends for every failure."""

    def __init__(
        self,
        code: int,
        message: str,
        *,
        reason: str | None = None,
        details: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = _REASONS.get(code, "") if reason is None else reason
        self.details = dict(details or {})
        self.headers = dict(headers or {})

    def status(self) -> JsonObject:
        body: JsonObject = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
        }
        if self.reason:
            body["reason"] = self.reason
        if self.details:
            body["details"] = self.details
        body["code"] = self.code
        return body

    def response(self) -> web.Response:
        return web.json_response(self.status(), status=self.code, headers=self.headers)


def _details(rtype: ResourceType, name: str, kind: str | None = None) -> JsonObject:
    details: JsonObject = {"name": name}
    if rtype.group:
        details["group"] = rtype.group
    details["kind"] = kind or rtype.plural
    return details


def not_found(rtype: ResourceType, name: str) -> ApiError:
    return ApiError(404, f'{rtype.qualified} "{name}" not found', details=_details(rtype, name))


def already_exists(rtype: ResourceType, name: str) -> ApiError:
    return ApiError(
        409,
        f'{rtype.qualified} "{name}" already exists',
        reason="AlreadyExists",
        details=_details(rtype, name),
    )


def conflict(rtype: ResourceType, name: str, why: str = _MODIFIED) -> ApiError:
    return ApiError(
        409,
        f'Operation cannot be fulfilled on {rtype.qualified} "{name}": {why}',
        details=_details(rtype, name),
    )


def invalid(rtype: ResourceType, name: str, causes: Iterable[tuple[str, str]]) -> ApiError:
    listed = list(causes)
    subject = f"{rtype.kind}.{rtype.group}" if rtype.group else rtype.kind
    text = ", ".join(f"{where}: {what}" for where, what in listed)
    details = _details(rtype, name, rtype.kind)
    details["causes"] = [
        {"reason": "FieldValueInvalid", "message": what, "field": where} for where, what in listed
    ]
    return ApiError(422, f'{subject} "{name}" is invalid: {text}', details=details)


def bad_request(message: str) -> ApiError:
    return ApiError(400, message)


UNKNOWN_RESOURCE = "the server could not find the requested resource"
NOT_ALLOWED = "the server does not allow this method on the requested resource"


@dataclass
class Fault:
    """The next `remaining` requests matching method, path and watch-ness fail with `status`."""

    status: int
    methods: frozenset[str] | None
    path: str | re.Pattern[str] | None
    watch: bool | None
    remaining: int
    retry_after: int | None
    message: str | None

    def matches(self, method: str, path: str, is_watch: bool) -> bool:
        if self.methods is not None and method not in self.methods:
            return False
        if self.watch is not None and self.watch != is_watch:
            return False
        if isinstance(self.path, re.Pattern):
            return self.path.search(path) is not None
        return self.path is None or fnmatch.fnmatchcase(path, self.path)

    def error(self, target: Target | None, rtype: ResourceType | None) -> ApiError:
        headers = {}
        details: JsonObject = {}
        if self.status == 429 and self.retry_after is not None:
            headers["Retry-After"] = str(self.retry_after)
            details["retryAfterSeconds"] = self.retry_after
        if self.status == 409 and rtype is not None and target is not None:
            return conflict(rtype, target.name or "", self.message or _MODIFIED)
        message = self.message or _FAULT_MESSAGES.get(self.status, "injected fault")
        return ApiError(self.status, message, details=details, headers=headers)


@dataclass(frozen=True)
class Target:
    """What a resource URL addresses."""

    group: str
    version: str
    plural: str
    namespace: str | None
    name: str | None
    subresource: str | None


def parse_path(path: str) -> Target | None:
    """`/apis/apps/v1/namespaces/ns/deployments/web/status` -> its parts; None if not a resource."""
    parts = [part for part in path.split("/") if part]
    if len(parts) >= 3 and parts[0] == "api":
        group, version, rest = "", parts[1], parts[2:]
    elif len(parts) >= 4 and parts[0] == "apis":
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        return None
    namespace = None
    if rest[0] == "namespaces" and len(rest) >= 3:
        namespace, rest = rest[1], rest[2:]
    name = rest[1] if len(rest) > 1 else None
    return Target(group, version, rest[0], namespace, name, "/".join(rest[2:]) or None)


_KEY = r"[A-Za-z0-9][-A-Za-z0-9_./]*"
_EXISTS = re.compile(rf"(!?)\s*({_KEY})")
_EQUALS = re.compile(rf"({_KEY})\s*(==|=|!=)\s*([-A-Za-z0-9_.]*)")
_SET = re.compile(rf"({_KEY})\s+(in|notin)\s*\(([^()]*)\)")


@dataclass(frozen=True)
class LabelSelector:
    """A parsed `labelSelector`: requirements that all hold."""

    requirements: tuple[tuple[str, str, frozenset[str]], ...] = ()

    @classmethod
    def parse(cls, text: str) -> LabelSelector:
        requirements: list[tuple[str, str, frozenset[str]]] = []
        depth, start = 0, 0
        pieces = []
        for index, char in enumerate(text + ","):
            depth += {"(": 1, ")": -1}.get(char, 0)
            if char == "," and depth == 0:
                pieces.append(text[start:index].strip())
                start = index + 1
        for piece in filter(None, pieces):
            if match := _EXISTS.fullmatch(piece):
                requirements.append((match[2], "!" if match[1] else "exists", frozenset()))
            elif match := _EQUALS.fullmatch(piece):
                op = "!=" if match[2] == "!=" else "in"
                requirements.append((match[1], op, frozenset({match[3]})))
            elif match := _SET.fullmatch(piece):
                values = frozenset(value.strip() for value in match[3].split(","))
                requirements.append((match[1], "!=" if match[2] == "notin" else "in", values))
            else:
                raise bad_request(f"unable to parse requirement: {piece!r}")
        return cls(tuple(requirements))

    def matches(self, labels: Mapping[str, str]) -> bool:
        for key, op, values in self.requirements:
            present = key in labels
            if op == "exists" and not present:
                return False
            if op == "!" and present:
                return False
            if op == "in" and not (present and labels[key] in values):
                return False
            if op == "!=" and present and labels[key] in values:
                return False
        return True


def _field_value(obj: Mapping[str, Any], dotted: str) -> str:
    value: Any = obj
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return "" if value is None else str(value)


def parse_field_selector(text: str, rtype: ResourceType) -> tuple[tuple[str, bool, str], ...]:
    """`metadata.name=x,status.phase!=Failed` -> (field, equal?, value) triples."""
    allowed = rtype.field_labels | {"metadata.name", "metadata.namespace"}
    requirements = []
    for piece in filter(None, (part.strip() for part in text.split(","))):
        match = re.fullmatch(r"([A-Za-z0-9_.]+)\s*(==|=|!=)\s*(.*)", piece)
        if match is None:
            raise bad_request(f"invalid field selector: {piece!r}")
        if match[1] not in allowed:
            raise bad_request(f"field label not supported: {match[1]}")
        requirements.append((match[1], match[2] != "!=", match[3]))
    return tuple(requirements)


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _spec_part(obj: Mapping[str, Any], rtype: ResourceType) -> JsonObject:
    # What generation counts: everything but metadata, and but status when it has its own endpoint.
    skipped = {"metadata", "status"} if rtype.status_subresource else {"metadata"}
    return {key: value for key, value in obj.items() if key not in skipped}


def _without_version(obj: Mapping[str, Any]) -> JsonObject:
    trimmed = copy.deepcopy(dict(obj))
    trimmed.get("metadata", {}).pop("resourceVersion", None)
    return trimmed


@dataclass(frozen=True)
class _Event:
    rv: int
    type: str
    resource: kmock.resource
    namespace: str | None
    name: str
    obj: JsonObject
    old: JsonObject | None


@dataclass(frozen=True)
class WatchInfo:
    """An open watch stream, for tests that wait until the code under test is watching."""

    plural: str
    namespace: str | None
    resource_version: str
    label_selector: str


@attrs.define(kw_only=True, eq=False)
class ApiServer(kmock.KubernetesScaffold):
    """The double. Use as `async with ApiServer() as apiserver:`; the `apiserver` fixture does."""

    clock: Callable[[], float] = attrs.field(default=time.time)
    calls: list[Call] = attrs.field(factory=list, init=False)
    _types: dict[tuple[str, str, str], ResourceType] = attrs.field(factory=dict, init=False)
    _store: kmock.ObjectsArray = attrs.field(factory=kmock.ObjectsArray, init=False)
    _log: list[_Event] = attrs.field(factory=list, init=False)
    _log_rvs: list[int] = attrs.field(factory=list, init=False)
    _rv: int = attrs.field(default=1000, init=False)
    _compacted: int = attrs.field(default=0, init=False)
    _faults: list[Fault] = attrs.field(factory=list, init=False)
    _expiring_watches: int = attrs.field(default=0, init=False)
    _watch_epoch: int = attrs.field(default=0, init=False)
    _watches: list[WatchInfo] = attrs.field(factory=list, init=False)
    _changed: asyncio.Event = attrs.field(factory=asyncio.Event, init=False)
    _reactors: dict[kmock.resource, list[Reactor]] = attrs.field(factory=dict, init=False)
    reactor_errors: list[BaseException] = attrs.field(factory=list, init=False)
    _rng: random.Random = attrs.field(factory=lambda: random.Random(0), init=False)
    _own_payloads: int = attrs.field(default=0, init=False)
    _http: kmock.Server | None = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._own_payloads = len(self._payloads)  # any payload beyond these is a test's reaction

    async def __aenter__(self) -> ApiServer:
        await super().__aenter__()
        self._http = kmock.Server(self)
        await self._http.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close_watches()  # the HTTP server waits for open handlers when it stops
        try:
            if self._http is not None:
                await self._http.__aexit__(exc_type, exc, tb)
        finally:
            self._http = None
            await super().__aexit__(exc_type, exc, tb)

    # ----------------------------------------------------------------- set-up

    def register(
        self,
        group: str,
        version: str,
        plural: str,
        kind: str,
        namespaced: bool = True,
        status_subresource: bool = True,
        schema: Mapping[str, Any] | Validator | None = None,
        *,
        also_served: Iterable[str] = (),
        allow_create_on_update: bool = False,
        field_labels: Iterable[str] = (),
        name_rule: re.Pattern[str] = _SUBDOMAIN,
    ) -> ResourceType:
        """Serve a resource. `schema`: a CRD version's openAPIV3Schema (its defaults are
        applied and it is enforced strictly) or a validator that raises ValueError (422).
        Registering again replaces the rules; stored objects stay."""
        defaults = schema if isinstance(schema, Mapping) else None
        validator = schemas.openapi_validator(schema) if isinstance(schema, Mapping) else schema
        rtype = ResourceType(
            group,
            (version, *also_served),
            plural,
            kind,
            namespaced,
            status_subresource,
            validator,
            defaults,
            allow_create_on_update,
            frozenset(field_labels),
            name_rule,
        )
        for served in rtype.versions:
            self._types[group, served, plural] = rtype
            self.resources[kmock.resource(group, served, plural)] = kmock.ResourceInfo(
                namespaced=namespaced,
                kind=kind,
                singular=kind.lower(),
                verbs={"create", "delete", "get", "list", "patch", "update", "watch"},
                subresources={"status"} if status_subresource else set(),
            )
        return rtype

    def on_write(self, ref: str, reactor: Reactor) -> None:
        """Call `reactor(event_type, obj)` soon after every stored change of a resource,
        as a controller of the cluster would (e.g. mark a Deployment's pods ready)."""
        self._reactors.setdefault(self._resolve(ref).resource, []).append(reactor)

    # ------------------------------------------------------------- inspection

    @property
    def resource_version(self) -> int:
        return self._rv

    @property
    def watches(self) -> tuple[WatchInfo, ...]:
        return tuple(self._watches)

    @property
    def objects(self) -> kmock.ObjectsArray:
        """kmock's container: `objects["apps/v1/deployments", ns, name].history` lists every
        stored version of an object (None where it was deleted)."""
        return self._store

    def read(self, ref: str, name: str, namespace: str | None = None) -> JsonObject | None:
        """A copy of the stored object, or None."""
        rtype = self._resolve(ref)
        obj = self._live(rtype, namespace if rtype.namespaced else None, name)
        return copy.deepcopy(obj) if obj is not None else None

    def list_objects(self, ref: str, namespace: str | None = None) -> list[JsonObject]:
        """Copies of the stored objects of a resource (in one namespace, or all)."""
        return [copy.deepcopy(obj) for obj in self._current(self._resolve(ref), namespace)]

    def writes(
        self,
        ref: str | None = None,
        *,
        name: str | None = None,
        namespace: str | None = None,
        status: bool | None = None,
        ok: bool | None = True,
    ) -> list[Call]:
        """Write requests (POST, PUT, PATCH, DELETE), by default only the successful ones.
        `status`: True for /status writes only, False for main-endpoint writes only."""
        rtype = self._resolve(ref) if ref is not None else None
        return [
            call
            for call in self.calls
            if call.is_write
            and (rtype is None or (call.group, call.plural) == (rtype.group, rtype.plural))
            and (name is None or call.name == name)
            and (namespace is None or call.namespace == namespace)
            and (status is None or (call.subresource == "status") == status)
            and (ok is None or call.ok == ok)
        ]

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Wait until `predicate()` holds; it is checked after every request and write."""
        async with asyncio.timeout(timeout):
            while not predicate():
                await self._changed.wait()

    # ----------------------------------------------------------- direct writes

    def seed(self, obj: Mapping[str, Any]) -> JsonObject:
        """Store an object as given, status included (create or replace), bypassing HTTP."""
        rtype = self._type_of(obj)
        meta = obj.get("metadata") or {}
        namespace = meta.get("namespace") or "default" if rtype.namespaced else None
        body = self._identified(rtype, dict(obj), rtype.versions[0], namespace, None)
        meta = body["metadata"]
        old = self._live(rtype, namespace, meta.get("name", ""))
        if old is None:
            return self._create(rtype, body, namespace, keep_status=True)
        meta["resourceVersion"] = old["metadata"]["resourceVersion"]
        return self._update(rtype, old, body, status_only=False, keep_status=True)

    def set_status(
        self,
        ref: str,
        name: str,
        status: Mapping[str, Any],
        namespace: str | None = None,
    ) -> JsonObject:
        """Replace an object's .status, as its controller would through /status."""
        rtype = self._resolve(ref)
        namespace = namespace if rtype.namespaced else None
        old = self._live(rtype, namespace, name)
        if old is None:
            raise not_found(rtype, name)
        candidate = copy.deepcopy(old)
        candidate["status"] = copy.deepcopy(dict(status))
        return self._update(rtype, old, candidate, status_only=True)

    # ------------------------------------------------------------------ faults

    def fail(
        self,
        status: int,
        *,
        method: str | Iterable[str] | None = None,
        path: str | re.Pattern[str] | None = None,
        watch: bool | None = None,
        times: int = 1,
        retry_after: int | None = 1,
        message: str | None = None,
    ) -> None:
        """The next `times` requests matching `method` (one or several), `path` (a glob or a
        regex searched in the path) and `watch` answer `status` (429, 500, 503, 409, ...)."""
        methods = (
            None
            if method is None
            else frozenset(
                [method.upper()] if isinstance(method, str) else [m.upper() for m in method]
            )
        )
        self._faults.append(Fault(status, methods, path, watch, times, retry_after, message))

    def conflict_next_write(
        self, times: int = 1, path: str | re.Pattern[str] | None = None
    ) -> None:
        """The next `times` writes answer 409 Conflict, as a concurrent writer would cause."""
        self.fail(409, method=WRITE_METHODS, path=path, times=times)

    def expire_next_watch(self, times: int = 1) -> None:
        """The next `times` watch requests get an ERROR event with a 410 Status, then end."""
        self._expiring_watches += times

    def compact(self) -> None:
        """Forget history: a watch from an older resourceVersion gets 410 Gone."""
        self._compacted = self._rv

    def close_watches(self) -> None:
        """End every open watch stream (clients see the stream close and re-watch)."""
        self._watch_epoch += 1
        self._notify()

    # -------------------------------------------------------------------- HTTP

    async def _handle(self, request: kmock.Request) -> web.StreamResponse:
        target = parse_path(request.url.path)
        content_type = (
            next(
                (value for key, value in request.headers.items() if key.lower() == "content-type"),
                "",
            )
            .split(";")[0]
            .strip()
        )
        try:
            body = json.loads(request.body) if request.body else None
        except ValueError:
            body = request.text
        call = Call(
            request.method.value, request.url.path, dict(request.params), content_type, body
        )
        if target is not None:
            call.group, call.plural, call.namespace = target.group, target.plural, target.namespace
            call.name, call.subresource = target.name, target.subresource
        self.calls.append(call)
        self._notify()
        try:
            response = await self._respond(request, target, call)
        except ApiError as error:
            response = error.response()
        except kmock.KubernetesError as error:
            response = await self._render_error(error)
        call.status = response.status
        self._notify()
        return response

    async def _respond(
        self, request: kmock.Request, target: Target | None, call: Call
    ) -> web.StreamResponse:
        is_watch = call.method == "GET" and call.query.get("watch") in ("true", "1")
        for fault in self._faults:
            if fault.remaining > 0 and fault.matches(call.method, call.path, is_watch):
                fault.remaining -= 1
                rtype = (
                    None
                    if target is None
                    else self._types.get((target.group, target.version, target.plural))
                )
                raise fault.error(target, rtype)
        if len(self._payloads) > self._own_payloads:
            try:  # a reaction the test set with kmock's DSL answers first
                return await super()._handle(request)
            except kmock.KubernetesEndpointNotFoundError:
                pass
        if target is None:
            return await self._discovery(request)
        return await self._dispatch(request, target, call, is_watch)

    async def _discovery(self, request: kmock.Request) -> web.StreamResponse:
        # kmock's scaffold answers; routed here because the client adds a trailing slash
        # (`/api/v1/`, `/version/`) that kmock's routes do not expect.
        path = "/" + request.url.path.strip("/")
        parts = path.strip("/").split("/")
        payload: kmock.Payload
        if path == "/version":
            payload = await self._serve_server_version(request)
        elif path == "/apis":
            payload = await self._serve_apis(request)
        elif path == "/api":
            payload = await self._serve_api(request)
        elif path == "/":
            payload = await self._serve_root(request)
        elif parts[0] == "apis" and len(parts) == 2:
            payload = await self._serve_group(request)
        elif (parts[0], len(parts)) in (("apis", 3), ("api", 2)):
            payload = await self._serve_version(request)
        else:
            raise ApiError(404, UNKNOWN_RESOURCE)
        return web.json_response(payload)

    async def _render_error(self, exc: Exception) -> web.StreamResponse:
        if isinstance(exc, kmock.KubernetesError):
            message = UNKNOWN_RESOURCE if exc.status == 404 else (exc.message or repr(exc))
            return ApiError(exc.status, message).response()
        return ApiError(500, f"Internal error occurred: {exc!r}").response()

    async def _serve_server_version(self, request: kmock.Request) -> kmock.Payload:
        major, minor, *_ = schemas.KUBERNETES_VERSION.split(".")
        return {
            "major": major,
            "minor": minor,
            "gitVersion": f"v{schemas.KUBERNETES_VERSION}",
            "gitCommit": "0" * 40,
            "gitTreeState": "clean",
            "buildDate": "2026-01-01T00:00:00Z",
            "goVersion": "go1.25",
            "compiler": "gc",
            "platform": "linux/amd64",
        }

    async def _dispatch(
        self, request: kmock.Request, target: Target, call: Call, is_watch: bool
    ) -> web.StreamResponse:
        rtype = self._types.get((target.group, target.version, target.plural))
        if rtype is None or (target.namespace is not None and not rtype.namespaced):
            raise ApiError(404, UNKNOWN_RESOURCE)
        if target.subresource not in (None, "status") or (
            target.subresource == "status" and not rtype.status_subresource
        ):
            raise ApiError(404, UNKNOWN_RESOURCE)
        namespace = target.namespace if rtype.namespaced else None
        if call.method == "GET" and is_watch:
            return await self._watch(request, rtype, target, call.query)
        if call.method == "GET" and target.name is None:
            return web.json_response(
                self._list_answer(rtype, namespace, target.version, call.query)
            )
        if call.method == "GET" and target.name is not None:
            obj = self._live(rtype, namespace, target.name)
            if obj is None:
                raise not_found(rtype, target.name)
            return self._answer(rtype, obj, target.version)
        return self._write(rtype, target, namespace, call)

    def _write(
        self, rtype: ResourceType, target: Target, namespace: str | None, call: Call
    ) -> web.StreamResponse:
        method, name, version, body = call.method, target.name, target.version, call.body
        dry_run = "dryRun" in call.query
        status_only = target.subresource == "status"
        if method == "POST" and name is None and target.subresource is None:
            if rtype.namespaced and namespace is None:
                raise ApiError(405, NOT_ALLOWED)
            obj = self._identified(rtype, body, version, namespace, None)
            return self._answer(
                rtype, self._create(rtype, obj, namespace, dry_run=dry_run), version, 201
            )
        if name is None:
            raise ApiError(405, NOT_ALLOWED)
        if method == "DELETE" and target.subresource is None:
            return web.json_response(self._delete(rtype, namespace, name, body, dry_run))
        old = self._live(rtype, namespace, name)
        if method == "PUT":
            obj = self._identified(rtype, body, version, namespace, name)
            if old is None and rtype.allow_create_on_update and not status_only:
                return self._answer(
                    rtype, self._create(rtype, obj, namespace, dry_run=dry_run), version, 201
                )
        elif method == "PATCH" and old is not None:
            obj = self._identified(
                rtype, self._patched(rtype, old, body, call.content_type), version, namespace, name
            )
        elif method != "PATCH":
            raise ApiError(405, NOT_ALLOWED)
        if old is None:
            raise not_found(rtype, name)
        self._check_preconditions(rtype, old, obj.get("metadata", {}), for_put=method == "PUT")
        updated = self._update(rtype, old, obj, status_only=status_only, dry_run=dry_run)
        return self._answer(rtype, updated, version)

    def _answer(
        self, rtype: ResourceType, obj: JsonObject, version: str, code: int = 200
    ) -> web.Response:
        return web.json_response(self._present(rtype, obj, version), status=code)

    def _present(self, rtype: ResourceType, obj: Mapping[str, Any], version: str) -> JsonObject:
        # Served versions share one storage and one schema: only apiVersion differs.
        shown = copy.deepcopy(dict(obj))
        shown["apiVersion"] = rtype.api_version(version)
        return shown

    # ------------------------------------------------------------ list, watch

    def _current(self, rtype: ResourceType, namespace: str | None = None) -> list[JsonObject]:
        found = [
            obj.last.raw
            for (resource, ns, _), obj in self._store.items()
            if resource == rtype.resource
            and not obj.deleted
            and (namespace is None or ns == namespace)
        ]
        return sorted(
            found, key=lambda o: (o["metadata"].get("namespace") or "", o["metadata"]["name"])
        )

    def _selection(
        self,
        rtype: ResourceType,
        params: Mapping[str, str],
    ) -> Callable[[Mapping[str, Any]], bool]:
        labels = LabelSelector.parse(params.get("labelSelector", ""))
        fields = parse_field_selector(params.get("fieldSelector", ""), rtype)

        def selects(obj: Mapping[str, Any]) -> bool:
            return labels.matches(obj.get("metadata", {}).get("labels") or {}) and all(
                (_field_value(obj, path) == value) == equal for path, equal, value in fields
            )

        return selects

    def _list_answer(
        self, rtype: ResourceType, namespace: str | None, version: str, params: Mapping[str, str]
    ) -> JsonObject:
        selects = self._selection(rtype, params)
        items = [obj for obj in self._current(rtype, namespace) if selects(obj)]
        meta: JsonObject = {"resourceVersion": str(self._rv)}
        if params.get("continue"):
            try:
                rv, after = json.loads(base64.urlsafe_b64decode(params["continue"]))
            except (ValueError, TypeError):
                raise bad_request("invalid continue token") from None
            if rv < self._compacted:
                raise ApiError(
                    410,
                    "The provided continue parameter is too old to display a "
                    "consistent list result. You can start a new list without the "
                    "continue parameter.",
                )
            items = [
                o
                for o in items
                if [o["metadata"].get("namespace") or "", o["metadata"]["name"]] > after
            ]
        limit = int(params["limit"]) if params.get("limit", "").isdigit() else 0
        if 0 < limit < len(items):
            last = items[limit - 1]["metadata"]
            token = json.dumps([self._rv, [last.get("namespace") or "", last["name"]]])
            meta["continue"] = base64.urlsafe_b64encode(token.encode()).decode()
            meta["remainingItemCount"] = len(items) - limit
            items = items[:limit]
        return {
            "apiVersion": rtype.api_version(version),
            "kind": f"{rtype.kind}List",
            "metadata": meta,
            "items": [self._present(rtype, o, version) for o in items],
        }

    async def _watch(
        self, request: kmock.Request, rtype: ResourceType, target: Target, params: Mapping[str, str]
    ) -> web.StreamResponse:
        selects = self._selection(rtype, params)
        namespace = target.namespace if rtype.namespaced else None
        since = params.get("resourceVersion", "")
        timeout = float(params["timeoutSeconds"]) if params.get("timeoutSeconds") else None
        info = WatchInfo(rtype.plural, namespace, since, params.get("labelSelector", ""))
        stream: AsyncIterator[Any]
        if since not in ("", "0") and not since.isdigit():
            raise bad_request(f"invalid resource version: {since!r}")
        if self._expiring_watches > 0:
            self._expiring_watches -= 1
            stream = self._gone(f"too old resource version: {since or 0} ({self._rv})")
        elif since not in ("", "0") and int(since) < self._compacted:
            stream = self._gone(f"too old resource version: {since} ({self._compacted})")
        else:
            initial: list[JsonObject] = []
            start = int(since or 0)
            if since in ("", "0"):  # no position given: the current state first, as ADDED
                initial = [
                    self._present(rtype, obj, target.version)
                    for obj in self._current(rtype, namespace)
                    if selects(obj) and target.name in (None, obj["metadata"]["name"])
                ]
                start = self._rv
            stream = self._events(info, rtype, target, namespace, selects, start, initial, timeout)
        # kmock renders the stream (Response is exported by kmock, though not in its __all__).
        render = kmock.Response  # type: ignore[attr-defined]
        answer = render(status=200, headers={"Content-Type": "application/json"}, payload=stream)
        return await answer(request)

    async def _gone(self, message: str) -> AsyncIterator[Any]:
        yield b""
        yield {"type": "ERROR", "object": ApiError(410, message).status()}

    async def _events(
        self,
        info: WatchInfo,
        rtype: ResourceType,
        target: Target,
        namespace: str | None,
        selects: Callable[[Mapping[str, Any]], bool],
        start: int,
        initial: list[JsonObject],
        timeout: float | None,
    ) -> AsyncIterator[Any]:
        epoch = self._watch_epoch
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        self._watches.append(info)
        self._notify()
        try:
            yield b""  # sends the headers now: the client waits for them before reading events
            for obj in initial:
                yield {"type": "ADDED", "object": obj}
            position = bisect.bisect_right(self._log_rvs, start)
            while True:
                while position < len(self._log):
                    event = self._log[position]
                    position += 1
                    shown = self._visible(event, rtype, target, namespace, selects)
                    if shown is not None:
                        yield shown
                if self._watch_epoch != epoch:
                    return
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    return
                changed = self._changed
                try:
                    async with asyncio.timeout(remaining):
                        await changed.wait()
                except TimeoutError:
                    return
        finally:
            self._watches.remove(info)
            self._notify()

    def _visible(
        self,
        event: _Event,
        rtype: ResourceType,
        target: Target,
        namespace: str | None,
        selects: Callable[[Mapping[str, Any]], bool],
    ) -> JsonObject | None:
        if event.resource != rtype.resource:
            return None
        if (namespace is not None and event.namespace != namespace) or (
            target.name is not None and event.name != target.name
        ):
            return None
        now = selects(event.obj)
        before = event.old is not None and selects(event.old)
        kind = event.type
        if kind == "MODIFIED" and now != before:  # the object entered or left the selection
            kind = "ADDED" if now else "DELETED"
        elif not now:
            return None
        return {"type": kind, "object": self._present(rtype, event.obj, target.version)}

    # ------------------------------------------------------------------ writes

    def _identified(
        self, rtype: ResourceType, body: Any, version: str, namespace: str | None, name: str | None
    ) -> JsonObject:
        """The request body checked against the URL, with apiVersion and kind filled in."""
        if not isinstance(body, dict):
            raise bad_request("the body of the request must be a JSON object")
        obj = copy.deepcopy(body)
        api_version, kind = obj.get("apiVersion"), obj.get("kind")
        if rtype.custom and not (api_version and kind):
            missing = "Kind" if not kind else "apiVersion"
            raise bad_request(f"Object '{missing}' is missing in '{json.dumps(body)[:200]}'")
        if api_version and api_version not in [rtype.api_version(v) for v in rtype.versions]:
            raise bad_request(
                f"the API version in the data ({api_version}) does not match the "
                f"expected API version ({rtype.api_version(version)})"
            )
        if kind and kind != rtype.kind:
            raise bad_request(
                f"the kind in the data ({kind}) does not match the expected kind ({rtype.kind})"
            )
        obj["apiVersion"], obj["kind"] = rtype.api_version(), rtype.kind
        meta = obj.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise bad_request("metadata must be an object")
        if rtype.namespaced:
            if meta.get("namespace") not in (None, "", namespace):
                raise bad_request(
                    "the namespace of the provided object does not match the "
                    "namespace sent on the request"
                )
            meta["namespace"] = namespace
        else:
            meta.pop("namespace", None)
        if name is not None and meta.get("name") not in (None, "", name):
            raise bad_request(
                f"the name of the object ({meta['name']}) does not match the name "
                f"on the URL ({name})"
            )
        if name is not None:
            meta["name"] = name
        return obj

    def _patched(
        self, rtype: ResourceType, old: JsonObject, patch: Any, content_type: str
    ) -> JsonObject:
        if content_type == "application/json-patch+json":
            if not isinstance(patch, list):
                raise bad_request("a JSON patch must be a list of operations")
            try:
                result = jsonpatch.apply_patch(copy.deepcopy(old), patch)
            except jsonpatch.InvalidJsonPatch as error:
                raise bad_request(str(error)) from None
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as error:
                raise invalid(rtype, old["metadata"]["name"], [("", str(error))]) from None
        elif content_type == "application/merge-patch+json" or (
            content_type == "application/strategic-merge-patch+json" and not rtype.custom
        ):
            result = merge_patch(old, patch)
        else:
            raise ApiError(
                415,
                "the body of the request was in an unknown format - accepted "
                "media types include: application/json-patch+json, "
                "application/merge-patch+json"
                + ("" if rtype.custom else ", application/strategic-merge-patch+json"),
            )
        if not isinstance(result, dict):
            raise bad_request("the patch does not give an object")
        return result

    def _check_preconditions(
        self, rtype: ResourceType, old: JsonObject, meta: Mapping[str, Any], for_put: bool
    ) -> None:
        name = old["metadata"]["name"]
        rv = meta.get("resourceVersion")
        if for_put and not rv and rtype.custom:  # custom resources never update unconditionally
            raise invalid(
                rtype,
                name,
                [
                    (
                        "metadata.resourceVersion",
                        "Invalid value: 0x0: must be specified for an update",
                    )
                ],
            )
        if rv and rv != old["metadata"]["resourceVersion"]:
            raise conflict(rtype, name)
        uid = meta.get("uid")
        if uid and uid != old["metadata"].get("uid"):
            raise conflict(
                rtype,
                name,
                f"Precondition failed: UID in precondition: {uid}, "
                f"UID in object meta: {old['metadata'].get('uid')}",
            )

    def _check_metadata(self, rtype: ResourceType, obj: JsonObject) -> None:
        meta = obj["metadata"]
        name = meta.get("name", "")
        causes: list[tuple[str, str]] = []
        for section in ("labels", "annotations"):
            values = meta.get(section)
            if values is None:
                continue
            if not isinstance(values, dict) or not all(isinstance(v, str) for v in values.values()):
                raise bad_request(
                    f"json: cannot unmarshal metadata.{section}: values must be strings"
                )
            for key, value in values.items():
                if not _QUALIFIED.fullmatch(key) or len(key.rpartition("/")[2]) > 63:
                    causes.append(
                        (
                            f"metadata.{section}",
                            f'Invalid value: "{key}": name part '
                            "must consist of alphanumeric characters, '-', '_' or '.'",
                        )
                    )
                if section == "labels" and (len(value) > 63 or not _LABEL_VALUE.fullmatch(value)):
                    causes.append(
                        (
                            "metadata.labels",
                            f'Invalid value: "{value}": a valid label '
                            "must be an empty string or consist of alphanumeric "
                            "characters, '-', '_' or '.'",
                        )
                    )
        finalizers = meta.get("finalizers")
        if finalizers is not None and (
            not isinstance(finalizers, list) or not all(isinstance(f, str) for f in finalizers)
        ):
            raise bad_request("json: cannot unmarshal metadata.finalizers: must be strings")
        if causes:
            raise invalid(rtype, name, causes)

    def _admit(self, rtype: ResourceType, obj: JsonObject) -> None:
        self._check_metadata(rtype, obj)
        if rtype.defaults is not None:
            schemas.apply_defaults(rtype.defaults, obj)
        if rtype.validator is not None:
            try:
                rtype.validator(obj)
            except ValueError as error:
                where = getattr(error, "field", "")
                what = getattr(error, "reason", str(error))
                raise invalid(
                    rtype, obj["metadata"]["name"], [(where, f"Invalid value: {what}")]
                ) from None

    def _now(self) -> str:
        moment = datetime.datetime.fromtimestamp(self.clock(), datetime.UTC)
        return moment.strftime("%Y-%m-%dT%H:%M:%SZ")

    def _create(
        self,
        rtype: ResourceType,
        obj: JsonObject,
        namespace: str | None,
        *,
        keep_status: bool = False,
        dry_run: bool = False,
    ) -> JsonObject:
        meta = obj["metadata"]
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + "".join(
                self._rng.choice(_NAME_ALPHABET) for _ in range(5)
            )
        name = meta.get("name") or ""
        if not name:
            raise invalid(
                rtype, "", [("metadata.name", "Required value: name or generateName is required")]
            )
        if meta.get("resourceVersion"):
            raise ApiError(
                500, "resourceVersion should not be set on objects to be created", reason=""
            )
        if self._live(rtype, namespace, name) is not None:
            raise already_exists(rtype, name)
        if len(name) > 253 or not rtype.name_rule.fullmatch(name):
            raise invalid(
                rtype,
                name,
                [("metadata.name", f'Invalid value: "{name}": must be a lowercase RFC 1123 name')],
            )
        for server_field in _SERVER_FIELDS:
            meta.pop(server_field, None)
        meta["uid"] = str(uuid.UUID(int=self._rng.getrandbits(128), version=4))
        meta["creationTimestamp"] = self._now()
        if rtype.tracks_generation:
            meta["generation"] = 1
        if rtype.status_subresource and not keep_status:
            obj.pop("status", None)  # status is only written through /status
        self._admit(rtype, obj)
        return self._commit(rtype, obj, "ADDED", None, dry_run)

    def _update(
        self,
        rtype: ResourceType,
        old: JsonObject,
        candidate: JsonObject,
        *,
        status_only: bool,
        keep_status: bool = False,
        dry_run: bool = False,
    ) -> JsonObject:
        if status_only:
            new = copy.deepcopy(old)  # a /status write changes nothing else
            if "status" in candidate:
                new["status"] = copy.deepcopy(candidate["status"])
            else:
                new.pop("status", None)
        else:
            new = copy.deepcopy(candidate)
            meta, old_meta = new["metadata"], old["metadata"]
            for server_field in _SERVER_FIELDS:
                meta.pop(server_field, None)
                if server_field in old_meta:
                    meta[server_field] = old_meta[server_field]
            if rtype.status_subresource and not keep_status:
                new.pop("status", None)
                if "status" in old:
                    new["status"] = copy.deepcopy(old["status"])
            if old_meta.get("deletionTimestamp"):
                added = set(meta.get("finalizers") or []) - set(old_meta.get("finalizers") or [])
                if added:
                    raise invalid(
                        rtype,
                        meta["name"],
                        [
                            (
                                "metadata.finalizers",
                                "Forbidden: no new finalizers can be added if "
                                "the object is being deleted",
                            )
                        ],
                    )
        self._admit(rtype, new)
        if _without_version(new) == _without_version(old):
            return copy.deepcopy(old)  # a no-op write stores nothing and tells no watcher
        if rtype.tracks_generation and _spec_part(new, rtype) != _spec_part(old, rtype):
            new["metadata"]["generation"] = int(old["metadata"].get("generation", 0)) + 1
        meta = new["metadata"]
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            return self._commit(rtype, new, "DELETED", old, dry_run)  # the last finalizer went
        return self._commit(rtype, new, "MODIFIED", old, dry_run)

    def _delete(
        self, rtype: ResourceType, namespace: str | None, name: str, options: Any, dry_run: bool
    ) -> JsonObject:
        old = self._live(rtype, namespace, name)
        if old is None:
            raise not_found(rtype, name)
        preconditions = options.get("preconditions") if isinstance(options, dict) else None
        if isinstance(preconditions, dict):
            rv, uid = preconditions.get("resourceVersion"), preconditions.get("uid")
            current = old["metadata"]["resourceVersion"]
            if rv and rv != current:
                raise conflict(
                    rtype,
                    name,
                    f"the ResourceVersion in the precondition ({rv}) "
                    f"does not match the ResourceVersion in record ({current}). "
                    "The object might have been modified",
                )
            if uid and uid != old["metadata"].get("uid"):
                raise conflict(
                    rtype,
                    name,
                    f"the UID in the precondition ({uid}) does not match "
                    f"the UID in record ({old['metadata'].get('uid')}). The object "
                    "might have been deleted and then recreated",
                )
        if old["metadata"].get("finalizers"):
            if old["metadata"].get("deletionTimestamp"):
                return self._present(rtype, old, rtype.versions[0])
            marked = copy.deepcopy(old)
            marked["metadata"]["deletionTimestamp"] = self._now()
            marked["metadata"]["deletionGracePeriodSeconds"] = 0
            return self._commit(rtype, marked, "MODIFIED", old, dry_run)
        gone = self._commit(rtype, copy.deepcopy(old), "DELETED", old, dry_run)
        details = _details(rtype, name)
        details["uid"] = gone["metadata"].get("uid")
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Success",
            "details": details,
        }

    def _commit(
        self,
        rtype: ResourceType,
        obj: JsonObject,
        event_type: str,
        old: JsonObject | None,
        dry_run: bool,
    ) -> JsonObject:
        if dry_run:
            return copy.deepcopy(obj)
        self._rv += 1
        meta = obj["metadata"]
        meta["resourceVersion"] = str(self._rv)
        namespace = meta.get("namespace") if rtype.namespaced else None
        key = (rtype.resource, namespace, meta["name"])
        stored = copy.deepcopy(obj)
        if event_type == "DELETED":
            self._store[key].delete()
        elif key in self._store:
            self._store[key].history.append(stored)
        else:
            self._store[key] = stored
        self._log.append(
            _Event(
                self._rv,
                event_type,
                rtype.resource,
                namespace,
                meta["name"],
                stored,
                copy.deepcopy(old) if old is not None else None,
            )
        )
        self._log_rvs.append(self._rv)
        self._notify()
        for reactor in self._reactors.get(rtype.resource, ()):
            asyncio.get_running_loop().call_soon(
                self._react, reactor, event_type, copy.deepcopy(stored)
            )
        return copy.deepcopy(stored)

    def _react(self, reactor: Reactor, event_type: str, obj: JsonObject) -> None:
        try:
            reactor(event_type, obj)
        except Exception as error:  # reported by the fixture: a test's reactor failed
            self.reactor_errors.append(error)

    # ---------------------------------------------------------------- helpers

    def _live(self, rtype: ResourceType, namespace: str | None, name: str) -> JsonObject | None:
        key = (rtype.resource, namespace if rtype.namespaced else None, name)
        if key not in self._store:
            return None
        obj = self._store[key]
        return None if obj.deleted else copy.deepcopy(obj.last.raw)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _resolve(self, ref: str) -> ResourceType:
        """'apps/v1/deployments', 'v1/pods', 'deployments', 'deployments.apps' or 'Deployment'."""
        found = {
            rtype
            for (group, version, plural), rtype in self._types.items()
            if ref
            in (
                f"{group}/{version}/{plural}",
                f"{version}/{plural}",
                plural,
                f"{plural}.{group}",
                rtype.kind,
            )
            and not (group and ref == f"{version}/{plural}")
        }
        if len(found) != 1:
            problem = "is ambiguous" if found else "is not registered"
            raise KeyError(f"resource {ref!r} {problem}")
        return found.pop()

    def _type_of(self, obj: Mapping[str, Any]) -> ResourceType:
        group, _, version = str(obj.get("apiVersion", "")).rpartition("/")
        rtype = next(
            (
                t
                for (g, v, _), t in self._types.items()
                if (g, v) == (group, version) and t.kind == obj.get("kind")
            ),
            None,
        )
        if rtype is None:
            raise KeyError(
                f"no registered resource for {obj.get('kind')} ({obj.get('apiVersion')})"
            )
        return rtype


def register_standard_resources(server: ApiServer, *, validate: bool = True) -> None:
    """The resources Codedance reads and writes, with their schemas enforced when `validate`.

    Built-in kinds are checked with kubernetes-validate, the Istio and Gateway API
    kinds with their vendored CRDs, CanaryDeployment with deploy/crd.yaml when it exists.
    """
    builtin = schemas.validate_builtin if validate else None

    def crd(group: str, kind: str, version: str) -> Mapping[str, Any] | None:
        path: Path = schemas.CRD_FILES[group, kind]
        return schemas.openapi_schema(path, version, kind) if validate and path.exists() else None

    pod_fields = (
        "spec.nodeName",
        "spec.restartPolicy",
        "spec.schedulerName",
        "spec.serviceAccountName",
        "status.phase",
        "status.podIP",
        "status.nominatedNodeName",
    )
    event_fields = (
        "involvedObject.kind",
        "involvedObject.namespace",
        "involvedObject.name",
        "involvedObject.uid",
        "involvedObject.apiVersion",
        "involvedObject.resourceVersion",
        "involvedObject.fieldPath",
        "reason",
        "reportingComponent",
        "source",
        "type",
    )
    server.register("", "v1", "pods", "Pod", schema=builtin, field_labels=pod_fields)
    server.register("", "v1", "services", "Service", schema=builtin, name_rule=_DNS1035)
    server.register("", "v1", "configmaps", "ConfigMap", status_subresource=False, schema=builtin)
    server.register(
        "",
        "v1",
        "events",
        "Event",
        status_subresource=False,
        schema=builtin,
        allow_create_on_update=True,
        field_labels=event_fields,
    )
    server.register(
        "events.k8s.io",
        "v1",
        "events",
        "Event",
        status_subresource=False,
        schema=builtin,
        allow_create_on_update=True,
    )
    server.register("apps", "v1", "deployments", "Deployment", schema=builtin)
    server.register("apps", "v1", "replicasets", "ReplicaSet", schema=builtin)
    server.register("networking.k8s.io", "v1", "ingresses", "Ingress", schema=builtin)
    server.register(
        "coordination.k8s.io", "v1", "leases", "Lease", status_subresource=False, schema=builtin
    )
    server.register(
        "codedance.io",
        "v1alpha1",
        "canarydeployments",
        "CanaryDeployment",
        schema=crd("codedance.io", "CanaryDeployment", "v1alpha1"),
    )
    server.register(
        "networking.istio.io",
        "v1",
        "virtualservices",
        "VirtualService",
        schema=crd("networking.istio.io", "VirtualService", "v1"),
        also_served=("v1beta1", "v1alpha3"),
    )
    server.register(
        "networking.istio.io",
        "v1",
        "destinationrules",
        "DestinationRule",
        schema=crd("networking.istio.io", "DestinationRule", "v1"),
        also_served=("v1beta1", "v1alpha3"),
    )
    server.register(
        "gateway.networking.k8s.io",
        "v1",
        "httproutes",
        "HTTPRoute",
        schema=crd("gateway.networking.k8s.io", "HTTPRoute", "v1"),
        also_served=("v1beta1",),
    )
