"""`codedance status` and the manual commands: a cluster's CanaryDeployments, seen and steered.

    codedance status [NAME] [-n NS | -A] [--watch] [--kubeconfig FILE]
    codedance approve|pause|resume|abort|retry NAME [-n NS] [--reason TEXT]
                     [--timeout SECONDS] [--kubeconfig FILE]

In: the cluster, through a kubeconfig (the default one, or `--kubeconfig`)
or the in-cluster config. Out: `status` prints a table like `kubectl get`
(NAME, PHASE, WEIGHT, STEP, HEALTH, AGE) with each rollout's last verdict
explained on the line below, or, for one NAME, a detail view (conditions,
pending rules, policy hash, last transition); `--watch` prints it again on
every change until Ctrl-C (exit 130). A command patches the CanaryDeployment
with the `codedance.io/command` annotation (see `adapters.kube.commands`),
naming the kubeconfig's user, then waits for the controller's outcome: exit 0
with the new phase, 1 with the reason when the command was refused, 2 on
usage and connection errors or when no controller answered in time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any, cast

import aiohttp
import yaml
from kubernetes.aio import client, watch
from kubernetes.aio.client.exceptions import ApiException
from kubernetes.aio.config.config_exception import ConfigException

from adapters.kube.commands import (
    MERGE_PATCH,
    VERBS,
    command_patch,
    new_command,
    outcome_of,
)
from adapters.kube.connection import configuration
from adapters.kube.models import GROUP, PLURAL, VERSION
from codedance.policy_files import UsageError

EXIT_OK, EXIT_REFUSED, EXIT_USAGE = 0, 1, 2
COLUMNS = ("NAME", "PHASE", "WEIGHT", "STEP", "HEALTH", "AGE")

JsonObject = dict[str, Any]

HELP = {
    "approve": "let a rollout waiting for approval take its next step",
    "pause": "pause a rollout's analysis and weight changes",
    "resume": "resume a paused rollout",
    "abort": "roll a rollout back now",
    "retry": "start a rolled back or failed rollout again",
}


def add_commands(commands: Any) -> None:
    status = commands.add_parser("status", help="show CanaryDeployments and their last verdict")
    status.add_argument("name", nargs="?", default=None, metavar="NAME")
    scope = status.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", default=None, metavar="NAMESPACE")
    scope.add_argument("-A", "--all-namespaces", action="store_true")
    status.add_argument("--watch", "-w", action="store_true", help="print again on every change")
    status.add_argument("--kubeconfig", default=None, metavar="FILE")
    status.set_defaults(run=_status)
    for verb in VERBS:
        cmd = commands.add_parser(verb, help=HELP[verb])
        cmd.add_argument("name", metavar="NAME")
        cmd.add_argument("-n", "--namespace", default=None, metavar="NAMESPACE")
        cmd.add_argument("--reason", default="", metavar="TEXT")
        cmd.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS")
        cmd.add_argument("--kubeconfig", default=None, metavar="FILE")
        cmd.set_defaults(run=_command, verb=verb)


# --- the cluster --------------------------------------------------------------------


def _kubeconfig_path(path: str | None) -> Path | None:
    if path:
        return Path(path)
    env = os.environ.get("KUBECONFIG")
    if env:
        return Path(env.split(os.pathsep)[0])
    default = Path.home() / ".kube" / "config"
    return default if default.exists() else None


def _current_context(path: str | None) -> JsonObject:
    """The kubeconfig's current context ({} without a kubeconfig or a readable one)."""
    file = _kubeconfig_path(path)
    if file is None or not file.exists():
        return {}
    try:
        document = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return {}
    current = document.get("current-context")
    for entry in document.get("contexts") or []:
        if isinstance(entry, dict) and entry.get("name") == current:
            return dict(entry.get("context") or {})
    return {}


def kubeconfig_user(path: str | None) -> str:
    """The user of the kubeconfig's current context, else $USER."""
    user = _current_context(path).get("user")
    return str(user) if user else os.environ.get("USER") or "unknown"


def _namespace(args: argparse.Namespace) -> str:
    if args.namespace:
        return str(args.namespace)
    return str(_current_context(args.kubeconfig).get("namespace") or "default")


async def _configuration(kubeconfig: str | None) -> client.Configuration:
    if kubeconfig is not None and not Path(kubeconfig).is_file():
        raise UsageError(f"no kubeconfig at {kubeconfig}")
    return await configuration(kubeconfig)


def _connected(args: argparse.Namespace, body: Any) -> int:
    """Run `body(api)` with a client; cluster and connection problems as one line."""

    async def main() -> int:
        async with client.ApiClient(await _configuration(args.kubeconfig)) as api:
            return cast(int, await body(api))

    try:
        return asyncio.run(main())
    except ConfigException as e:
        raise UsageError(f"no cluster configuration: {e}") from None
    except ApiException as e:
        raise UsageError(_api_message(e)) from None
    except (TimeoutError, aiohttp.ClientError, OSError) as e:
        raise UsageError(f"cannot reach the API server: {e or type(e).__name__}") from None


def _api_message(error: ApiException) -> str:
    if error.status == 404:
        return "not found (is the CanaryDeployment there, and the CRD installed?)"
    said = _server_says(error)
    if error.status in (401, 403):
        return f"the API server refused access ({error.status} {error.reason}){said}"
    return f"the API server answered {error.status} {error.reason}{said}"


def _server_says(error: ApiException) -> str:
    """The message of the API server's Status, on one line (": ..."), if it sent one.

    A 403's message names the user the server authenticated and what it may
    not do, which is what a person needs to ask for the right role.
    """
    body = error.body.decode("utf-8", "replace") if isinstance(error.body, bytes) else error.body
    try:
        status = json.loads(body or "")
    except ValueError:
        return ""
    message = status.get("message") if isinstance(status, dict) else None
    return f": {' '.join(str(message).split())}" if message else ""


# --- status -------------------------------------------------------------------------


def _age(obj: JsonObject, now: float) -> str:
    stamp = (obj.get("metadata") or {}).get("creationTimestamp")
    if not stamp:
        return "<unknown>"
    try:
        created = datetime.fromisoformat(str(stamp).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return "<unknown>"
    seconds = max(0, int(now - created))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size * (2 if unit != "d" else 1):
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _row(obj: JsonObject, now: float, with_namespace: bool) -> list[str]:
    meta, status = obj.get("metadata") or {}, obj.get("status") or {}
    health = status.get("health")
    row = [
        str(meta.get("name")),
        str(status.get("phase") or _ready_reason(status) or "Pending"),
        f"{status.get('weight') or 0}%",
        str(status.get("step") or 0),
        "-" if health is None else str(health),
        _age(obj, now),
    ]
    return [str(meta.get("namespace") or ""), *row] if with_namespace else row


def _ready_reason(status: JsonObject) -> str:
    for c in status.get("conditions") or []:
        if c.get("type") == "Ready" and c.get("status") == "False":
            return str(c.get("reason") or "")
    return ""


def _explanation(obj: JsonObject) -> str:
    status = obj.get("status") or {}
    return str(status.get("lastVerdict") or status.get("message") or "")


def table(objects: Iterable[JsonObject], *, now: float, with_namespace: bool = False) -> str:
    """A `kubectl get`-like table; each row followed by its last verdict's explanation."""
    items = sorted(
        objects,
        key=lambda o: ((o.get("metadata") or {}).get("namespace") or "", o["metadata"]["name"]),
    )
    header = ["NAMESPACE", *COLUMNS] if with_namespace else list(COLUMNS)
    rows = [_row(o, now, with_namespace) for o in items]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["   ".join(c.ljust(w) for c, w in zip(header, widths, strict=True)).rstrip()]
    for obj, row in zip(items, rows, strict=True):
        lines.append("   ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        explanation = _explanation(obj)
        if explanation:
            lines.append(f"  {explanation}")
    return "\n".join(lines)


def detail(obj: JsonObject, *, now: float) -> str:
    """One CanaryDeployment in full: the row, conditions, pending rules, policy, last change."""
    meta, status = obj.get("metadata") or {}, obj.get("status") or {}
    lines = [table([obj], now=now), ""]
    lines.append(f"Namespace:     {meta.get('namespace') or 'default'}")
    lines.append(f"Policy hash:   {status.get('policyHash') or '-'}")
    lines.append(f"Message:       {status.get('message') or '-'}")
    last = max(
        (str(c.get("lastTransitionTime") or "") for c in status.get("conditions") or []),
        default="",
    )
    lines.append(f"Last change:   {last or '-'}")
    outcome = outcome_of(obj)
    if outcome is not None:
        word = "done" if outcome.ok else "refused"
        lines.append(f"Last command:  {word}: {outcome.message}")
    lines.append("Conditions:")
    for c in status.get("conditions") or []:
        lines.append(
            f"  {c.get('type')}={c.get('status')} ({c.get('reason')}): {c.get('message') or ''}"
        )
    if not status.get("conditions"):
        lines.append("  -")
    lines.append("Pending rules:")
    pending = status.get("pendingSince") or {}
    verdict_at = status.get("lastVerdictAt") or now
    for label, since in sorted(pending.items()):
        lines.append(f"  {label}: true for {max(0.0, float(verdict_at) - float(since)):.0f}s")
    if not pending:
        lines.append("  -")
    return "\n".join(lines)


def _status(args: argparse.Namespace) -> int:
    if args.name and args.all_namespaces:
        raise UsageError("give a NAME with -n NAMESPACE, not -A")
    namespace = None if args.all_namespaces else _namespace(args)

    async def body(api: client.ApiClient) -> int:
        custom = client.CustomObjectsApi(api)
        if namespace is None:
            call: Any = custom.list_cluster_custom_object
            call_args: tuple[str, ...] = (GROUP, VERSION, PLURAL)
        else:
            call = custom.list_namespaced_custom_object
            call_args = (GROUP, VERSION, namespace, PLURAL)
        listed = cast(JsonObject, await call(*call_args))
        objects = {_key(o): o for o in listed.get("items") or []}
        _show(args, namespace, objects)
        if not args.watch:
            return (
                EXIT_USAGE if args.name and f"{namespace}/{args.name}" not in objects else EXIT_OK
            )
        rv = str((listed.get("metadata") or {}).get("resourceVersion") or "")
        while True:  # until Ctrl-C; a stream that ends is opened again
            stream = watch.Watch()  # type: ignore[no-untyped-call]
            try:
                async for event in stream.stream(  # type: ignore[no-untyped-call]
                    call, *call_args, resource_version=rv, allow_watch_bookmarks=True
                ):
                    obj = cast(JsonObject, event["raw_object"])
                    rv = str((obj.get("metadata") or {}).get("resourceVersion") or rv)
                    if event["type"] == "BOOKMARK":
                        continue
                    if args.name and (obj.get("metadata") or {}).get("name") != args.name:
                        continue
                    if event["type"] == "DELETED":
                        objects.pop(_key(obj), None)
                    else:
                        objects[_key(obj)] = obj
                    print()
                    _show(args, namespace, objects)
            finally:
                await stream.close()  # type: ignore[no-untyped-call]

    return _connected(args, body)


def _key(obj: JsonObject) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace')}/{meta.get('name')}"


def _show(args: argparse.Namespace, namespace: str | None, objects: dict[str, JsonObject]) -> None:
    now = time.time()
    if args.name:
        obj = objects.get(f"{namespace}/{args.name}")
        if obj is None:
            print(f"codedance status: no CanaryDeployment {namespace}/{args.name}", file=sys.stderr)
        else:
            print(detail(obj, now=now))
    elif not objects:
        where = "any namespace" if namespace is None else f"namespace {namespace}"
        print(f"No CanaryDeployments in {where}.", file=sys.stderr)
    else:
        print(table(objects.values(), now=now, with_namespace=namespace is None))
    sys.stdout.flush()


# --- commands -----------------------------------------------------------------------


def _command(args: argparse.Namespace) -> int:
    namespace = _namespace(args)
    if args.timeout <= 0:
        raise UsageError("--timeout must be positive")
    command = new_command(args.verb, kubeconfig_user(args.kubeconfig), args.reason)

    async def body(api: client.ApiClient) -> int:
        custom = client.CustomObjectsApi(api)
        try:
            await custom.patch_namespaced_custom_object(
                GROUP,
                VERSION,
                namespace,
                PLURAL,
                args.name,
                command_patch(command),
                _content_type=MERGE_PATCH,
            )
        except ApiException as e:
            if e.status == 404:
                raise UsageError(f"no CanaryDeployment {namespace}/{args.name}") from None
            raise
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            obj = cast(
                JsonObject,
                await custom.get_namespaced_custom_object(
                    GROUP, VERSION, namespace, PLURAL, args.name
                ),
            )
            outcome = outcome_of(obj)
            if outcome is not None and outcome.id == command.id:
                if outcome.ok:
                    print(f"{namespace}/{args.name}: {args.verb} done, now {outcome.phase}")
                    return EXIT_OK
                print(f"codedance {args.verb}: refused: {outcome.message}", file=sys.stderr)
                return EXIT_REFUSED
            await asyncio.sleep(0.1)
        raise UsageError(
            f"no controller handled the command within {args.timeout:g}s "
            "(is `codedance controller` running?)"
        )

    return _connected(args, body)
