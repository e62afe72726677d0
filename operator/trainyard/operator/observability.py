"""The operator's own Prometheus metrics, served on /metrics."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from trainyard.operator.status import PHASES


@dataclass
class OperatorMetrics:
    """Reconciles by result, their duration, runs by phase, restarts by reason, API errors."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        self.reconciles = Counter(
            "trainyard_operator_reconciles",
            "Reconciles by result (converged, changed, invalid, conflict, error).",
            ["result"],
            registry=self.registry,
        )
        self.reconcile_seconds = Histogram(
            "trainyard_operator_reconcile_duration_seconds",
            "Seconds one reconcile took, API calls included.",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.runs = Gauge(
            "trainyard_operator_runs", "TrainingRuns by phase.", ["phase"], registry=self.registry
        )
        self.restarts = Counter(
            "trainyard_operator_restarts",
            "Gang restarts by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.api_errors = Counter(
            "trainyard_operator_api_errors",
            "Kubernetes API answers that were errors, by verb and HTTP status (0: no answer).",
            ["verb", "code"],
            registry=self.registry,
        )
        self.run_phase = Gauge(
            "trainyard_operator_run_phase",
            "1 for each TrainingRun's current phase (alerts name the run; the series goes with the run).",
            ["namespace", "run", "phase"],
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "trainyard_operator_queue_depth",
            "Objects waiting in the work queue for a reconcile, by kind (delayed requeues not counted).",
            ["kind"],
            registry=self.registry,
        )
        self.queue_wait_seconds = Histogram(
            "trainyard_operator_queue_wait_seconds",
            "Seconds an object waited in the work queue between its first event and its reconcile.",
            ["kind"],
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.watch_restarts = Counter(
            "trainyard_operator_watch_restarts",
            "Watch streams re-opened (expired, closed by the server, or failed), by kind.",
            ["kind"],
            registry=self.registry,
        )
        self.leader = Gauge(
            "trainyard_operator_leader",
            "1 while this replica is the active one (kopf peering), 0 while it stands by.",
            registry=self.registry,
        )
        self.gate_verdicts = Counter(
            "trainyard_gate_verdicts",
            "PromotionGate verdicts reached, by namespace, gate and verdict.",
            ["namespace", "gate", "verdict"],
            registry=self.registry,
        )
        self.gate_verdict = Gauge(
            "trainyard_gate_verdict",
            "A gate's current verdict: 1 for the verdict it holds, 0 for the others.",
            ["namespace", "gate", "verdict"],
            registry=self.registry,
        )
        self.gate_criterion_value = Gauge(
            "trainyard_gate_criterion_value",
            "The observed value of each criterion of a gate.",
            ["namespace", "gate", "criterion"],
            registry=self.registry,
        )
        self.gate_criterion_threshold = Gauge(
            "trainyard_gate_criterion_threshold",
            "The threshold each criterion of a gate is judged against.",
            ["namespace", "gate", "criterion"],
            registry=self.registry,
        )
        self.pipeline_stage = Gauge(
            "trainyard_pipeline_stage",
            "A pipeline's current stage (its 0-based index), by namespace and pipeline.",
            ["namespace", "pipeline"],
            registry=self.registry,
        )
        self.inference_servers_ready = Gauge(
            "trainyard_inference_server_ready",
            "1 while an InferenceServer has all its replicas ready.",
            ["namespace", "server"],
            registry=self.registry,
        )
        self._phases: dict[str, str] = {}
        self._server: Any = None
        self.port: int | None = None
        for phase in PHASES:
            self.runs.labels(phase=phase).set(0)

    def record_phase(self, uid: str, phase: str | None) -> None:
        """Keep the runs-by-phase gauge true; None forgets a deleted run."""
        if phase is None:
            self._phases.pop(uid, None)
        else:
            self._phases[uid] = phase
        counts = dict.fromkeys(PHASES, 0)
        for value in self._phases.values():
            counts[value] = counts.get(value, 0) + 1
        for name, count in counts.items():
            self.runs.labels(phase=name).set(count)

    def record_run_phase(self, namespace: str, run: str, phase: str | None) -> None:
        """The per-run phase series: only the current phase is present; None removes the run."""
        for known in PHASES:
            if known != phase:
                with contextlib.suppress(KeyError):
                    self.run_phase.remove(namespace, run, known)
        if phase is not None:
            self.run_phase.labels(namespace=namespace, run=run, phase=phase).set(1)

    def record_api_error(self, verb: str, code: int) -> None:
        self.api_errors.labels(verb=verb, code=str(code)).inc()

    def serve(self, port: int, addr: str = "0.0.0.0") -> int:
        """Serve /metrics from a background thread; returns the port (0 picks one)."""
        self._server, _ = start_http_server(port, addr=addr, registry=self.registry)
        self.port = self._server.server_port
        return self.port

    def stop_serving(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
