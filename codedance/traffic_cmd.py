"""`codedance traffic`: where a CanaryDeployment's requests really go.

    codedance traffic NAME [-n NS] [--kubeconfig FILE] [--json]

In: the cluster, through a kubeconfig (as `codedance status` reads it), and a
CanaryDeployment's name. Out: per backend of its routing object (HTTPRoute,
VirtualService or the NGINX stable and canary Ingresses), the Service, its
weight, its ready endpoints by track and version, and the share of requests
that reaches canary and stable pods; then one summary line, `canary share
25.0% (status weight 25%)`, and the problems found (a Service that reaches
both tracks, a backend with no ready endpoints). `--json` prints the
document of `adapters.kube.traffic_view` instead. Exit 0 when shown, 2 on
a missing object, refused access or a connection problem (one line on
stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from kubernetes.aio import client

from adapters.kube.traffic_view import TrafficViewError, read_traffic_view
from codedance.control_cmd import EXIT_OK, _connected, _namespace
from codedance.policy_files import UsageError


def add_command(commands: Any) -> None:
    cmd = commands.add_parser(
        "traffic", help="show where a CanaryDeployment's requests go: weights, endpoints, shares"
    )
    cmd.add_argument("name", metavar="NAME")
    cmd.add_argument("-n", "--namespace", default=None, metavar="NAMESPACE")
    cmd.add_argument("--kubeconfig", default=None, metavar="FILE")
    cmd.add_argument("--json", action="store_true", help="print one JSON document")
    cmd.set_defaults(run=_traffic)


def _traffic(args: argparse.Namespace) -> int:
    namespace = _namespace(args)

    async def body(api: client.ApiClient) -> int:
        try:
            view = await read_traffic_view(api, namespace, args.name)
        except TrafficViewError as e:
            raise UsageError(str(e)) from None
        if args.json:
            print(json.dumps(view, indent=2, sort_keys=True))
        else:
            render(view)
        return EXIT_OK

    return _connected(args, body)


def _pct(value: float) -> str:
    return f"{value:.1f}%"


def _weight(backend: dict[str, Any]) -> str:
    """`25`, or `1 (25.0%)` when the weights are relative and do not sum to 100."""
    weight, percent = backend["weight"], backend["weightPercent"]
    return str(weight) if abs(weight - percent) < 0.05 else f"{weight} ({_pct(percent)})"


def summary(view: dict[str, Any]) -> str:
    """`canary share 25.0% (status weight 25%)`."""
    weight = view.get("statusWeight")
    said = "no status weight" if weight is None else f"status weight {weight}%"
    return f"canary share {_pct(view['share']['canary'])} ({said})"


def render(view: dict[str, Any]) -> None:
    """The view as a rich table, the summary line and the problems."""
    from rich.console import Console
    from rich.table import Table

    # piped or in a CI log, rich would assume 80 columns and fold image names; a file has room
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    routing = ", ".join(
        f"{r['kind']} {r['name']}" + ("" if r["found"] else " (absent)") for r in view["routing"]
    )
    table = Table(
        title=f"{view['namespace']}/{view['name']} ({view['provider']}: {routing})",
        title_justify="left",
    )
    for column in ("SERVICE", "WEIGHT", "READY ENDPOINTS", "CANARY", "STABLE", "FLAGS"):
        right = column in ("WEIGHT", "CANARY", "STABLE")
        # a narrow terminal folds a cell rather than cutting it: every character stays
        table.add_column(column, justify="right" if right else "left", overflow="fold")
    for b in view["backends"]:
        service = b["service"] + (f" ({b['subset']})" if b.get("subset") else "")
        groups = "\n".join(f"{g['ready']} {g['track']} {g['version']}" for g in b["groups"])
        if b["notReadyEndpoints"]:
            groups += f"\n{b['notReadyEndpoints']} not ready"
        flags = "\n".join(b["flags"])
        table.add_row(
            service,
            _weight(b),
            groups.strip() or "-",
            _pct(b["share"]["canary"]),
            _pct(b["share"]["stable"]),
            f"[bold red]{flags}[/]" if flags else "",
        )
    console.print(table)
    share = view["share"]
    line = f"{summary(view)}, stable {_pct(share['stable'])}"
    if share["unserved"]:
        line += f", unserved {_pct(share['unserved'])}"
    if share["unknown"]:
        line += f", no pod known {_pct(share['unknown'])}"
    console.print(line, markup=False, soft_wrap=True)
    for problem in view["problems"]:
        console.print(f"! {problem}", markup=False, style="yellow", soft_wrap=True)
    sys.stdout.flush()
