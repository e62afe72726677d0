"""Labels and metadata shared by every child of a TrainingRun.

`trainyard.dev/run` selects all children of one run (the reconcile code lists them with
it); `app.kubernetes.io/*` are the recommended labels tools such as dashboards group
by. Labels the user put on the run are copied onto every child, under ours: a user
label can never redirect a selector.
"""

from __future__ import annotations

from trainyard.api import TrainingRun
from trainyard.operator.builders.names import run_label_value
from trainyard.operator.builders.owner import owner_reference

RUN_LABEL = "trainyard.dev/run"
ATTEMPT_LABEL = "trainyard.dev/attempt"
COMPONENT_LABEL = "app.kubernetes.io/component"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
MANAGED_BY = "trainyard-operator"

# Values of app.kubernetes.io/component, one per kind of child.
CONFIG = "config"
RENDEZVOUS = "rendezvous"
WORKER = "worker"
ROLLOUT_SERVER = "rollout-server"


def selector_labels(run: TrainingRun, component: str) -> dict[str, str]:
    """The labels a Service or Deployment selects its pods by."""
    return {RUN_LABEL: run_label_value(run.metadata.name), COMPONENT_LABEL: component}


def child_labels(run: TrainingRun, component: str) -> dict[str, str]:
    """All labels of a child: the user's labels, then the recommended and Trainyard labels."""
    return {
        **(run.metadata.labels or {}),
        "app.kubernetes.io/name": "trainyard",
        "app.kubernetes.io/instance": run_label_value(run.metadata.name),
        "app.kubernetes.io/part-of": "trainyard",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        **selector_labels(run, component),
    }


def child_metadata(run: TrainingRun, name: str, component: str, uid: str) -> dict:
    """metadata of a child: name, namespace (when the run has one), labels, owner reference."""
    metadata: dict = {"name": name}
    if run.metadata.namespace:
        metadata["namespace"] = run.metadata.namespace
    metadata["labels"] = child_labels(run, component)
    metadata["ownerReferences"] = [owner_reference(run.kind, run.metadata.name, uid)]
    return metadata
