"""The reconcile side: CanaryDeployment objects in, rollouts in the engine out.

In: an API client, the `Engine` (built with a `RolloutRouters`, a
`RolloutWorkloads`, the `StatusStore` and an `EventAudit`), the policies, and
two factories the composition root gives: the traffic router and the
workload manager for one CanaryDeployment (this package never imports
another adapter). Out: `Controller.run()` watches CanaryDeployments in one
namespace, or all, until `stop()`; every object it sees is reconciled:

- validate: the spec against the models, the policy (a name the policy
  directory serves, or inline text that compiles), the target Deployment
  (it must exist). A refused object gets `Ready=False, reason=InvalidSpec`
  with the message in its status and a Warning Event, and no traffic is
  touched;
- add the finalizer `codedance.io/finalizer`, then hand the `RolloutSpec`
  to the engine, which starts it or resumes it from the status;
- a spec change (a new `metadata.generation`) restarts the release afresh:
  the old rollout's analysis stops (`Engine.forget`), traffic returns to
  stable (weight 0, confirmed), the status goes back to Pending and the
  engine starts the new generation from step 0, bringing the canary
  Deployment up again with the new version. A changed spec is a new release
  request: its analysis must not inherit `for` timers or windows measured on
  another version or policy. (Abort-and-retry would keep the old steps'
  history; a fresh start is what a user who edits the spec expects.)
  Generations are tracked in memory; after a restart the controller compares
  the object's generation with `status.observedGeneration`;
- objects in the way: before a rollout starts, the router and the workload
  manager are asked (`OwnedObjects.foreign`) whether an object they would
  write, such as `<stable>-canary`, exists and belongs to someone else (no
  `app.kubernetes.io/managed-by: codedance` label or an ownerReference to
  another owner). Such an object is never changed or deleted: the object gets
  `Ready=False, reason=ForeignObject` and a Warning Event, and no traffic is
  touched; the retire and route cleanup of a rollback skip it too;
- deletion with the finalizer: the analysis stops, traffic goes back to
  stable first (weight 0, confirmed by read-back), the canary is retired and
  the router's own objects removed, and only then is the finalizer taken off.
  Deletion always finishes: restoring traffic is retried for at most
  `restore_timeout` seconds, then given up with a Warning Event
  (`TrafficNotRestored`) saying what could not be restored and why; a routing
  object already gone (404) has nothing to restore, and the finalizer goes
  at once (Event `RouteGone`). Retiring the canary is bounded the same way;
  whatever stays behind carries an ownerReference to the CanaryDeployment
  (see `owner_reference`), so the garbage collector removes it.

Every transition is an audit line and an Event (through `EventAudit`), with
the explanation. Watches resume from the last resourceVersion seen; a 410
Gone, an error, or a stream that ends, is followed by a relist (the relist
reconciles every object again, which is idempotent). Each object has a worker
of its own, so a slow rollback of one never delays another, and one object's
events are handled in order, the latest state winning.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import logging
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar, cast, runtime_checkable

from kubernetes.aio import client, watch
from kubernetes.aio.client.exceptions import ApiException
from pydantic import ValidationError

import dsl
from adapters.kube import commands, retry
from adapters.kube.events import EventAudit, EventRecorder
from adapters.kube.models import (
    GROUP,
    PLURAL,
    VERSION,
    CanaryDeployment,
    status_from,
    to_rollout_spec,
)
from adapters.kube.store import rfc3339
from dsl.compile import CompiledPolicy
from engine import rollback
from engine.loop import Engine
from engine.model import AuditEntry, Phase, RolloutSpec, RolloutStatus
from engine.ports import (
    Clock,
    ObjectGone,
    PolicyProvider,
    PromotionUndo,
    RolloutRef,
    RouteCleanup,
    TrafficRouter,
    WorkloadManager,
)

log = logging.getLogger("codedance.kube.controller")

FINALIZER = "codedance.io/finalizer"
INLINE = "inline:"  # policy names of inline policies; a file name cannot contain ':'
INVALID = "InvalidSpec"
FOREIGN = "ForeignObject"
NOT_RESTORED = "TrafficNotRestored"
ROUTE_GONE = "RouteGone"
NOT_RETIRED = "CanaryNotRetired"
RESTORE_TIMEOUT = 60.0  # seconds a deletion tries to give stable its traffic back
ACTOR = "controller"
CONFLICT_ATTEMPTS = 5
# phases in which the canary may hold traffic or exist: what deletion must undo
TOUCHED = frozenset(
    {
        Phase.INITIALIZING,
        Phase.PROGRESSING,
        Phase.PAUSED,
        Phase.WAITING_FOR_APPROVAL,
        Phase.PROMOTING,
        Phase.ROLLING_BACK,
    }
)

RouterFactory = Callable[[CanaryDeployment], TrafficRouter]
WorkloadsFactory = Callable[[CanaryDeployment], WorkloadManager]
JsonObject = dict[str, Any]


class InvalidSpec(Exception):
    """A CanaryDeployment that cannot run; the message says why, for the user."""

    reason = INVALID


class ForeignObjectFound(InvalidSpec):
    """An object the rollout would write exists and belongs to someone else."""

    reason = FOREIGN


@runtime_checkable
class OwnedObjects(Protocol):
    """An adapter that writes objects of its own and can tell when one is not its own."""

    async def foreign(self, rollout: RolloutRef) -> str | None:
        """What is in the way (`Deployment ns/web-canary is not managed by ...`), else None."""
        ...


def owner_reference(cd: CanaryDeployment) -> JsonObject:
    """The ownerReference of everything made for `cd`: garbage collected with it.

    `blockOwnerDeletion` keeps a foreground deletion of the CanaryDeployment
    waiting for them; setting it needs `update` on `canarydeployments/finalizers`
    where the OwnerReferencesPermissionEnforcement admission plugin runs.
    """
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "CanaryDeployment",
        "name": cd.name,
        "uid": str(cd.metadata.get("uid") or ""),
        "controller": True,
        "blockOwnerDeletion": True,
    }


def is_not_found(error: BaseException) -> bool:
    """Whether an error is the API server's 404, as an adapter's `ObjectGone` or as is."""
    if isinstance(error, ObjectGone):
        return True
    return isinstance(error, ApiException) and retry.is_not_found(error)


def key_of(obj: JsonObject) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace') or 'default'}/{meta.get('name')}"


def ref_of(spec: RolloutSpec) -> RolloutRef:
    return RolloutRef(
        spec.namespace, spec.name, spec.stable, spec.canary_name, spec.service, spec.route
    )


class Policies:
    """A `PolicyProvider`: the policy directory's policies, plus each object's inline one."""

    def __init__(self, directory: PolicyProvider) -> None:
        self.directory = directory
        self._inline: dict[str, CompiledPolicy] = {}

    def get(self, name: str) -> CompiledPolicy | None:
        if name.startswith(INLINE):
            return self._inline.get(name)
        return self.directory.get(name)

    def set_inline(self, key: str, text: str) -> str:
        """Compile an object's inline policy; its name. Raises `dsl.PolicyError`."""
        name = INLINE + key
        self._inline[name] = dsl.load(text, f"{key} (inline policy)")
        return name

    def drop_inline(self, key: str) -> None:
        self._inline.pop(INLINE + key, None)


T = TypeVar("T")


class _PerRollout(Generic[T]):
    """One adapter per rollout, found by the rollout's key."""

    what = "adapter"

    def __init__(self) -> None:
        self._by_key: dict[str, T] = {}

    def set(self, key: str, adapter: T) -> None:
        self._by_key[key] = adapter

    def drop(self, key: str) -> None:
        self._by_key.pop(key, None)

    def get(self, key: str) -> T | None:
        return self._by_key.get(key)

    def _for(self, ref: RolloutRef) -> T:
        adapter = self._by_key.get(f"{ref.namespace}/{ref.name}")
        if adapter is None:
            raise LookupError(f"no {self.what} for {ref.namespace}/{ref.name}")
        return adapter


class RolloutRouters(_PerRollout[TrafficRouter]):
    """The engine's one `TrafficRouter`, passing each call to the rollout's own router."""

    what = "traffic router"

    async def set_weight(self, rollout: RolloutRef, weight: int) -> None:
        await self._for(rollout).set_weight(rollout, weight)

    async def get_weight(self, rollout: RolloutRef) -> int:
        return await self._for(rollout).get_weight(rollout)

    async def remove(self, rollout: RolloutRef) -> None:
        router = self._for(rollout)
        if isinstance(router, RouteCleanup) and not await _in_the_way(router, rollout):
            await router.remove(rollout)


class RolloutWorkloads(_PerRollout[WorkloadManager]):
    """The engine's one `WorkloadManager`, passing each call to the rollout's own."""

    what = "workload manager"

    async def bring_up(self, rollout: RolloutRef) -> None:
        await self._for(rollout).bring_up(rollout)

    async def promote(self, rollout: RolloutRef) -> None:
        await self._for(rollout).promote(rollout)

    async def retire(self, rollout: RolloutRef) -> None:
        workloads = self._for(rollout)
        if not await _in_the_way(workloads, rollout):
            await workloads.retire(rollout)

    async def restore_stable(self, rollout: RolloutRef) -> None:
        """`PromotionUndo`, for the rollout's own manager when it can undo a promotion."""
        workloads = self._for(rollout)
        if isinstance(workloads, PromotionUndo):
            await workloads.restore_stable(rollout)


async def _in_the_way(adapter: object, rollout: RolloutRef) -> bool:
    """True (and logged) when the adapter's object is someone else's: leave it be.

    A rollback retries retire and remove until they succeed, so refusing by
    raising would retry for ever; skipping is what "never delete what is not
    ours" asks.
    """
    if not isinstance(adapter, OwnedObjects):
        return False
    found = await adapter.foreign(rollout)
    if found:
        log.warning("%s/%s: left alone: %s", rollout.namespace, rollout.name, found)
    return bool(found)


class Controller:
    """Watches CanaryDeployments and keeps the engine's rollouts in step with them."""

    def __init__(
        self,
        api_client: client.ApiClient,
        *,
        engine: Engine,
        policies: Policies,
        routers: RolloutRouters,
        workloads: RolloutWorkloads,
        router_for: RouterFactory,
        workloads_for: WorkloadsFactory,
        audit: EventAudit,
        clock: Clock,
        namespace: str | None = None,
        watch_timeout: int = 300,
        retry_after: float = 5.0,
        restore_timeout: float = RESTORE_TIMEOUT,
    ) -> None:
        self._client = api_client
        self._api = client.CustomObjectsApi(api_client)
        self.engine = engine
        self.policies = policies
        self.routers = routers
        self.workloads = workloads
        self._router_for = router_for
        self._workloads_for = workloads_for
        self.audit = audit
        self.events: EventRecorder = audit.events
        self.clock = clock
        self.namespace = namespace
        self._watch_timeout = watch_timeout
        self._retry_after = retry_after
        self._restore_timeout = restore_timeout
        self._generations: dict[str, int] = {}  # key -> the generation the engine runs
        self._latest: dict[str, JsonObject | None] = {}  # None: the object is gone
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._stopping = asyncio.Event()
        self.relists = 0
        self.resource_version: str | None = None

    # --- watching -----------------------------------------------------------------

    async def run(self) -> None:
        """List, then watch from the list's resourceVersion; relist after 410 or an error."""
        while not self._stopping.is_set():
            try:
                rv = await self._relist()
                while not self._stopping.is_set():
                    rv = await self._watch_until_stopped(rv)
            except ApiException as error:
                if error.status == 410:
                    log.info("the watch position expired (410 Gone): listing again")
                    continue
                log.warning("watching CanaryDeployments: %s %s", error.status, error.reason)
            except (TimeoutError, OSError) as error:
                log.warning("watching CanaryDeployments: %s", error)
            await self._pause(self._retry_after)
        await self.idle()

    async def stop(self) -> None:
        self._stopping.set()

    async def idle(self) -> None:
        """Wait until every object seen so far has been reconciled."""
        while any(not t.done() for t in self._workers.values()):
            await asyncio.gather(*self._workers.values(), return_exceptions=True)

    async def _pause(self, seconds: float) -> None:
        sleeper = asyncio.ensure_future(self.clock.sleep_until(self.clock.now() + seconds))
        stopper = asyncio.ensure_future(self._stopping.wait())
        await asyncio.wait({sleeper, stopper}, return_when=asyncio.FIRST_COMPLETED)
        sleeper.cancel()
        stopper.cancel()

    def _list_call(self) -> Callable[..., Any]:
        if self.namespace is None:
            return self._api.list_cluster_custom_object
        return self._api.list_namespaced_custom_object

    def _list_args(self) -> tuple[str, ...]:
        if self.namespace is None:
            return (GROUP, VERSION, PLURAL)
        return (GROUP, VERSION, self.namespace, PLURAL)

    async def _relist(self) -> str:
        self.relists += 1
        listed = cast(
            JsonObject,
            await retry.call(lambda: self._list_call()(*self._list_args()), clock=self.clock),
        )
        seen = set()
        for obj in listed.get("items") or []:
            obj.setdefault("apiVersion", f"{GROUP}/{VERSION}")
            obj.setdefault("kind", "CanaryDeployment")
            seen.add(key_of(obj))
            self._offer(key_of(obj), obj)
        for key in list(self._generations):  # deleted while we were not watching
            if key not in seen:
                self._offer(key, None)
        rv = str((listed.get("metadata") or {}).get("resourceVersion") or "")
        self.resource_version = rv
        return rv

    async def _watch_until_stopped(self, rv: str) -> str:
        """`_watch`, ended early by `stop()`.

        A real API server keeps a quiet watch open until its `timeout_seconds`
        (minutes), sending nothing but bookmarks, so waiting for the stream to
        end would hold `stop()` up that long.
        """
        watching = asyncio.ensure_future(self._watch(rv))
        stopper = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({watching, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
            if not watching.done():
                watching.cancel()
                await asyncio.gather(watching, return_exceptions=True)
        if watching.cancelled():
            return self.resource_version or rv
        return watching.result()

    async def _watch(self, rv: str) -> str:
        """One watch stream from `rv`; the last resourceVersion seen when it ends."""
        stream = watch.Watch()  # type: ignore[no-untyped-call]
        try:
            async for event in stream.stream(  # type: ignore[no-untyped-call]
                self._list_call(),
                *self._list_args(),
                resource_version=rv,
                allow_watch_bookmarks=True,
                timeout_seconds=self._watch_timeout,
            ):
                kind = event["type"]
                obj = cast(JsonObject, event["raw_object"])
                rv = str((obj.get("metadata") or {}).get("resourceVersion") or rv)
                self.resource_version = rv
                if kind == "BOOKMARK":
                    continue
                self._offer(key_of(obj), None if kind == "DELETED" else obj)
                if self._stopping.is_set():
                    break
        finally:
            await stream.close()  # type: ignore[no-untyped-call]
        return rv

    def _offer(self, key: str, obj: JsonObject | None) -> None:
        """Queue the object's latest state for its worker (started when idle)."""
        self._latest[key] = obj
        worker = self._workers.get(key)
        if worker is None or worker.done():
            self._workers[key] = asyncio.ensure_future(self._work(key))

    async def _work(self, key: str) -> None:
        while key in self._latest:
            obj = self._latest.pop(key)
            try:
                if obj is None:
                    await self._gone(key)
                else:
                    await self.reconcile(obj)
            except Exception:
                log.exception("reconciling %s failed; trying again", key)
                self._latest.setdefault(key, obj)  # unless a newer state arrived meanwhile
                await self._pause(self._retry_after)
                if self._stopping.is_set():
                    return

    # --- reconciling --------------------------------------------------------------

    async def reconcile(self, obj: JsonObject) -> None:
        """Bring the engine in line with one CanaryDeployment as read from the API."""
        key = key_of(obj)
        meta = obj.get("metadata") or {}
        self.events.remember(key, str(meta.get("uid") or ""))
        if meta.get("deletionTimestamp"):
            if FINALIZER in (meta.get("finalizers") or []):
                await self._finalize(key, obj)
            else:
                await self._gone(key)
            return
        generation = int(meta.get("generation") or 0)
        try:
            cd, spec = await self._validate(key, obj)
        except InvalidSpec as problem:
            await self._refuse(key, obj, str(problem), problem.reason)
            return
        if FINALIZER not in (meta.get("finalizers") or []):
            await self._set_finalizer(key, add=True)
        try:
            await self._run(key, obj, cd, spec, generation)
        except InvalidSpec as problem:
            await self._refuse(key, obj, str(problem), problem.reason)
            return
        # a person's command (the codedance.io/command annotation), once per id
        await commands.handle(
            obj, self.engine, api_client=self._client, events=self.events, clock=self.clock
        )

    async def _run(
        self, key: str, obj: JsonObject, cd: CanaryDeployment, spec: RolloutSpec, generation: int
    ) -> None:
        """Start, resume or restart the rollout of a valid object."""
        running = self._generations.get(key)
        if running is None:
            status = obj.get("status") or {}
            observed = status.get("observedGeneration")
            stored = status_from(status)
            if stored is not None and observed is not None and generation > int(observed):
                await self._restart(key, cd, spec, generation, stored.phase)
            else:
                self._use(key, cd)
                await self._check_foreign(key, spec)
                self._generations[key] = generation
                await self.engine.add(spec)
        elif generation > running:
            status = await self.engine.forget(key)
            await self._restart(key, cd, spec, generation, status.phase if status else None)

    async def _validate(self, key: str, obj: JsonObject) -> tuple[CanaryDeployment, RolloutSpec]:
        manifest = {k: v for k, v in obj.items() if k != "status"}
        try:
            cd = CanaryDeployment.model_validate(manifest)
        except ValidationError as e:
            raise InvalidSpec(_validation_message(e)) from None
        if cd.spec.traffic.provider == "local":
            # the schema's default serves `codedance run --local`; a cluster has no local router
            raise InvalidSpec(
                "spec.traffic.provider is required on a cluster: istio, nginx-ingress or "
                "gateway-api (`local` is for `codedance run --local`)"
            )
        policy_name: str | None = None
        if cd.spec.policy.inline is not None:
            try:
                policy_name = self.policies.set_inline(key, cd.spec.policy.inline)
            except dsl.PolicyError as e:
                raise InvalidSpec(f"the inline policy has errors:\n{e.render()}") from None
        elif cd.spec.policy.name is not None and self.policies.get(cd.spec.policy.name) is None:
            raise InvalidSpec(f"no policy named {cd.spec.policy.name!r} in the policy directory")
        target = cd.spec.target_ref.name
        if not await self._deployment_exists(cd.namespace, target):
            raise InvalidSpec(f"the target Deployment {cd.namespace}/{target} does not exist")
        try:
            spec = to_rollout_spec(cd, policy_name)
        except (ValidationError, ValueError) as e:
            raise InvalidSpec(str(e)) from None
        return cd, spec

    async def _deployment_exists(self, namespace: str, name: str) -> bool:
        try:
            await retry.call(
                lambda: self._api.get_namespaced_custom_object(
                    "apps", "v1", namespace, "deployments", name
                ),
                clock=self.clock,
            )
        except ApiException as error:
            if retry.is_not_found(error):
                return False
            raise
        return True

    def _use(self, key: str, cd: CanaryDeployment) -> None:
        """Build the rollout's router and workload manager. Raises `InvalidSpec`."""
        try:
            router, workloads = self._router_for(cd), self._workloads_for(cd)
        except (ValueError, LookupError) as e:
            raise InvalidSpec(f"traffic or workloads cannot be set up: {e}") from None
        self.routers.set(key, router)
        self.workloads.set(key, workloads)

    async def _restart(
        self,
        key: str,
        cd: CanaryDeployment,
        spec: RolloutSpec,
        generation: int,
        phase: Phase | None,
    ) -> None:
        """A new generation: stop the old analysis, stable traffic, start from step 0."""
        if phase in TOUCHED and self.routers.get(key) is None:
            self._use(key, cd)  # a restarted controller: the old rollout's router
        if phase in TOUCHED:
            await rollback.set_weight_confirmed(self.routers, ref_of(spec), 0, self.clock)
        self._use(key, cd)
        await self._check_foreign(key, spec)
        message = f"the spec changed (generation {generation}): the analysis starts again"
        await self.engine.store.save(key, RolloutStatus(message=message))
        await self.audit.record(
            AuditEntry(
                time=self.clock.now(),
                rollout=key,
                actor=ACTOR,
                from_phase=phase or Phase.PENDING,
                to_phase=Phase.PENDING,
                action="restart",
                explanation=message,
                weight=0,
            )
        )
        self._generations[key] = generation
        await self.engine.add(spec)

    async def _check_foreign(self, key: str, spec: RolloutSpec) -> None:
        """Raise `ForeignObjectFound` when an object the rollout would write is not ours."""
        ref = ref_of(spec)
        for adapter in (self.workloads.get(key), self.routers.get(key)):
            if isinstance(adapter, OwnedObjects):
                found = await adapter.foreign(ref)
                if found:
                    raise ForeignObjectFound(f"{found}; it is left as it is")

    async def _refuse(self, key: str, obj: JsonObject, message: str, reason: str = INVALID) -> None:
        """An invalid spec: stop what runs, say why in the status and an Event."""
        status = await self.engine.forget(key)
        if status is not None and status.phase in TOUCHED:
            await self._restore(key, status)
        self._generations.pop(key, None)
        old = [c for c in (obj.get("status") or {}).get("conditions") or []]
        ready: JsonObject = next((c for c in old if c.get("type") == "Ready"), {})
        if ready.get("reason") == reason and ready.get("message") == message:
            return  # already said (a relist sees the same object again)
        await self._write_invalid(key, message, reason)
        await self.events.emit(key, reason, message, warning=True)

    async def _write_invalid(self, key: str, message: str, reason: str = INVALID) -> None:
        namespace, _, name = key.partition("/")
        for _ in range(CONFLICT_ATTEMPTS):
            obj = await self._read(namespace, name)
            if obj is None:
                return
            meta = obj.get("metadata") or {}
            generation = meta.get("generation")
            status = dict(obj.get("status") or {})
            condition: JsonObject = {
                "type": "Ready",
                "status": "False",
                "reason": reason,
                "message": message,
                "lastTransitionTime": rfc3339(self.clock.now()),
            }
            if generation is not None:
                condition["observedGeneration"] = generation
            others = [c for c in status.get("conditions") or [] if c.get("type") != "Ready"]
            status.update(
                conditions=[condition, *others], message=message, observedGeneration=generation
            )
            body: JsonObject = {**obj, "status": status}
            replace = self._api.replace_namespaced_custom_object_status
            if await self._write(replace, namespace, name, body):
                return
        raise RuntimeError(f"CanaryDeployment {key} kept changing: status not written")

    async def _finalize(self, key: str, obj: JsonObject) -> None:
        """Deletion: stable traffic first, then the canary goes, then the finalizer.

        Bounded: whatever cannot be restored within `restore_timeout` is said in
        a Warning Event and the finalizer goes anyway, so a deletion (and the
        deletion of a namespace, which deletes objects in any order) finishes.
        """
        status = await self.engine.forget(key)
        if status is None:
            status = status_from(obj.get("status") or {})
        if status is not None and status.phase in TOUCHED:
            if self.routers.get(key) is None:
                problem = self._use_for_deletion(key, obj)
                if problem:
                    await self.events.emit(
                        key,
                        NOT_RESTORED,
                        f"the CanaryDeployment is going, but its traffic cannot be restored: "
                        f"{problem}",
                        warning=True,
                    )
            if self.routers.get(key) is not None:
                await self._restore(key, status, deleting=True)
        await self._set_finalizer(key, add=False)
        await self._gone(key)

    def _use_for_deletion(self, key: str, obj: JsonObject) -> str | None:
        """A restarted controller's router and workloads for an object going away.

        Not `_validate`: the target Deployment or the policy may be gone already
        (a namespace being deleted), and the traffic still needs restoring.
        """
        try:
            cd = CanaryDeployment.model_validate({k: v for k, v in obj.items() if k != "status"})
            self._use(key, cd)
        except ValidationError as e:
            return _validation_message(e)
        except InvalidSpec as problem:
            return str(problem)
        return None

    async def _restore(self, key: str, status: RolloutStatus, *, deleting: bool = False) -> None:
        """Weight 0 (confirmed), the canary retired, the router's objects removed.

        Deleting, each part is retried for at most `restore_timeout` seconds
        and what could not be done is a Warning Event (`_undo`); otherwise (an
        invalid spec: the object stays) it is retried until done, as a rollback.
        """
        namespace, _, name = key.partition("/")
        obj = await self._read(namespace, name)
        target = ((obj or {}).get("spec") or {}).get("targetRef") or {}
        stable = str(target.get("name") or "")
        traffic = ((obj or {}).get("spec") or {}).get("traffic") or {}
        ref = RolloutRef(
            namespace,
            name,
            stable,
            f"{stable}-canary",
            str(traffic.get("service") or stable),
            str(traffic.get("route") or ""),
        )
        if not deleting:  # the object stays: retried until done, as a rollback is
            await rollback.roll_back(self.routers, self.workloads, ref, self.clock)
            restored = retired = removed = True
        else:
            restored, retired, removed = await self._undo(key, ref)
        if restored and retired and removed:
            explanation = (
                "the CanaryDeployment is going: stable has all traffic, the canary is retired"
            )
        else:
            explanation = "the CanaryDeployment is going: not everything could be restored"
        await self.audit.record(
            AuditEntry(
                time=self.clock.now(),
                rollout=key,
                actor=ACTOR,
                from_phase=status.phase,
                to_phase=Phase.ROLLED_BACK,
                action="delete",
                explanation=explanation,
                weight=0,
            )
        )

    async def _undo(self, key: str, ref: RolloutRef) -> tuple[bool, bool, bool]:
        """Stable traffic, the canary retired, the route cleaned: each bounded in time.

        The canary is retired even when stable traffic was not confirmed: the
        CanaryDeployment is going, and its garbage collector would remove the
        canary anyway.
        """
        restored = await self._bounded(
            key,
            "returning traffic to stable",
            lambda: rollback.write_confirmed(self.routers, ref, 0),
            NOT_RESTORED,
        )
        retired = await self._bounded(
            key, "retiring the canary", lambda: self.workloads.retire(ref), NOT_RETIRED
        )
        removed = await self._bounded(
            key, "removing the canary route", lambda: self.routers.remove(ref), NOT_RETIRED
        )
        return restored, retired, removed

    async def _bounded(self, key: str, what: str, attempt: Callable[[], Any], reason: str) -> bool:
        """Run `attempt` until it succeeds, for at most `restore_timeout` seconds.

        True when done or when its object is gone (404: nothing left to undo,
        said in a `RouteGone` Event); False after the time is up, with a Warning
        Event naming the last error.
        """
        deadline = self.clock.now() + self._restore_timeout
        delay, tries = 0.25, 0
        while True:
            tries += 1
            left = max(0.0, deadline - self.clock.now())
            try:
                # a call that hangs (an API server that accepts and never answers) counts too
                await asyncio.wait_for(attempt(), timeout=max(left, 0.1))
                return True
            except Exception as error:  # the adapters' errors have no common base
                if is_not_found(error):
                    if reason == NOT_RESTORED:  # said once: the later steps meet the same 404
                        await self.events.emit(
                            key,
                            ROUTE_GONE,
                            f"{what}: nothing to restore, the routing object is gone: "
                            f"{_describe(error)}",
                            warning=True,
                        )
                    return True
                if self.clock.now() + delay >= deadline:
                    message = (
                        f"{what} did not succeed within {self._restore_timeout:g}s "
                        f"({tries} attempts), giving up: {_describe(error)}"
                    )
                    log.warning("%s: %s", key, message)
                    await self.events.emit(key, reason, message, warning=True)
                    return False
                log.info("%s: %s failed, retrying in %.2fs: %s", key, what, delay, error)
            await self.clock.sleep_until(self.clock.now() + delay)
            delay = min(5.0, delay * 2)

    async def _gone(self, key: str) -> None:
        await self.engine.forget(key)
        self._generations.pop(key, None)
        self.routers.drop(key)
        self.workloads.drop(key)
        self.policies.drop_inline(key)
        self.events.forget(key)

    async def _set_finalizer(self, key: str, *, add: bool) -> None:
        namespace, _, name = key.partition("/")
        for _ in range(CONFLICT_ATTEMPTS):
            obj = await self._read(namespace, name)
            if obj is None:
                return
            finalizers = list((obj.get("metadata") or {}).get("finalizers") or [])
            if (FINALIZER in finalizers) == add:
                return
            finalizers = (
                [*finalizers, FINALIZER] if add else [f for f in finalizers if f != FINALIZER]
            )
            body = copy.deepcopy(obj)
            body["metadata"]["finalizers"] = finalizers
            body.pop("status", None)
            if await self._write(self._api.replace_namespaced_custom_object, namespace, name, body):
                return
        raise RuntimeError(f"CanaryDeployment {key} kept changing: finalizer not updated")

    async def _write(self, replace: Any, namespace: str, name: str, body: JsonObject) -> bool:
        """Replace the object (or its status): True once done or the object is gone,
        False on a stale resourceVersion (the caller reads again and retries)."""
        try:
            await retry.call(
                functools.partial(replace, GROUP, VERSION, namespace, PLURAL, name, body),
                clock=self.clock,
            )
        except ApiException as error:
            if retry.is_not_found(error):
                return True
            if not retry.is_conflict(error):
                raise
            return False
        return True

    async def _read(self, namespace: str, name: str) -> JsonObject | None:
        try:
            obj = await retry.call(
                lambda: self._api.get_namespaced_custom_object(
                    GROUP, VERSION, namespace, PLURAL, name
                ),
                clock=self.clock,
            )
        except ApiException as error:
            if retry.is_not_found(error):
                return None
            raise
        return dict(cast(JsonObject, obj))


def _describe(error: BaseException) -> str:
    if isinstance(error, ApiException):
        return f"HTTP {error.status} {error.reason}"
    if isinstance(error, TimeoutError):
        return "the API server did not answer in time"
    return str(error) or type(error).__name__


def _validation_message(error: ValidationError) -> str:
    parts = []
    for e in error.errors():
        where = ".".join(str(p) for p in e["loc"])
        parts.append(f"{where}: {e['msg']}" if where else str(e["msg"]))
    return "; ".join(parts)
