"""adapters.telemetry: the engine's measurements and the probes, scraped over real HTTP.

Each test starts a `HealthServer` on a free loopback port, makes the calls
the engine makes through its `Telemetry` port, and reads `/metrics`,
`/healthz` and `/readyz` with an aiohttp client, the way Prometheus and the
kubelet do. The last test runs a whole rollout through the real engine (on
fake time) and checks the metrics agree with what the engine did.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager

import aiohttp
import pytest
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

import dsl
from adapters.local.memory import MemoryRouter, MemoryStore, NoopWorkloads
from adapters.telemetry import HealthServer, PrometheusTelemetry
from adapters.telemetry.prometheus import OTHER
from dsl.compile import CompiledPolicy
from engine.audit import MemoryAudit
from engine.loop import Engine, LoopClock
from engine.model import Phase, RolloutSpec
from engine.ports import MetricRequest, Telemetry

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of an exposition, keyed by (sample name, labels)."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def labelsets(samples: Samples, name: str) -> list[dict[str, str]]:
    return [dict(labels) for (n, labels) in samples if n == name]


class Served:
    """A running server and a client session pointed at it."""

    def __init__(self, server: HealthServer, session: aiohttp.ClientSession) -> None:
        self.server = server
        self.session = session

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.port}{path}"

    async def get(self, path: str) -> tuple[int, str, aiohttp.ClientResponse]:
        async with self.session.get(self.url(path)) as response:
            return response.status, await response.text(), response

    async def metrics(self) -> Samples:
        status, text, _ = await self.get("/metrics")
        assert status == 200
        return parse(text)


@asynccontextmanager
async def serving(
    telemetry: PrometheusTelemetry | None = None,
    *,
    ready: Callable[[], bool] = lambda: True,
    healthy: Callable[[], bool] | None = None,
) -> AsyncIterator[Served]:
    server = HealthServer(
        telemetry or PrometheusTelemetry(version="1.2.3"),
        ready=ready,
        healthy=healthy,
        host="127.0.0.1",
        port=0,
    )
    await server.start()
    try:
        async with aiohttp.ClientSession() as session:
            yield Served(server, session)
    finally:
        await server.stop()


# --- metrics ----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_every_metric_is_exposed_with_its_labels_after_the_engine_calls() -> None:
    telemetry = PrometheusTelemetry(version="1.2.3")
    telemetry.tick_lag(0.003)
    telemetry.verdict("rollback", "latency")
    telemetry.verdict("continue", None)
    telemetry.verdict("continue", None)
    telemetry.phases({"Progressing": 2, "Paused": 1})
    telemetry.query(0.02, True)
    telemetry.query(0.4, False)
    telemetry.policy_reload_failed("default")
    async with serving(telemetry) as served:
        m = await served.metrics()

    assert {d["phase"] for d in labelsets(m, "codedance_rollouts")} == {p.value for p in Phase}
    assert sample(m, "codedance_rollouts", phase="Progressing") == 2
    assert sample(m, "codedance_rollouts", phase="Paused") == 1
    assert sample(m, "codedance_rollouts", phase="Succeeded") == 0

    assert sample(m, "codedance_verdicts_total", action="rollback", rule="latency") == 1
    assert sample(m, "codedance_verdicts_total", action="continue", rule="") == 2
    assert len(labelsets(m, "codedance_verdicts_total")) == 2

    # 3 ms lands above the 2.5 ms bucket and inside the 5 ms one
    assert sample(m, "codedance_tick_lag_seconds_count") == 1
    assert sample(m, "codedance_tick_lag_seconds_sum") == pytest.approx(0.003)
    assert sample(m, "codedance_tick_lag_seconds_bucket", le="0.0025") == 0
    assert sample(m, "codedance_tick_lag_seconds_bucket", le="0.005") == 1
    assert sample(m, "codedance_tick_lag_seconds_bucket", le="+Inf") == 1

    assert sample(m, "codedance_metric_query_seconds_count") == 2
    assert sample(m, "codedance_metric_query_seconds_sum") == pytest.approx(0.42)
    assert sample(m, "codedance_metric_query_seconds_bucket", le="0.025") == 1
    assert sample(m, "codedance_metric_query_errors_total") == 1

    assert sample(m, "codedance_policy_reload_failures_total", policy="default") == 1
    assert sample(m, "codedance_build_info", version="1.2.3") == 1


@pytest.mark.asyncio
async def test_a_fresh_registry_has_every_phase_at_zero_and_no_errors() -> None:
    async with serving() as served:
        m = await served.metrics()
    assert {
        d["phase"]: sample(m, "codedance_rollouts", **d) for d in labelsets(m, "codedance_rollouts")
    } == {p.value: 0 for p in Phase}
    assert sample(m, "codedance_metric_query_errors_total") == 0
    assert sample(m, "codedance_tick_lag_seconds_count") == 0


def test_phase_counts_replace_the_last_ones() -> None:
    telemetry = PrometheusTelemetry()
    telemetry.phases({"Progressing": 3})
    telemetry.phases({"Succeeded": 2, "RolledBack": 1, "NotAPhase": 7})
    get = telemetry.registry.get_sample_value
    assert get("codedance_rollouts", {"phase": "Progressing"}) == 0
    assert get("codedance_rollouts", {"phase": "Succeeded"}) == 2
    assert get("codedance_rollouts", {"phase": "RolledBack"}) == 1
    assert get("codedance_rollouts", {"phase": "NotAPhase"}) is None


def test_rule_and_policy_labels_are_capped() -> None:
    telemetry = PrometheusTelemetry(max_labels=2)
    for rule in ["latency", "errors", "line 7", "line 8", "latency"]:
        telemetry.verdict("rollback", rule)
    for name in ["a", "b", "c"]:
        telemetry.policy_reload_failed(name)
    get = telemetry.registry.get_sample_value
    assert get("codedance_verdicts_total", {"action": "rollback", "rule": "latency"}) == 2
    assert get("codedance_verdicts_total", {"action": "rollback", "rule": "errors"}) == 1
    assert get("codedance_verdicts_total", {"action": "rollback", "rule": OTHER}) == 2
    assert get("codedance_verdicts_total", {"action": "rollback", "rule": "line 7"}) is None
    assert get("codedance_policy_reload_failures_total", {"policy": "b"}) == 1
    assert get("codedance_policy_reload_failures_total", {"policy": OTHER}) == 1


def test_instances_keep_their_own_registries() -> None:
    first, second = PrometheusTelemetry(), PrometheusTelemetry()
    first.query(0.1, False)
    assert isinstance(first, Telemetry)
    assert first.registry is not second.registry
    assert first.registry.get_sample_value("codedance_metric_query_errors_total") == 1
    assert second.registry.get_sample_value("codedance_metric_query_errors_total") == 0


def test_a_given_registry_is_used() -> None:
    registry = CollectorRegistry()
    PrometheusTelemetry(registry, version="9").verdict("pause", "no_data")
    assert registry.get_sample_value("codedance_build_info", {"version": "9"}) == 1
    labels = {"action": "pause", "rule": "no_data"}
    assert registry.get_sample_value("codedance_verdicts_total", labels) == 1


@pytest.mark.asyncio
async def test_metrics_have_the_exposition_content_type() -> None:
    async with serving() as served:
        status, _, response = await served.get("/metrics")
    assert status == 200
    assert response.headers["Content-Type"] == CONTENT_TYPE_LATEST


# --- probes -----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_readyz_follows_the_ready_callback() -> None:
    state = {"ready": False}
    async with serving(ready=lambda: state["ready"]) as served:
        status, text, response = await served.get("/readyz")
        assert (status, text.strip()) == (503, "not ready")
        assert response.content_type == "text/plain"
        state["ready"] = True
        status, text, _ = await served.get("/readyz")
        assert (status, text.strip()) == (200, "ready")
        state["ready"] = False
        status, _, _ = await served.get("/readyz")
        assert status == 503


@pytest.mark.asyncio
async def test_healthz_is_ok_without_a_callback_and_follows_one_when_given() -> None:
    async with serving(ready=lambda: False) as served:
        status, text, _ = await served.get("/healthz")
        # liveness does not depend on readiness
        assert (status, text.strip()) == (200, "ok")

    state = {"healthy": True}
    async with serving(healthy=lambda: state["healthy"]) as served:
        assert (await served.get("/healthz"))[0] == 200
        state["healthy"] = False
        status, text, _ = await served.get("/healthz")
        assert (status, text.strip()) == (503, "unhealthy")
        state["healthy"] = True
        assert (await served.get("/healthz"))[0] == 200


@pytest.mark.asyncio
async def test_a_failing_check_is_a_no_and_its_error_is_not_sent() -> None:
    def broken() -> bool:
        raise RuntimeError("secret token abc123 rejected by https://internal.example")

    async with serving(ready=broken, healthy=broken) as served:
        for path in ("/readyz", "/healthz"):
            status, text, response = await served.get(path)
            assert status == 503
            assert "abc123" not in text and "internal" not in text
            assert "aiohttp" not in response.headers.get("Server", "")
            assert "Python" not in response.headers.get("Server", "")


@pytest.mark.asyncio
async def test_unknown_paths_are_not_found() -> None:
    async with serving() as served:
        status, _, response = await served.get("/debug")
    assert status == 404
    assert "aiohttp" not in response.headers.get("Server", "")


# --- lifecycle --------------------------------------------------------------------


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@pytest.mark.asyncio
async def test_port_zero_binds_a_free_port_and_stop_frees_it() -> None:
    server = HealthServer(PrometheusTelemetry(), ready=lambda: True, host="127.0.0.1", port=0)
    with pytest.raises(RuntimeError):
        _ = server.port
    await server.start()
    port = server.port
    assert port > 0 and server.running
    assert not _bindable(port)
    await server.stop()
    assert not server.running
    with pytest.raises(RuntimeError):
        _ = server.port
    assert _bindable(port)
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientConnectionError):
            await session.get(f"http://127.0.0.1:{port}/healthz")
    await server.stop()  # a second stop is harmless

    # and the same port can be served again at once
    again = HealthServer(PrometheusTelemetry(), ready=lambda: True, host="127.0.0.1", port=port)
    await again.start()
    try:
        assert again.port == port
    finally:
        await again.stop()


# --- through the engine -----------------------------------------------------------


class HealthySource:
    """Metric values that keep every rule quiet; `down` makes queries fail for a while."""

    def __init__(self, down: Callable[[float], bool]) -> None:
        self.down = down
        self.calls = 0
        self.failures = 0

    async def fetch(
        self, at: float, requests: Sequence[MetricRequest]
    ) -> Mapping[MetricRequest, float | None]:
        self.calls += 1
        if self.down(at):
            self.failures += 1
            raise ConnectionError("unreachable")
        return dict.fromkeys(requests, 0.1)

    async def fetch_range(
        self, start: float, end: float, step: float, requests: Sequence[MetricRequest]
    ) -> Mapping[MetricRequest, list[tuple[float, float | None]]]:
        return {r: [] for r in requests}


class Policies:
    def __init__(self, text: str) -> None:
        self.policy = dsl.load(text, "default.rules")

    def get(self, name: str) -> CompiledPolicy | None:
        return self.policy if name == "default" else None


@pytest.mark.asyncio
@pytest.mark.looptime
async def test_a_rollout_through_the_engine_shows_in_the_metrics() -> None:
    telemetry = PrometheusTelemetry()
    epoch = 1_000_000.0
    source = HealthySource(down=lambda t: epoch + 30 <= t < epoch + 50)
    audit = MemoryAudit()
    engine = Engine(
        policies=Policies("latency: p99 > 300ms for 1m -> rollback\n"),
        metrics=source,
        router=MemoryRouter(),
        workloads=NoopWorkloads(),
        store=MemoryStore(),
        audit=audit,
        clock=LoopClock(epoch=epoch),
        telemetry=telemetry,
    )
    spec = RolloutSpec.model_validate(
        {
            "name": "web",
            "stable": "web",
            "policy": "default",
            "interval": "10s",
            "strategy": {"type": "linear", "step_duration": "30s"},
        }
    )
    task = asyncio.create_task(engine.run())
    try:
        await engine.add(spec)
        # loop time is fake: an hour here is milliseconds, and a stuck rollout fails fast
        status = await asyncio.wait_for(engine.wait_finished("default/web"), timeout=3600)
    finally:
        await engine.stop()
        await task

    get = telemetry.registry.get_sample_value
    assert status.phase is Phase.SUCCEEDED
    # the phases are counted at each tick: one rollout, in a phase it went through
    counted = {p.value: get("codedance_rollouts", {"phase": p.value}) for p in Phase}
    assert sum(v or 0 for v in counted.values()) == 1
    [(shown, _)] = [(p, v) for p, v in counted.items() if v == 1]
    assert shown in {e.to_phase.value for e in audit.entries}
    assert get("codedance_tick_lag_seconds_count") == len(engine.tick_lags) > 0
    assert get("codedance_metric_query_seconds_count") == source.calls > 0
    assert get("codedance_metric_query_errors_total") == source.failures > 0
    # at most one verdict a tick, and no rule decided any of them
    verdicts = [
        (s.labels["action"], s.labels["rule"], s.value)
        for family in telemetry.registry.collect()
        for s in family.samples
        if s.name == "codedance_verdicts_total"
    ]
    assert verdicts and all(rule == "" for _, rule, _ in verdicts)
    assert 0 < sum(v for _, _, v in verdicts) <= len(engine.tick_lags)
