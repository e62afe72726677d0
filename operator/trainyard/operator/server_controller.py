"""The InferenceServer controller: how a server is observed, and its registration.

A server owns a Deployment and a Service (label `trainyard.dev/server`), and follows the
TrainingRuns its `run://` sources name: a run's event (it finished, it failed, it was
created again under the same name) enqueues every server in its namespace that serves
it, so a finished run rolls its server without waiting for a resync.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

from trainyard.api import contract
from trainyard.api.inference import ServerPhase
from trainyard.operator.builders.inference import SERVER_LABEL, server_label_value
from trainyard.operator.observability import OperatorMetrics
from trainyard.operator.plan import Plan
from trainyard.operator.runtime import Registration, Runtime
from trainyard.operator.server_reconcile import ServerObserved, reconcile

KIND = "InferenceServer"
CHILD_KINDS = ("Service", "Deployment")


def referenced_runs(body: dict[str, Any]) -> set[str]:
    """Names of the TrainingRuns a server's model and adapters come from (run:// sources)."""
    # Read before validation (a follower map runs on every event): any shape may come.
    spec = body.get("spec") if isinstance(body.get("spec"), dict) else {}
    adapters = spec.get("adapters") if isinstance(spec.get("adapters"), list) else []
    entries = [spec.get("model"), *adapters]
    sources = [entry.get("source") for entry in entries if isinstance(entry, dict)]
    names = set()
    for source in sources:
        match = contract.RUN_REFERENCE.match(source) if isinstance(source, str) else None
        if match:
            names.add(match["run"])
    return names


def servers_of_run(runtime: Runtime, run: dict[str, Any]) -> list[str]:
    """The servers in the run's namespace whose sources name the run."""
    meta = run.get("metadata") or {}
    return [
        server["metadata"]["name"]
        for server in runtime.owners(KIND, meta.get("namespace") or "")
        if meta.get("name") in referenced_runs(server)
    ]


@dataclass
class InferenceServers:
    """The controller's own state: which gauge series belong to which server."""

    _series: dict[str, tuple[str, str]] = field(default_factory=dict, repr=False)

    def registration(self) -> Registration:
        return Registration(
            kind=KIND,
            owns=CHILD_KINDS,
            owner_label=SERVER_LABEL,
            label_value=server_label_value,
            observe=observe,
            reconcile=reconcile,
            recorded=self.recorded,
            follows={"TrainingRun": servers_of_run},
        )

    def recorded(self, metrics: OperatorMetrics, body: dict[str, Any], plan: Plan | None) -> None:
        """trainyard_inference_server_ready: 1 while every replica of the current spec is
        available (phase Ready; a server scaled to zero has all of its none), 0 otherwise;
        a server that is gone leaves the gauge."""
        meta = body.get("metadata") or {}
        uid = meta.get("uid", "")
        if plan is None:
            series = self._series.pop(uid, None)
            if series is not None:
                with contextlib.suppress(KeyError):
                    metrics.inference_servers_ready.remove(*series)
            return
        series = (meta.get("namespace") or "", meta.get("name") or "")
        self._series[uid] = series
        status = plan.status or body.get("status") or {}
        ready = status.get("phase") == ServerPhase.READY
        metrics.inference_servers_ready.labels(*series).set(1 if ready else 0)


async def observe(runtime: Runtime, body: dict[str, Any]) -> ServerObserved:
    meta = body["metadata"]
    namespace = meta["namespace"]
    children, _ = runtime.children(
        runtime.registrations[KIND], namespace, meta["name"], meta["uid"]
    )
    runs = {
        name: run
        for name in referenced_runs(body)
        if (run := runtime.owner("TrainingRun", namespace, name)) is not None
    }
    return ServerObserved(
        server=body, children=children, runs=runs, image=runtime.config.default_vllm_image
    )
