"""Leader election on a Lease: two `LeaseElector`s against one API double.

Most tests drive `step()` on a shared fake clock, so who leads at each moment
is exact; one runs `run()` on the real loop with a short lease.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from kubernetes.aio import client

from adapters.kube.lease import LeaseElector, parse_time
from adapters.kube.retry import LoopClock
from tests.kube.apiserver import ApiServer

NS = "codedance"
NAME = "codedance-controller"


class FakeClock:
    def __init__(self, t: float = 1_767_225_600.0) -> None:
        self.t = t

    def now(self) -> float:
        return self.t

    async def sleep_until(self, t: float) -> None:
        self.t = max(self.t, t)


def elector(api: client.ApiClient, identity: str, clock: Any, **kw: Any) -> LeaseElector:
    kw.setdefault("lease_seconds", 15)
    kw.setdefault("renew_every", 5)
    return LeaseElector(api, namespace=NS, name=NAME, identity=identity, clock=clock, **kw)


def lease(apiserver: ApiServer) -> dict[str, Any]:
    obj = apiserver.read("leases", NAME, NS)
    assert obj is not None
    return dict(obj["spec"])


@pytest.mark.asyncio
async def test_only_one_leads_and_the_other_takes_over_once_the_lease_expires(
    apiserver: ApiServer, kube_client: client.ApiClient
) -> None:
    clock = FakeClock()
    a, b = elector(kube_client, "a", clock), elector(kube_client, "b", clock)
    assert await a.step() and not await b.step()
    assert (a.is_leader, b.is_leader) == (True, False)
    spec = lease(apiserver)
    assert spec["holderIdentity"] == "a" and spec["leaseTransitions"] == 0
    assert spec["leaseDurationSeconds"] == 15
    assert parse_time(spec["acquireTime"]) == parse_time(spec["renewTime"]) == clock.t

    for _ in range(5):  # a renews; b keeps waiting
        clock.t += 5
        assert await a.step() and not await b.step()
        assert (a.is_leader, b.is_leader) == (True, False)
    assert parse_time(lease(apiserver)["renewTime"]) == clock.t

    # a stops renewing (hung, cut off): b waits out the lease, then takes over
    clock.t += 14
    assert not await b.step()
    assert a.is_leader  # still within the lease it renewed
    clock.t += 1
    assert not a.is_leader  # a stops acting by itself the moment b may start
    assert await b.step() and b.is_leader
    spec = lease(apiserver)
    assert spec["holderIdentity"] == "b" and spec["leaseTransitions"] == 1
    assert not await a.step() and not a.is_leader  # a comes back: b's lease is live


@pytest.mark.asyncio
async def test_a_race_is_decided_by_the_resource_version(
    apiserver: ApiServer, kube_client: client.ApiClient
) -> None:
    clock = FakeClock()
    a, b = elector(kube_client, "a", clock), elector(kube_client, "b", clock)
    assert await a.step()
    clock.t += 30  # a's lease expired: both see it free and both try
    results = await asyncio.gather(a.step(), b.step())
    assert sum(results) == 1 and a.is_leader + b.is_leader == 1
    holder = lease(apiserver)["holderIdentity"]
    assert (holder == "a") == a.is_leader


@pytest.mark.asyncio
async def test_a_stale_write_loses(apiserver: ApiServer, kube_client: client.ApiClient) -> None:
    clock = FakeClock()
    a = elector(kube_client, "a", clock)
    assert await a.step()
    apiserver.conflict_next_write(path="*/leases/*")
    clock.t += 5
    assert not await a.step() and not a.is_leader
    assert await a.step() and a.is_leader


@pytest.mark.asyncio
async def test_release_lets_the_other_take_over_at_once(
    apiserver: ApiServer, kube_client: client.ApiClient
) -> None:
    clock = FakeClock()
    a, b = elector(kube_client, "a", clock), elector(kube_client, "b", clock)
    assert await a.step()
    await a.release()
    assert not a.is_leader and lease(apiserver)["holderIdentity"] == ""
    assert await b.step() and b.is_leader


@pytest.mark.asyncio
async def test_a_writer_guarded_by_is_leader_never_writes_from_the_non_leader(
    apiserver: ApiServer, kube_client: client.ApiClient
) -> None:
    clock = LoopClock()
    electors = [
        elector(kube_client, name, clock, lease_seconds=1, renew_every=0.1) for name in ("a", "b")
    ]
    core = client.CoreV1Api(kube_client)
    written: list[str] = []

    async def writer(me: LeaseElector) -> None:
        # what a controller replica does: act only while leading
        for i in range(20):
            if me.is_leader:
                body = {
                    "apiVersion": "v1",
                    "kind": "ConfigMap",
                    "metadata": {"name": f"{me.identity}-{i}", "namespace": NS},
                }
                await core.create_namespaced_config_map(NS, body)
                written.append(me.identity)
            await asyncio.sleep(0.05)

    runs = [asyncio.create_task(e.run()) for e in electors]
    try:
        await _play(apiserver, electors, runs, writer, written)
    finally:
        for e in electors:
            e.stop()
        await asyncio.gather(*runs)
    assert not any(e.is_leader for e in electors)


async def _play(
    apiserver: ApiServer,
    electors: list[LeaseElector],
    runs: list[asyncio.Task[None]],
    writer: Any,
    written: list[str],
) -> None:
    await apiserver.wait_for(lambda: any(e.is_leader for e in electors))
    first = next(e for e in electors if e.is_leader)
    second = next(e for e in electors if e is not first)
    await asyncio.gather(writer(first), writer(second))
    assert set(written) == {first.identity}
    assert {c.body["metadata"]["name"].split("-")[0] for c in apiserver.writes("configmaps")} == {
        first.identity
    }

    # the leader stops; the other takes over (at once, as the lease is released)
    first.stop()
    await runs[electors.index(first)]
    await apiserver.wait_for(lambda: second.is_leader, timeout=3)
    assert lease(apiserver)["holderIdentity"] == second.identity
    assert lease(apiserver)["leaseTransitions"] == 1
    written.clear()
    await asyncio.gather(writer(first), writer(second))
    assert set(written) == {second.identity}
