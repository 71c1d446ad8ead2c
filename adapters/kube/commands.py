"""Manual commands on a CanaryDeployment: an annotation in, an engine command and its outcome out.

A person's command (approve, pause, resume, abort, retry) travels as the
annotation `codedance.io/command` on the CanaryDeployment, a JSON object
`{"verb", "user", "reason", "at", "id"}` written with a JSON merge patch
(`command_patch`), so it needs no RBAC beyond `patch` on the resource and
`kubectl get -o yaml` shows the last one asked for. The controller calls
`handle(obj, engine, ...)` when it reconciles an object: a command whose id
has not been handled yet runs as `Engine.command(key, verb, actor=user,
reason)`, which writes the user into the audit log and the Event. A refused
command (approve when nothing waits) becomes a Warning Event with the reason.
Either way the outcome goes into the annotation `codedance.io/command-handled`
(`{"id", "ok", "message", "phase"}`): the command line waits for it, and a
restarted controller sees the id there and does not run the command again.

The handled id is written after the command ran: a controller killed between
the two runs it once more on restart, and the state machine refuses what no
longer applies (a second approve of the same step finds nothing waiting).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any, cast

from kubernetes.aio import client
from kubernetes.aio.client.exceptions import ApiException

from adapters.kube import retry
from adapters.kube.events import EventRecorder
from adapters.kube.models import GROUP, PLURAL, VERSION
from engine.loop import Engine
from engine.machine import IllegalTransition
from engine.ports import Clock

log = logging.getLogger("codedance.kube.commands")

COMMAND = "codedance.io/command"
HANDLED = "codedance.io/command-handled"
VERBS = ("approve", "pause", "resume", "abort", "retry")
MERGE_PATCH = "application/merge-patch+json"
REFUSED = "CommandRefused"

JsonObject = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Command:
    """One command as a person asked for it."""

    verb: str
    user: str
    reason: str = ""
    at: float = 0.0
    id: str = ""


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of a command: run (`ok`) or refused, with the message and phase."""

    id: str
    ok: bool
    message: str
    phase: str = ""


def new_command(verb: str, user: str, reason: str = "") -> Command:
    return Command(verb=verb, user=user, reason=reason, at=time.time(), id=str(uuid.uuid4()))


def command_patch(command: Command) -> JsonObject:
    """The JSON merge patch that asks the controller to run `command`."""
    return {"metadata": {"annotations": {COMMAND: json.dumps(asdict(command))}}}


def _annotation(obj: JsonObject, name: str) -> JsonObject | None:
    text = ((obj.get("metadata") or {}).get("annotations") or {}).get(name)
    if not text:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def command_of(obj: JsonObject) -> Command | None:
    """The object's command annotation; None when there is none or it is not JSON."""
    data = _annotation(obj, COMMAND)
    if data is None:
        return None
    at = data.get("at")
    return Command(
        verb=str(data.get("verb") or ""),
        user=str(data.get("user") or ""),
        reason=str(data.get("reason") or ""),
        at=float(at) if isinstance(at, int | float) else 0.0,
        id=str(data.get("id") or ""),
    )


def outcome_of(obj: JsonObject) -> Outcome | None:
    """The outcome of the last command the controller handled, if any."""
    data = _annotation(obj, HANDLED)
    if data is None:
        return None
    return Outcome(
        id=str(data.get("id") or ""),
        ok=bool(data.get("ok")),
        message=str(data.get("message") or ""),
        phase=str(data.get("phase") or ""),
    )


def pending(obj: JsonObject) -> Command | None:
    """The object's command when it has an id the controller has not handled yet."""
    command = command_of(obj)
    if command is None or not command.id:
        return None
    done = outcome_of(obj)
    if done is not None and done.id == command.id:
        return None
    return command


async def run(command: Command, key: str, engine: Engine) -> Outcome:
    """Run one command through the engine; refused commands come back with the reason."""
    if command.verb not in VERBS:
        return Outcome(command.id, False, f"unknown command {command.verb!r}")
    actor = command.user or "unknown"
    try:
        status = await engine.command(key, command.verb, actor=actor, reason=command.reason)
    except IllegalTransition as refusal:
        return Outcome(command.id, False, str(refusal), _phase(engine, key))
    except KeyError:
        return Outcome(command.id, False, f"the rollout {key} is not running")
    message = f"{command.verb} by {actor}: {status.phase.value}"
    return Outcome(command.id, True, message, status.phase.value)


def _phase(engine: Engine, key: str) -> str:
    try:
        return engine.status(key).phase.value
    except KeyError:
        return ""


async def handle(
    obj: JsonObject,
    engine: Engine,
    *,
    api_client: client.ApiClient,
    events: EventRecorder,
    clock: Clock,
) -> Outcome | None:
    """Run the object's unhandled command, if any, and record its outcome on the object.

    The object is read again first: the watch may hand over a copy older than
    the outcome this controller has just written, and a command runs once.
    """
    if pending(obj) is None:
        return None
    meta = obj.get("metadata") or {}
    namespace, name = str(meta.get("namespace") or "default"), str(meta.get("name"))
    api = client.CustomObjectsApi(api_client)
    try:
        fresh = await retry.call(
            lambda: api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name),
            clock=clock,
        )
    except ApiException as error:
        if retry.is_not_found(error):
            return None
        raise
    command = pending(cast(JsonObject, fresh))
    if command is None:
        return None
    key = f"{namespace}/{name}"
    outcome = await run(command, key, engine)
    if not outcome.ok:
        log.info("%s: %s by %s refused: %s", key, command.verb, command.user, outcome.message)
        await events.emit(
            key, REFUSED, f"{command.verb} by {command.user}: {outcome.message}", warning=True
        )
    body = {"metadata": {"annotations": {HANDLED: json.dumps(asdict(outcome))}}}
    try:
        await retry.call(
            lambda: api.patch_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name, body, _content_type=MERGE_PATCH
            ),
            clock=clock,
        )
    except ApiException as error:
        if not retry.is_not_found(error):
            raise
    return outcome
