"""The TrainingPipeline controller: how a pipeline is observed, and its registration.

A pipeline owns one TrainingRun and one PromotionGate per started stage; their events
(a run succeeding, a gate's verdict) come through the runtime's informers for those kinds,
selected by the `trainyard.dev/pipeline` label, and enqueue the pipeline.
"""

from __future__ import annotations

import contextlib
from typing import Any

from trainyard.operator.builders.names import run_label_value
from trainyard.operator.builders.pipeline import PIPELINE_LABEL
from trainyard.operator.observability import OperatorMetrics
from trainyard.operator.pipeline_reconcile import PipelineObserved, reconcile_pipeline
from trainyard.operator.plan import Plan
from trainyard.operator.runtime import Registration, Runtime

CHILD_KINDS = ("TrainingRun", "PromotionGate", "InferenceServer", "ConfigMap", "Job")
"""Job and ConfigMap: each promoted stage's provenance.json writer."""
UPDATED_KINDS = ("InferenceServer",)  # the serve stage's server, replaced to roll a new model


async def observe(runtime: Runtime, body: dict[str, Any]) -> PipelineObserved:
    meta = body["metadata"]
    registration = runtime.registrations["TrainingPipeline"]
    children, _ = runtime.children(registration, meta["namespace"], meta["name"], meta["uid"])
    return PipelineObserved(pipeline=body, children=children, image=runtime.config.default_image)


def record(metrics: OperatorMetrics, body: dict[str, Any], plan: Plan | None) -> None:
    """trainyard_pipeline_stage: the index of the stage running or being gated."""
    meta = body.get("metadata") or {}
    labels = {"namespace": meta.get("namespace", ""), "pipeline": meta.get("name", "")}
    if plan is None:
        if labels["pipeline"]:
            with contextlib.suppress(KeyError):
                metrics.pipeline_stage.remove(labels["namespace"], labels["pipeline"])
        return
    stages = plan.status.get("stages") or []
    current = plan.status.get("currentStage")
    index = next((i for i, s in enumerate(stages) if s.get("name") == current), len(stages))
    metrics.pipeline_stage.labels(**labels).set(index)


def registration() -> Registration:
    return Registration(
        kind="TrainingPipeline",
        owns=CHILD_KINDS,
        owner_label=PIPELINE_LABEL,
        label_value=run_label_value,
        observe=observe,
        reconcile=reconcile_pipeline,
        recorded=record,
    )
