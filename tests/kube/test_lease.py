"""Leader election on a real Lease: `LeaseElector`s as the controller's ServiceAccount.

The electors talk to the real kube-apiserver with exactly deploy/rbac.yaml's
rights (`controller_api`), on a Lease of their own in the `codedance`
namespace (a distinct name per test, so tests never share one); the test
reads the Lease back as admin. Most tests drive `step()` on a shared fake
clock, so who leads at each moment is exact (the server stores the times as
written, MicroTime with microseconds); one runs `run()` on the real loop with
a short lease. Conflicts are real 409s: the server's resourceVersion check
decides every race, and the API server's audit log shows the refused write.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import pytest_asyncio
from kubernetes.aio import client
from kubernetes.aio.client.exceptions import ApiException

from adapters.kube.lease import GROUP, PLURAL, VERSION, LeaseElector, parse_time
from adapters.kube.retry import LoopClock
from tests.cluster.controlplane import CONTROLLER_NAMESPACE, CONTROLLER_USER, ControlPlane
from tests.cluster.kube import AuditEvent, audit_events, eventually

NS = CONTROLLER_NAMESPACE  # deploy/rbac.yaml grants the Lease rights here only


class FakeClock:
    def __init__(self, t: float = 1_767_225_600.0) -> None:
        self.t = t

    def now(self) -> float:
        return self.t

    async def sleep_until(self, t: float) -> None:
        self.t = max(self.t, t)


@pytest_asyncio.fixture
async def lease_name(admin_api: client.ApiClient) -> AsyncIterator[str]:
    """A Lease name no other test uses; the Lease is deleted afterwards."""
    name = f"test-lease-{secrets.token_hex(4)}"
    yield name
    try:
        await client.CustomObjectsApi(admin_api).delete_namespaced_custom_object(
            GROUP, VERSION, NS, PLURAL, name
        )
    except ApiException as error:
        if error.status != 404:
            raise


def elector(api: client.ApiClient, name: str, identity: str, clock: Any, **kw: Any) -> LeaseElector:
    kw.setdefault("lease_seconds", 15)
    kw.setdefault("renew_every", 5)
    kw.setdefault("namespace", NS)
    return LeaseElector(api, name=name, identity=identity, clock=clock, **kw)


async def read_lease(admin_api: client.ApiClient, name: str) -> dict[str, Any]:
    obj = await client.CustomObjectsApi(admin_api).get_namespaced_custom_object(
        GROUP, VERSION, NS, PLURAL, name
    )
    assert isinstance(obj, dict)
    return obj


async def lease(admin_api: client.ApiClient, name: str) -> dict[str, Any]:
    return dict((await read_lease(admin_api, name))["spec"])


def controller_requests(plane: ControlPlane) -> list[AuditEvent]:
    return audit_events(plane.audit_log, CONTROLLER_USER)


def lease_writes(plane: ControlPlane, name: str, since: int) -> list[AuditEvent]:
    """The controller's writes (create, update) of the Lease `name` after its `since`-th request.

    A create names no object in its URL, so it is told apart by time (`since`),
    not by name: the tests of one session run one after another.
    """
    return [
        e
        for e in controller_requests(plane)[since:]
        if e.resource == "leases"
        and e.namespace == NS
        and e.verb in ("create", "update")
        and e.name in (name, "")
    ]


def hold_reads(
    monkeypatch: pytest.MonkeyPatch, me: LeaseElector, after: Callable[[], Awaitable[Any]]
) -> None:
    """Run `after()` between `me`'s next read of the Lease and its write."""
    api = me._api  # the elector's own CustomObjectsApi
    read = api.get_namespaced_custom_object

    async def read_then(*args: Any, **kwargs: Any) -> Any:
        obj = await read(*args, **kwargs)
        await after()
        return obj

    monkeypatch.setattr(api, "get_namespaced_custom_object", read_then)


@pytest.mark.asyncio
async def test_only_one_leads_and_the_other_takes_over_once_the_lease_expires(
    controller_api: client.ApiClient, admin_api: client.ApiClient, lease_name: str
) -> None:
    clock = FakeClock()
    a = elector(controller_api, lease_name, "a", clock)
    b = elector(controller_api, lease_name, "b", clock)
    assert await a.step() and not await b.step()
    assert (a.is_leader, b.is_leader) == (True, False)
    spec = await lease(admin_api, lease_name)
    assert spec["holderIdentity"] == "a" and spec["leaseTransitions"] == 0
    assert spec["leaseDurationSeconds"] == 15
    assert parse_time(spec["acquireTime"]) == parse_time(spec["renewTime"]) == clock.t
    # the server keeps MicroTime as RFC 3339 with six fractional digits, as client-go writes it
    assert spec["renewTime"] == "2026-01-01T00:00:00.000000Z"

    for _ in range(5):  # a renews; b keeps waiting
        clock.t += 5.25
        assert await a.step() and not await b.step()
        assert (a.is_leader, b.is_leader) == (True, False)
    assert parse_time((await lease(admin_api, lease_name))["renewTime"]) == clock.t

    # a stops renewing (hung, cut off): b waits out the lease, then takes over
    clock.t += 14
    assert not await b.step()
    assert a.is_leader  # still within the lease it renewed
    clock.t += 1
    assert not a.is_leader  # a stops acting by itself the moment b may start
    assert await b.step() and b.is_leader
    spec = await lease(admin_api, lease_name)
    assert spec["holderIdentity"] == "b" and spec["leaseTransitions"] == 1
    assert not await a.step() and not a.is_leader  # a comes back: b's lease is live


@pytest.mark.asyncio
async def test_a_race_is_decided_by_the_resource_version(
    controller_api: client.ApiClient,
    admin_api: client.ApiClient,
    lease_name: str,
    control_plane: ControlPlane,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = FakeClock()
    a = elector(controller_api, lease_name, "a", clock)
    b = elector(controller_api, lease_name, "b", clock)
    since = len(controller_requests(control_plane))
    assert await a.step()
    clock.t += 30  # a's lease expired: both see it free and both try
    # both read the same resourceVersion before either writes: a true race
    both_read = asyncio.Barrier(2)
    for me in (a, b):
        hold_reads(monkeypatch, me, both_read.wait)
    results = await asyncio.gather(a.step(), b.step())
    assert sum(results) == 1 and a.is_leader + b.is_leader == 1
    holder = (await lease(admin_api, lease_name))["holderIdentity"]
    assert (holder == "a") == a.is_leader
    # the server accepted one update and refused the other with 409 Conflict
    updates = [e.code for e in lease_writes(control_plane, lease_name, since) if e.verb == "update"]
    assert sorted(updates) == [200, 409]


@pytest.mark.asyncio
async def test_a_stale_write_loses(
    controller_api: client.ApiClient,
    admin_api: client.ApiClient,
    lease_name: str,
    control_plane: ControlPlane,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = FakeClock()
    a = elector(controller_api, lease_name, "a", clock)
    since = len(controller_requests(control_plane))
    assert await a.step()

    async def someone_writes() -> None:  # between a's read and a's write
        await client.CustomObjectsApi(admin_api).patch_namespaced_custom_object(
            GROUP,
            VERSION,
            NS,
            PLURAL,
            lease_name,
            {"metadata": {"annotations": {"test/touched": "yes"}}},
            _content_type="application/merge-patch+json",
        )

    with monkeypatch.context() as patched:
        hold_reads(patched, a, someone_writes)
        clock.t += 5
        assert not await a.step() and not a.is_leader
    assert [e.code for e in lease_writes(control_plane, lease_name, since)] == [201, 409]
    assert await a.step() and a.is_leader
    assert (await lease(admin_api, lease_name))["holderIdentity"] == "a"


@pytest.mark.asyncio
async def test_release_lets_the_other_take_over_at_once(
    controller_api: client.ApiClient, admin_api: client.ApiClient, lease_name: str
) -> None:
    clock = FakeClock()
    a = elector(controller_api, lease_name, "a", clock)
    b = elector(controller_api, lease_name, "b", clock)
    assert await a.step()
    await a.release()
    spec = await lease(admin_api, lease_name)
    assert not a.is_leader and spec["holderIdentity"] == ""
    assert spec["leaseDurationSeconds"] == 1
    assert await b.step() and b.is_leader
    assert (await lease(admin_api, lease_name))["holderIdentity"] == "b"


@pytest.mark.asyncio
async def test_the_controller_may_hold_a_lease_only_in_its_own_namespace(
    controller_api: client.ApiClient,
    namespace: str,
    control_plane: ControlPlane,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """deploy/rbac.yaml grants the Lease verbs by a Role in `codedance`: elsewhere it is 403."""
    clock = FakeClock()
    a = elector(controller_api, "codedance-controller", "a", clock, namespace=namespace)
    assert not await a.step() and not a.is_leader
    refused = [
        e
        for e in controller_requests(control_plane)
        if e.resource == "leases" and e.namespace == namespace
    ]
    assert [(e.verb, e.code) for e in refused] == [("get", 403)]
    assert any(
        r.levelname == "ERROR" and "403" in r.getMessage() and namespace in r.getMessage()
        for r in caplog.records
    )


@pytest.mark.asyncio
async def test_a_writer_guarded_by_is_leader_never_writes_from_the_non_leader(
    controller_api: client.ApiClient,
    admin_api: client.ApiClient,
    lease_name: str,
    namespace: str,
) -> None:
    clock = LoopClock()
    electors = [
        elector(controller_api, lease_name, name, clock, lease_seconds=1, renew_every=0.1)
        for name in ("a", "b")
    ]
    # the guarded writes are the test's own ConfigMaps, made as admin in the test's namespace
    core = client.CoreV1Api(admin_api)
    written: list[str] = []

    async def writer(me: LeaseElector) -> None:
        # what a controller replica does: act only while leading
        for i in range(20):
            if me.is_leader:
                body = client.V1ConfigMap(metadata=client.V1ObjectMeta(name=f"{me.identity}-{i}"))
                await core.create_namespaced_config_map(namespace, body)
                written.append(me.identity)
            await asyncio.sleep(0.05)

    async def made_by() -> set[str]:
        maps = (await core.list_namespaced_config_map(namespace)).items
        names = [str(m.metadata.name) for m in maps if m.metadata is not None]
        # kube-root-ca.crt would be the cluster's own
        return {name.split("-")[0] for name in names if name != "kube-root-ca.crt"}

    runs = [asyncio.create_task(e.run()) for e in electors]
    try:
        await eventually(_any_leader(electors), timeout=10)
        first = next(e for e in electors if e.is_leader)
        second = next(e for e in electors if e is not first)
        await asyncio.gather(writer(first), writer(second))
        assert set(written) == {first.identity}
        assert await made_by() == {first.identity}

        # the leader stops; the other takes over (at once, as the lease is released)
        first.stop()
        await runs[electors.index(first)]
        await eventually(_leads(second), timeout=3)
        spec = await lease(admin_api, lease_name)
        assert spec["holderIdentity"] == second.identity
        assert spec["leaseTransitions"] == 1
        written.clear()
        await asyncio.gather(writer(first), writer(second))
        assert set(written) == {second.identity}
        assert await made_by() == {first.identity, second.identity}
    finally:
        for e in electors:
            e.stop()
        await asyncio.gather(*runs)
    assert not any(e.is_leader for e in electors)
    assert (await lease(admin_api, lease_name))["holderIdentity"] == ""


def _any_leader(electors: list[LeaseElector]) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return any(e.is_leader for e in electors)

    return check


def _leads(me: LeaseElector) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return me.is_leader

    return check
