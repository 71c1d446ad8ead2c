"""`codedance controller`: the Kubernetes controller process, wired from the adapters.

    codedance controller [--namespace NS] [--policies DIR] [--kubeconfig FILE]
                         [--prometheus URL] [--catalog plain] [--listen :8080]
                         [--audit-log FILE] [--lease-name NAME] [--lease-namespace NS]

In: the cluster (in-cluster config, or a kubeconfig), the policy directory
(usually the mounted ConfigMap), a Prometheus URL. Out: a process that serves
`/metrics`, `/healthz` and `/readyz`, takes part in the Lease election, and,
while it leads, runs the engine and the CanaryDeployment controller.

The Lease (`--lease-name`, default `codedance-controller`) lives in the
controller's own namespace (`--lease-namespace`, else $POD_NAMESPACE, else the
pod's ServiceAccount namespace, else `codedance`), where deploy/rbac.yaml
grants the Lease verbs; the watched namespace has nothing to do with it.

`/readyz` is true once the policies are loaded and the election has been
tried once (this replica knows whether it leads). Only the leader runs the
engine; a leader that loses the Lease stops at once and exits with status 1,
so Kubernetes restarts it as a follower (client-go's controllers do the
same): a rollout is never driven by two replicas, and the new leader resumes
every rollout from its status. SIGTERM (a pod being stopped) stops the engine,
releases the Lease so that another replica can lead at once, and exits with 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kubernetes.aio import client

from adapters.kube.connection import configuration
from adapters.kube.controller import (
    Controller,
    Policies,
    RolloutRouters,
    RolloutWorkloads,
    owner_reference,
)
from adapters.kube.events import EventAudit, EventRecorder
from adapters.kube.lease import LeaseElector
from adapters.kube.models import CanaryDeployment
from adapters.kube.pods import PodStatusSource
from adapters.kube.store import StatusStore
from adapters.kube.workloads import KubeWorkloads
from adapters.telemetry.http import HealthServer
from adapters.telemetry.prometheus import PrometheusTelemetry
from engine import registry
from engine.audit import JsonLinesAudit, LoggingAudit
from engine.loop import Engine, LoopClock
from engine.policystore import PolicyStore
from engine.ports import AuditSink, MetricRequest, MetricSource, MetricValues, TrafficRouter

log = logging.getLogger("codedance.controller")

LEASE_NAME = "codedance-controller"
# deploy/rbac.yaml grants the Lease verbs by a Role in the controller's own namespace only
LEASE_NAMESPACE = "codedance"
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def add_command(commands: Any) -> None:
    cmd = commands.add_parser("controller", help="run the Kubernetes controller")
    cmd.add_argument("--namespace", default=None, help="watch one namespace (default: all)")
    cmd.add_argument("--policies", default="/etc/codedance/policies", metavar="DIR")
    cmd.add_argument("--kubeconfig", default=None, metavar="FILE", help="default: in-cluster")
    cmd.add_argument("--prometheus", default=None, metavar="URL")
    cmd.add_argument("--catalog", default="plain", help="the Prometheus metric catalog")
    cmd.add_argument("--listen", default=":8080", metavar="[HOST]:PORT")
    cmd.add_argument("--audit-log", default=None, metavar="FILE", help="JSON lines audit log")
    cmd.add_argument(
        "--lease-name", default=LEASE_NAME, metavar="NAME", help=f"default: {LEASE_NAME}"
    )
    cmd.add_argument(
        "--lease-namespace",
        default=None,
        metavar="NS",
        help=f"default: $POD_NAMESPACE, else the pod's own namespace, else {LEASE_NAMESPACE}",
    )
    cmd.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # the event loop of the standard library works too, slower
        pass
    return asyncio.run(_main(args))


def _listen(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "0.0.0.0", int(port)


async def _configuration(kubeconfig: str | None) -> client.Configuration:
    return await configuration(kubeconfig)


def lease_namespace(args: argparse.Namespace) -> str:
    """Where the Lease lives: the controller's own namespace, never the one it watches.

    The Role that lets the controller use Leases exists only there, so a Lease
    in the watched namespace would be refused (403) and no replica would lead.
    """
    if args.lease_namespace:
        return str(args.lease_namespace)
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text(encoding="utf-8").strip() or LEASE_NAMESPACE
    except OSError:  # not in a pod
        return LEASE_NAMESPACE


POD_METRICS = ("ready_pods", "not_ready_pods", "failed_pods", "restarts")


class _NoPrometheus:
    """Without `--prometheus`, every traffic metric is unknown (never a made-up number)."""

    async def fetch(self, at: float, requests: Sequence[MetricRequest]) -> MetricValues:
        return dict.fromkeys(requests)

    async def fetch_range(
        self, start: float, end: float, step: float, requests: Sequence[MetricRequest]
    ) -> Mapping[MetricRequest, list[tuple[float, float | None]]]:
        return {}


def _metrics(args: argparse.Namespace, api: client.ApiClient) -> dict[str, MetricSource]:
    """Pod health from the API; every other metric from Prometheus, when given one."""
    traffic: MetricSource = _NoPrometheus()
    if args.prometheus is not None:
        from adapters.metrics.catalog import catalog_for

        traffic = registry.create(
            registry.METRICS, "prometheus", args.prometheus, catalog_for(args.catalog)
        )
    pods = PodStatusSource(api)
    return {"*": traffic, **dict.fromkeys(POD_METRICS, pods)}


async def _main(args: argparse.Namespace) -> int:
    clock = LoopClock()
    telemetry = PrometheusTelemetry()
    identity = os.environ.get("POD_NAME") or socket.gethostname()
    lease_ns = lease_namespace(args)
    # SIGTERM cancels the main task, so that every `finally` below runs (the
    # Lease is released) instead of the process dying where it stands.
    main, terminated = asyncio.current_task(), asyncio.Event()
    assert main is not None

    def terminate() -> None:
        terminated.set()
        main.cancel()

    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, terminate)
    async with client.ApiClient(await _configuration(args.kubeconfig)) as api:
        store = PolicyStore(args.policies, telemetry=telemetry)
        elector = LeaseElector(
            api, namespace=lease_ns, name=args.lease_name, identity=identity, clock=clock
        )
        tried = asyncio.Event()
        host, port = _listen(args.listen)
        server = HealthServer(
            telemetry,
            ready=lambda: store.version > 0 and tried.is_set(),
            host=host,
            port=port,
        )
        await server.start()
        watcher = asyncio.ensure_future(store.watch(clock))
        try:
            while not await elector.step():
                tried.set()
                await clock.sleep_until(clock.now() + 5.0)
            tried.set()
            return await _lead(api, args, clock, telemetry, store, elector, identity)
        except asyncio.CancelledError:
            if terminated.is_set():
                log.info("%s stopping on SIGTERM", identity)
                return 0
            raise
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            await elector.release()
            await server.stop()


async def _lead(
    api: client.ApiClient,
    args: argparse.Namespace,
    clock: LoopClock,
    telemetry: PrometheusTelemetry,
    store: PolicyStore,
    elector: LeaseElector,
    identity: str,
) -> int:
    """Run the engine and the controller until the Lease is lost."""
    inner: AuditSink = JsonLinesAudit(args.audit_log) if args.audit_log else LoggingAudit()
    audit = EventAudit(inner, EventRecorder(api, clock=clock, instance=identity))
    policies = Policies(store)
    routers, workloads = RolloutRouters(), RolloutWorkloads()
    engine = Engine(
        policies=policies,
        metrics=_metrics(args, api),
        router=routers,
        workloads=workloads,
        store=StatusStore(api, clock=clock),
        audit=audit,
        clock=clock,
        telemetry=telemetry,
    )

    def router_for(cd: CanaryDeployment) -> TrafficRouter:
        t = cd.spec.traffic
        stable = t.service or cd.spec.target_ref.name
        canary = t.canary_service or f"{stable}-canary"
        kwargs: dict[str, Any] = {"stable_service": stable, "canary_service": canary}
        if t.provider == "gateway-api":
            kwargs["http_route"] = t.http_route or stable
        elif t.provider == "istio":
            kwargs = {
                "virtual_service": t.virtual_service or stable,
                "route": t.route,
                "stable_host": stable,
                "canary_host": canary,
                "destination_rule": t.destination_rule,
            }
        elif t.provider == "nginx-ingress":
            # the canary Ingress is made for this release: garbage collected with it
            kwargs = {
                "ingress": t.ingress or stable,
                "canary_service": canary,
                "owner": owner_reference(cd),
            }
        return registry.create(registry.TRAFFIC, t.provider, api, **kwargs)

    def workloads_for(cd: CanaryDeployment) -> KubeWorkloads:
        v = cd.spec.version
        return KubeWorkloads(
            api,
            images=v.images,
            pod_template_patch=v.pod_template_patch,
            clock=clock,
            owner=owner_reference(cd),
        )

    controller = Controller(
        api,
        engine=engine,
        policies=policies,
        routers=routers,
        workloads=workloads,
        router_for=router_for,
        workloads_for=workloads_for,
        audit=audit,
        clock=clock,
        namespace=args.namespace,
    )
    running = [asyncio.ensure_future(engine.run()), asyncio.ensure_future(controller.run())]
    try:
        while elector.is_leader:
            await clock.sleep_until(clock.now() + 5.0)
            await elector.step()
        log.error("%s lost the Lease: stopping so that another replica leads", identity)
        return 1
    finally:
        await controller.stop()
        await engine.stop()
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
