"""`codedance demo` and `codedance run --local`: a real release on this machine.

    codedance demo [--scenario healthy|slow|errors|crash] [--router builtin|nginx|NAME]
                   [--strategy linear|exponential|manual|steps|NAME] [--policy FILE]
                   [--prometheus auto|URL] [--json]
    codedance run ROLLOUT.yaml --local [--scenario ...] [--router ...] [--prometheus ...] [--json]

Both start the local platform (`codedance.local`), show the rollout live in
the terminal (or print one JSON summary with `--json`) and exit 0 when the
release Succeeded, 1 when it did not (RolledBack, Failed), 2 for a usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from codedance.policy_files import UsageError, load_policy, read_text
from dsl.compile import CompiledPolicy
from engine import registry
from engine.model import Phase, RolloutSpec, StrategySpec

RULES_DIR = Path(__file__).resolve().parent.parent / "rules"
DEMO_POLICY = RULES_DIR / "demo.rules"


def add_commands(commands: Any) -> None:
    demo = commands.add_parser("demo", help="run a canary release on this machine")
    _common(demo)
    demo.add_argument(
        "--strategy", default="linear", metavar="NAME",
        help="linear, exponential, manual, steps, or a package's (default linear)",
    )
    demo.add_argument("--step-duration", default="4s", help="time per step (default 4s)")
    demo.add_argument("--policy", type=Path, default=None, help="a .rules file (default: demo)")
    demo.set_defaults(run=run_demo)

    run = commands.add_parser("run", help="run a CanaryDeployment manifest")
    run.add_argument("manifest", type=Path, metavar="ROLLOUT.yaml")
    run.add_argument("--local", action="store_true", required=True,
                     help="on this machine (the only mode for now)")
    run.add_argument("--policies", type=Path, default=RULES_DIR,
                     help="directory of named policies (default: rules/)")
    _common(run)
    run.set_defaults(run=run_manifest)


def _common(p: argparse.ArgumentParser) -> None:
    from codedance.local import SCENARIOS

    p.add_argument("--scenario", choices=sorted(SCENARIOS), default="healthy")
    p.add_argument("--router", default="builtin", metavar="NAME",
                   help="a registered traffic router: builtin, nginx, or a package's")
    p.add_argument("--rate", type=float, default=100.0, help="requests per second (default 100)")
    p.add_argument(
        "--prometheus", metavar="auto|URL", default=None,
        help="read traffic metrics from Prometheus instead of the router: `auto` runs one "
        "here (needs the prometheus program) scraping the services; with the URL of your "
        "own, the services' ports are written to a file_sd targets file in the run's work "
        "directory, and a line on stderr gives its path and the scrape job to add",
    )
    p.add_argument("--json", action="store_true", help="print only a JSON summary")
    p.add_argument("--bad-after", type=float, default=None, metavar="SECONDS",
                   help="when the canary turns bad, after it starts (default 9)")


def run_demo(args: argparse.Namespace) -> int:
    path = args.policy or DEMO_POLICY
    policy = _load_policy(path)
    try:
        strategy = StrategySpec(
            type=args.strategy,
            steps=(10, 50, 100) if args.strategy == "steps" else None,
            step_duration=args.step_duration,
        )
    except ValidationError as e:
        raise UsageError(f"--strategy/--step-duration: {e.errors()[0]['msg']}") from None
    spec = RolloutSpec(
        name="web", namespace="default", stable="web", policy=path.stem, interval=1.0,
        strategy=strategy, max_pause=30.0,
    )
    return _run(spec, policy, args)


def run_manifest(args: argparse.Namespace) -> int:
    from adapters.kube.models import CanaryDeployment, to_rollout_spec

    text = read_text(str(args.manifest))
    try:
        data = yaml.safe_load(text)
        manifest = CanaryDeployment.model_validate(data)
    except yaml.YAMLError as e:
        raise UsageError(f"{args.manifest}: not YAML: {e}") from None
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise UsageError(f"{args.manifest}: {where}: {first['msg']}") from None
    if manifest.spec.policy.inline is not None:
        policy = _compile(manifest.spec.policy.inline, f"{args.manifest} (inline policy)")
        spec = to_rollout_spec(manifest, policy_name="inline")
    else:
        name = manifest.spec.policy.name
        policy = _load_policy(args.policies / f"{name}.rules")
        spec = to_rollout_spec(manifest)
    return _run(spec, policy, args)


def _load_policy(path: Path) -> CompiledPolicy:
    return load_policy(str(path))


def _compile(text: str, path: str) -> CompiledPolicy:
    return load_policy(path, source=text)


def _run(spec: RolloutSpec, policy: CompiledPolicy, args: argparse.Namespace) -> int:
    from codedance.local import SCENARIOS, LocalPlatform

    if args.router == "nginx" and shutil.which("nginx") is None and not Path(
        "/usr/sbin/nginx"
    ).exists():
        raise UsageError("nginx not found: apt-get install nginx, or use --router builtin")
    _check_prometheus(args.prometheus)
    try:
        platform = LocalPlatform(
            spec, policy, SCENARIOS[args.scenario], router=args.router, rate=args.rate,
            prometheus=args.prometheus, bad_after=args.bad_after,
        )
    except registry.ProviderError as e:
        raise UsageError(e.message) from None
    coro = _drive(platform, quiet=args.json, manual=spec.strategy.type == "manual")
    try:
        import uvloop

        summary = uvloop.run(coro)
    except ImportError:  # pragma: no cover - uvloop is a dependency; kept for odd platforms
        summary = asyncio.run(coro)
    if args.json:
        print(json.dumps(summary.to_json(), indent=2))
    else:
        from rich.console import Console

        from codedance.live import summary_panel

        Console().print(summary_panel(summary))
    return 0 if summary.phase == Phase.SUCCEEDED.value else 1


def _check_prometheus(value: str | None) -> None:
    from adapters.local.prometheus import INSTALL_HINT, find_prometheus
    from codedance.local import AUTO

    if value is None:
        return
    if value == AUTO:
        if find_prometheus() is None:
            raise UsageError(f"prometheus not found: {INSTALL_HINT}")
    elif not value.startswith(("http://", "https://")):
        raise UsageError(
            f"--prometheus: `auto` or a URL such as http://localhost:9090, not {value!r}"
        )


async def _drive(platform: Any, *, quiet: bool, manual: bool) -> Any:
    if quiet:
        return await platform.run(_auto_approve if manual else None)
    if not sys.stdout.isatty():
        return await platform.run(_Progress(manual))
    from rich.console import Console
    from rich.live import Live

    from codedance.live import live_panel

    console = Console()
    with Live(live_panel(platform), console=console, refresh_per_second=4) as live:

        async def tick(p: Any) -> None:
            live.update(live_panel(p))
            if manual:
                await _auto_approve(p)

        return await platform.run(tick)


class _Progress:
    """Plain progress lines for a log: one per transition, as it happens."""

    def __init__(self, manual: bool) -> None:
        self.manual = manual
        self.shown = 0
        self.first: float | None = None

    async def __call__(self, platform: Any) -> None:
        entries = platform.audit.entries
        for e in entries[self.shown :]:
            self.first = e.time if self.first is None else self.first
            print(
                f"+{e.time - self.first:5.1f}s  {e.to_phase.value:<18} weight {e.weight:>3}%  "
                f"{e.explanation}",
                flush=True,
            )
        self.shown = len(entries)
        if self.manual:
            await _auto_approve(platform)


async def _auto_approve(platform: Any) -> None:
    """In the demo nobody is at the keyboard: approve each step as it comes up."""
    engine = platform.engine
    if engine is None:
        return
    status = engine.status(platform.spec.key)
    if status.phase is Phase.WAITING_FOR_APPROVAL:
        await engine.command(platform.spec.key, "approve", os.environ.get("USER") or "demo")
