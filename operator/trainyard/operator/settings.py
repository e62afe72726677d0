"""How the operator runs: namespaces, peering, watch timeouts, backoffs, resync, metrics.

One dataclass the CLI fills from flags (and tests fill directly), translated into
kopf's `OperatorSettings` in one place.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import kopf

from trainyard.operator.k8s import ApiSettings
from trainyard.operator.metrics_client import DEFAULT_URL_TEMPLATE


@dataclass
class OperatorConfig:
    """Settings of one operator process."""

    namespaces: list[str] = field(default_factory=list)
    """Namespaces to serve (exact names or kopf globs); empty with clusterwide for all."""
    clusterwide: bool = False
    """Serve every namespace."""
    standalone: bool = False
    """Run without peering (no coordination with other operator replicas)."""
    identity: str | None = None
    """This replica's name in the peering object (unset: the pod's, from POD_ID, else
    user@host with a random tail)."""
    peering_name: str = "trainyard"
    """The KopfPeering object replicas coordinate through (one active at a time)."""
    priority: int = 0
    """Peering priority: the highest-priority replica is the active one."""
    resync_seconds: float = 600.0
    """How often every object is reconciled without an event: a safety net only (events,
    and each reconcile's own requeue, drive everything else)."""
    progress_seconds: float = 10.0
    """How often a Running run's progress (rank 0's metrics) is read."""
    child_event_delay: float = 0.05
    """Seconds a child's event waits before its owner's reconcile, so a burst is one reconcile."""
    workers: int = 8
    """Reconciles in flight at once (different objects; one object is never reconciled twice at once)."""
    error_backoff_base: float = 0.5
    """First pause before a failed reconcile is retried; doubled per failure."""
    error_backoff_cap: float = 300.0
    """Longest pause between retries of a failing reconcile."""
    watch_server_timeout: float | None = 300.0
    """Seconds the API server keeps one watch open before the operator re-watches."""
    watch_client_timeout: float | None = 330.0
    """Seconds without any answer after which a watch is considered dead (a silent stream)."""
    watch_reconnect_backoff: float = 0.1
    """Pause before re-watching after a watch ended."""
    connect_timeout: float = 10.0
    """Seconds to connect to the API server."""
    request_timeout: float = 30.0
    """Seconds one API request may take."""
    api_backoffs: tuple[float, ...] = (0.1, 0.2, 0.5, 1.0, 2.0, 4.0)
    """Pauses between retries of throttled (429) or failed (5xx) API requests."""
    error_backoffs: tuple[float, ...] = (1, 2, 5, 10, 30, 60)
    """Pauses before kopf reruns a reconcile that raised."""
    consistency_timeout: float = 15.0
    """Seconds kopf waits to see its own last patch come back through the watch before it
    treats an older event as current (kopf's default is 5; a busy operator watching every
    child needs longer, or it reruns the create handler on a stale event)."""
    metrics_port: int | None = 8080
    """Port of the operator's own /metrics (None: not served)."""
    run_metrics_url: str = DEFAULT_URL_TEMPLATE
    """URL template of rank 0's metrics; fields: run, namespace, job, service, port, pod_ip."""
    run_metrics_timeout: float = 2.0
    """Seconds to wait for rank 0's metrics."""
    default_image: str | None = None
    """Trainer image for runs that name none (the builders' pinned default when unset)."""
    default_vllm_image: str | None = None
    """vLLM rollout server image (the builders' pinned default when unset)."""
    api_server: str | None = None
    """Talk to this API server URL without credentials (development and tests);
    unset: in-cluster service account, else kubeconfig."""
    post_events: bool = True
    """Post Kubernetes Events about handler outcomes."""
    liveness_endpoint: str | None = None
    """e.g. http://0.0.0.0:8081/healthz for the Deployment's liveness probe."""

    def api_settings(self) -> ApiSettings:
        return ApiSettings(
            request_timeout=self.request_timeout,
            connect_timeout=self.connect_timeout,
            backoffs=tuple(self.api_backoffs),
        )

    @classmethod
    def from_environment(cls, **overrides: object) -> OperatorConfig:
        """Defaults overridden by TRAINYARD_* variables (the Helm chart sets them), then by arguments."""
        env = os.environ
        config = cls()
        if env.get("TRAINYARD_NAMESPACES"):
            config.namespaces = [n for n in env["TRAINYARD_NAMESPACES"].split(",") if n]
        config.clusterwide = env.get("TRAINYARD_CLUSTERWIDE", "").lower() in ("1", "true", "yes")
        if env.get("TRAINYARD_TRAINER_IMAGE"):
            config.default_image = env["TRAINYARD_TRAINER_IMAGE"]
        if env.get("TRAINYARD_VLLM_IMAGE"):
            config.default_vllm_image = env["TRAINYARD_VLLM_IMAGE"]
        for key, value in overrides.items():
            setattr(config, key, value)
        return config


def configure_kopf(settings: kopf.OperatorSettings, config: OperatorConfig) -> None:
    """Translate the config into kopf's settings."""
    # kopf keeps handler progress in status.kopf by default; a structural CRD schema
    # prunes unknown status fields, so progress and the diff base go to annotations.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="trainyard.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="trainyard.dev", key="last-handled-configuration"
    )
    settings.persistence.finalizer = "trainyard.dev/finalizer"
    settings.persistence.consistency_timeout = config.consistency_timeout
    settings.peering.name = config.peering_name
    settings.peering.priority = config.priority
    settings.peering.standalone = config.standalone
    settings.peering.clusterwide = config.clusterwide
    settings.watching.server_timeout = config.watch_server_timeout
    settings.watching.client_timeout = config.watch_client_timeout
    settings.watching.connect_timeout = config.connect_timeout
    settings.watching.reconnect_backoff = config.watch_reconnect_backoff
    settings.networking.request_timeout = config.request_timeout
    settings.networking.connect_timeout = config.connect_timeout
    settings.networking.error_backoffs = tuple(config.api_backoffs)
    settings.queueing.error_delays = tuple(config.error_backoffs)
    settings.posting.enabled = config.post_events
    # Events for warnings and errors only: conditions already tell each success, and an
    # Event per reconcile would be one more API write per run per change.
    settings.posting.level = logging.WARNING
