"""The Prometheus source against a real Prometheus scraping two real app instances.

Two aiohttp apps on loopback export prometheus-client metrics: a
`http_request_duration_seconds` histogram and a `http_requests_total{code}`
counter. Prometheus (the Debian package) scrapes both every second, giving
them `namespace` and `workload` labels through `static_configs`, as the
`plain` catalog expects. The canary is slower and fails a quarter of its
requests. After some traffic, one fetch must answer p99, error_rate and
request_rate for both tracks with one query per metric, and the synchronous
facade must agree with it.

Skipped when Prometheus is not installed, except in CI (CI=true), where it
fails instead.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from adapters.metrics.catalog import catalog_for
from adapters.metrics.prometheus import PrometheusSource, SyncPrometheus
from engine.ports import MetricRequest, Target
from tests.services import start_prometheus, which_or_skip

NAMESPACE = "shop"
WINDOW = 15.0  # seconds; covers all the traffic below


class App:
    """One instance of the service: `/work` does the work, `/metrics` exports it."""

    def __init__(self, delay: float, fail_every: int) -> None:
        self.delay = delay
        self.fail_every = fail_every
        self.served = 0
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "http_request_duration_seconds", "Request latency.", registry=self.registry
        )
        self.requests = Counter(
            "http_requests", "Requests by status code.", ["code"], registry=self.registry
        )
        # Series that exist from the start count from 0; the stable never
        # fails, so its 5xx series never exists and its error rate must still be 0.
        self.requests.labels(code="200")
        if fail_every:
            self.requests.labels(code="500")
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def work(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        await asyncio.sleep(self.delay)
        self.served += 1
        status = 500 if self.fail_every and self.served % self.fail_every == 0 else 200
        self.requests.labels(code=str(status)).inc()
        self.latency.observe(time.perf_counter() - started)
        return web.Response(status=status, text="done")

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry), content_type="text/plain")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/work", self.work)
        app.router.add_get("/metrics", self.metrics)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = self.runner.addresses[0][1]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest_asyncio.fixture
async def apps() -> AsyncIterator[dict[str, App]]:
    which_or_skip("prometheus", "apt-get install prometheus")
    instances = {"checkout": App(delay=0.0, fail_every=0), "checkout-canary": App(0.06, 4)}
    for app in instances.values():
        await app.start()
    yield instances
    for app in instances.values():
        await app.stop()


async def drive(apps: dict[str, App], seconds: float) -> None:
    """Requests to both instances, a few at a time, for `seconds`."""
    deadline = asyncio.get_running_loop().time() + seconds
    async with aiohttp.ClientSession() as session:

        async def client(port: int) -> None:
            while asyncio.get_running_loop().time() < deadline:
                async with session.get(f"http://127.0.0.1:{port}/work") as response:
                    await response.read()

        await asyncio.gather(*(client(app.port) for app in apps.values() for _ in range(3)))


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_plain_metrics_from_a_real_prometheus(apps: dict[str, App], tmp_path: Path) -> None:
    scrape = {
        "job_name": "checkout",
        "static_configs": [
            {
                "targets": [f"127.0.0.1:{app.port}"],
                "labels": {"namespace": NAMESPACE, "workload": workload},
            }
            for workload, app in apps.items()
        ],
    }
    # start_prometheus blocks until both apps were scraped, which needs this loop free
    running = start_prometheus(tmp_path, [scrape])
    base_url = await asyncio.to_thread(running.__enter__)
    try:
        await drive(apps, 4.0)
        await asyncio.sleep(2.5)  # two more scrapes take in the last requests
        at = time.time() - 1.0  # a time every scrape before it has been stored for
        reqs = {
            (workload, metric): MetricRequest(
                Target(NAMESPACE, workload, "canary" if "canary" in workload else "stable"),
                metric,
                WINDOW,
            )
            for workload in apps
            for metric in ("p99", "error_rate", "request_rate")
        }
        async with PrometheusSource(base_url, catalog_for("plain")) as source:
            got = await source.fetch(at, list(reqs.values()))
            assert source.http_requests == 3
            ranges = await source.fetch_range(at - 3.0, at, 1.0, [reqs["checkout-canary", "p99"]])
        sync = SyncPrometheus(base_url, catalog_for("plain"))
        try:
            synced = await asyncio.to_thread(sync.fetch, at, list(reqs.values()))
        finally:
            sync.close()
    finally:
        await asyncio.to_thread(running.__exit__, None, None, None)

    assert all(got[r] is not None for r in reqs.values()), got
    value = {key: float(got[r] or 0.0) for key, r in reqs.items()}
    assert value["checkout", "p99"] < 0.05 < value["checkout-canary", "p99"] <= 0.25
    assert value["checkout", "error_rate"] == 0.0
    assert 0.15 < value["checkout-canary", "error_rate"] < 0.35
    assert value["checkout", "request_rate"] > value["checkout-canary", "request_rate"] > 1.0
    assert synced == got
    points = ranges[reqs["checkout-canary", "p99"]]
    assert [t for t, _ in points] == pytest.approx([at - 3.0, at - 2.0, at - 1.0, at])
    assert all(v is not None and 0.05 < v <= 0.25 for _, v in points), points
