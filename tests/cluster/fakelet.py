"""Fake nodes: a kubelet stand-in that binds pods and moves them to Running and Ready.

In: a kubeconfig, the number of nodes, the default delay before a pod is
ready. Out, on the API server: Nodes `fake-node-0..n-1` (Ready, with
capacity), every unscheduled pod bound to one of them (round robin; no
scheduler needed), and each bound pod's status written the way a kubelet
writes it: `Pending` with an IP, then after the delay `Running` with
`Ready`/`ContainersReady` true and a ready status per container. A pod
being deleted is confirmed gone (grace period 0), so ReplicaSets scale down
and namespaces finish deleting.

A pod asks for a fault with annotations on its template:

| annotation | effect |
|---|---|
| `fakelet.codedance.io/ready-after: "20s"` | ready only after that delay (s, ms or m) |
| `fakelet.codedance.io/fault: never-ready` | runs, never ready |
| `fakelet.codedance.io/fault: crash` | CrashLoopBackOff, the restart count growing every second |
| `fakelet.codedance.io/crash-after: "5s"` | ready first, then crash-looping from that delay on |
| `fakelet.codedance.io/fault: fail` | phase Failed, its container exited 1 |

Run it as `python -m tests.cluster.fakelet --kubeconfig PATH`; the control
plane fixture does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import ipaddress
import itertools
import logging
import signal
from typing import Any

import aiohttp
from kubernetes.aio import client, config, watch
from kubernetes.aio.client.exceptions import ApiException

log = logging.getLogger("fakelet")

PREFIX = "fakelet.codedance.io/"
READY_AFTER = PREFIX + "ready-after"
FAULT = PREFIX + "fault"
CRASH_AFTER = PREFIX + "crash-after"
FAULTS = ("never-ready", "crash", "fail")
POD_NETWORK = ipaddress.ip_network("10.244.0.0/16")
NODE_NETWORK = ipaddress.ip_network("10.250.0.0/24")
CRASH_EVERY = 1.0
MERGE_PATCH = "application/merge-patch+json"


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_delay(text: str) -> float:
    text = text.strip()
    for suffix, scale in (("ms", 0.001), ("s", 1.0), ("m", 60.0)):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * scale
    return float(text)


def condition(kind: str, status: bool, reason: str | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "type": kind,
        "status": "True" if status else "False",
        "lastTransitionTime": now(),
        "lastProbeTime": None,
    }
    if reason:
        entry["reason"] = reason
    return entry


def container_statuses(pod: dict[str, Any], state: str, restarts: int = 0) -> list[Any]:
    statuses = []
    for container in pod["spec"]["containers"]:
        status: dict[str, Any] = {
            "name": container["name"],
            "image": container.get("image", ""),
            "imageID": f"fake://{container.get('image', '')}",
            "containerID": f"fake://{pod['metadata']['uid']}/{container['name']}",
            "restartCount": restarts,
            "ready": state == "ready",
            "started": state in ("ready", "running"),
        }
        if state in ("ready", "running"):
            status["state"] = {"running": {"startedAt": now()}}
        elif state == "crash":
            status["state"] = {"waiting": {"reason": "CrashLoopBackOff", "message": "fault"}}
            status["lastState"] = {
                "terminated": {"exitCode": 1, "reason": "Error", "finishedAt": now()}
            }
        elif state == "fail":
            status["state"] = {
                "terminated": {"exitCode": 1, "reason": "Error", "finishedAt": now()}
            }
        else:
            status["state"] = {"waiting": {"reason": "ContainerCreating"}}
        statuses.append(status)
    return statuses


async def checked(response: aiohttp.ClientResponse) -> None:
    """Raise `ApiException` for an error answer; the answer's body is not parsed into a model."""
    try:
        if response.status >= 400:
            raise ApiException(status=response.status, reason=await response.text())
    finally:
        response.release()


class Fakelet:
    def __init__(self, api: client.ApiClient, nodes: int, ready_after: float) -> None:
        self.core = client.CoreV1Api(api)
        self.node_names = [f"fake-node-{i}" for i in range(nodes)]
        self.ready_after = ready_after
        self._next_node = itertools.cycle(self.node_names)
        self._ips = (str(ip) for ip in POD_NETWORK.hosts())
        self._started: dict[str, asyncio.Task[None]] = {}  # by pod uid
        self._deleting: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()  # running deletions, kept from the GC

    async def register_nodes(self) -> None:
        for index, name in enumerate(self.node_names):
            address = str(NODE_NETWORK.network_address + index + 1)
            body = {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": name,
                    "labels": {"kubernetes.io/hostname": name, "type": "fake"},
                },
            }
            with contextlib.suppress(ApiException):
                await self.core.create_node(body)
            capacity = {"cpu": "32", "memory": "256Gi", "pods": "250"}
            status = {
                "status": {
                    "capacity": capacity,
                    "allocatable": capacity,
                    "addresses": [
                        {"type": "InternalIP", "address": address},
                        {"type": "Hostname", "address": name},
                    ],
                    "conditions": [
                        {
                            "type": "Ready",
                            "status": "True",
                            "reason": "KubeletReady",
                            "message": "fake node",
                            "lastHeartbeatTime": now(),
                            "lastTransitionTime": now(),
                        }
                    ],
                    "nodeInfo": {
                        "kubeletVersion": "fake",
                        "architecture": "amd64",
                        "operatingSystem": "linux",
                        "bootID": "",
                        "containerRuntimeVersion": "fake://0",
                        "kernelVersion": "",
                        "kubeProxyVersion": "",
                        "machineID": "",
                        "osImage": "fake",
                        "systemUUID": "",
                    },
                }
            }
            await self.core.patch_node_status(name, status)

    async def run(self) -> None:
        await self.register_nodes()
        log.info("nodes registered: %s", ", ".join(self.node_names))
        resource_version = ""
        while True:
            if not resource_version:
                listing = await self.core.list_pod_for_all_namespaces_without_preload_content()
                document = await listing.json()
                for pod in document["items"]:
                    await self.handle(pod)
                resource_version = document["metadata"]["resourceVersion"]
            try:
                resource_version = await self.watch(resource_version)
            except ApiException as error:
                if error.status == 410:
                    resource_version = ""
                else:
                    log.warning("watch failed: %s", error.reason)
                    await asyncio.sleep(1)
            except (TimeoutError, OSError) as error:
                log.warning("watch interrupted: %s", error)
                await asyncio.sleep(0.5)

    async def watch(self, resource_version: str) -> str:
        """One watch stream of every pod from `resource_version`; the last one seen."""
        stream = watch.Watch()  # type: ignore[no-untyped-call]
        try:
            async for event in stream.stream(  # type: ignore[no-untyped-call]
                self.core.list_pod_for_all_namespaces,
                resource_version=resource_version,
                timeout_seconds=300,
                allow_watch_bookmarks=True,
            ):
                pod = event["raw_object"]
                resource_version = pod["metadata"]["resourceVersion"]
                if event["type"] in ("ADDED", "MODIFIED"):
                    await self.handle(pod)
                elif event["type"] == "DELETED":
                    self.forget(pod)
        finally:
            await stream.close()  # type: ignore[no-untyped-call]
        return resource_version

    async def handle(self, pod: dict[str, Any]) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        node = spec.get("nodeName")
        if meta.get("deletionTimestamp"):
            if (node is None or node in self.node_names) and meta["uid"] not in self._deleting:
                self._deleting.add(meta["uid"])
                self.forget(pod)
                task = asyncio.create_task(self.confirm_deleted(pod))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            return
        if not node:
            await self.bind(pod)
            return
        if node in self.node_names and meta["uid"] not in self._started:
            status = pod.get("status") or {}
            if status.get("phase") in ("Succeeded", "Failed"):
                return
            if status.get("phase") == "Running" and status.get("podIP"):
                # started by an earlier run of ours: a kubelet restart keeps pods
                self._started[meta["uid"]] = asyncio.create_task(asyncio.sleep(0))
                return
            self._started[meta["uid"]] = asyncio.create_task(self.start(pod))

    def forget(self, pod: dict[str, Any]) -> None:
        task = self._started.pop(pod["metadata"]["uid"], None)
        if task is not None:
            task.cancel()

    async def bind(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        body = {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": meta["name"], "namespace": meta["namespace"]},
            "target": {"apiVersion": "v1", "kind": "Node", "name": next(self._next_node)},
        }
        try:
            await checked(
                await self.core.create_namespaced_pod_binding_without_preload_content(
                    meta["name"], meta["namespace"], body
                )
            )
        except ApiException as error:
            # already bound (a replayed event) or gone: nothing to do
            if error.status not in (404, 409):
                log.warning("binding %s/%s: %s", meta["namespace"], meta["name"], error.reason)

    async def patch_status(self, pod: dict[str, Any], status: dict[str, Any]) -> None:
        meta = pod["metadata"]
        try:
            await checked(
                await self.core.patch_namespaced_pod_status_without_preload_content(
                    meta["name"], meta["namespace"], {"status": status}, _content_type=MERGE_PATCH
                )
            )
        except ApiException as error:
            if error.status != 404:
                raise

    async def start(self, pod: dict[str, Any]) -> None:
        annotations = pod["metadata"].get("annotations") or {}
        fault = annotations.get(FAULT, "")
        delay = self.ready_after
        if READY_AFTER in annotations:
            delay = parse_delay(annotations[READY_AFTER])
        ip = next(self._ips)
        node_index = self.node_names.index(pod["spec"]["nodeName"])
        base = {
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "hostIP": str(NODE_NETWORK.network_address + node_index + 1),
            "startTime": now(),
            "qosClass": "BestEffort",
        }
        try:
            await self.patch_status(
                pod,
                {
                    **base,
                    "phase": "Pending",
                    "conditions": [
                        condition("PodScheduled", True),
                        condition("Initialized", True),
                        condition("ContainersReady", False, "ContainersNotReady"),
                        condition("Ready", False, "ContainersNotReady"),
                    ],
                    "containerStatuses": container_statuses(pod, "creating"),
                },
            )
            await asyncio.sleep(delay)
            if fault == "fail":
                await self.patch_status(
                    pod,
                    {
                        **base,
                        "phase": "Failed",
                        "reason": "Error",
                        "conditions": [condition("Ready", False, "PodFailed")],
                        "containerStatuses": container_statuses(pod, "fail"),
                    },
                )
                return
            if fault == "crash":
                await self.crash_loop(pod, base)
            ready = fault != "never-ready"
            reason = None if ready else "ContainersNotReady"
            await self.patch_status(
                pod,
                {
                    **base,
                    "phase": "Running",
                    "conditions": [
                        condition("PodScheduled", True),
                        condition("Initialized", True),
                        condition("ContainersReady", ready, reason),
                        condition("Ready", ready, reason),
                    ],
                    "containerStatuses": container_statuses(pod, "ready" if ready else "running"),
                },
            )
            if CRASH_AFTER in annotations:
                await asyncio.sleep(parse_delay(annotations[CRASH_AFTER]))
                await self.crash_loop(pod, base)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # one pod's failure never stops the others
            log.warning("pod %s: %s", pod["metadata"]["name"], error)

    async def crash_loop(self, pod: dict[str, Any], base: dict[str, Any]) -> None:
        """CrashLoopBackOff until the pod is deleted, one more restart every CRASH_EVERY."""
        for restarts in itertools.count(1):
            await self.patch_status(
                pod,
                {
                    **base,
                    "phase": "Running",
                    "conditions": [
                        condition("ContainersReady", False, "ContainersNotReady"),
                        condition("Ready", False, "ContainersNotReady"),
                    ],
                    "containerStatuses": container_statuses(pod, "crash", restarts),
                },
            )
            await asyncio.sleep(CRASH_EVERY)

    async def confirm_deleted(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        try:
            await checked(
                await self.core.delete_namespaced_pod_without_preload_content(
                    meta["name"],
                    meta["namespace"],
                    # in the body: a body's options replace the query's
                    body={"gracePeriodSeconds": 0, "preconditions": {"uid": meta["uid"]}},
                )
            )
        except ApiException as error:
            if error.status not in (404, 409):
                log.warning("deleting %s/%s: %s", meta["namespace"], meta["name"], error.reason)
        except Exception:
            log.exception("deleting %s/%s", meta["namespace"], meta["name"])
        finally:
            self._deleting.discard(meta["uid"])


async def main_async(arguments: argparse.Namespace) -> None:
    configuration = client.Configuration()
    await config.load_kube_config(  # type: ignore[no-untyped-call]
        config_file=arguments.kubeconfig, client_configuration=configuration
    )
    loop = asyncio.get_running_loop()
    stopped = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopped.set)
    async with client.ApiClient(configuration) as api:
        fakelet = Fakelet(api, arguments.nodes, arguments.ready_after)
        runner = asyncio.create_task(fakelet.run())
        waiter = asyncio.create_task(stopped.wait())
        await asyncio.wait({runner, waiter}, return_when=asyncio.FIRST_COMPLETED)
        for task in (runner, waiter):
            task.cancel()
        if runner.done() and not runner.cancelled() and runner.exception():
            raise runner.exception()  # type: ignore[misc]


def main() -> None:
    parser = argparse.ArgumentParser(prog="fakelet", description=__doc__.splitlines()[0])
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--ready-after", type=float, default=0.0, help="seconds")
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    asyncio.run(main_async(arguments))


if __name__ == "__main__":
    main()
