"""The headless Service that gives a run's worker pods stable DNS names.

An indexed Job's pod gets hostname `<job-name>-<index>`; with the pod's `subdomain` set
to this Service's name, it resolves as `<job-name>-<index>.<service>` in the namespace.
torchrun on every node uses index 0's name as its master address.
"""

from __future__ import annotations

from trainyard.api import TrainingRun
from trainyard.operator.builders import labels, names

RENDEZVOUS_PORT = 29500


def render_workers_service(run: TrainingRun, *, uid: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": labels.child_metadata(
            run, names.workers_service_name(run.metadata.name), labels.RENDEZVOUS, uid
        ),
        "spec": {
            "clusterIP": "None",
            "selector": labels.selector_labels(run, labels.WORKER),
            # Workers look each other up before any of them could be ready: the DNS
            # records must exist from the moment the pods have IPs.
            "publishNotReadyAddresses": True,
            "ports": [
                {
                    "name": "rendezvous",
                    "port": RENDEZVOUS_PORT,
                    "targetPort": RENDEZVOUS_PORT,
                    "protocol": "TCP",
                }
            ],
        },
    }
