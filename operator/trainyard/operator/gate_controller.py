"""The PromotionGate controller: how a gate is observed, and its registration on the runtime.

A gate owns its evaluation ConfigMaps and Jobs (label `trainyard.dev/gate`) and follows
the TrainingRun it names: an event of that run enqueues the gates naming it. The
decisions are `gate_reconcile.reconcile`'s; the one piece of I/O besides the runtime's
is reading eval.json (`results_store`), done here in `observe`, only once the current
evaluation Job has completed, and once per Job (cached by the Job's uid).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from trainyard.api.gate import VERDICTS
from trainyard.operator import gate_reconcile
from trainyard.operator.builders.evaluation import GATE_LABEL, gate_label_value
from trainyard.operator.gate_reconcile import EvalReading, GateObserved, run_name_of
from trainyard.operator.observability import OperatorMetrics
from trainyard.operator.plan import Plan
from trainyard.operator.results_store import read_results
from trainyard.operator.runtime import Registration, Runtime

logger = logging.getLogger("trainyard.operator")

KIND = "PromotionGate"
CHILD_KINDS = ("ConfigMap", "Job")
"""What a gate owns and watches: its evaluation's task and Job."""


def gates_of_run(runtime: Runtime, run: dict[str, Any]) -> list[str]:
    """The gates (same namespace) whose spec.run names this TrainingRun."""
    meta = run.get("metadata") or {}
    name = meta.get("name")
    return [
        gate["metadata"]["name"]
        for gate in runtime.owners(KIND, meta.get("namespace") or "")
        if run_name_of(gate) == name
    ]


@dataclass
class _Shown:
    """What this operator last put in a gate's gauges (to take it out again)."""

    namespace: str
    name: str
    verdict: str | None = None
    criteria: set[str] = field(default_factory=set)


@dataclass
class PromotionGates:
    """The PromotionGate controller's own state: eval.json readings, gauges shown."""

    runtime: Runtime
    _readings: dict[str, EvalReading] = field(default_factory=dict, repr=False)
    _shown: dict[str, _Shown] = field(default_factory=dict, repr=False)
    _posts: set[asyncio.Task[None]] = field(default_factory=set, repr=False)

    def registration(self) -> Registration:
        return Registration(
            kind=KIND,
            owns=CHILD_KINDS,
            owner_label=GATE_LABEL,
            label_value=gate_label_value,
            observe=self.observe,
            reconcile=gate_reconcile.reconcile,
            recorded=self.recorded,
            follows={"TrainingRun": gates_of_run},
            # judge's bootstrap: 0.5 s at 1,000 examples, 3 s at 5,000 (gates' notes)
            threaded=True,
        )

    async def observe(self, runtime: Runtime, body: dict[str, Any]) -> GateObserved:
        meta = body["metadata"]
        namespace, uid = meta["namespace"], meta["uid"]
        registration = runtime.registrations[KIND]
        children, _ = runtime.children(registration, namespace, meta["name"], uid)
        run_name = run_name_of(body)
        run = runtime.owner("TrainingRun", namespace, run_name) if run_name else None
        wanted = gate_reconcile.results_wanted(body, run, children)
        reading = self._readings.get(uid)
        if wanted is not None and (reading is None or reading.job_uid != wanted.job_uid):
            read = await read_results(wanted.uri, endpoint=wanted.endpoint)
            reading = EvalReading(wanted.job_uid, read.uri, read.results, read.problem)
            self._readings[uid] = reading
        return GateObserved(
            gate=body,
            run=run,
            children=children,
            reading=reading,
            image=runtime.config.default_image,
        )

    def recorded(self, metrics: OperatorMetrics, body: dict[str, Any], plan: Plan | None) -> None:
        """Verdict gauges (1 for the verdict held), verdict changes counted, each criterion's
        observed value and threshold; a gate that is gone leaves every series."""
        meta = body.get("metadata") or {}
        uid = meta.get("uid", "")
        if plan is None:
            self._readings.pop(uid, None)
            shown = self._shown.pop(uid, None)
            if shown is not None:
                _clear(metrics, shown)
            return
        status = plan.status or body.get("status") or {}
        shown = self._shown.setdefault(uid, _Shown(meta["namespace"], meta["name"]))
        verdict = status.get("verdict")
        if verdict != shown.verdict and verdict is not None:
            if shown.verdict is not None or (body.get("status") or {}).get("verdict") != verdict:
                metrics.gate_verdicts.labels(shown.namespace, shown.name, verdict).inc()
                if verdict in gate_reconcile.DECIDED:
                    self._announce(body, status)
            for name in VERDICTS:
                metrics.gate_verdict.labels(shown.namespace, shown.name, name).set(
                    1 if name == verdict else 0
                )
            shown.verdict = verdict
        criteria = set()
        for result in status.get("results") or []:
            criterion = result.get("criterion")
            criteria.add(criterion)
            labels = (shown.namespace, shown.name, criterion)
            if result.get("observed") is not None:
                metrics.gate_criterion_value.labels(*labels).set(result["observed"])
            if result.get("threshold") is not None:
                metrics.gate_criterion_threshold.labels(*labels).set(result["threshold"])
        for criterion in shown.criteria - criteria:
            _remove(metrics.gate_criterion_value, shown.namespace, shown.name, criterion)
            _remove(metrics.gate_criterion_threshold, shown.namespace, shown.name, criterion)
        shown.criteria = criteria

    def _announce(self, body: dict[str, Any], status: dict[str, Any]) -> None:
        """Post the decision as a Kubernetes Event, beside the reconciles (a failed post is
        logged: the status already holds the decision). Off with `post_events`."""
        if not self.runtime.config.post_events:
            return
        event = gate_reconcile.decision_event(body, status, datetime.now(UTC))
        task = asyncio.get_running_loop().create_task(self._post(event))
        self._posts.add(task)
        task.add_done_callback(self._posts.discard)

    async def _post(self, event: dict[str, Any]) -> None:
        client = self.runtime.client
        try:
            await client.create(event, event["metadata"]["namespace"])
        except Exception as error:  # an Event is a courtesy; never fail a gate over it
            logger.info("event for %s not posted: %s", event["involvedObject"]["name"], error)

    async def close(self) -> None:
        for task in list(self._posts):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def _remove(metric: Any, *labels: str) -> None:
    with contextlib.suppress(KeyError):
        metric.remove(*labels)


def _clear(metrics: OperatorMetrics, shown: _Shown) -> None:
    for name in VERDICTS:
        _remove(metrics.gate_verdict, shown.namespace, shown.name, name)
    for criterion in shown.criteria:
        _remove(metrics.gate_criterion_value, shown.namespace, shown.name, criterion)
        _remove(metrics.gate_criterion_threshold, shown.namespace, shown.name, criterion)
