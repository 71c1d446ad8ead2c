"""The Prometheus source (adapters/metrics/prometheus.py) against a Prometheus double.

The double is a real aiohttp server on 127.0.0.1: it records every request
(path, form, headers), answers `/api/v1/query` and `/api/v1/query_range`
with canned series, and can be told to fail first (500, 429, 400, a slow
answer). The escaping tests do not trust dsl.promql: they lex the query text
the double received with the small lexer below and decode its strings with
Go's unquoting rules, as Prometheus does.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.metrics.catalog import catalog_for
from adapters.metrics.prometheus import (
    PrometheusError,
    PrometheusSource,
    QueryPlanner,
    SyncPrometheus,
)
from engine.ports import MetricRequest, Target
from tests.services import free_port

PLAIN = catalog_for("plain")
TOKEN = "s3cr3t-token-value"

# --- the double ---------------------------------------------------------------------


@dataclass
class Received:
    path: str
    form: dict[str, str]
    headers: dict[str, str]

    @property
    def query(self) -> str:
        return self.form["query"]


@dataclass
class Failure:
    status: int = 500
    body: str = '{"status":"error","errorType":"internal","error":"boom"}'
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


Answer = Callable[[str], Mapping[tuple[str, str], Any]]


class PrometheusDouble:
    """Answers every query with the canned series of `answer(query)`, labelled by `labels`."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.failures: list[Failure] = []
        self.labels = ("namespace", "workload")
        self.answer: Answer = lambda query: {}
        self.scalar: str | None = None
        self.release = asyncio.Event()
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/api/v1/query", self._query)
        app.router.add_post("/api/v1/query_range", self._range)
        self.runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        host, port = self.runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"

    async def stop(self) -> None:
        self.release.set()
        if self.runner is not None:
            await self.runner.cleanup()

    async def _record(self, request: web.Request) -> Received:
        # a form body, or the URL's parameters (prometheus-api-client sends those)
        form = {k: str(v) for k, v in {**request.query, **(await request.post())}.items()}
        got = Received(request.path, form, dict(request.headers))
        self.received.append(got)
        return got

    async def _failure(self, got: Received) -> web.Response | None:
        if not self.failures:
            return None
        failure = self.failures.pop(0)
        if failure.delay:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.release.wait(), failure.delay)
        # `{auth}` in a body echoes the credentials, as a careless proxy might
        body = failure.body.replace("{auth}", got.headers.get("Authorization", ""))
        return web.Response(
            status=failure.status,
            text=body,
            headers=failure.headers,
            content_type="application/json",
        )

    def _labelled(self, query: str) -> list[tuple[dict[str, str], Any]]:
        ns_label, wl_label = self.labels
        return [
            ({ns_label: ns, wl_label: wl, "instance": "x"} if ns or wl else {}, value)
            for (ns, wl), value in self.answer(query).items()
        ]

    async def _query(self, request: web.Request) -> web.Response:
        got = await self._record(request)
        failed = await self._failure(got)
        if failed is not None:
            return failed
        at = float(got.form["time"])
        if self.scalar is not None:
            data: dict[str, Any] = {"resultType": "scalar", "result": [at, self.scalar]}
        else:
            result = [{"metric": m, "value": [at, str(v)]} for m, v in self._labelled(got.query)]
            data = {"resultType": "vector", "result": result}
        return web.json_response({"status": "success", "data": data})

    async def _range(self, request: web.Request) -> web.Response:
        got = await self._record(request)
        failed = await self._failure(got)
        if failed is not None:
            return failed
        start, end, step = (float(got.form[k]) for k in ("start", "end", "step"))
        result = []
        for metric, values in self._labelled(got.query):
            # `values` maps an offset from start (in steps) to a value; missing = no point
            points = [[start + i * step, str(v)] for i, v in sorted(values.items())]
            assert all(p[0] <= end for p in points)
            result.append({"metric": metric, "values": points})
        return web.json_response(
            {"status": "success", "data": {"resultType": "matrix", "result": result}}
        )


@pytest_asyncio.fixture
async def prom() -> AsyncIterator[PrometheusDouble]:
    double = PrometheusDouble()
    await double.start()
    yield double
    await double.stop()


class Sleeps:
    """An injected sleep that records the delays and does not wait."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


def source(url: str, **kwargs: Any) -> PrometheusSource:
    kwargs.setdefault("jitter", lambda cap: cap)
    kwargs.setdefault("sleep", Sleeps())
    return PrometheusSource(url, kwargs.pop("catalog", PLAIN), **kwargs)


def req(namespace: str, workload: str, metric: str = "p99", **kw: Any) -> MetricRequest:
    track = "canary" if workload.endswith("canary") else "stable"
    return MetricRequest(Target(namespace, workload, track, **kw), metric, 60.0)


def metric_of(query: str) -> str:
    """Which built-in metric a catalog query is (for canned answers)."""
    if "histogram_quantile(0.99" in query:
        return "p99"
    if 'code=~"5.."' in query:
        return "error_rate"
    return "request_rate"


# --- batching and fan-out -----------------------------------------------------------


@pytest.mark.asyncio
async def test_a_thousand_targets_take_one_request_per_metric(prom: PrometheusDouble) -> None:
    reqs, expected = [], {}
    metrics = {"p99": 0.0, "error_rate": 0.5, "request_rate": 100.0}
    for i in range(500):
        namespace = f"team-{i % 10}"
        for j, workload in enumerate((f"app-{i}", f"app-{i}-canary")):
            for metric, base in metrics.items():
                r = req(namespace, workload, metric)
                reqs.append(r)
                expected[r] = base + i / 1000 + j / 10_000

    def answer(query: str) -> dict[tuple[str, str], float]:
        base = metrics[metric_of(query)]
        out = {(f"team-{i % 10}", f"app-{i}"): base + i / 1000 for i in range(500)}
        out |= {(f"team-{i % 10}", f"app-{i}-canary"): base + i / 1000 + 1e-4 for i in range(500)}
        out[("team-0", "not-asked-for")] = 42.0  # extra series are ignored
        return out

    prom.answer = answer
    async with source(prom.url) as src:
        got = await src.fetch(1_700_000_000.0, reqs)
        assert len(prom.received) == 3 == src.http_requests
        assert sorted(metric_of(r.query) for r in prom.received) == sorted(metrics)
        assert {r.form["time"] for r in prom.received} == {"1700000000.0"}
        assert got == pytest.approx(expected)
        await src.fetch(1_700_000_030.0, reqs)
        assert len(prom.received) == 6


@pytest.mark.asyncio
async def test_each_request_gets_its_own_series_or_none(prom: PrometheusDouble) -> None:
    prom.answer = lambda q: {
        ("shop", "ok"): 0.25,
        ("shop", "nan"): "NaN",
        ("shop", "inf"): "+Inf",
        ("other", "ok"): 9.0,  # same workload name, another namespace
    }
    reqs = [req("shop", w) for w in ("ok", "nan", "inf", "missing")] + [req("other", "ok")]
    async with source(prom.url) as src:
        got = await src.fetch(10.0, reqs)
    assert [got[r] for r in reqs] == [0.25, None, None, None, 9.0]
    assert len(prom.received) == 1


@pytest.mark.asyncio
async def test_pod_metrics_sum_the_pods_of_each_track(prom: PrometheusDouble) -> None:
    prom.labels = ("namespace", "pod")
    prom.answer = lambda q: {
        ("shop", "checkout-7d9f8b6c5-x2x4z"): 0.5,
        ("shop", "checkout-7d9f8b6c5-q9w8e"): 0.25,
        ("shop", "checkout-canary-5f6d7c8b9-a1b2c"): 1.0,
        ("shop", "checkout-canary-5f6d7c8b9-zzzzz-extra"): 100.0,  # not a pod of either
    }
    stable, canary = req("shop", "checkout", "cpu"), req("shop", "checkout-canary", "cpu")
    # a target with a pod regex of its own (here one stable and one canary pod)
    picked = req(
        "shop", "picked", "cpu", pod_regex="checkout-7d9f8b6c5-x2x4z|checkout-canary-.*-a1b2c"
    )
    async with source(prom.url) as src:
        got = await src.fetch(10.0, [stable, canary, picked])
    assert got == {stable: 0.75, canary: 1.0, picked: 1.5}
    assert len(prom.received) == 1
    (regex,) = re.findall(r'pod=~"([^"]*)"', prom.received[0].query)
    assert regex == (
        "(?:checkout-7d9f8b6c5-x2x4z|checkout-canary-.*-a1b2c"
        "|checkout-[a-z0-9]+-[a-z0-9]+|checkout-canary-[a-z0-9]+-[a-z0-9]+)"
    )


@pytest.mark.asyncio
async def test_nginx_knows_a_track_by_its_service(prom: PrometheusDouble) -> None:
    prom.labels = ("namespace", "service")
    prom.answer = lambda q: {("shop", "checkout-canary-svc"): 0.02, ("shop", "checkout"): 0.01}
    canary = req("shop", "checkout-canary", "error_rate", service="checkout-canary-svc")
    stable = req("shop", "checkout", "error_rate")  # no Service named: the workload's name
    async with source(prom.url, catalog=catalog_for("nginx")) as src:
        got = await src.fetch(10.0, [canary, stable])
    assert got == {canary: 0.02, stable: 0.01}
    assert 'service=~"(?:checkout|checkout-canary-svc)"' in prom.received[0].query


@pytest.mark.asyncio
async def test_a_policy_template_is_rendered_per_target(prom: PrometheusDouble) -> None:
    template = 'sum(rate(orders{ns="{{namespace}}", app="{{workload}}"}[{{window}}]))'
    values = {"checkout": 3.0, "checkout-canary": 1.0}
    prom.answer = lambda q: {("", ""): values[re.search(r'app="([^"]*)"', q)[1]]}  # type: ignore[index]
    reqs = [MetricRequest(Target("shop", w, "x"), "orders", 60.0, template) for w in values]
    async with source(prom.url) as src:
        got = await src.fetch(10.0, reqs)
    assert got == dict(zip(reqs, values.values(), strict=True))
    assert sorted(r.query for r in prom.received) == [
        'sum(rate(orders{ns="shop", app="checkout"}[1m]))',
        'sum(rate(orders{ns="shop", app="checkout-canary"}[1m]))',
    ]


@pytest.mark.asyncio
async def test_a_scalar_answer_serves_a_policy_metric(prom: PrometheusDouble) -> None:
    prom.scalar = "7"
    template = 'scalar(sum(up{namespace="{{namespace}}", app="{{workload}}"}))'
    r = MetricRequest(Target("shop", "checkout", "stable"), "up_count", 60.0, template)
    async with source(prom.url) as src:
        assert await src.fetch(10.0, [r]) == {r: 7.0}


@pytest.mark.asyncio
async def test_a_metric_without_a_query_is_unknown_without_a_request(
    prom: PrometheusDouble,
) -> None:
    r = MetricRequest(Target("shop", "checkout", "stable"), "no_such_metric", 60.0)
    async with source(prom.url) as src:
        assert await src.fetch(10.0, [r]) == {r: None}
    assert prom.received == []


@pytest.mark.asyncio
async def test_a_range_is_placed_on_the_tick_grid(prom: PrometheusDouble) -> None:
    prom.answer = lambda q: {("shop", "checkout"): {0: 0.1, 1: 0.2, 3: "NaN"}}
    r, other = req("shop", "checkout"), req("shop", "gone")
    async with source(prom.url) as src:
        got = await src.fetch_range(900.0, 1020.0, 30.0, [r, other])
    assert got[r] == [(900.0, 0.1), (930.0, 0.2), (960.0, None), (990.0, None), (1020.0, None)]
    assert got[other] == [(t, None) for t in (900.0, 930.0, 960.0, 990.0, 1020.0)]
    (sent,) = prom.received
    assert (sent.path, sent.form["start"], sent.form["end"], sent.form["step"]) == (
        "/api/v1/query_range",
        "900.0",
        "1020.0",
        "30.0",
    )


# --- failures, retries and timeouts -------------------------------------------------


@pytest.mark.asyncio
async def test_500s_are_retried_with_exponential_backoff(prom: PrometheusDouble) -> None:
    prom.failures = [Failure(500), Failure(503)]
    prom.answer = lambda q: {("shop", "checkout"): 0.3}
    sleeps = Sleeps()
    outcomes: list[bool] = []
    async with source(prom.url, sleep=sleeps, on_query=lambda s, ok: outcomes.append(ok)) as src:
        got = await src.fetch(10.0, [req("shop", "checkout")])
    assert list(got.values()) == [0.3]
    assert len(prom.received) == 3 == src.http_requests
    assert sleeps.delays == [0.2, 0.4]  # backoff * 2**attempt, jitter at its cap
    assert outcomes == [True]


@pytest.mark.asyncio
async def test_a_429_waits_as_long_as_retry_after_says(prom: PrometheusDouble) -> None:
    prom.failures = [Failure(429, "slow down", {"Retry-After": "2"})]
    prom.answer = lambda q: {("shop", "checkout"): 0.3}
    sleeps = Sleeps()
    async with source(prom.url, sleep=sleeps) as src:
        got = await src.fetch(10.0, [req("shop", "checkout")])
    assert list(got.values()) == [0.3]
    assert sleeps.delays == [2.0]
    assert len(prom.received) == 2


@pytest.mark.asyncio
async def test_a_retry_after_beyond_the_cap_gives_up(prom: PrometheusDouble) -> None:
    prom.failures = [Failure(429, "slow down", {"Retry-After": "120"})]
    prom.answer = lambda q: {("shop", "checkout"): 0.3}
    async with source(prom.url) as src:
        got = await src.fetch(10.0, [req("shop", "checkout")])
    assert list(got.values()) == [None]
    assert len(prom.received) == 1


@pytest.mark.asyncio
async def test_a_400_is_not_retried(
    prom: PrometheusDouble, caplog: pytest.LogCaptureFixture
) -> None:
    body = '{"status":"error","errorType":"bad_data","error":"parse error at char 3"}'
    prom.failures = [Failure(400, body)]
    prom.answer = lambda q: {("shop", "checkout"): 0.3}
    outcomes: list[bool] = []
    with caplog.at_level(logging.WARNING):
        async with source(prom.url, on_query=lambda s, ok: outcomes.append(ok)) as src:
            got = await src.fetch(10.0, [req("shop", "checkout"), req("shop", "cart")])
    assert list(got.values()) == [None, None]
    assert len(prom.received) == 1
    assert outcomes == [False]
    assert "HTTP 400: parse error at char 3" in caplog.text


@pytest.mark.asyncio
async def test_retries_run_out(prom: PrometheusDouble) -> None:
    prom.failures = [Failure(502)] * 3
    prom.answer = lambda q: {("shop", "checkout"): 0.3}
    async with source(prom.url, retries=2) as src:
        got = await src.fetch(10.0, [req("shop", "checkout")])
    assert list(got.values()) == [None]
    assert len(prom.received) == 3


@pytest.mark.asyncio
async def test_a_slow_answer_times_out_to_unknown_without_retrying(prom: PrometheusDouble) -> None:
    prom.failures = [Failure(200, delay=5.0)]
    prom.answer = lambda q: {("shop", "checkout"): 0.3}
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with source(prom.url, timeout=0.3) as src:
        got = await src.fetch(10.0, [req("shop", "checkout")])
    assert list(got.values()) == [None]
    assert loop.time() - started < 2.0
    assert len(prom.received) == 1


@pytest.mark.asyncio
async def test_an_unreachable_prometheus_is_retried_then_unknown() -> None:
    sleeps = Sleeps()
    async with source(f"http://127.0.0.1:{free_port()}", sleep=sleeps, retries=2) as src:
        got = await src.fetch(10.0, [req("shop", "checkout")])
        assert list(got.values()) == [None]
        assert src.http_requests == 3
    assert len(sleeps.delays) == 2


@pytest.mark.asyncio
async def test_one_failed_group_leaves_the_others_answered(prom: PrometheusDouble) -> None:
    prom.failures = [Failure(400)]  # the first query to arrive fails
    prom.answer = lambda q: {("shop", "checkout"): 0.3}
    reqs = [req("shop", "checkout", m) for m in ("p99", "error_rate", "request_rate")]
    async with source(prom.url) as src:
        got = await src.fetch(10.0, reqs)
    assert sorted(v is None for v in got.values()) == [False, False, True]


# --- credentials --------------------------------------------------------------------


@pytest.mark.asyncio
async def test_the_bearer_token_is_read_from_its_file_at_every_request(
    prom: PrometheusDouble, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    prom.answer = lambda q: {("shop", "checkout"): 0.3}
    async with source(prom.url, bearer_token_file=token_file) as src:
        await src.fetch(10.0, [req("shop", "checkout")])
        token_file.write_text("rotated-token")
        await src.fetch(20.0, [req("shop", "checkout")])
    assert [r.headers["Authorization"] for r in prom.received] == [
        f"Bearer {TOKEN}",
        "Bearer rotated-token",
    ]


@pytest.mark.asyncio
async def test_basic_auth_comes_from_a_user_password_file(
    prom: PrometheusDouble, tmp_path: Path
) -> None:
    auth_file = tmp_path / "basic"
    auth_file.write_text("reader:pa:ss@word\n")
    prom.answer = lambda q: {("shop", "checkout"): 0.3}
    async with source(prom.url, basic_auth_file=auth_file) as src:
        await src.fetch(10.0, [req("shop", "checkout")])
    expected = base64.b64encode(b"reader:pa:ss@word").decode()
    assert prom.received[0].headers["Authorization"] == f"Basic {expected}"


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["bearer", "basic"])
async def test_credentials_never_reach_logs_exceptions_or_reprs(
    prom: PrometheusDouble, tmp_path: Path, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    secret_file = tmp_path / "secret"
    if kind == "bearer":
        secret_file.write_text(TOKEN)
        secrets = [TOKEN]
        options = {"bearer_token_file": secret_file}
    else:
        secret_file.write_text(f"reader:{TOKEN}")
        secrets = [TOKEN, base64.b64encode(f"reader:{TOKEN}".encode()).decode()]
        options = {"basic_auth_file": secret_file}
    # the double echoes the Authorization header in its error bodies
    echo = '{"status":"error","errorType":"bad_data","error":"rejected {auth}"}'
    prom.failures = [Failure(400, echo), Failure(503, "no: {auth}"), Failure(401, "who: {auth}")]
    with caplog.at_level(logging.DEBUG):
        async with source(prom.url, retries=0, **options) as src:
            await src.fetch(10.0, [req("shop", "checkout")])
            await src.fetch(20.0, [req("shop", "checkout")])
            with pytest.raises(PrometheusError) as raised:
                await src.query("up", 30.0)
            shown = [caplog.text, str(raised.value), repr(raised.value), repr(src)]
    assert secrets[-1] in prom.received[0].headers["Authorization"]  # it was sent
    assert "<redacted>" in caplog.text
    for text in shown:
        for secret in secrets:
            assert secret not in text


@pytest.mark.asyncio
async def test_a_url_with_credentials_is_refused() -> None:
    with pytest.raises(ValueError, match="basic auth file") as raised:
        PrometheusSource("http://reader:hunter2@prometheus:9090", PLAIN)
    assert "hunter2" not in str(raised.value)


# --- escaping -----------------------------------------------------------------------

STRING = "\x00"  # stands for a string literal in the code outside strings


def lex(query: str) -> tuple[str, list[str]]:
    """The query outside strings (each string as STRING, comments dropped) and its strings."""
    code: list[str] = []
    strings: list[str] = []
    i = 0
    while i < len(query):
        ch = query[i]
        if ch in "\"'`":
            j = i + 1
            while query[j] != ch:  # IndexError: never closed, which fails the test
                assert query[j] != "\n", f"a raw newline in a string of {query!r}"
                j += 2 if query[j] == "\\" and ch != "`" else 1
            strings.append(query[i : j + 1])
            code.append(STRING)
            i = j + 1
        elif ch == "#":
            end = query.find("\n", i)
            i = len(query) if end < 0 else end
        else:
            code.append(ch)
            i += 1
    return "".join(code), strings


_GO_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}


def go_unquote(literal: str) -> str:
    """A double-quoted PromQL string's value, as Go's strconv.Unquote reads it (ASCII \\x only)."""
    assert literal[0] == literal[-1] == '"'
    body, out, i = literal[1:-1], [], 0
    while i < len(body):
        ch = body[i]
        assert ch not in '"\n'
        if ch != "\\":
            out.append(ch)
            i += 1
            continue
        esc = body[i + 1]
        if esc in _GO_ESCAPES:
            out.append(_GO_ESCAPES[esc])
            i += 2
        elif esc in '\\"':
            out.append(esc)
            i += 2
        elif esc in "xuU":
            width = {"x": 2, "u": 4, "U": 8}[esc]
            value = int(body[i + 2 : i + 2 + width], 16)
            assert esc != "x" or value < 0x80
            out.append(chr(value))
            i += 2 + width
        else:
            raise AssertionError(f"unknown escape \\{esc} in {literal!r}")
    return "".join(out)


HOSTILE = [
    '"}[5m]) or vector(1) #',
    'quote"d',
    "back\\slash",
    "line\nbreak",
    "tab\tand\x7fdel",
    ".*",
    "a|b",
    "(?:x)",
    "x{2}",
    "^$",
    "[a-z]+",
    "{{workload}}",
    "rtl\u202eoverride",
    "# not a comment",
    "`",
]
NOT_MATCHED = ["", "a", "b", "x", "xx", "anything", "vector(1)", "quote", "rtl", "z"]


def _regex_strings(query: str, template: str) -> list[tuple[str, str]]:
    """(template string, decoded query string) for each string literal, in order."""
    code, strings = lex(query)
    template_code, template_strings = lex(template)
    # the one placeholder outside strings is the window, one minute in these tests
    template_code = template_code.replace("{{window}}", "1m")
    assert code == template_code, "the query's structure differs from its template's"
    return list(zip(template_strings, (go_unquote(s) for s in strings), strict=True))


def assert_matches_exactly(regex: str, members: list[str]) -> None:
    compiled = re.compile(regex)
    for name in members:
        assert compiled.fullmatch(name), (regex, name)
    for name in NOT_MATCHED:
        assert (compiled.fullmatch(name) is not None) == (name in members), (regex, name)


@pytest.mark.asyncio
async def test_hostile_names_cannot_change_a_batched_query(prom: PrometheusDouble) -> None:
    namespaces = ["shop", 'evil"}) or vector(1) #']
    reqs = [req(ns, w, "error_rate") for ns in namespaces for w in HOSTILE]
    prom.answer = lambda q: {(ns, w): 0.5 for ns in namespaces for w in HOSTILE}
    async with source(prom.url) as src:
        got = await src.fetch(10.0, reqs)
    assert set(got.values()) == {0.5}  # every hostile target still gets its own series
    (sent,) = prom.received
    template = PLAIN["error_rate"].template
    pairs = _regex_strings(sent.query, template)
    assert [t for t, _ in pairs].count('"{{workload}}"') == 3
    for written, decoded in pairs:
        if written == '"{{workload}}"':
            assert_matches_exactly(decoded, HOSTILE)
        elif written == '"{{namespace}}"':
            assert_matches_exactly(decoded, namespaces)
        else:
            assert decoded == go_unquote(written)  # the template's own strings are untouched


@pytest.mark.asyncio
async def test_hostile_names_cannot_change_a_policy_query(prom: PrometheusDouble) -> None:
    template = 'sum(rate(x{ns="{{namespace}}", app="{{workload}}", r=~"{{workload}}"}[{{window}}]))'
    reqs = [MetricRequest(Target("shop", w, "canary"), "x", 60.0, template) for w in HOSTILE]
    async with source(prom.url) as src:
        await src.fetch(10.0, reqs)
    assert len(prom.received) == len(HOSTILE)
    for sent in prom.received:
        (_, ns), (_, app), (_, regex) = _regex_strings(sent.query, template)
        assert ns == "shop"
        assert app in HOSTILE
        assert_matches_exactly(regex, [app])


names = st.text(st.characters(codec="utf-8"), min_size=1, max_size=12)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(names, names), min_size=1, max_size=6, unique=True))
def test_any_names_fill_only_the_strings_of_a_batch(targets: list[tuple[str, str]]) -> None:
    planner = QueryPlanner(PLAIN)
    reqs = [req(ns, w, "p99") for ns, w in targets]
    (query,) = planner.plan(reqs).queries
    template = PLAIN["p99"].template
    for written, decoded in _regex_strings(query.text, template):
        if written == '"{{workload}}"':
            assert_matches_exactly(decoded, sorted({w for _, w in targets}))
        elif written == '"{{namespace}}"':
            assert_matches_exactly(decoded, sorted({ns for ns, _ in targets}))


def test_the_lexer_sees_a_naive_substitution() -> None:
    """Without escaping the structure check fails, so the tests above can fail."""
    template = PLAIN["p99"].template
    naive = template.replace("{{workload}}", HOSTILE[0]).replace("{{window}}", "1m")
    naive = naive.replace("{{namespace}}", "shop")
    with pytest.raises((AssertionError, IndexError)):
        _regex_strings(naive, template)


# --- the synchronous facade ---------------------------------------------------------


@pytest.mark.asyncio
async def test_the_sync_facade_asks_the_same_query(prom: PrometheusDouble, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    prom.answer = lambda q: {("shop", "checkout"): 0.3, ("shop", "checkout-canary"): 0.4}
    prom.failures = [Failure(500)]
    reqs = [req("shop", "checkout"), req("shop", "checkout-canary")]
    sync = SyncPrometheus(prom.url, PLAIN, backoff=0.0, bearer_token_file=token_file)
    try:
        got = await asyncio.to_thread(sync.fetch, 10.0, reqs)
    finally:
        sync.close()
    assert list(got.values()) == [0.3, 0.4]
    assert len(prom.received) == 2  # one 500, retried once
    assert prom.received[-1].headers["Authorization"] == f"Bearer {TOKEN}"
    async with source(prom.url) as src:
        await src.fetch(10.0, reqs)
    assert prom.received[-1].query == prom.received[0].query


@pytest.mark.asyncio
async def test_the_sync_facade_hides_credentials_in_errors(
    prom: PrometheusDouble, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    prom.failures = [Failure(400, "rejected {auth}")]
    sync = SyncPrometheus(prom.url, PLAIN, bearer_token_file=token_file)
    try:
        with pytest.raises(PrometheusError) as raised:
            await asyncio.to_thread(sync.query, "up", 10.0)
    finally:
        sync.close()
    assert "400" in str(raised.value)
    assert TOKEN not in str(raised.value)
