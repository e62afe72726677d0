"""Glue between kopf and the pure reconcile: gather what is observed, plan, apply, count.

Children and pods are read from informers (one label-selected LIST + WATCH per kind,
`k8s.Informer`), not listed per reconcile, so a converged run costs no API request at
all. kopf watches the runs themselves; children go through the informers because
kopf's per-object event machinery costs about a millisecond per event, and every run
brings several child events. Reconciles of one run are serialized (create handlers and
the resync loop may fire together).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from trainyard.operator import k8s
from trainyard.operator.builders.labels import RUN_LABEL
from trainyard.operator.builders.names import run_label_value, worker_job_name, workers_service_name
from trainyard.operator.metrics_client import MetricsClient, metrics_url
from trainyard.operator.observability import OperatorMetrics
from trainyard.operator.progress import MetricsSample
from trainyard.operator.reconcile import Observed, Plan, reconcile
from trainyard.operator.settings import OperatorConfig
from trainyard.operator.status import TERMINAL_PHASES

logger = logging.getLogger("trainyard.operator")

CHILD_KINDS = ("ConfigMap", "Service", "Job", "Deployment")
WATCHED_KINDS = (*CHILD_KINDS, "Pod")
SYNC_TIMEOUT = 30.0  # how long a reconcile waits for the informers' first listing
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
RESYNC_CONCURRENCY = 8
EXPECTATION_SECONDS = 30.0  # how long a write of ours may take to show up in a watch


def run_snapshot(body: Mapping[str, Any]) -> dict[str, Any]:
    """A plain copy of a run's body, as the resync loop keeps it."""
    snapshot = {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": copy.deepcopy(dict(body["metadata"])),
        "spec": copy.deepcopy(dict(body.get("spec") or {})),
    }
    if body.get("status") is not None:
        snapshot["status"] = copy.deepcopy(dict(body["status"]))
    return snapshot


def _whole(kind: str, body: dict[str, Any]) -> dict[str, Any]:
    return body


def child_entry(kind: str, body: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a child reconcile reads: identity, owners, labels and status.

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


@dataclass
class Controller:
    """Per-process state: the API client, locks, and the bodies this operator just wrote."""

    config: OperatorConfig
    metrics: OperatorMetrics = field(default_factory=OperatorMetrics)
    connection: Any = None
    _client: k8s.KubeClient | None = None
    _metrics_client: MetricsClient | None = None
    _locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    # uid → (resourceVersion the write was based on, the body the write returned)
    _written: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)
    _resync: asyncio.Task[None] | None = None
    _informers: list[k8s.Informer] = field(default_factory=list)
    _runs: list[k8s.Informer] = field(default_factory=list)
    _informer_tasks: list[asyncio.Task[None]] = field(default_factory=list)
    # Expectations (as Kubernetes controllers keep them): children this operator just
    # created or deleted, until the watch-fed indexes show it, so a reconcile that runs
    # before the watch event arrives neither posts them again nor sees them still there.
    _created: dict[str, dict[tuple[str, str], tuple[float, dict[str, Any]]]] = field(
        default_factory=dict
    )
    _deleted: dict[str, dict[tuple[str, str], float]] = field(default_factory=dict)

    def start_resync(self) -> None:
        """Reconcile every run every `resync_seconds` (progress, stalls, TTL, missed events)."""
        if self._resync is None:
            self._resync = asyncio.get_running_loop().create_task(self._resync_forever())

    async def _resync_forever(self) -> None:
        limit = asyncio.Semaphore(RESYNC_CONCURRENCY)

        async def resync_one(body: dict[str, Any]) -> None:
            async with limit:
                try:
                    await self.reconcile(body)
                except Exception as error:  # one run's trouble must not stop the others
                    logger.info(
                        "resync of %s/%s deferred: %s",
                        body["metadata"].get("namespace"),
                        body["metadata"].get("name"),
                        error,
                    )

        while True:
            await asyncio.sleep(self.config.resync_seconds)
            runs = [body for informer in self._runs for body in informer.all()]
            await asyncio.gather(*(resync_one(body) for body in runs))

    def set_connection(self, connection: Any) -> None:
        """The credentials kopf logged in with; the client is rebuilt, the informers start."""
        self.connection = connection
        if self._client is not None:
            old, self._client = self._client, None
            asyncio.get_running_loop().create_task(old.close())
        if not self._informers:
            self._start_informers()
        for informer in (*self._informers, *self._runs):
            informer.client = self.client

    def _start_informers(self) -> None:
        config = self.config
        exact = [n for n in config.namespaces if not any(ch in n for ch in "*?[!,")]
        # kopf namespace globs are kopf's to resolve; children are then watched everywhere
        # (label-selected, so only Trainyard's children come back).
        scopes: list[str | None] = (
            exact
            if exact and len(exact) == len(config.namespaces) and not config.clusterwide
            else [None]
        )
        for namespace in scopes:
            # The runs as the resync loop sees them (kopf watches them too, for its handlers).
            runs = k8s.Informer(
                self.client,
                "TrainingRun",
                namespace,
                None,
                _whole,
                server_timeout=config.watch_server_timeout or 300.0,
                client_timeout=config.watch_client_timeout or 330.0,
                backoff=config.watch_reconnect_backoff,
            )
            self._runs.append(runs)
            self._informer_tasks.append(asyncio.get_running_loop().create_task(runs.run()))
            for kind in WATCHED_KINDS:
                informer = k8s.Informer(
                    self.client,
                    kind,
                    namespace,
                    RUN_LABEL,
                    child_entry,
                    server_timeout=config.watch_server_timeout or 300.0,
                    client_timeout=config.watch_client_timeout or 330.0,
                    backoff=config.watch_reconnect_backoff,
                )
                self._informers.append(informer)
                self._informer_tasks.append(asyncio.get_running_loop().create_task(informer.run()))

    async def _synced(self) -> None:
        await asyncio.wait_for(
            asyncio.gather(*(i.synced.wait() for i in self._informers)), SYNC_TIMEOUT
        )

    def _observed_children(
        self, namespace: str, name: str
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        label = run_label_value(name)
        children = [c for i in self._informers if i.kind != "Pod" for c in i.get(namespace, label)]
        pods = [p for i in self._informers if i.kind == "Pod" for p in i.get(namespace, label)]
        return children, pods

    @property
    def client(self) -> k8s.KubeClient:
        if self._client is None:
            if self.connection is None:
                raise RuntimeError(
                    "no Kubernetes connection yet: the kopf login handler has not run"
                )
            self._client = k8s.KubeClient(
                self.connection, self.config.api_settings(), self.metrics.record_api_error
            )
        return self._client

    @property
    def metrics_client(self) -> MetricsClient:
        if self._metrics_client is None:
            self._metrics_client = MetricsClient(self.config.run_metrics_timeout)
        return self._metrics_client

    async def close(self) -> None:
        for task in self._informer_tasks:
            task.cancel()
        for task in self._informer_tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._informer_tasks.clear()
        self._informers.clear()
        self._runs.clear()
        if self._resync is not None:
            self._resync.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._resync
            self._resync = None
        for closable in (self._client, self._metrics_client):
            if closable is not None:
                await closable.close()
        self._client = self._metrics_client = None

    def forget(self, uid: str) -> None:
        self._locks.pop(uid, None)
        self._written.pop(uid, None)
        self._created.pop(uid, None)
        self._deleted.pop(uid, None)
        self.metrics.record_phase(uid, None)

    def _freshest(self, body: dict[str, Any]) -> dict[str, Any]:
        """kopf may hand over a body older than this operator's own last status write."""
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

    async def reconcile(self, body: Mapping[str, Any]) -> Plan:
        """Reconcile one run; raises k8s.ApiError (Conflict included) for kopf to retry."""
        raw = run_snapshot(body)
        uid = raw["metadata"]["uid"]
        lock = self._locks.setdefault(uid, asyncio.Lock())
        started = time.perf_counter()
        async with lock:
            try:
                plan = await self._reconcile_locked(raw)
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
            else ("invalid" if plan.status.get("phase") == "Invalid" else "changed")
        )
        self.metrics.reconciles.labels(result=result).inc()
        return plan

    async def _reconcile_locked(self, raw: dict[str, Any]) -> Plan:
        raw = self._freshest(raw)
        meta = raw["metadata"]
        namespace, name, uid = meta["namespace"], meta["name"], meta["uid"]
        await self._synced()
        indexed, pods = self._observed_children(namespace, name)
        children = self._expected_children(uid, indexed)
        now = datetime.now(UTC)
        sample = await self._read_metrics(raw, children, pods)
        plan = reconcile(
            Observed(
                run=raw,
                children=children,
                pods=pods,
                metrics=sample,
                now=now,
                image=self.config.default_image,
                vllm_image=self.config.default_vllm_image,
            )
        )
        if plan.is_empty:
            self.metrics.record_phase(uid, (raw.get("status") or {}).get("phase"))
            return plan
        applied = await k8s.apply_plan(
            self.client,
            plan,
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
        if plan.restart_reason is not None:
            self.metrics.restarts.labels(reason=plan.restart_reason).inc()
            logger.info("run %s/%s: gang restart (%s)", namespace, name, plan.restart_reason)
        self.metrics.record_phase(uid, plan.status.get("phase"))
        return plan

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
        """The indexed children, corrected by what this operator did that the watch has not shown yet."""
        now = time.monotonic()
        seen = {(c["kind"], c["metadata"]["name"]) for c in indexed}
        created, deleted = self._created.get(uid, {}), self._deleted.get(uid, {})
        for key, (deadline, _) in list(created.items()):
            if key in seen or now > deadline:
                del created[key]
        for key, deadline in list(deleted.items()):
            if key not in seen or now > deadline:
                del deleted[key]
        children = [c for c in indexed if (c["kind"], c["metadata"]["name"]) not in deleted]
        return children + [entry for _, entry in created.values()]

    async def _read_metrics(
        self, raw: dict[str, Any], children: list[dict[str, Any]], pods: list[dict[str, Any]]
    ) -> MetricsSample | None:
        """Rank 0's metrics when the current attempt's rank 0 is running; else None."""
        status = raw.get("status") or {}
        if status.get("phase") in TERMINAL_PHASES:
            return None
        name = raw["metadata"]["name"]
        job_name = worker_job_name(name, int(status.get("restartAttempt") or 0))
        job = next(
            (c for c in children if c["kind"] == "Job" and c["metadata"]["name"] == job_name), None
        )
        if job is None:
            return None
        rank0 = next(
            (
                p
                for p in pods
                if any(
                    ref.get("uid") == job["metadata"].get("uid")
                    for ref in p["metadata"].get("ownerReferences") or []
                )
                and "0"
                in (
                    (p["metadata"].get("labels") or {}).get(COMPLETION_INDEX),
                    (p["metadata"].get("annotations") or {}).get(COMPLETION_INDEX),
                )
                and (p.get("status") or {}).get("phase") == "Running"
            ),
            None,
        )
        if rank0 is None:
            return None
        port = int(((raw.get("spec") or {}).get("metrics") or {}).get("port") or 9400)
        url = metrics_url(
            self.config.run_metrics_url,
            run=name,
            namespace=raw["metadata"]["namespace"],
            job=job_name,
            service=workers_service_name(name),
            port=port,
            pod_ip=(rank0.get("status") or {}).get("podIP"),
        )
        return await self.metrics_client.fetch(url)
