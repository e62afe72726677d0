"""A TrainingPipeline's children: one TrainingRun and one PromotionGate per started stage.

Pure: the pipeline and the stage in, plain manifests out. The stage's run is named
`<pipeline>-<stage>` and its gate `<pipeline>-<stage>-gate`; both carry the pipeline's
owner reference (deleting the pipeline deletes them, and their own children after
them), the `trainyard.dev/pipeline` label the runtime maps their events by, and a hash
of the stage as the pipeline had it when the stage started (an edit made later is
noticed, not applied).
"""

from __future__ import annotations

import json
from typing import Any

from trainyard.api import TrainingRun
from trainyard.api.base import API_VERSION
from trainyard.api.pipeline import Stage, TrainingPipeline
from trainyard.operator.builders import pod_settings
from trainyard.operator.builders.job import DEFAULT_TRAINER_IMAGE
from trainyard.operator.builders.names import child_name, run_label_value, short_hash
from trainyard.operator.builders.owner import owner_reference

PIPELINE_LABEL = "trainyard.dev/pipeline"
STAGE_LABEL = "trainyard.dev/stage"
STAGE_HASH_ANNOTATION = "trainyard.dev/stage-spec-hash"
SERVED_MODEL_ANNOTATION = "trainyard.dev/served-model"
SERVE_STAGE = "serve"
PREVIOUS = "run://previous"
PROVENANCE = "provenance"
"""app.kubernetes.io/component of a stage's provenance ConfigMap and Job."""
PROVENANCE_CONTAINER = "provenance"
PROVENANCE_TASK_DIR = "/etc/trainyard"
PROVENANCE_TASK_KEY = "provenance.json"
PROVENANCE_TASK_PATH = f"{PROVENANCE_TASK_DIR}/{PROVENANCE_TASK_KEY}"
PROVENANCE_RETRIES = 2
"""Pods a failed provenance write gets again (the Job's backoffLimit)."""


def stage_run_name(pipeline: str, stage: str) -> str:
    """The stage's TrainingRun: `<pipeline>-<stage>`.

    >>> stage_run_name("assistant-v2", "sft")
    'assistant-v2-sft'
    """
    return f"{pipeline}-{stage}"


def stage_gate_name(pipeline: str, stage: str) -> str:
    return f"{stage_run_name(pipeline, stage)}-gate"


def stage_hash(stage: Stage) -> str:
    """A short hash of a stage as written (run and gate)."""
    return short_hash(json.dumps(stage.model_dump(by_alias=True, mode="json"), sort_keys=True))


def _metadata(pipeline: TrainingPipeline, stage: Stage, name: str, uid: str) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "name": name,
        "labels": {
            **(pipeline.metadata.labels or {}),
            "app.kubernetes.io/part-of": "trainyard",
            "app.kubernetes.io/managed-by": "trainyard-operator",
            PIPELINE_LABEL: run_label_value(pipeline.metadata.name),
            STAGE_LABEL: stage.name,
        },
        "annotations": {STAGE_HASH_ANNOTATION: stage_hash(stage)},
        "ownerReferences": [owner_reference("TrainingPipeline", pipeline.metadata.name, uid)],
    }
    if pipeline.metadata.namespace:
        metadata["namespace"] = pipeline.metadata.namespace
    return metadata


def render_stage_run(
    pipeline: TrainingPipeline, stage: Stage, *, uid: str, model_source: str | None
) -> dict[str, Any]:
    """The stage's TrainingRun; `model_source` replaces run://previous (the model the
    previous stage promoted)."""
    # What the author wrote (defaults are the API server's to fill, as for any run).
    spec = stage.run.model_dump(by_alias=True, exclude_unset=True, mode="json")
    if spec["model"]["source"] == PREVIOUS:
        if model_source is None:
            raise ValueError(f"stage {stage.name}: run://previous has no promoted model yet")
        spec["model"]["source"] = model_source
    name = stage_run_name(pipeline.metadata.name, stage.name)
    return {
        "apiVersion": API_VERSION,
        "kind": "TrainingRun",
        "metadata": _metadata(pipeline, stage, name, uid),
        "spec": spec,
    }


def render_stage_gate(
    pipeline: TrainingPipeline, stage: Stage, *, uid: str
) -> dict[str, Any] | None:
    """The stage's PromotionGate on its run, or None for a stage without a gate."""
    if stage.gate is None:
        return None
    gate = stage.gate.model_dump(by_alias=True, exclude_unset=True, mode="json")
    name = stage_gate_name(pipeline.metadata.name, stage.name)
    return {
        "apiVersion": API_VERSION,
        "kind": "PromotionGate",
        "metadata": _metadata(pipeline, stage, name, uid),
        "spec": {"run": stage_run_name(pipeline.metadata.name, stage.name), **gate},
    }


def promoted_model(stage: Stage, run_name: str, gate_status: dict[str, Any] | None) -> str:
    """Where the model a finished stage hands on lies: what its gate promoted, else the
    stage's exported final model (`<checkpoint.uri>/final`), else `run://<run>`.

    >>> from trainyard.api.pipeline import Stage
    >>> stage = Stage.model_validate({"name": "sft", "run": {"method": "sft",
    ...     "model": {"source": "hf://org/m"}, "dataset": {"source": "s3://b/d.jsonl"},
    ...     "checkpoint": {"uri": "s3://ckpt/p/sft"}}})
    >>> promoted_model(stage, "p-sft", None)
    's3://ckpt/p/sft/final'
    >>> promoted_model(stage, "p-sft", {"promotedModel": "s3://ckpt/p/sft/step-40"})
    's3://ckpt/p/sft/step-40'
    """
    promoted = (gate_status or {}).get("promotedModel")
    if promoted:
        return str(promoted)
    if stage.run.checkpoint is not None:
        return f"{stage.run.checkpoint.uri.rstrip('/')}/final"
    return f"run://{run_name}"


def hands_on_adapter(stage: Stage) -> bool:
    """Whether the model a stage promotes is a LoRA adapter (PEFT, no merged export)."""
    checkpoint = stage.run.checkpoint
    return stage.run.peft is not None and not (checkpoint is not None and checkpoint.export_merged)


def serving_source(
    stage: Stage, model: str, input_model: str | None, adapter_before: bool
) -> tuple[str, str | None]:
    """(model, adapter) that serve a stage's promoted model in vLLM.

    A full model is served as it is; a LoRA stage with checkpoint.exportMerged by its
    merged export (`final/merged`); an adapter by name on the model it was trained on:
    the stage's input model, or, when that was an adapter too (LoRA stacked on LoRA),
    the merged base the workload saved beside the new adapter (`<model>/base`).

    >>> from trainyard.api.pipeline import Stage
    >>> lora = Stage.model_validate({"name": "dpo", "run": {"method": "dpo",
    ...     "model": {"source": "run://previous"}, "dataset": {"source": "s3://b/d.jsonl"},
    ...     "peft": {"r": 8}}})
    >>> serving_source(lora, "s3://c/dpo/final", "s3://c/sft/final", adapter_before=False)
    ('s3://c/sft/final', 's3://c/dpo/final')
    >>> serving_source(lora, "s3://c/dpo/final", "s3://c/sft/final", adapter_before=True)
    ('s3://c/dpo/final/base', 's3://c/dpo/final')
    """
    if stage.run.peft is None:
        return model, None
    if not hands_on_adapter(stage):
        return f"{model.rstrip('/')}/merged", None
    if adapter_before or input_model is None:
        return f"{model.rstrip('/')}/base", model
    return input_model, model


def serve_server_name(pipeline: str) -> str:
    return f"{pipeline}-{SERVE_STAGE}"


def render_pipeline_server(
    pipeline: TrainingPipeline, *, uid: str, model: str, adapter: str | None = None
) -> dict[str, Any]:
    """The InferenceServer of the pipeline's `serve` block, serving `model` (and `adapter`,
    a promoted LoRA adapter, under the name clients ask for: the template's
    servedModelName, else the server's name; the base model is then `<that>-base`). The
    promoted model is also an annotation, so the pipeline sees what its server serves."""
    assert pipeline.spec.serve is not None
    spec = pipeline.spec.serve.model_dump(by_alias=True, exclude_unset=True, mode="json")
    spec["model"] = {"source": model}
    name = serve_server_name(pipeline.metadata.name)
    if adapter is not None:
        served = pipeline.spec.serve.served_model_name or name
        spec["servedModelName"] = f"{served}-base"
        spec["adapters"] = [{"name": served, "source": adapter}, *(spec.get("adapters") or [])]
    metadata: dict[str, Any] = {
        "name": name,
        "labels": {
            **(pipeline.metadata.labels or {}),
            "app.kubernetes.io/part-of": "trainyard",
            "app.kubernetes.io/managed-by": "trainyard-operator",
            PIPELINE_LABEL: run_label_value(pipeline.metadata.name),
            STAGE_LABEL: SERVE_STAGE,
        },
        "annotations": {SERVED_MODEL_ANNOTATION: adapter or model},
        "ownerReferences": [owner_reference("TrainingPipeline", pipeline.metadata.name, uid)],
    }
    if pipeline.metadata.namespace:
        metadata["namespace"] = pipeline.metadata.namespace
    return {
        "apiVersion": API_VERSION,
        "kind": "InferenceServer",
        "metadata": metadata,
        "spec": spec,
    }


def provenance_name(pipeline: str, stage: str) -> str:
    """The ConfigMap and Job writing a stage's provenance.json: `<pipeline>-<stage>-provenance`.

    >>> provenance_name("assistant-v2", "sft")
    'assistant-v2-sft-provenance'
    """
    return child_name(stage_run_name(pipeline, stage), PROVENANCE)


def provenance_image(run: TrainingRun | None, default: str | None) -> str:
    """The image the stage trained in (the run's, else the operator's default trainer image)."""
    return (run.spec.image if run is not None else None) or default or DEFAULT_TRAINER_IMAGE


def render_provenance(
    pipeline: TrainingPipeline,
    stage: Stage,
    *,
    uid: str,
    record: dict[str, Any],
    run: TrainingRun | None,
    image: str | None = None,
) -> list[dict[str, Any]]:
    """[ConfigMap, Job] writing `provenance.json` beside the stage's promoted model.

    The pod is the stage's own kind of pod (pod_settings: restricted security, no
    service-account token, the run's storage credentials, env, scheduling and image), so
    the write uses the user's credentials, never the operator's. The workload adds the
    fingerprints only a storage reader can take (manifest hashes, ETags) to `record`."""
    name = provenance_name(pipeline.metadata.name, stage.name)
    storage = (
        stage.run.storage.model_dump(by_alias=True, exclude_none=True, mode="json")
        if (stage.run.storage is not None)
        else None
    )
    task = {"record": record, "storage": storage}
    metadata = _metadata(pipeline, stage, name, uid)
    metadata["labels"]["app.kubernetes.io/component"] = PROVENANCE
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata,
        "data": {PROVENANCE_TASK_KEY: json.dumps(task, indent=2, sort_keys=True) + "\n"},
    }
    groups = [[{"name": "PYTHONUNBUFFERED", "value": "1"}], pod_settings.cache_env()]
    if run is not None:
        groups += [pod_settings.s3_env(run), pod_settings.user_env(run)]
    container: dict[str, Any] = {
        "name": PROVENANCE_CONTAINER,
        "image": provenance_image(run, image),
        "command": ["python", "-m", "trainyard.workloads.provenance", PROVENANCE_TASK_PATH],
        "env": pod_settings.merge_env(*groups),
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}},
    }
    pod_spec = pod_settings.task_pod(
        container,
        task_volume="provenance-task",
        task_dir=PROVENANCE_TASK_DIR,
        config_map=name,
        run=run,
    )
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": json.loads(json.dumps(metadata)),
        "spec": {
            "completions": 1,
            "parallelism": 1,
            "backoffLimit": PROVENANCE_RETRIES,
            "template": {"metadata": {"labels": dict(metadata["labels"])}, "spec": pod_spec},
        },
    }
    return [config_map, job]
