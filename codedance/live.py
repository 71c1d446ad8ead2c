"""What a person watches during a local release, and the summary after it.

In: a running `LocalPlatform` (its engine, its traffic statistics) or a
finished `Summary`. Out: rich renderables: the live panel (step and weight,
p99 and error rate per track, each rule's state, the health score, the last
verdict with its explanation) and the closing summary.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from dsl.ast import Dim
from dsl.units import format_duration, format_value

if TYPE_CHECKING:
    from codedance.local import LocalPlatform, Summary

_PHASE_STYLE = {
    "Succeeded": "bold green",
    "RolledBack": "bold red",
    "RollingBack": "red",
    "Paused": "yellow",
    "Failed": "bold red",
}
_RULE_STYLE = {"inactive": "dim", "pending": "yellow", "firing": "bold red"}


def live_panel(platform: LocalPlatform) -> Panel:
    engine = platform.engine
    spec = platform.spec
    if engine is None:
        return Panel("starting the stable service and the router...", title="codedance demo")
    status = engine.status(spec.key)
    now = platform.clock.now()
    started = status.started_at if status.started_at is not None else now
    head = Text.assemble(
        ("phase ", "dim"), (status.phase.value, _PHASE_STYLE.get(status.phase.value, "bold")),
        ("   step ", "dim"), f"{status.step}",
        ("   canary weight ", "dim"), (f"{status.weight}%", "bold"),
        ("   elapsed ", "dim"), format_duration(round(now - started, 1)),
    )
    caption = (
        "measured by the router; the policy reads Prometheus"
        if platform.prometheus
        else None
    )
    tracks = Table(
        box=None, pad_edge=False, show_header=True, header_style="dim", caption=caption,
        caption_style="dim",
    )
    tracks.add_column("track")
    tracks.add_column("p99", justify="right")
    tracks.add_column("error rate", justify="right")
    tracks.add_column("requests/s", justify="right")
    for track in ("stable", "canary"):
        p99 = platform.stats.value(track, "p99", 1.0, now)
        err = platform.stats.value(track, "error_rate", 1.0, now)
        rps = platform.stats.value(track, "request_rate", 1.0, now)
        tracks.add_row(
            track, format_value(p99, Dim.DURATION), format_value(err, Dim.RATIO),
            format_value(rps, Dim.NUMBER),
        )
    rules = Table(box=None, pad_edge=False, show_header=True, header_style="dim")
    rules.add_column("rule")
    rules.add_column("action")
    rules.add_column("state")
    verdict = engine.verdict(spec.key)
    if verdict is not None:
        for r in verdict.rules:
            state: str = r.state
            if r.pending_since is not None:
                state += f" for {format_duration(round(verdict.at - r.pending_since, 1))}"
            rules.add_row(r.rule, r.action.value, Text(state, _RULE_STYLE[r.state]))
    last = Text("no verdict yet", "dim")
    if verdict is not None:
        last = Text.assemble(
            ("health ", "dim"), f"{verdict.health:.0f}", ("   last verdict ", "dim"),
            verdict.explanation,
        )
    return Panel(
        Group(head, Text(""), tracks, Text(""), rules, Text(""), last),
        title=f"codedance: {spec.key} ({platform.scenario.name})",
    )


def summary_panel(summary: Summary) -> Panel:
    table = Table(box=None, show_header=True, header_style="dim")
    table.add_column("at", justify="right")
    table.add_column("to")
    table.add_column("weight", justify="right")
    table.add_column("why")
    first = summary.transitions[0]["at"] if summary.transitions else 0.0
    for t in summary.transitions:
        table.add_row(
            f"+{t['at'] - first:.1f}s", t["to"], f"{t['weight']}%", t["explanation"]
        )
    lines = [
        Text.assemble(
            ("final phase ", "dim"), (summary.phase, _PHASE_STYLE.get(summary.phase, "bold")),
            ("   duration ", "dim"), f"{summary.duration:.1f}s",
            ("   final weight ", "dim"), f"{summary.final_weight}%",
        ),
        Text.assemble(
            ("requests sent ", "dim"), f"{summary.requests_sent}",
            ("   failed ", "dim"), f"{summary.requests_failed}",
            ("   of which the canary's injected errors ", "dim"), f"{summary.canary_errors}",
        ),
    ]
    if summary.reaction_seconds is not None:
        lines.append(Text.assemble(
            ("reaction: canary turned bad -> all traffic on stable in ", "dim"),
            (f"{summary.reaction_seconds:.2f}s", "bold"),
        ))
    if summary.after_rollback:
        lines.append(Text.assemble(
            ("after the rollback, requests by track: ", "dim"),
            ", ".join(f"{k} {v}" for k, v in sorted(summary.after_rollback.items())),
        ))
    lines.append(Text.assemble(("metrics from ", "dim"), summary.metrics_source))
    lines.append(Text.assemble(("audit log ", "dim"), summary.audit_log))
    return Panel(Group(table, Text(""), *lines), title="summary")
