"""A third-party package carries a rollout: installed with pip, found by entry point.

`tests/fixtures/plugin_pkg` is a package as someone else would publish it: a
router that keeps weights in a JSON file (and counts its writes), a metric
source that reads values from a JSON file and a decider that promotes early,
each registered in its `pyproject.toml`. The test builds and installs it with
pip into a directory of its own and puts that on sys.path, the way a
site-packages is, so nothing but `importlib.metadata` tells Codedance it is
there. The rollouts then run in the real `Engine` on fake time (looptime),
with every provider looked up by name in the registry.

The package code is also what docs/extending.md shows; a test keeps the two
the same, so the documented router is one that works.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import dsl
from adapters.local.memory import MemoryStore, NoopWorkloads
from dsl.compile import CompiledPolicy
from engine import registry
from engine.audit import MemoryAudit
from engine.loop import Engine, LoopClock
from engine.model import Phase, RolloutSpec
from engine.ports import RolloutRef

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "tests" / "fixtures" / "plugin_pkg"
MODULE = "codedance_jsonfile"
POLICY = "latency: p99 > 300ms for 1m -> rollback\n"


@pytest.fixture(scope="module")
def site_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package, built and installed by pip into a directory of its own."""
    # built from a copy: setuptools writes build/ and *.egg-info beside the sources
    source = tmp_path_factory.mktemp("source") / "plugin_pkg"
    shutil.copytree(PACKAGE, source)
    target = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [
            sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
            "--no-build-isolation", "--disable-pip-version-check", "--target", str(target),
            str(source),
        ],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, f"pip install failed:\n{result.stdout}{result.stderr}"
    return target


@pytest.fixture
def installed(site_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.syspath_prepend(str(site_dir))
    registry.refresh()
    yield site_dir
    registry.refresh()
    for name in [m for m in sys.modules if m == MODULE or m.startswith(MODULE + ".")]:
        del sys.modules[name]


class Policies:
    def __init__(self) -> None:
        self.policy = dsl.load(POLICY, "default.rules")

    def get(self, name: str) -> CompiledPolicy | None:
        return self.policy if name == "default" else None


def spec() -> RolloutSpec:
    return RolloutSpec.model_validate(
        {
            "name": "web", "namespace": "shop", "stable": "web", "policy": "default",
            "interval": "10s", "strategy": {"type": "linear", "step_duration": "1m"},
        }
    )


async def run(router: Any, metrics: Any, decider: Any = None) -> tuple[Phase, MemoryAudit]:
    audit = MemoryAudit()
    engine = Engine(
        policies=Policies(), metrics=metrics, router=router, workloads=NoopWorkloads(),
        store=MemoryStore(), audit=audit, clock=LoopClock(epoch=0.0), decider=decider,
    )
    task = asyncio.create_task(engine.run())
    await engine.add(spec())
    status = await engine.wait_finished("shop/web")
    await engine.stop()
    await task
    return status.phase, audit


def weights_file(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def test_the_package_is_found_by_name_in_each_of_its_groups(installed: Path) -> None:
    assert "jsonfile" in registry.available(registry.TRAFFIC)
    assert "builtin" in registry.available(registry.TRAFFIC)  # ours are still there
    assert "jsonfile" in registry.available(registry.METRICS)
    assert "early-promote" in registry.available(registry.DECIDERS)
    router_class: Any = registry.load(registry.TRAFFIC, "jsonfile")
    assert Path(sys.modules[router_class.__module__].__file__ or "").is_relative_to(installed)


def test_an_unknown_router_is_reported_with_the_known_names(installed: Path) -> None:
    with pytest.raises(registry.UnknownProvider) as e:
        registry.create(registry.TRAFFIC, "jsonfiel")
    message = str(e.value)
    assert message.startswith("unknown traffic router 'jsonfiel' (did you mean 'jsonfile'?)")
    known = message.split("; known: ", 1)[1].split(" (", 1)[0].split(", ")
    assert known == ["builtin", "gateway-api", "istio", "jsonfile", "nginx", "nginx-ingress"]


def test_without_the_package_its_router_is_unknown() -> None:
    registry.refresh()
    with pytest.raises(registry.UnknownProvider, match="'jsonfile'; known: builtin, "):
        registry.load(registry.TRAFFIC, "jsonfile")


@pytest.mark.asyncio
@pytest.mark.looptime
async def test_a_healthy_canary_walks_every_step_through_the_package_router(
    installed: Path, tmp_path: Path
) -> None:
    weights, values = tmp_path / "weights.json", tmp_path / "metrics.json"
    values.write_text(json.dumps({"canary.p99": 0.12, "stable.p99": 0.11}))
    router = registry.create(registry.TRAFFIC, "jsonfile", str(weights))
    metrics = registry.create(registry.METRICS, "jsonfile", str(values))

    phase, audit = await run(router, metrics)

    assert phase is Phase.SUCCEEDED
    entry = weights_file(weights)["shop/web"]
    # bring-up at 0, the six linear steps, promotion at 100, then all traffic on the
    # new stable; each write confirmed by reading the file back
    assert entry["history"] == [0, 5, 10, 25, 50, 75, 100, 100, 0]
    assert entry["writes"] == 9
    assert entry["weight"] == 0
    steps = [(e.time, e.weight) for e in audit.entries if e.action == "step"]
    assert steps == [(60.0 * k, w) for k, w in enumerate([5, 10, 25, 50, 75, 100])]


@pytest.mark.asyncio
@pytest.mark.looptime
async def test_a_slow_canary_is_rolled_back_through_the_package_router(
    installed: Path, tmp_path: Path
) -> None:
    weights, values = tmp_path / "weights.json", tmp_path / "metrics.json"
    values.write_text(json.dumps({"canary.p99": 0.45, "stable.p99": 0.11}))
    router = registry.create(registry.TRAFFIC, "jsonfile", str(weights))

    phase, audit = await run(router, registry.create(registry.METRICS, "jsonfile", str(values)))

    assert phase is Phase.ROLLED_BACK
    assert weights_file(weights)["shop/web"]["history"] == [0, 5, 0]
    rollback = next(e for e in audit.entries if e.action == "rollback")
    assert rollback.rule == "latency"
    assert rollback.time == 70.0  # p99 bad from the first tick, at 10s, for 1m


@pytest.mark.asyncio
@pytest.mark.looptime
async def test_the_package_decider_promotes_early(installed: Path, tmp_path: Path) -> None:
    weights, values = tmp_path / "weights.json", tmp_path / "metrics.json"
    values.write_text(json.dumps({"canary.p99": 0.12, "stable.p99": 0.11}))
    router = registry.create(registry.TRAFFIC, "jsonfile", str(weights))
    metrics = registry.create(registry.METRICS, "jsonfile", str(values))

    phase, audit = await run(router, metrics, registry.create(registry.DECIDERS, "early-promote"))

    assert phase is Phase.SUCCEEDED
    assert weights_file(weights)["shop/web"]["history"] == [0, 5, 10, 25, 50, 100, 0]
    promote = next(e for e in audit.entries if e.action == "promote")
    assert promote.explanation == "promote: healthy through a step at 50%"


@pytest.mark.asyncio
async def test_the_demo_drives_the_package_router_with_the_builtin_proxy_following(
    installed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from adapters.local.trafficstats import TrafficStats
    from codedance.local import LocalSite, ProxiedRouter, local_router

    # the demo builds it with no argument: it reads its file from the environment
    monkeypatch.setenv("JSONFILE_ROUTER", str(tmp_path / "weights.json"))
    site = LocalSite(
        tmp_path, "http://127.0.0.1:1", "http://127.0.0.1:2", TrafficStats(LoopClock())
    )
    front = local_router("jsonfile", site)
    assert isinstance(front, ProxiedRouter)
    ref = RolloutRef("shop", "web", "web", "web-canary")
    await front.start()
    try:
        assert front.url.startswith("http://127.0.0.1:")
        await front.set_weight(ref, 25)
        assert await front.get_weight(ref) == 25
        assert await front.proxy.get_weight(ref) == 25  # the demo's traffic follows it
    finally:
        await front.stop()
    assert weights_file(tmp_path / "weights.json")["shop/web"]["history"] == [25]
    # our own routers front the traffic themselves
    assert not isinstance(local_router("builtin", site), ProxiedRouter)


@pytest.mark.asyncio
async def test_the_demo_runs_a_real_release_through_the_package_router(
    installed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from codedance.local import SCENARIOS, LocalPlatform

    monkeypatch.setenv("JSONFILE_ROUTER", str(tmp_path / "weights.json"))
    demo = RolloutSpec.model_validate(
        {
            "name": "web", "stable": "web", "policy": "demo", "interval": "1s",
            "max_pause": "30s",
            "strategy": {"type": "steps", "steps": [10, 50, 100], "step_duration": "1s"},
        }
    )
    policy = dsl.load((ROOT / "rules" / "demo.rules").read_text(), "rules/demo.rules")
    platform = LocalPlatform(
        demo, policy, SCENARIOS["healthy"], router="jsonfile", workdir=tmp_path / "demo"
    )
    summary = await asyncio.wait_for(platform.run(), timeout=60)
    assert summary.phase == "Succeeded"
    assert summary.requests_failed == 0
    assert summary.per_track.get("canary", 0) > 0  # real requests went where it said
    assert weights_file(tmp_path / "weights.json")["default/web"]["history"] == [
        0, 10, 50, 100, 100, 0
    ]


def test_an_unknown_demo_router_fails_before_anything_starts(tmp_path: Path) -> None:
    from codedance.local import SCENARIOS, LocalPlatform

    with pytest.raises(registry.UnknownProvider, match=r"'ngnix' \(did you mean 'nginx'\?\)"):
        LocalPlatform(spec(), Policies().policy, SCENARIOS["healthy"], router="ngnix",
                      workdir=tmp_path)


# --- the documentation shows this package ------------------------------------------------


def _blocks(markdown: str) -> dict[str, str]:
    """The fenced code blocks of docs/extending.md that name a file on their first line."""
    found: dict[str, str] = {}
    for body in re.findall(r"```\w*\n(.*?)```", markdown, flags=re.S):
        first, _, rest = body.partition("\n")
        named = re.match(r"(?:#|//) (\S+\.(?:py|toml))$", first)
        if named:
            found[named.group(1)] = rest
    return found


def test_the_documented_router_is_the_tested_one_and_under_60_lines() -> None:
    blocks = _blocks((ROOT / "docs" / "extending.md").read_text())
    router = f"{MODULE}/router.py"
    assert blocks[router] == (PACKAGE / router).read_text()
    for name in (f"{MODULE}/metrics.py", f"{MODULE}/decider.py"):
        assert blocks[name] == (PACKAGE / name).read_text()
    # the documented pyproject.toml is the package's, less the other providers
    documented = blocks["pyproject.toml"].splitlines()
    ours = (PACKAGE / "pyproject.toml").read_text().splitlines()
    assert [line for line in documented if line] == [line for line in ours if line][:11]
    assert "jsonfile = \"codedance_jsonfile.router:JsonFileRouter\"" in documented
    assert len(documented) + len(blocks[router].splitlines()) < 60
