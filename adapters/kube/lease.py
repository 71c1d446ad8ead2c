"""Leader election on a coordination.k8s.io/v1 Lease, so two controller replicas never both act.

In: an API client, the Lease's namespace and name, this replica's identity, a
clock. Out: `LeaseElector`, whose `is_leader` a writer checks before it acts,
`step()` (one attempt to acquire or renew), `run()` (step every `renew_every`
seconds until `stop()`, then release), and `release()`.

The Lease holds `holderIdentity`, `acquireTime`, `renewTime`,
`leaseDurationSeconds` and `leaseTransitions`, as client-go's election writes
them, so `kubectl get lease` reads the same. A replica takes the Lease when it
is absent, released (no holder) or expired (`renewTime + leaseDurationSeconds`
passed), and the holder renews it. Every write carries the resourceVersion
read: when two replicas race, the API server accepts one write and answers
the other 409, which simply lost.

`is_leader` is True only until `lease_seconds` after the last successful
renewal by our own clock: a leader cut off from the API server stops acting
by the time another replica may take over, whether or not it notices. (The
kubernetes client's own LeaseLock cannot be used: it sends a parameter the
API rejects.)
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from typing import Any, cast

from kubernetes.aio import client
from kubernetes.aio.client.exceptions import ApiException

from adapters.kube import retry
from engine.ports import Clock

log = logging.getLogger("codedance.kube.lease")

GROUP = "coordination.k8s.io"
VERSION = "v1"
PLURAL = "leases"


def micro_time(seconds: float) -> str:
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str | None) -> float | None:
    if not text:
        return None
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


class LeaseElector:
    """One replica's side of the election. `run()` it as a task; check `is_leader` before acting."""

    def __init__(
        self,
        api_client: client.ApiClient,
        *,
        namespace: str,
        name: str,
        identity: str,
        lease_seconds: int = 15,
        renew_every: float = 5.0,
        clock: Clock,
    ) -> None:
        if not 0 < renew_every < lease_seconds:
            raise ValueError("renew_every must be positive and shorter than lease_seconds")
        self._api = client.CustomObjectsApi(api_client)
        self.namespace, self.name, self.identity = namespace, name, identity
        self._lease = lease_seconds
        self._every = renew_every
        self._clock = clock
        self._renewed: float | None = None  # when our last acquire or renew succeeded
        self._stop = asyncio.Event()

    @property
    def is_leader(self) -> bool:
        return self._renewed is not None and self._clock.now() < self._renewed + self._lease

    async def step(self) -> bool:
        """Acquire or renew the Lease once; whether we hold it now."""
        now = self._clock.now()
        try:
            lease = await self._api.get_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, self.name
            )
        except ApiException as error:
            if not retry.is_not_found(error):
                return self._failed(error)
            return await self._write(None, self._spec(now, now, 0), now)
        lease = dict(cast("dict[str, Any]", lease))
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        transitions = int(spec.get("leaseTransitions") or 0)
        if holder == self.identity:
            renewed = {**spec, "renewTime": micro_time(now), "leaseDurationSeconds": self._lease}
            return await self._write(lease, renewed, now)
        renew_time = parse_time(spec.get("renewTime")) or 0.0
        duration = float(spec.get("leaseDurationSeconds") or 0)
        if holder and now < renew_time + duration:
            self._renewed = None  # someone else holds a live lease
            return False
        return await self._write(lease, self._spec(now, now, transitions + 1), now)

    async def release(self) -> None:
        """Give the Lease up (if we hold it) so another replica need not wait for it to expire."""
        if self._renewed is None:
            return
        self._renewed = None
        try:
            lease = cast(
                "dict[str, Any]",
                await self._api.get_namespaced_custom_object(
                    GROUP, VERSION, self.namespace, PLURAL, self.name
                ),
            )
            spec = lease.get("spec") or {}
            if spec.get("holderIdentity") != self.identity:
                return
            lease["spec"] = {**spec, "holderIdentity": "", "leaseDurationSeconds": 1}
            await self._api.replace_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, self.name, lease
            )
        except ApiException as error:
            log.warning(
                "could not release Lease %s/%s: %s %s",
                self.namespace,
                self.name,
                error.status,
                error.reason,
            )  # it expires on its own

    async def run(self) -> None:
        """Acquire and renew every `renew_every` seconds until `stop()`; then release."""
        self._stop.clear()
        try:
            while not self._stop.is_set():
                await self.step()
                wake = self._clock.now() + self._every
                sleeper = asyncio.ensure_future(self._clock.sleep_until(wake))
                stopper = asyncio.ensure_future(self._stop.wait())
                await asyncio.wait({sleeper, stopper}, return_when=asyncio.FIRST_COMPLETED)
                for task in (sleeper, stopper):
                    task.cancel()
        finally:
            await self.release()

    def stop(self) -> None:
        self._stop.set()

    # --- helpers -------------------------------------------------------------------

    def _spec(self, acquired: float, renewed: float, transitions: int) -> dict[str, Any]:
        return {
            "holderIdentity": self.identity,
            "acquireTime": micro_time(acquired),
            "renewTime": micro_time(renewed),
            "leaseDurationSeconds": self._lease,
            "leaseTransitions": transitions,
        }

    async def _write(self, lease: dict[str, Any] | None, spec: dict[str, Any], now: float) -> bool:
        try:
            if lease is None:
                body = {
                    "apiVersion": f"{GROUP}/{VERSION}",
                    "kind": "Lease",
                    "metadata": {"name": self.name, "namespace": self.namespace},
                    "spec": spec,
                }
                await self._api.create_namespaced_custom_object(
                    GROUP, VERSION, self.namespace, PLURAL, body
                )
            else:
                body = {**lease, "spec": spec}  # metadata keeps the resourceVersion read
                await self._api.replace_namespaced_custom_object(
                    GROUP, VERSION, self.namespace, PLURAL, self.name, body
                )
        except ApiException as error:
            if retry.is_conflict(error):
                self._renewed = None  # another replica wrote first: it won
                return False
            return self._failed(error)
        if self._renewed is None:
            log.info("%s leads %s/%s", self.identity, self.namespace, self.name)
        self._renewed = now
        return True

    def _failed(self, error: ApiException) -> bool:
        # keep `_renewed`: leadership lapses by time alone, not by one failed request
        if retry.status_code(error) in (401, 403):
            # no retry cures this: the replica would wait forever, so say why
            log.error(
                "Lease %s/%s: %s %s: the controller may not use Leases there "
                "(deploy/rbac.yaml grants get, create and update on leases in its own namespace)",
                self.namespace,
                self.name,
                error.status,
                error.reason,
            )
        else:
            log.warning("Lease %s/%s: %s %s", self.namespace, self.name, error.status, error.reason)
        return self.is_leader
