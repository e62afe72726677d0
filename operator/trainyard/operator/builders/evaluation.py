"""The evaluation a PromotionGate runs: one ConfigMap (the task) and one Job per attempt.

Pure: the parsed gate, its judged run (when it names one), the task and the gate's uid
in; plain manifests out, the same bytes for the same input.

| child | name | labels (besides app.kubernetes.io/*) |
|---|---|---|
| ConfigMap (evaluation.json) | `<gate>-eval-<attempt>` | trainyard.dev/gate, component=evaluation |
| Job (one pod) | `<gate>-eval-<attempt>` | + trainyard.dev/attempt=N, kueue.x-k8s.io/queue-name |

The pod gets the same settings as the judged run's training pods (`pod_settings`):
restricted security, no service-account token, the cache and /dev/shm volumes, the
run's storage credentials (AWS_*), runs root, scheduling, Kueue queue and env, its image
(unless `evaluation.image`) and its GPUs per node (unless `evaluation.resources` names
a GPU count). Both children carry a controller owner reference to the gate, so deleting
the gate deletes them. The Job retries a failed pod `EVALUATION_RETRIES` times (an
evaluation is a plain batch job: a new pod starts it again from scratch) before it
fails, and the gate fails with the Job's reason.
"""

from __future__ import annotations

import json

from trainyard.api import TrainingRun
from trainyard.api.gate import EvaluationTask, PromotionGate
from trainyard.operator.builders import pod_settings, sandbox
from trainyard.operator.builders.job import DEFAULT_TRAINER_IMAGE
from trainyard.operator.builders.labels import (
    ATTEMPT_LABEL,
    COMPONENT_LABEL,
    KUEUE_QUEUE_LABEL,
    MANAGED_BY,
)
from trainyard.operator.builders.names import child_name, run_label_value
from trainyard.operator.builders.owner import owner_reference

GATE_LABEL = "trainyard.dev/gate"
"""Selects every child of one gate (value: `gate_label_value` of the gate name)."""
EVALUATION = "evaluation"
"""app.kubernetes.io/component of the evaluation's children."""
EVALUATOR_CONTAINER = "evaluator"
TASK_DIR = "/etc/trainyard"
TASK_KEY = "evaluation.json"
TASK_PATH = f"{TASK_DIR}/{TASK_KEY}"
TASK_VOLUME = "evaluation-task"
EVALUATION_RETRIES = 2
"""Pods a failed evaluation gets again (the Job's backoffLimit) before the gate fails."""


def gate_label_value(gate_name: str) -> str:
    """The `trainyard.dev/gate` label value of a gate (hashed when the name is too long)."""
    return run_label_value(gate_name)


def evaluation_name(gate_name: str, attempt: int) -> str:
    """The ConfigMap and Job of an evaluation attempt (1, 2, …): `<gate>-eval-<attempt>`.

    >>> evaluation_name("sft-release", 1)
    'sft-release-eval-1'
    """
    return child_name(gate_name, f"eval-{attempt}")


def gate_labels(gate: PromotionGate) -> dict[str, str]:
    """All labels of a gate's child: the user's, then the recommended and Trainyard ones."""
    value = gate_label_value(gate.metadata.name)
    return {
        **(gate.metadata.labels or {}),
        "app.kubernetes.io/name": "trainyard",
        "app.kubernetes.io/instance": value,
        "app.kubernetes.io/part-of": "trainyard",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        GATE_LABEL: value,
        COMPONENT_LABEL: EVALUATION,
    }


def _metadata(gate: PromotionGate, name: str, uid: str) -> dict:
    metadata: dict = {"name": name}
    if gate.metadata.namespace:
        metadata["namespace"] = gate.metadata.namespace
    metadata["labels"] = gate_labels(gate)
    metadata["ownerReferences"] = [owner_reference(gate.kind, gate.metadata.name, uid)]
    return metadata


def evaluation_gpus(gate: PromotionGate, run: TrainingRun | None) -> int:
    """GPUs of the evaluation pod: evaluation.resources' GPU limit, else the run's per node."""
    resources = gate.spec.evaluation.resources if gate.spec.evaluation else None
    for group in (resources.limits, resources.requests) if resources else ():
        if group and pod_settings.GPU_RESOURCE in group:
            return int(str(group[pod_settings.GPU_RESOURCE]))
    return run.spec.distributed.gpus_per_node if run is not None else 0


def render_evaluation(
    gate: PromotionGate,
    task: EvaluationTask,
    *,
    uid: str,
    attempt: int,
    run: TrainingRun | None = None,
    image: str | None = None,
) -> list[dict]:
    """[ConfigMap, Job] of evaluation attempt `attempt` (apply order: the pod mounts the
    ConfigMap). `image` is the operator's default trainer image."""
    name = evaluation_name(gate.metadata.name, attempt)
    evaluation = gate.spec.evaluation
    if evaluation is None:
        raise ValueError(f"PromotionGate/{gate.metadata.name}: no spec.evaluation to render")
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(gate, name, uid),
        "data": {TASK_KEY: json.dumps(task.to_yaml_dict(), indent=2, sort_keys=True) + "\n"},
    }
    run_spec = run.spec if run is not None else None
    groups = [[{"name": "PYTHONUNBUFFERED", "value": "1"}], pod_settings.cache_env()]
    if run is not None:
        groups += [
            pod_settings.runs_env(run),
            pod_settings.s3_env(run),
            sandbox.trainer_env(run),  # the reward suite scores with the run's code rewards
            pod_settings.user_env(run),
        ]
    container = {
        "name": EVALUATOR_CONTAINER,
        "image": evaluation.image
        or (run_spec.image if run_spec is not None else None)
        or image
        or DEFAULT_TRAINER_IMAGE,
        "command": ["python", "-m", "trainyard.workloads.evaluate", TASK_PATH],
        "env": pod_settings.merge_env(*groups),
        "resources": pod_settings.container_resources(
            evaluation.resources, evaluation_gpus(gate, run)
        ),
    }
    pod_spec = pod_settings.task_pod(
        container,
        task_volume=TASK_VOLUME,
        task_dir=TASK_DIR,
        config_map=name,
        run=run,
        resources=evaluation.resources,
    )
    metadata = _metadata(gate, name, uid)
    metadata["labels"][ATTEMPT_LABEL] = str(attempt)
    queue = run_spec.scheduling.queue if run_spec is not None and run_spec.scheduling else None
    if queue:
        metadata["labels"][KUEUE_QUEUE_LABEL] = queue
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata,
        "spec": {
            "completions": 1,
            "parallelism": 1,
            "backoffLimit": EVALUATION_RETRIES,
            # Kueue admits a Job by unsuspending it.
            "suspend": bool(queue),
            "template": {
                "metadata": {"labels": {**gate_labels(gate), ATTEMPT_LABEL: str(attempt)}},
                "spec": pod_spec,
            },
        },
    }
    return [config_map, job]
