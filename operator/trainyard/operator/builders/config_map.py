"""The ConfigMap a run's workers read their configuration from.

It holds two files, mounted at /etc/trainyard:

* `run.json`: the TrainingRun itself (apiVersion, kind, name/namespace/labels, the
  whole spec with defaults filled in). The workload parses it with the same
  `trainyard.api.TrainingRun` model, so the pod trains exactly what was validated.
  Server-side metadata (uid, resourceVersion, managedFields…) and status are left out:
  they change on every write and would make the ConfigMap differ without cause.
* `trainer.json`: keyword arguments for the TRL config that only the operator can
  decide, today the vLLM connection (`use_vllm`, `vllm_mode`, `vllm_server_base_url`,
  `vllm_group_port`, `vllm_server_timeout`, or the colocate options), under TRL's own
  names; `{}` when there are none. The workload applies them over what it derives
  from run.json.
"""

from __future__ import annotations

import json

from trainyard.api import TrainingRun
from trainyard.operator.builders import labels, names
from trainyard.operator.builders.vllm import trainer_vllm_options

CONFIG_DIR = "/etc/trainyard"
RUN_CONFIG_KEY = "run.json"
TRAINER_OPTIONS_KEY = "trainer.json"
RUN_CONFIG_PATH = f"{CONFIG_DIR}/{RUN_CONFIG_KEY}"
TRAINER_OPTIONS_PATH = f"{CONFIG_DIR}/{TRAINER_OPTIONS_KEY}"


def run_document(run: TrainingRun) -> dict:
    """The run as the workload reads it: stable fields only, defaults written out."""
    metadata: dict = {"name": run.metadata.name}
    if run.metadata.namespace:
        metadata["namespace"] = run.metadata.namespace
    if run.metadata.labels:
        metadata["labels"] = dict(run.metadata.labels)
    return {
        "apiVersion": run.api_version,
        "kind": run.kind,
        "metadata": metadata,
        "spec": run.spec.model_dump(by_alias=True, exclude_none=True, mode="json"),
    }


def render_config_map(run: TrainingRun, *, uid: str, restart_attempt: int = 0) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": labels.child_metadata(
            run, names.config_map_name(run.metadata.name, restart_attempt), labels.CONFIG, uid
        ),
        "data": {
            RUN_CONFIG_KEY: json.dumps(run_document(run), indent=2) + "\n",
            TRAINER_OPTIONS_KEY: json.dumps(trainer_vllm_options(run), indent=2) + "\n",
        },
    }
