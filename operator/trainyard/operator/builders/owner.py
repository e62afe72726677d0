"""The owner reference every child of a TrainingRun carries.

Kubernetes' garbage collector deletes a run's children when the run is deleted because
of this reference; `controller: true` marks the run as the one object that manages the
child, and `blockOwnerDeletion: true` lets a foreground deletion of the run wait for
its children to be gone.
"""

from __future__ import annotations

from trainyard.api import API_VERSION


def owner_reference(kind: str, name: str, uid: str) -> dict:
    """The controller owner reference to a Trainyard resource."""
    if not uid:
        raise ValueError(f"{kind}/{name}: an owner reference needs the resource's uid")
    return {
        "apiVersion": API_VERSION,
        "kind": kind,
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }
