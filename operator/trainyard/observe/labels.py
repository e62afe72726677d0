"""The scrape jobs and target labels the chart's monitors give, which the queries select on.

The chart's ServiceMonitor and PodMonitors (charts/trainyard/templates/*monitor*.yaml) set
`job` to one of these names and copy the pods' Trainyard labels onto every series, so a
query can join a training pod's metrics to its run and pipeline.
"""

from __future__ import annotations

from trainyard.operator.builders.inference import SERVER_LABEL
from trainyard.operator.builders.labels import ATTEMPT_LABEL, COMPONENT_LABEL, RUN_LABEL
from trainyard.operator.builders.pipeline import PIPELINE_LABEL

OPERATOR_JOB = "trainyard-operator"
TRAINING_JOB = "trainyard-training"
VLLM_JOB = "trainyard-vllm"

# Target label ← pod label (Prometheus' Kubernetes discovery spells the pod label
# __meta_kubernetes_pod_label_<name with every non-alphanumeric character as _>).
# A pipeline's runs carry PIPELINE_LABEL (a run's labels are copied to every child); an
# InferenceServer's pods SERVER_LABEL.
POD_LABELS = {
    "run": RUN_LABEL,
    "pipeline": PIPELINE_LABEL,
    "attempt": ATTEMPT_LABEL,
    "server": SERVER_LABEL,
    "component": COMPONENT_LABEL,
}


def meta_label(pod_label: str) -> str:
    """The discovery meta label of a pod label.

    >>> meta_label("trainyard.dev/run")
    '__meta_kubernetes_pod_label_trainyard_dev_run'
    """
    return "__meta_kubernetes_pod_label_" + "".join(c if c.isalnum() else "_" for c in pod_label)
