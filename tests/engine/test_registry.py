"""engine.registry: providers found by entry point, and the errors a person reads.

Each test that needs a package of its own writes one into a temporary
directory the way pip lays out an installed package (a `NAME.dist-info` with
`entry_points.txt`, beside its modules) and puts it on sys.path, so the
registry finds it through `importlib.metadata` exactly as it finds ours.
"""

from __future__ import annotations

import asyncio
import sys
import textwrap
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest
from pydantic import ValidationError

import dsl
from adapters.local.memory import MemoryRouter, MemoryStore, NoopWorkloads
from dsl.compile import CompiledPolicy
from engine import registry
from engine.audit import MemoryAudit
from engine.decider import Decider, MachineDecider
from engine.loop import Engine, LoopClock
from engine.model import Phase, RolloutSpec, StrategySpec
from engine.ports import MetricRequest
from engine.strategy import strategy_of

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "cdtest_"  # every module a test package brings starts with it


class Site:
    """A directory on sys.path into which a test installs packages."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def install(
        self, dist: str, entry_points: Mapping[str, Mapping[str, str]], **modules: str
    ) -> None:
        info = self.root / f"{dist.replace('-', '_')}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
        lines: list[str] = []
        for group, names in entry_points.items():
            lines += [f"[{group}]", *(f"{n} = {v}" for n, v in names.items()), ""]
        (info / "entry_points.txt").write_text("\n".join(lines))
        for name, source in modules.items():
            assert name.startswith(PREFIX)
            (self.root / f"{name}.py").write_text(textwrap.dedent(source))
        registry.refresh()


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Site]:
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.refresh()
    yield Site(tmp_path)
    registry.refresh()
    for name in [m for m in sys.modules if m.startswith(PREFIX)]:
        del sys.modules[name]


ROUTER = textwrap.dedent(
    """
    class Router:
        async def set_weight(self, rollout, weight):
            self.weight = weight

        async def get_weight(self, rollout):
            return self.weight
    """
)


# --- our own providers ----------------------------------------------------------------


def _ours() -> list[tuple[str, str, str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    groups = project["project"]["entry-points"]
    return [(g, n, v) for g, names in groups.items() for n, v in names.items()]


def test_pyproject_registers_a_provider_in_every_group() -> None:
    groups = {g for g, _, _ in _ours()}
    assert groups == set(registry.GROUPS)


@pytest.mark.parametrize(("group", "name", "value"), _ours(), ids=lambda x: str(x))
def test_each_of_our_providers_is_found_and_loads(group: str, name: str, value: str) -> None:
    assert name in registry.available(group), "reinstall: pip install -e '.[dev]'"
    module = value.split(":")[0]
    if not (ROOT / (module.replace(".", "/") + ".py")).exists():
        pytest.skip(f"{module} is not written yet")
    obj = registry.load(group, name)
    assert f"{obj.__module__}:{obj.__qualname__}" == value  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", ["linear", "exponential", "manual"])
def test_our_strategies_are_built_through_the_registry(name: str) -> None:
    strategy = strategy_of(StrategySpec(type=name, max_weight=30))
    assert strategy.weights[-1] == 30
    assert strategy.needs_approval(1) is (name == "manual")


def test_the_default_decider_is_the_state_machine() -> None:
    decider = registry.create(registry.DECIDERS, "default")
    assert isinstance(decider, MachineDecider)
    assert isinstance(decider, Decider)


# --- errors ---------------------------------------------------------------------------


def test_an_unknown_name_names_the_closest_and_every_known_one() -> None:
    with pytest.raises(registry.UnknownProvider) as e:
        registry.load(registry.TRAFFIC, "istoi")
    message = str(e.value)
    assert message.startswith("unknown traffic router 'istoi' (did you mean 'istio'?); known: ")
    for name in ("builtin", "nginx", "istio", "nginx-ingress", "gateway-api"):
        assert name in message
    assert "codedance.traffic" in message
    assert "\n" not in message


def test_a_name_a_known_one_begins_with_suggests_it() -> None:
    with pytest.raises(registry.UnknownProvider, match=r"did you mean 'exponential'\?"):
        registry.check_name(registry.STRATEGIES, "expo")


def test_an_unknown_group_lists_the_groups() -> None:
    with pytest.raises(registry.UnknownProvider, match=r"codedance\.deciders, codedance\.metrics"):
        registry.available("codedance.trafic")


def test_a_plugin_whose_import_fails_names_its_entry_point_and_the_error(site: Site) -> None:
    site.install(
        "broken-router",
        {"codedance.traffic": {"broken": f"{PREFIX}broken:Router"}},
        cdtest_broken="import cdtest_no_such_module\n",
    )
    with pytest.raises(registry.BrokenProvider) as e:
        registry.load(registry.TRAFFIC, "broken")
    assert str(e.value) == (
        "traffic router 'broken' (entry point broken = cdtest_broken:Router in "
        "codedance.traffic) failed to load: ModuleNotFoundError: No module named "
        "'cdtest_no_such_module'"
    )


def test_a_class_without_a_method_of_the_protocol_is_refused(site: Site) -> None:
    site.install(
        "half-router",
        {"codedance.traffic": {"half": f"{PREFIX}half:Router"}},
        cdtest_half="""
            class Router:
                async def set_weight(self, rollout, weight): ...
        """,
    )
    with pytest.raises(registry.InvalidProvider, match=r"'half' .* is not a TrafficRouter: "
                       r"it has no get_weight$"):
        registry.load(registry.TRAFFIC, "half")


def test_a_method_the_protocol_awaits_must_be_async(site: Site) -> None:
    site.install(
        "sync-router",
        {"codedance.traffic": {"sync": f"{PREFIX}sync:Router"}},
        cdtest_sync="""
            class Router:
                def set_weight(self, rollout, weight): ...
                async def get_weight(self, rollout): ...
        """,
    )
    with pytest.raises(registry.InvalidProvider, match="set_weight must be `async def`"):
        registry.load(registry.TRAFFIC, "sync")


def test_what_a_factory_makes_is_checked_when_it_is_built(site: Site) -> None:
    site.install(
        "factories",
        {"codedance.metrics": {"bad": f"{PREFIX}f:make_bad", "good": f"{PREFIX}f:make_good"}},
        cdtest_f="""
            class Source:
                async def fetch(self, at, requests):
                    return {}
                async def fetch_range(self, start, end, step, requests):
                    return {}

            def make_good(url):
                return Source()

            def make_bad(url):
                return object()
        """,
    )
    good = registry.create(registry.METRICS, "good", "http://prometheus:9090")
    assert type(good).__name__ == "Source"
    with pytest.raises(registry.InvalidProvider) as e:
        registry.create(registry.METRICS, "bad", "http://prometheus:9090")
    assert "made an object, which is not a MetricSource: it has no fetch, fetch_range" in str(
        e.value
    )
    with pytest.raises(registry.InvalidProvider, match="cannot be built here: missing a required"):
        registry.create(registry.METRICS, "good")


def test_a_ready_object_is_used_as_it_is_and_anything_else_is_refused(site: Site) -> None:
    site.install(
        "objects",
        {"codedance.traffic": {"ready": f"{PREFIX}objects:ROUTER", "number": f"{PREFIX}objects:N"}},
        cdtest_objects=ROUTER + "\nROUTER = Router()\nN = 3\n",
    )
    ready = registry.create(registry.TRAFFIC, "ready")
    assert ready is registry.load(registry.TRAFFIC, "ready")
    with pytest.raises(
        registry.InvalidProvider,
        match=r"'number' .* is an int: neither a TrafficRouter nor a class or factory that makes",
    ):
        registry.load(registry.TRAFFIC, "number")


def test_one_name_from_two_packages_names_both(site: Site) -> None:
    site.install("mesh-a", {"codedance.traffic": {"mesh": f"{PREFIX}a:Router"}}, cdtest_a=ROUTER)
    site.install("mesh-b", {"codedance.traffic": {"mesh": f"{PREFIX}b:Router"}}, cdtest_b=ROUTER)
    with pytest.raises(registry.InvalidProvider, match=r"registered by two packages, mesh-\w "
                       r"\(cdtest_\w:Router\) and mesh-\w \(cdtest_\w:Router\)"):
        registry.load(registry.TRAFFIC, "mesh")


# --- caching --------------------------------------------------------------------------


def test_a_provider_is_loaded_once_and_refresh_finds_new_packages(site: Site) -> None:
    site.install(
        "counted", {"codedance.traffic": {"counted": f"{PREFIX}counted:Router"}},
        cdtest_counted=ROUTER,
    )
    first = registry.load(registry.TRAFFIC, "counted")
    del sys.modules[f"{PREFIX}counted"]
    assert registry.load(registry.TRAFFIC, "counted") is first
    assert f"{PREFIX}counted" not in sys.modules  # not imported again
    assert "later" not in registry.available(registry.TRAFFIC)
    site.install(
        "later", {"codedance.traffic": {"later": f"{PREFIX}later:Router"}}, cdtest_later=ROUTER
    )
    assert "later" in registry.available(registry.TRAFFIC)


# --- strategies from a package ----------------------------------------------------------


def test_a_package_strategy_is_a_valid_strategy_type(site: Site) -> None:
    site.install(
        "halves",
        {"codedance.strategies": {"halves": f"{PREFIX}s:halves", "empty": f"{PREFIX}s:empty"}},
        cdtest_s="""
            from engine.strategy import Strategy

            def halves(spec):
                return Strategy((50, 100), spec.step_duration)

            def empty(spec):
                return Strategy((), spec.step_duration)
        """,
    )
    strategy = strategy_of(StrategySpec(type="halves", step_duration="2m"))
    assert (strategy.weights, strategy.step_duration) == ((50, 100), 120.0)
    with pytest.raises(ValueError, match="at least one"):
        strategy_of(StrategySpec(type="empty"))
    with pytest.raises(ValidationError, match=r"unknown strategy 'halfs' \(did you mean 'halves'"
                       r"\?\); known: empty, exponential, halves, linear, manual, steps"):
        StrategySpec(type="halfs")


# --- deciders ---------------------------------------------------------------------------


class ConstantSource:
    def __init__(self) -> None:
        self.calls: list[float] = []

    async def fetch(
        self, at: float, requests: Sequence[MetricRequest]
    ) -> Mapping[MetricRequest, float | None]:
        self.calls.append(at)
        return {r: 0.1 for r in requests}

    async def fetch_range(
        self, start: float, end: float, step: float, requests: Sequence[MetricRequest]
    ) -> Mapping[MetricRequest, list[tuple[float, float | None]]]:
        return {r: [] for r in requests}


class Policies:
    def __init__(self) -> None:
        self.policy = dsl.load("latency: p99 > 300ms for 1m -> rollback\n", "default.rules")

    def get(self, name: str) -> CompiledPolicy | None:
        return self.policy if name == "default" else None


DECIDER = """
    from engine.decider import MachineDecider

    class PromoteAt:
        '''Promotes once a step at `weight`% is due; counts the ticks it was asked at.'''

        def __init__(self, weight=25):
            self.weight = weight
            self.calls = 0

        def decide(self, status, verdict, now, machine):
            self.calls += 1
            due = now - status.step_started_at >= machine.strategy.step_duration
            if status.phase == "Progressing" and status.weight >= self.weight and due:
                verdict = verdict.model_copy(update={"action": "promote"})
            return MachineDecider().decide(status, verdict, now, machine)
"""


@pytest.mark.asyncio
@pytest.mark.looptime
async def test_a_package_decider_turns_verdicts_into_the_plan(site: Site) -> None:
    site.install(
        "promote-at", {"codedance.deciders": {"promote-at": f"{PREFIX}dec:PromoteAt"}},
        cdtest_dec=DECIDER,
    )
    decider = registry.create(registry.DECIDERS, "promote-at", 25)
    router, audit, source = MemoryRouter(), MemoryAudit(), ConstantSource()
    engine = Engine(
        policies=Policies(), metrics=source, router=router, workloads=NoopWorkloads(),
        store=MemoryStore(), audit=audit, clock=LoopClock(epoch=0.0), decider=decider,
    )
    task = asyncio.create_task(engine.run())
    spec = RolloutSpec.model_validate(
        {"name": "web", "stable": "web", "policy": "default", "interval": "10s",
         "strategy": {"type": "linear", "step_duration": "1m"}}
    )
    await engine.add(spec)
    status = await engine.wait_finished(spec.key)
    await engine.stop()
    await task
    assert status.phase is Phase.SUCCEEDED
    # 5, 10, 25 and then promotion: the steps at 50 and 75 never happen
    assert [w for _, w in router.writes] == [0, 5, 10, 25, 100, 0]
    promote = next(e for e in audit.entries if e.action == "promote")
    assert (promote.time, promote.actor) == (180.0, "policy")
    # unlike the built-in decider, a package's is asked at every tick
    assert decider.calls == len(source.calls) > 6  # type: ignore[attr-defined]
