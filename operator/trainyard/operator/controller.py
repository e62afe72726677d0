"""The TrainingRun controller: how a run is observed, and its registration on the runtime.

Everything else (watches, queue, retries, leadership, applying the plan) is the
runtime's; the decisions are `reconcile.reconcile`'s.

Rank 0's metrics are read beside the reconciles, not inside them: an observation takes
the newest sample read so far and, when it is older than the progress period, starts
the next read in the background (a few at a time); a read that brings a new sample
enqueues the run. A slow or unresolvable metrics endpoint then costs its own read's
timeout, never a reconcile worker, and cannot hold up an event of another run.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

from trainyard.operator.builders.labels import RUN_LABEL
from trainyard.operator.builders.names import run_label_value, worker_job_name, workers_service_name
from trainyard.operator.metrics_client import MetricsClient, metrics_url
from trainyard.operator.observability import OperatorMetrics
from trainyard.operator.plan import Plan
from trainyard.operator.progress import MetricsSample
from trainyard.operator.reconcile import Observed, reconcile
from trainyard.operator.runtime import Registration, Runtime
from trainyard.operator.status import TERMINAL_PHASES

# What a run owns, and what its reconcile reads: its children, and the pods of its Jobs.
CHILD_KINDS = ("ConfigMap", "Service", "Job", "Deployment")
WATCHED_KINDS = (*CHILD_KINDS, "Pod")
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
METRICS_READS = 4  # rank-0 reads in flight at once, all runs together


@dataclass
class _Progress:
    """What is known of one run's metrics reads."""

    url: str | None = None
    sample: MetricsSample | None = None
    read_at: float = float("-inf")  # monotonic time the last read started
    task: asyncio.Task[None] | None = None


@dataclass
class TrainingRuns:
    """The TrainingRun controller's own state: the client that reads rank 0's metrics."""

    runtime: Runtime
    _metrics_client: MetricsClient | None = field(default=None, repr=False)
    _progress: dict[str, _Progress] = field(default_factory=dict, repr=False)
    _reads: asyncio.Semaphore | None = field(default=None, repr=False)

    @property
    def metrics_client(self) -> MetricsClient:
        if self._metrics_client is None:
            self._metrics_client = MetricsClient(self.runtime.config.run_metrics_timeout)
        return self._metrics_client

    async def close(self) -> None:
        for progress in self._progress.values():
            if progress.task is not None:
                progress.task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await progress.task
        self._progress.clear()
        if self._metrics_client is not None:
            await self._metrics_client.close()
            self._metrics_client = None

    def registration(self) -> Registration:
        return Registration(
            kind="TrainingRun",
            owns=WATCHED_KINDS,
            owner_label=RUN_LABEL,
            label_value=run_label_value,
            observe=self.observe,
            reconcile=reconcile,
            recorded=self.recorded,
        )

    def recorded(self, metrics: OperatorMetrics, body: dict[str, Any], plan: Plan | None) -> None:
        record_run(metrics, body, plan)
        uid = body["metadata"]["uid"]
        finished = plan is not None and plan.status.get("phase") in TERMINAL_PHASES
        if (plan is None or finished) and uid in self._progress:
            task = self._progress.pop(uid).task
            if task is not None:
                task.cancel()

    async def observe(self, runtime: Runtime, body: dict[str, Any]) -> Observed:
        meta = body["metadata"]
        registration = runtime.registrations["TrainingRun"]
        children, pods = runtime.children(
            registration, meta["namespace"], meta["name"], meta["uid"]
        )
        config = runtime.config
        return Observed(
            run=body,
            children=children,
            pods=pods,
            metrics=self._sample(body, children, pods),
            image=config.default_image,
            vllm_image=config.default_vllm_image,
            progress_seconds=config.progress_seconds,
        )

    def _sample(
        self, raw: dict[str, Any], children: list[dict[str, Any]], pods: list[dict[str, Any]]
    ) -> MetricsSample | None:
        """The newest sample of the current attempt's rank 0; a read starts when it is due."""
        uid = raw["metadata"]["uid"]
        url = self._metrics_url(raw, children, pods)
        if url is None:
            self._progress.pop(uid, None)
            return None
        progress = self._progress.setdefault(uid, _Progress())
        if progress.url != url:  # a new attempt, a new rank 0: an older sample is not its
            progress.url, progress.sample, progress.read_at = url, None, float("-inf")
        due = time.monotonic() - progress.read_at >= self.runtime.config.progress_seconds
        if due and (progress.task is None or progress.task.done()):
            progress.read_at = time.monotonic()
            meta = raw["metadata"]
            key = ("TrainingRun", meta["namespace"], meta["name"])
            progress.task = asyncio.get_running_loop().create_task(self._read(progress, url, key))
        return progress.sample

    async def _read(self, progress: _Progress, url: str, key: tuple[str, str, str]) -> None:
        if self._reads is None:
            self._reads = asyncio.Semaphore(METRICS_READS)
        async with self._reads:
            sample = await self.metrics_client.fetch(url)
        if sample is not None and progress.url == url and sample != progress.sample:
            progress.sample = sample
            self.runtime.enqueue(key)

    def _metrics_url(
        self, raw: dict[str, Any], children: list[dict[str, Any]], pods: list[dict[str, Any]]
    ) -> str | None:
        """Rank 0's metrics URL when the current attempt's rank 0 is running; else None."""
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
        rank0 = next((p for p in pods if _is_running_rank0(p, job)), None)
        if rank0 is None:
            return None
        port = int(((raw.get("spec") or {}).get("metrics") or {}).get("port") or 9400)
        return metrics_url(
            self.runtime.config.run_metrics_url,
            run=name,
            namespace=raw["metadata"]["namespace"],
            job=job_name,
            service=workers_service_name(name),
            port=port,
            pod_ip=(rank0.get("status") or {}).get("podIP"),
        )


def _is_running_rank0(pod: dict[str, Any], job: dict[str, Any]) -> bool:
    meta = pod["metadata"]
    return (
        any(
            ref.get("uid") == job["metadata"].get("uid")
            for ref in meta.get("ownerReferences") or []
        )
        and "0"
        in (
            (meta.get("labels") or {}).get(COMPLETION_INDEX),
            (meta.get("annotations") or {}).get(COMPLETION_INDEX),
        )
        and (pod.get("status") or {}).get("phase") == "Running"
    )


def record_run(metrics: OperatorMetrics, body: dict[str, Any], plan: Plan | None) -> None:
    """Runs by phase and restarts by reason; a run that is gone leaves the gauge."""
    meta = body["metadata"]
    uid, namespace, name = meta["uid"], meta.get("namespace", ""), meta.get("name", "")
    if plan is None:
        metrics.record_phase(uid, None)
        metrics.record_run_phase(namespace, name, None)
        return
    if plan.restart_reason is not None:
        metrics.restarts.labels(reason=plan.restart_reason).inc()
    phase = plan.status.get("phase") or (body.get("status") or {}).get("phase")
    metrics.record_phase(uid, phase)
    metrics.record_run_phase(namespace, name, phase)
