"""The Prometheus module: metric requests in, one value (or None) per request out.

`PrometheusSource` implements the engine's `MetricSource` over aiohttp.
`SyncPrometheus` is the same thing, synchronous, over prometheus-api-client's
`PrometheusConnect`, for the tools (backtest, REPL). Both plan their queries
with one `QueryPlanner` and read answers with one `distribute`, so a tool and
the controller ask Prometheus the same questions.

Batching. The loop hands a source every request of every rollout due at a
tick. The planner groups built-in metrics by (metric, template, window) and
sends ONE query per group: `{{namespace}}` and the target placeholder
(`{{workload}}`, `{{service}}` for NGINX, `{{pod_regex}}` for pod metrics) are
filled with a regex alternation of the group's targets, each name escaped with
`dsl.promql.escape_regex` (`(?:checkout|cart\\.v2)`; PromQL anchors regex
matchers, so a name matches only itself). The catalog's templates aggregate
`by` the provider's namespace and workload labels, and `distribute` hands
each request the series that carries its target's names (pod metrics: the
sum of the series of the pods its regex matches). A target with no series, or
a NaN or infinite value, gets None; a failed query gives None to all of its
requests and a warning in the log; `fetch` itself never raises.

Metrics a policy defines (`request.template` set) and catalog overrides that
match with `=` cannot be batched: they are rendered per target with
`dsl.promql.render` and sent once per distinct query text (targets whose
queries come out the same share one). We do not batch policy templates even
when they use `=~`, because we cannot know which labels their result keeps;
their query must return one series, and a result of several series is
unknown for them. `{{service}}` is the target's Service, or its workload name
when it has none; `{{pod_regex}}` defaults to the pods of a Deployment named
like the workload; `{{interval}}` is the step of a range query and
`evaluation_interval` for an instant one.

The wire. Instant queries are `POST /api/v1/query` (form `query`, `time` =
the tick, `timeout`), ranges `POST /api/v1/query_range`; a form body, because
a thousand-target alternation is too long for a URL. Each HTTP attempt has
`timeout` seconds. Connection errors, 5xx and 429 are retried up to `retries`
times, waiting a random time up to `backoff * 2**attempt` (full jitter, capped
at `max_backoff`), or the server's `Retry-After` when longer (one longer than
`max_backoff` gives up instead: the next tick asks again). Timeouts are not
retried: the attempt has used its time, and retrying a heavy query only adds
load to a struggling Prometheus. Other 4xx are the query's fault and final.

Credentials. A bearer token file or a `user:password` file is read at every
request, so a rotated Secret takes effect without a restart. Their contents
never reach a log line, an exception or a repr: error texts are scrubbed of
them (and of the base64 form a server might echo), and a base URL carrying
`user:password@` is refused in favour of the file.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import random
import re
import ssl
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import requests
from prometheus_api_client import PrometheusConnect
from prometheus_api_client.exceptions import PrometheusApiClientException
from urllib3.util.retry import Retry

from adapters.metrics.catalog import CatalogEntry, default_pod_regex
from dsl.ast import Dim
from dsl.promql import (
    Place,
    Placeholder,
    Segment,
    Template,
    TemplateError,
    escape_label_value,
    is_duration,
    placeholder_problem,
    prometheus_duration,
    quote_meta,
)
from engine.ports import MetricRequest, MetricValues, Target, range_times

log = logging.getLogger("codedance.adapters.prometheus")

RETRY_STATUSES = frozenset({429, *range(500, 600)})
Point = tuple[float, float | None]
RangeValues = Mapping[MetricRequest, list[Point]]


class PrometheusError(Exception):
    """A query that got no usable answer. Its text never holds a credential."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Series:
    """One series of a query's result: its labels and its (time, value) points."""

    labels: Mapping[str, str]
    points: tuple[Point, ...]


# --- planning -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PlannedQuery:
    """One query to send, and the requests its answer serves."""

    text: str
    metric: str
    entry: CatalogEntry | None  # None for a policy's own template
    requests: tuple[MetricRequest, ...]


@dataclass(frozen=True, slots=True)
class Plan:
    queries: tuple[PlannedQuery, ...]
    unanswerable: tuple[MetricRequest, ...]  # no template, or a value that cannot be sent


def identity_of(entry: CatalogEntry, target: Target) -> str:
    """The value of `target` that the entry's workload label carries (or its pod regex)."""
    if entry.identity == "service":
        return target.service or target.workload
    if entry.identity == "pod_regex":
        return target.pod_regex or default_pod_regex(target.workload)
    return target.workload


def target_values(target: Target) -> dict[str, str]:
    """The target placeholders' values for a query about `target` alone."""
    return {
        "namespace": target.namespace,
        "workload": target.workload,
        "track": target.track,
        "service": target.service or target.workload,
        "pod_regex": target.pod_regex or default_pod_regex(target.workload),
    }


def _alternation(values: Iterable[str], *, regexes: bool) -> str:
    """The content of a `=~` string matching any of `values` (regexes as they are)."""
    parts = [escape_label_value(v if regexes else quote_meta(v)) for v in sorted(set(values))]
    return parts[0] if len(parts) == 1 else "(?:" + "|".join(parts) + ")"


def _fill_batch(
    segments: Sequence[Segment], regex_fills: Mapping[str, str], durations: Mapping[str, str]
) -> str:
    """A template filled with pre-escaped regex alternations and durations.

    Only regex places take an alternation and only duration places a duration,
    so the alternation sits inside the `=~` string the template's author wrote.
    """
    out: list[str] = []
    for seg in segments:
        if not isinstance(seg, Placeholder):
            out.append(seg.text)
            continue
        problem = placeholder_problem(seg)
        if problem is not None:
            raise problem
        if seg.place is Place.REGEX and seg.name in regex_fills:
            out.append(regex_fills[seg.name])
        elif seg.place is Place.DURATION and is_duration(durations.get(seg.name, "")):
            out.append(durations[seg.name])
        else:
            raise ValueError(f"{{{{{seg.name}}}}} cannot be filled for a batch here")
    return "".join(out)


class QueryPlanner:
    """Turns requests into the fewest queries: one per batchable group, one per other query."""

    def __init__(
        self, catalog: Mapping[str, CatalogEntry], evaluation_interval: float = 30.0
    ) -> None:
        self.catalog = catalog
        self.evaluation_interval = evaluation_interval
        self._parsed: dict[str, Template | None] = {}
        self._warned: set[str] = set()

    def _policy_template(self, text: str) -> Template | None:
        if text not in self._parsed:
            try:
                # the unit is the policy's business; only the text matters here
                self._parsed[text] = Template(text, Dim.NUMBER)
            except TemplateError as e:
                log.warning("a policy metric template is unusable: %s", e.message)
                self._parsed[text] = None
        return self._parsed[text]

    def plan(self, requests: Sequence[MetricRequest], interval: float | None = None) -> Plan:
        step = prometheus_duration(interval or self.evaluation_interval)
        batches: dict[tuple[str, CatalogEntry, str], list[MetricRequest]] = {}
        singles: dict[tuple[str, str, CatalogEntry | None], list[MetricRequest]] = {}
        unanswerable: list[MetricRequest] = []
        for req in dict.fromkeys(requests):
            entry = self.catalog.get(req.metric) if req.template is None else None
            template = entry.compiled if entry is not None else self._template_for(req)
            if template is None:
                unanswerable.append(req)
                continue
            try:
                window = prometheus_duration(req.window)
                values = target_values(req.target)
                for value in values.values():
                    escape_label_value(value)  # a lone surrogate cannot be sent
                if entry is not None and entry.batchable:
                    batches.setdefault((req.metric, entry, window), []).append(req)
                    continue
                text = template.render({**values, "window": window, "interval": step})
            except (ValueError, KeyError) as e:
                log.warning("cannot query %s for %s: %s", req.metric, _name(req.target), e)
                unanswerable.append(req)
                continue
            singles.setdefault((text, req.metric, entry), []).append(req)
        queries = [
            PlannedQuery(text, metric, entry, tuple(reqs))
            for (text, metric, entry), reqs in singles.items()
        ]
        for (metric, entry, window), reqs in batches.items():
            fills = {
                "namespace": _alternation((r.target.namespace for r in reqs), regexes=False),
                entry.identity: _alternation(
                    (identity_of(entry, r.target) for r in reqs),
                    regexes=entry.identity == "pod_regex",
                ),
            }
            text = _fill_batch(entry.compiled.segments, fills, {"window": window, "interval": step})
            queries.append(PlannedQuery(text, metric, entry, tuple(reqs)))
        return Plan(tuple(queries), tuple(unanswerable))

    def _template_for(self, req: MetricRequest) -> Template | None:
        if req.template is not None:
            return self._policy_template(req.template)
        if req.metric not in self._warned:
            self._warned.add(req.metric)
            log.warning("no query for the metric %s in the catalog", req.metric)
        return None


def _name(target: Target) -> str:
    return f"{target.namespace}/{target.workload}"


# --- answers ------------------------------------------------------------------------


def _number(text: Any) -> float | None:
    """A sample value as Prometheus writes it ("0.25", "NaN", "+Inf"); None unless finite."""
    value = float(text)
    return value if math.isfinite(value) else None


def _point(pair: Sequence[Any]) -> Point:
    return float(pair[0]), _number(pair[1])


def decode_result(result_type: str | None, result: Any) -> list[Series]:
    """The series of a query's `data.result`; raises PrometheusError for anything else.

    `result_type` None guesses the type from the shape, for clients that
    return the result alone.
    """
    try:
        if result_type is None:
            if isinstance(result, list) and result and not isinstance(result[0], dict):
                result_type = "scalar"
            elif isinstance(result, list) and result and "values" in result[0]:
                result_type = "matrix"
            else:
                result_type = "vector"
        if result_type == "scalar":
            return [Series({}, (_point(result),))]
        if result_type == "vector":
            # a native histogram sample has "histogram" instead of "value": not a number
            return [
                Series(dict(item["metric"]), (_point(item["value"]),) if "value" in item else ())
                for item in result
            ]
        if result_type == "matrix":
            return [
                Series(dict(item["metric"]), tuple(_point(p) for p in item["values"]))
                for item in result
            ]
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise PrometheusError(f"malformed query result ({type(e).__name__})") from None
    raise PrometheusError(f"a {result_type} result is not a number")


def _sum(series: Sequence[Series]) -> tuple[Point, ...]:
    """Pointwise sum; unknown at a time where any summed series is unknown."""
    totals: dict[float, float | None] = {}
    for s in series:
        for t, v in s.points:
            if t not in totals:
                totals[t] = v
            else:
                before = totals[t]
                totals[t] = None if before is None or v is None else before + v
    return tuple(sorted(totals.items()))


def distribute(
    query: PlannedQuery, series: Sequence[Series]
) -> dict[MetricRequest, tuple[Point, ...]]:
    """Each request of `query` with the points of its own series (empty when it has none).

    A query about one target answers with its one series, whatever its labels.
    Otherwise a series belongs to the target whose namespace and identity its
    labels carry; for pod metrics, to each target whose pods include its pod,
    and a target's series are summed.
    """
    entry = query.entry
    if len(series) == 1 and (entry is None or len(_identities(entry, query.requests)) == 1):
        return {r: series[0].points for r in query.requests}
    if entry is None:
        return {r: () for r in query.requests}
    if entry.identity == "pod_regex":
        return _by_pod(entry, query.requests, series)
    by_labels: dict[tuple[str | None, str | None], list[Series]] = defaultdict(list)
    for s in series:
        key = (s.labels.get(entry.namespace_label), s.labels.get(entry.workload_label))
        by_labels[key].append(s)
    out: dict[MetricRequest, tuple[Point, ...]] = {}
    for req in query.requests:
        found = by_labels.get((req.target.namespace, identity_of(entry, req.target)), [])
        out[req] = found[0].points if len(found) == 1 else ()
    return out


def _identities(entry: CatalogEntry, requests: Iterable[MetricRequest]) -> set[tuple[str, str]]:
    return {(r.target.namespace, identity_of(entry, r.target)) for r in requests}


_DEPLOYMENT_POD = re.compile(r"(.+)-[a-z0-9]+-[a-z0-9]+")


def _by_pod(
    entry: CatalogEntry, requests: Sequence[MetricRequest], series: Sequence[Series]
) -> dict[MetricRequest, tuple[Point, ...]]:
    """Pod series summed per target.

    A target without a pod regex owns the pods of a Deployment of its name,
    found by name (what `default_pod_regex` matches, without a regex scan of
    every pod for every target); a target's own regex is matched against the
    pods of its namespace.
    """
    pods: dict[str, list[tuple[str, Series]]] = defaultdict(list)
    by_deployment: dict[tuple[str, str], list[Series]] = defaultdict(list)
    for s in series:
        namespace, pod = s.labels.get(entry.namespace_label), s.labels.get(entry.workload_label)
        if namespace is None or pod is None:
            continue
        pods[namespace].append((pod, s))
        m = _DEPLOYMENT_POD.fullmatch(pod)
        if m is not None:
            by_deployment[(namespace, m.group(1))].append(s)
    out: dict[MetricRequest, tuple[Point, ...]] = {}
    for req in requests:
        target = req.target
        if not target.pod_regex:
            matched = by_deployment.get((target.namespace, target.workload), [])
        else:
            try:
                pattern = re.compile(target.pod_regex)
            except re.error:
                log.warning("the pod regex of %s is not a regex", _name(target))
                matched = []
            else:
                matched = [s for pod, s in pods[target.namespace] if pattern.fullmatch(pod)]
        out[req] = _sum(matched) if matched else ()
    return out


def _instant(points: tuple[Point, ...]) -> float | None:
    return points[-1][1] if points else None


def _on_grid(
    points: tuple[Point, ...], start: float, step: float, times: list[float]
) -> list[Point]:
    """Points placed on the grid of a range (a time with no point is None)."""
    values: list[float | None] = [None] * len(times)
    for t, v in points:
        i = round((t - start) / step)
        # Prometheus keeps milliseconds; a point within 2ms is the grid's
        if 0 <= i < len(times) and abs(times[i] - t) <= 0.002:
            values[i] = v
    return list(zip(times, values, strict=True))


# --- credentials --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Credentials:
    """What to send with one request, and the strings no text may show."""

    headers: Mapping[str, str]
    secrets: tuple[str, ...]

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "<redacted>")
        return text


class _CredentialFiles:
    def __init__(self, bearer_token_file: str | Path | None, basic_auth_file: str | Path | None):
        if bearer_token_file is not None and basic_auth_file is not None:
            raise ValueError("give a bearer token file or a basic auth file, not both")
        self.bearer = Path(bearer_token_file) if bearer_token_file is not None else None
        self.basic = Path(basic_auth_file) if basic_auth_file is not None else None

    def read(self) -> _Credentials:
        """Read the files now (a rotated Secret counts from the next request)."""
        if self.bearer is not None:
            token = self._read(self.bearer, "bearer token").strip()
            if not token:
                raise PrometheusError(f"the bearer token file {self.bearer} is empty")
            return _Credentials({"Authorization": f"Bearer {token}"}, (token,))
        if self.basic is not None:
            text = self._read(self.basic, "basic auth").strip("\r\n")
            _, colon, password = text.partition(":")
            if not colon:
                raise PrometheusError(f"the basic auth file {self.basic} must hold user:password")
            encoded = base64.b64encode(text.encode()).decode()
            secrets = tuple(s for s in (password, encoded) if s)
            return _Credentials({"Authorization": f"Basic {encoded}"}, secrets)
        return _Credentials({}, ())

    @staticmethod
    def _read(path: Path, what: str) -> str:
        try:
            return path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
            raise PrometheusError(f"cannot read the {what} file {path}: {reason}") from None


def _base_url(url: str) -> str:
    if "@" in url.split("://", 1)[-1].split("/", 1)[0]:
        raise ValueError("put Prometheus credentials in a basic auth file, not in the URL")
    return url.rstrip("/")


def _error_text(body: str, creds: _Credentials) -> str:
    """Prometheus' own error message, or the start of the body; scrubbed of credentials."""
    try:
        decoded = json.loads(body)
        message = str(decoded.get("error") or decoded) if isinstance(decoded, dict) else body
    except ValueError:
        message = body
    return creds.redact(message.strip())[:300]


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (seconds or an HTTP date)."""
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


# --- the asyncio source -------------------------------------------------------------


class PrometheusSource:
    """The engine's metric source over a Prometheus HTTP API.

        source = PrometheusSource("http://prometheus:9090", catalog_for("istio"),
                                  bearer_token_file="/var/run/secrets/prometheus/token")
        values = await source.fetch(now, requests)   # {request: float | None}
        await source.close()

    `http_requests` counts HTTP requests sent (retries included);
    `on_query(seconds, ok)` is called once per query, retries included in its time
    (the engine's `Telemetry.query` fits). `jitter(cap)` picks the wait before a
    retry, at most `cap` (default: uniformly at random) and `sleep` waits it; tests
    inject both. Pass a `session` to share a connection pool; the source then
    leaves it open. At most `max_concurrency` queries are in flight at once.
    """

    def __init__(
        self,
        base_url: str,
        catalog: Mapping[str, CatalogEntry],
        *,
        timeout: float = 5.0,
        retries: int = 3,
        backoff: float = 0.2,
        max_backoff: float = 5.0,
        jitter: Callable[[float], float] | None = None,
        bearer_token_file: str | Path | None = None,
        basic_auth_file: str | Path | None = None,
        ca_file: str | Path | None = None,
        insecure_skip_verify: bool = False,
        session: aiohttp.ClientSession | None = None,
        on_query: Callable[[float, bool], None] | None = None,
        evaluation_interval: float = 30.0,
        max_concurrency: int = 16,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.base_url = _base_url(base_url)
        self.planner = QueryPlanner(catalog, evaluation_interval)
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._jitter = jitter if jitter is not None else _full_jitter
        self._credentials = _CredentialFiles(bearer_token_file, basic_auth_file)
        self._ssl: ssl.SSLContext | bool = True
        if insecure_skip_verify:
            self._ssl = False
        elif ca_file is not None:
            self._ssl = ssl.create_default_context(cafile=str(ca_file))
        self._session = session
        self._owns_session = session is None
        self._on_query = on_query
        self._limit = asyncio.Semaphore(max_concurrency)
        self._sleep = sleep
        self.http_requests = 0

    def __repr__(self) -> str:
        provider = getattr(self.planner.catalog, "provider", "custom")
        return f"PrometheusSource({self.base_url!r}, provider={provider!r})"

    async def __aenter__(self) -> PrometheusSource:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    # --- the port ---

    async def fetch(self, at: float, requests: Sequence[MetricRequest]) -> MetricValues:
        plan = self.planner.plan(requests)
        values: dict[MetricRequest, float | None] = dict.fromkeys(requests)

        async def one(query: PlannedQuery) -> None:
            series = await self._answer(query, "/api/v1/query", {"time": _time(at)})
            for req, points in distribute(query, series).items():
                values[req] = _instant(points)

        await asyncio.gather(*(one(q) for q in plan.queries))
        return values

    async def fetch_range(
        self, start: float, end: float, step: float, requests: Sequence[MetricRequest]
    ) -> RangeValues:
        times = range_times(start, end, step)
        plan = self.planner.plan(requests, interval=step)
        empty: list[Point] = [(t, None) for t in times]
        values: dict[MetricRequest, list[Point]] = {r: list(empty) for r in requests}
        if not times:
            return values
        form = {"start": _time(times[0]), "end": _time(times[-1]), "step": repr(float(step))}

        async def one(query: PlannedQuery) -> None:
            series = await self._answer(query, "/api/v1/query_range", form)
            for req, points in distribute(query, series).items():
                values[req] = _on_grid(points, times[0], step, times)

        await asyncio.gather(*(one(q) for q in plan.queries))
        return values

    async def _answer(
        self, query: PlannedQuery, path: str, form: Mapping[str, str]
    ) -> list[Series]:
        """The series of one planned query; [] (and a warning) when it fails."""
        async with self._limit:
            started = time.perf_counter()
            try:
                series = await self._post(path, {"query": query.text, **form})
            except PrometheusError as e:
                ok = False
                series = []
                log.warning(
                    "prometheus query for %s (%d requests) failed: %s",
                    query.metric,
                    len(query.requests),
                    e,
                )
            else:
                ok = True
            if self._on_query is not None:
                self._on_query(time.perf_counter() - started, ok)
            return series

    # --- HTTP ---

    async def query(self, query: str, at: float) -> list[Series]:
        """An instant query's series; raises PrometheusError."""
        return await self._post("/api/v1/query", {"query": query, "time": _time(at)})

    async def query_range(self, query: str, start: float, end: float, step: float) -> list[Series]:
        """A range query's series; raises PrometheusError."""
        form = {"query": query, "start": _time(start), "end": _time(end), "step": repr(float(step))}
        return await self._post("/api/v1/query_range", form)

    async def _post(self, path: str, form: Mapping[str, str]) -> list[Series]:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        url = self.base_url + path
        data = {**form, "timeout": prometheus_duration(self.timeout)}
        attempt = 0
        while True:
            creds = self._credentials.read()
            retry_after: float | None = None
            self.http_requests += 1
            try:
                async with self._session.post(
                    url,
                    data=data,
                    headers=dict(creds.headers),
                    timeout=aiohttp.ClientTimeout(total=self.timeout),
                    ssl=self._ssl,
                ) as response:
                    body = (await response.read()).decode("utf-8", errors="replace")
                    if response.status == 200:
                        return _decode_body(body, creds)
                    error = PrometheusError(
                        f"HTTP {response.status}: {_error_text(body, creds)}", response.status
                    )
                    retryable = response.status in RETRY_STATUSES
                    retry_after = _retry_after(response.headers.get("Retry-After"))
            except TimeoutError:
                raise PrometheusError(f"no answer within {self.timeout:g}s") from None
            except aiohttp.ClientError as e:
                error = PrometheusError(f"cannot reach Prometheus: {creds.redact(str(e))}")
                retryable = isinstance(e, aiohttp.ClientConnectionError)
            if not retryable or attempt >= self.retries:
                raise error
            delay = self._jitter(min(self.max_backoff, self.backoff * 2**attempt))
            if retry_after is not None:
                if retry_after > self.max_backoff:
                    raise PrometheusError(f"{error} (asked to retry after {retry_after:g}s)")
                delay = max(delay, retry_after)
            attempt += 1
            await self._sleep(delay)


def _full_jitter(cap: float) -> float:
    return random.uniform(0.0, cap)


def _time(t: float) -> str:
    return repr(float(t))


def _decode_body(body: str, creds: _Credentials) -> list[Series]:
    try:
        decoded = json.loads(body)
    except ValueError:
        raise PrometheusError("the answer is not JSON") from None
    if not isinstance(decoded, dict) or decoded.get("status") != "success":
        message = decoded.get("error") if isinstance(decoded, dict) else None
        raise PrometheusError(f"query failed: {creds.redact(str(message))[:300]}")
    data = decoded.get("data")
    if not isinstance(data, dict):
        raise PrometheusError("the answer has no data")
    return decode_result(data.get("resultType"), data.get("result"))


# --- the synchronous facade ---------------------------------------------------------


class SyncPrometheus:
    """The same queries, synchronously, for the tools (backtest, REPL).

        prom = SyncPrometheus("http://localhost:9090", catalog_for("plain"))
        prom.fetch(time.time(), requests)        # {request: float | None}
        prom.fetch_range(start, end, 30, requests)

    Built on prometheus-api-client's `PrometheusConnect`, which sends the query
    in the URL (its POST mode too): fine for a tool's few rollouts. Retries
    (connection errors, 5xx, 429 with its Retry-After) are urllib3's.
    """

    def __init__(
        self,
        base_url: str,
        catalog: Mapping[str, CatalogEntry],
        *,
        timeout: float = 5.0,
        retries: int = 3,
        backoff: float = 0.2,
        bearer_token_file: str | Path | None = None,
        basic_auth_file: str | Path | None = None,
        ca_file: str | Path | None = None,
        insecure_skip_verify: bool = False,
        evaluation_interval: float = 30.0,
    ) -> None:
        self.base_url = _base_url(base_url)
        self.planner = QueryPlanner(catalog, evaluation_interval)
        self._credentials = _CredentialFiles(bearer_token_file, basic_auth_file)
        session = requests.Session()
        session.verify = False if insecure_skip_verify else (str(ca_file) if ca_file else True)
        retry = Retry(
            total=retries,
            read=0,  # a timed-out query is not sent again (see the module docstring)
            backoff_factor=backoff,
            status_forcelist=sorted(RETRY_STATUSES),
            allowed_methods=None,
            respect_retry_after_header=True,
            raise_on_status=False,
        )
        self._client = PrometheusConnect(
            url=self.base_url, session=session, retry=retry, timeout=timeout, method="POST"
        )

    def __repr__(self) -> str:
        return f"SyncPrometheus({self.base_url!r})"

    def close(self) -> None:
        self._client.close()

    def query(self, query: str, at: float) -> list[Series]:
        """An instant query's series; raises PrometheusError."""
        return self._call(lambda: self._client.custom_query(query, params={"time": _time(at)}))

    def query_range(self, query: str, start: float, end: float, step: float) -> list[Series]:
        """A range query's series; raises PrometheusError."""
        # the client rounds datetimes to whole seconds; the params carry the exact times
        params = {"start": _time(start), "end": _time(end)}
        return self._call(
            lambda: self._client.custom_query_range(
                query, _datetime(start), _datetime(end), repr(float(step)), params=params
            )
        )

    def fetch(
        self, at: float, requests: Sequence[MetricRequest]
    ) -> dict[MetricRequest, float | None]:
        plan = self.planner.plan(requests)
        values: dict[MetricRequest, float | None] = dict.fromkeys(requests)
        for q in plan.queries:
            series = self._answer(q, partial(self.query, q.text, at))
            for req, points in distribute(q, series).items():
                values[req] = _instant(points)
        return values

    def fetch_range(
        self, start: float, end: float, step: float, requests: Sequence[MetricRequest]
    ) -> dict[MetricRequest, list[Point]]:
        times = range_times(start, end, step)
        plan = self.planner.plan(requests, interval=step)
        values: dict[MetricRequest, list[Point]] = {r: [(t, None) for t in times] for r in requests}
        if not times:
            return values
        for q in plan.queries:
            series = self._answer(q, partial(self.query_range, q.text, times[0], times[-1], step))
            for req, points in distribute(q, series).items():
                values[req] = _on_grid(points, times[0], step, times)
        return values

    def _answer(self, query: PlannedQuery, run: Callable[[], list[Series]]) -> list[Series]:
        try:
            return run()
        except PrometheusError as e:
            log.warning("prometheus query for %s failed: %s", query.metric, e)
            return []

    def _call(self, run: Callable[[], Any]) -> list[Series]:
        creds = self._credentials.read()
        # PrometheusConnect sends this attribute with every request
        self._client.headers = dict(creds.headers)
        try:
            return decode_result(None, run())
        except PrometheusApiClientException as e:
            raise PrometheusError(creds.redact(str(e))[:300]) from None
        except requests.RequestException as e:
            raise PrometheusError(
                f"cannot reach Prometheus: {creds.redact(str(e))[:300]}"
            ) from None
        except ValueError:
            raise PrometheusError("the answer is not JSON") from None


def _datetime(t: float) -> datetime:
    return datetime.fromtimestamp(t, tz=UTC)
