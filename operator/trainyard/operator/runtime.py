"""One controller runtime for every kind: watches, a work queue, workers, leadership.

A kind is registered with a `Registration`: its pure `reconcile(observed) -> Plan`, the
child kinds it owns, and how to read its observation. The runtime then

- keeps the owners as kopf delivers them (`kopf.on.event`: every watch event, deletions
  included, whatever the propagation policy; no finalizer, no annotations written);
- watches the children through one informer per child kind (label-selected LIST+WATCH,
  `k8s.Informer`), and maps every child event to its owner through the owner label;
- enqueues the owner's key in a deduplicating, rate-limited work queue
  (`workqueue.WorkQueue`): one reconcile in flight per object, events coalesced,
  failures retried with capped exponential backoff, `Plan.requeue_after` honoured;
- resyncs every owner on a slow timer, as a safety net only;
- follows kopf's peering: a standby replica keeps its caches warm but makes no
  writes (no queue worker runs), and enqueues everything when it takes over.

What the runtime keeps per object (owner body, locks, expectations, written status,
schedules, failures, the phase gauge) goes when the object's deletion is seen.

Adding a controller for a new kind is a pure `reconcile(observed) -> Plan`, an `observe`
that gathers what it reads (`runtime.children(...)` for its children, `runtime.owner(...)`
for another registered kind it follows), and a `Registration` passed to
`runtime.register` before the operator starts (see `controller.TrainingRuns`); kopf's
event handler is registered for every registered kind (`handlers.PLURALS`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from trainyard.operator import k8s, leadership
from trainyard.operator.observability import OperatorMetrics
from trainyard.operator.plan import Plan
from trainyard.operator.settings import OperatorConfig
from trainyard.operator.workqueue import QueueClosed, WorkQueue

logger = logging.getLogger("trainyard.operator")

Key = tuple[str, str, str]  # (kind, namespace, name)
SYNC_TIMEOUT = 30.0  # how long a reconcile waits for the informers' first listing
EXPECTATION_SECONDS = 30.0  # how long a write of ours may take to show up in a watch
PEERING_KINDS = ("KopfPeering", "ZalandoKopfPeering")
INVALID_PHASE = "Invalid"  # every kind's phase for a spec it cannot act on
CLUSTER_PEERING_KINDS = ("ClusterKopfPeering", "ZalandoClusterKopfPeering")


@dataclass(frozen=True)
class Registration:
    """Everything the runtime needs to run one kind's controller."""

    kind: str
    """The owner kind, e.g. "TrainingRun" (a key of `k8s.RESOURCES`)."""
    owns: tuple[str, ...]
    """Child kinds watched for this owner (pods included where the reconcile reads them)."""
    owner_label: str
    """The label on every child naming its owner, e.g. "trainyard.dev/run"."""
    label_value: Callable[[str], str]
    """The owner label's value for an owner name (names longer than a label are hashed)."""
    observe: Callable[[Runtime, dict[str, Any]], Awaitable[Any]]
    """Read what the reconcile looks at (children from the informers, metrics…)."""
    reconcile: Callable[[Any], Plan]
    """Pure: observation in, plan out."""
    recorded: Callable[[OperatorMetrics, dict[str, Any], Plan | None], None] | None = None
    """Keep this kind's gauges true after a reconcile (plan None: the object is gone)."""
    follows: Mapping[str, Callable[[Runtime, dict[str, Any]], list[str]]] = field(
        default_factory=dict
    )
    """Other registered kinds this kind's reconcile reads, e.g. {"TrainingRun": gates_of_run}:
    an event of such an object enqueues the names (same namespace) the function returns."""
    threaded: bool = False
    """The reconcile may compute for long (a gate's bootstrap: seconds for thousands of
    examples): it runs in a worker thread, so watches and other reconciles never wait."""


def child_entry(kind: str, body: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a child a reconcile reads: identity, owners, labels and status.

    No copies: the informer parsed `body` for this event alone, and reconcile only reads.
    """
    meta = body.get("metadata") or {}
    entry = {
        "apiVersion": body.get("apiVersion"),
        "kind": kind,
        "metadata": {
            k: meta[k]
            for k in (
                "name",
                "namespace",
                "uid",
                "labels",
                "annotations",
                "ownerReferences",
                "deletionTimestamp",
            )
            if k in meta
        },
    }
    if "status" in body:
        entry["status"] = body["status"]
    return entry


def _whole(kind: str, body: dict[str, Any]) -> dict[str, Any]:
    return body


@dataclass
class Runtime:
    """Per-process state shared by every registered controller."""

    config: OperatorConfig
    metrics: OperatorMetrics = field(default_factory=OperatorMetrics)
    identity: str = ""
    registrations: dict[str, Registration] = field(default_factory=dict)
    configuration: Any = None  # kubernetes_asyncio Configuration, set at login
    _client: k8s.KubeClient | None = None
    _queue: WorkQueue[Key] | None = None
    _owners: dict[Key, dict[str, Any]] = field(default_factory=dict)
    # (kind, namespace) → name → body: what followers look up on every event, without a scan
    _by_namespace: dict[tuple[str, str], dict[str, dict[str, Any]]] = field(default_factory=dict)
    _by_label: dict[tuple[str, str, str], str] = field(default_factory=dict)
    _informers: dict[tuple[str, str], list[k8s.Informer]] = field(default_factory=dict)
    _peerings: list[k8s.Informer] = field(default_factory=list)
    _tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    _active: asyncio.Event = field(default_factory=asyncio.Event)
    _leadership_timer: asyncio.TimerHandle | None = None
    # uid → (resourceVersion the write was based on, the body the write returned)
    _written: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)
    # Expectations (as Kubernetes controllers keep them): children this operator just
    # created or deleted, until the watch shows it, so a reconcile that runs before the
    # watch event neither posts them again nor sees them still there.
    _created: dict[str, dict[tuple[str, str], tuple[float, dict[str, Any]]]] = field(
        default_factory=dict
    )
    _deleted: dict[str, dict[tuple[str, str], float]] = field(default_factory=dict)
    reconciles: int = 0  # reconciles run, all kinds (tests and benchmarks count them)

    def register(self, registration: Registration) -> None:
        self.registrations[registration.kind] = registration

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def client(self) -> k8s.KubeClient:
        if self._client is None:
            if self.configuration is None:
                raise RuntimeError("no Kubernetes connection yet: the login handler has not run")
            self._client = k8s.KubeClient(
                self.configuration, self.config.api_settings(), self.metrics.record_api_error
            )
            self._client.user_agent = f"trainyard-operator/{self.identity or 'standalone'}"
        return self._client

    def set_configuration(self, configuration: Any) -> None:
        """The credentials the operator logged in with; the client is rebuilt."""
        self.configuration = configuration
        if self._client is not None:
            old, self._client = self._client, None
            asyncio.get_running_loop().create_task(old.close())
        for informers in (*self._informers.values(), self._peerings):
            for informer in informers:
                informer.client = self.client

    async def start(self) -> None:
        """Start the watches, the workers and the resync loop (once, after login)."""
        if self._queue is not None:
            return
        loop = asyncio.get_running_loop()
        self._queue = WorkQueue(
            backoff_base=self.config.error_backoff_base,
            backoff_cap=self.config.error_backoff_cap,
            on_depth=lambda depth: self.metrics.queue_depth.labels(kind="all").set(depth),
            on_wait=lambda seconds: self.metrics.queue_wait_seconds.labels(kind="all").observe(
                seconds
            ),
        )
        for registration in self.registrations.values():
            for kind in registration.owns:
                self._start_informers(kind, registration.owner_label)
        self._start_peering()
        for index in range(self.config.workers):
            self._tasks.append(loop.create_task(self._work(), name=f"reconcile worker {index}"))
        self._tasks.append(loop.create_task(self._resync_forever(), name="resync"))

    def _scopes(self) -> list[str | None]:
        config = self.config
        exact = [n for n in config.namespaces if not any(ch in n for ch in "*?[!,")]
        # kopf namespace globs are kopf's to resolve; children are then watched everywhere
        # (label-selected, so only Trainyard's children come back).
        if exact and len(exact) == len(config.namespaces) and not config.clusterwide:
            return list(exact)
        return [None]

    def _informer(
        self, kind: str, namespace: str | None, label: str | None, **callbacks: Any
    ) -> k8s.Informer:
        config = self.config
        informer = k8s.Informer(
            self.client,
            kind,
            namespace,
            label,
            callbacks.pop("transform", child_entry),
            server_timeout=config.watch_server_timeout or 300.0,
            client_timeout=config.watch_client_timeout or 330.0,
            backoff=config.watch_reconnect_backoff,
            on_restart=lambda: self.metrics.watch_restarts.labels(kind=kind).inc(),
            **callbacks,
        )
        self._tasks.append(asyncio.get_running_loop().create_task(informer.run()))
        return informer

    def _start_informers(self, kind: str, label: str) -> None:
        if (kind, label) in self._informers:
            return
        self._informers[(kind, label)] = [
            self._informer(
                kind,
                namespace,
                label,
                on_change=lambda _kind, entry, added, label=label: self._child_changed(
                    label, entry, added
                ),
            )
            for namespace in self._scopes()
        ]

    def _start_peering(self) -> None:
        if self.config.standalone:
            self._set_active(True)
            return
        if self.config.clusterwide or self._scopes() == [None]:
            kinds, scopes = CLUSTER_PEERING_KINDS, [None]
        else:
            kinds, scopes = PEERING_KINDS, self._scopes()
        for kind in kinds:
            for namespace in scopes:
                self._peerings.append(
                    self._informer(
                        kind,
                        namespace,
                        None,
                        transform=_whole,
                        on_change=lambda *_: self._judge_leadership(),
                        on_synced=self._judge_leadership,
                    )
                )

    async def close(self) -> None:
        if self._queue is not None:
            self._queue.close()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        self._informers.clear()
        self._peerings.clear()
        if self._leadership_timer is not None:
            self._leadership_timer.cancel()
        if self._client is not None:
            await self._client.close()
            self._client = None

    # -- leadership -------------------------------------------------------------------------

    @property
    def is_active(self) -> bool:
        return self._active.is_set()

    def _judge_leadership(self) -> None:
        if not all(p.synced.is_set() for p in self._peerings):
            return
        peerings = [
            obj
            for informer in self._peerings
            for obj in informer.all()
            if obj["metadata"]["name"] == self.config.peering_name
        ]
        verdict = leadership.judge(
            peerings, identity=self.identity, priority=self.config.priority, now=datetime.now(UTC)
        )
        if self._leadership_timer is not None:
            self._leadership_timer.cancel()
            self._leadership_timer = None
        if verdict.recheck_at is not None:  # a blocking peer may die without a word
            delay = (verdict.recheck_at - datetime.now(UTC)).total_seconds() + 0.1
            self._leadership_timer = asyncio.get_running_loop().call_later(
                max(0.1, delay), self._judge_leadership
            )
        if verdict.active != self.is_active:
            logger.info(
                "%s: %s",
                self.identity,
                "active" if verdict.active else f"standing by for {', '.join(verdict.blocking)}",
            )
        self._set_active(verdict.active)

    def _set_active(self, active: bool) -> None:
        was = self.is_active
        self.metrics.leader.set(1 if active else 0)
        if active and not was:
            self._active.set()
            for key in list(self._owners):  # what happened while standing by
                self.enqueue(key)
        elif not active:
            self._active.clear()

    # -- events -----------------------------------------------------------------------------

    def owner_event(self, kind: str, event_type: str | None, body: Mapping[str, Any]) -> None:
        """kopf saw an owner event (None: listed): keep the body, enqueue, or forget."""
        meta = body.get("metadata") or {}
        key = (kind, meta.get("namespace") or "", meta.get("name") or "")
        logger.debug("%s: %s event for %s", self.identity, event_type, key)
        registration = self.registrations[kind]
        label = (kind, key[1], registration.label_value(key[2]))
        if event_type == "DELETED":
            self.forget(key, meta.get("uid", ""))
            self._notify_followers(kind, body)
            return
        self._owners[key] = dict(body)
        self._by_namespace.setdefault((kind, key[1]), {})[key[2]] = self._owners[key]
        self._by_label[label] = key[2]
        # Followers read this object's status, which is mostly this operator's own writes
        # (a run's phase): they hear every change, the echo of such a write included.
        self._notify_followers(kind, body)
        if event_type == "MODIFIED" and self._is_own_write(body):
            return  # the status this operator just wrote, computed by the reconcile that wrote it
        self.enqueue(key)

    def _notify_followers(self, kind: str, body: Mapping[str, Any]) -> None:
        namespace = (body.get("metadata") or {}).get("namespace") or ""
        for follower in self.registrations.values():
            mapper = follower.follows.get(kind)
            if mapper is not None:
                for name in mapper(self, dict(body)):
                    self.enqueue((follower.kind, namespace, name))

    def owners(self, kind: str, namespace: str) -> list[dict[str, Any]]:
        """The cached objects of a registered kind in a namespace (as kopf last delivered them)."""
        return list(self._by_namespace.get((kind, namespace), {}).values())

    def owner(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """One cached object of a registered kind, or None when it does not exist."""
        return self._owners.get((kind, namespace, name))

    def _child_changed(self, label: str, entry: Mapping[str, Any], added: bool = False) -> None:
        meta = entry.get("metadata") or {}
        if added and self._was_expected(entry):
            return  # our own create coming back: the reconcile that made it counted on it
        value = (meta.get("labels") or {}).get(label)
        namespace = meta.get("namespace") or ""
        for registration in self.registrations.values():
            if registration.owner_label != label:
                continue
            name = self._by_label.get((registration.kind, namespace, value or ""))
            if name is not None:
                # A short settle time: a burst of child events (pods of a gang starting,
                # a Job's counters) becomes one reconcile, not one per event.
                self.enqueue((registration.kind, namespace, name), self.config.child_event_delay)

    def _was_expected(self, entry: Mapping[str, Any]) -> bool:
        """Whether a newly seen child is one this operator just created (and settle that)."""
        meta = entry.get("metadata") or {}
        key = (entry.get("kind"), meta.get("name"))
        for owner in meta.get("ownerReferences") or []:
            created = self._created.get(owner.get("uid", ""))
            if created is not None and created.pop(key, None) is not None:  # type: ignore[arg-type]
                if not created:
                    self._created.pop(owner.get("uid", ""), None)
                return True
        return False

    def _is_own_write(self, body: Mapping[str, Any]) -> bool:
        """Whether an owner event only echoes this operator's own last status write."""
        meta = body.get("metadata") or {}
        written = self._written.get(meta.get("uid", ""))
        return written is not None and (
            written[1]["metadata"]["resourceVersion"] == meta.get("resourceVersion")
        )

    def enqueue(self, key: Key, after: float | None = None) -> None:
        """Ask for a reconcile of `key` (after `after` seconds); nothing while standing by."""
        if self._queue is None or not self.is_active:
            return
        if after is None:
            self._queue.add(key)
        else:
            self._queue.add_after(key, after)

    def forget(self, key: Key, uid: str) -> None:
        """The object is gone: drop everything kept about it."""
        body = self._owners.pop(key, None)
        self._by_namespace.get((key[0], key[1]), {}).pop(key[2], None)
        registration = self.registrations[key[0]]
        self._by_label.pop((key[0], key[1], registration.label_value(key[2])), None)
        if self._queue is not None:
            self._queue.remove(key)
        uid = uid or ((body or {}).get("metadata") or {}).get("uid", "")
        for kept in (self._written, self._created, self._deleted):
            kept.pop(uid, None)
        if registration.recorded is not None:
            gone = {"metadata": {"uid": uid, "namespace": key[1], "name": key[2]}}
            registration.recorded(self.metrics, gone, None)

    # -- workers ----------------------------------------------------------------------------

    async def _work(self) -> None:
        assert self._queue is not None
        queue = self._queue
        while True:
            await self._active.wait()
            try:
                key = await queue.get()
            except QueueClosed:
                return
            try:
                if not self.is_active:
                    continue  # taken over meanwhile: the new leader reconciles it
                requeue = await self._reconcile_key(key)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # one object's trouble must not stop the others
                delay = queue.add_rate_limited(key)
                log = logger.info if isinstance(error, k8s.ApiError) else logger.exception
                log("reconcile of %s %s/%s failed (%s); retrying in %.1fs", *key, error, delay)
            else:
                queue.forget(key)
                if requeue is not None:
                    queue.add_after(key, requeue)
            finally:
                queue.done(key)

    async def _resync_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.resync_seconds)
            for key in list(self._owners):
                self.enqueue(key)

    async def _reconcile_key(self, key: Key) -> float | None:
        body = self._owners.get(key)
        if body is None:
            return None
        registration = self.registrations[key[0]]
        logger.debug("%s: reconcile %s", self.identity, key)
        self.reconciles += 1
        started = time.perf_counter()
        try:
            plan = await self._reconcile(registration, body)
        except k8s.Conflict:
            self.metrics.reconciles.labels(result="conflict").inc()
            raise
        except Exception:
            self.metrics.reconciles.labels(result="error").inc()
            raise
        finally:
            self.metrics.reconcile_seconds.observe(time.perf_counter() - started)
        result = (
            "converged"
            if plan.is_empty
            else (
                "invalid"
                # a gate says it in its verdict
                if INVALID_PHASE in (plan.status.get("phase"), plan.status.get("verdict"))
                else "changed"
            )
        )
        self.metrics.reconciles.labels(result=result).inc()
        return plan.requeue_after

    async def _reconcile(self, registration: Registration, body: dict[str, Any]) -> Plan:
        body = self._freshest(body)
        meta = body["metadata"]
        namespace, name, uid = meta["namespace"], meta["name"], meta["uid"]
        await self._synced()
        observed = await registration.observe(self, body)
        if registration.threaded:
            plan = await asyncio.to_thread(registration.reconcile, observed)
        else:
            plan = registration.reconcile(observed)
        if not plan.is_empty:
            applied = await k8s.apply_plan(
                self.client,
                plan,
                kind=registration.kind,
                namespace=namespace,
                name=name,
                resource_version=meta.get("resourceVersion"),
            )
            self._expect(uid, plan)
            if (
                plan.status_patch is not None
                and applied.status is not None
                and applied.resource_version
            ):
                result = {
                    "status": applied.status,
                    "metadata": {"resourceVersion": applied.resource_version},
                }
                self._written[uid] = (meta.get("resourceVersion", ""), result)
        if registration.recorded is not None:
            registration.recorded(self.metrics, body, plan)
        return plan

    async def _synced(self) -> None:
        informers = [i for group in self._informers.values() for i in group]
        await asyncio.wait_for(asyncio.gather(*(i.synced.wait() for i in informers)), SYNC_TIMEOUT)

    def _freshest(self, body: dict[str, Any]) -> dict[str, Any]:
        """The cached body may be older than this operator's own last status write."""
        uid = body["metadata"]["uid"]
        written = self._written.get(uid)
        if written is not None:
            based_on, result = written
            if body["metadata"].get("resourceVersion") == based_on:
                return {
                    **body,
                    "status": result.get("status"),
                    "metadata": {
                        **body["metadata"],
                        "resourceVersion": result["metadata"]["resourceVersion"],
                    },
                }
            self._written.pop(uid, None)
        return body

    # -- what reconciles read ---------------------------------------------------------------

    def children(
        self, registration: Registration, namespace: str, name: str, uid: str
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(children, pods) labelled for this owner, corrected by this operator's own
        writes that the watches have not shown yet."""
        value = registration.label_value(name)
        children: list[dict[str, Any]] = []
        pods: list[dict[str, Any]] = []
        for kind in registration.owns:
            for informer in self._informers.get((kind, registration.owner_label), []):
                (pods if kind == "Pod" else children).extend(informer.get(namespace, value))
        return self._expected_children(uid, children), pods

    def _expect(self, uid: str, plan: Plan) -> None:
        deadline = time.monotonic() + EXPECTATION_SECONDS
        created = self._created.setdefault(uid, {})
        for manifest in plan.creates:
            created[(manifest["kind"], manifest["metadata"]["name"])] = (
                deadline,
                child_entry(manifest["kind"], manifest),
            )
        deleted = self._deleted.setdefault(uid, {})
        for ref in plan.deletes:
            deleted[(ref.kind, ref.name)] = deadline
            created.pop((ref.kind, ref.name), None)

    def _expected_children(self, uid: str, indexed: list[dict[str, Any]]) -> list[dict[str, Any]]:
        now = time.monotonic()
        seen = {(c["kind"], c["metadata"]["name"]) for c in indexed}
        created, deleted = self._created.get(uid, {}), self._deleted.get(uid, {})
        for key, (deadline, _) in list(created.items()):
            if key in seen or now > deadline:
                del created[key]
        for key, deadline in list(deleted.items()):
            if key not in seen or now > deadline:
                del deleted[key]
        if not created:
            self._created.pop(uid, None)
        if not deleted:
            self._deleted.pop(uid, None)
        children = [c for c in indexed if (c["kind"], c["metadata"]["name"]) not in deleted]
        return children + [entry for _, entry in created.values()]
