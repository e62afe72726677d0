"""What a reconcile asks the runtime to do: the common currency of every controller.

A pure reconcile returns a `Plan`; the runtime carries it out in one order, whatever
the kind: the owner's status first (so a counter such as a restart is recorded before
the restart happens, and a crash in between can never restart twice for free), then
deletes, then creates, then updates (whole replacements of children whose rendering
changed, e.g. an InferenceServer's Deployment after a model change). `requeue_after`
asks for another reconcile after that many seconds without an event (a TTL, a
deadline, the next progress read).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ChildRef:
    """A child to delete."""

    api_version: str
    kind: str
    name: str


@dataclass(frozen=True)
class Plan:
    """What to write. Empty when the object has converged."""

    status_patch: dict[str, Any] | None = None
    deletes: tuple[ChildRef, ...] = ()
    creates: tuple[dict[str, Any], ...] = ()
    status: dict[str, Any] = field(default_factory=dict)
    restart_reason: str | None = None
    requeue_after: float | None = None
    updates: tuple[dict[str, Any], ...] = ()
    """Children that exist and are replaced whole by these manifests (PUT)."""

    @property
    def is_empty(self) -> bool:
        return (
            self.status_patch is None and not self.deletes and not self.creates and not self.updates
        )


def ref(obj: dict[str, Any]) -> ChildRef:
    """The delete reference of an observed child."""
    return ChildRef(obj.get("apiVersion", ""), obj.get("kind", ""), obj["metadata"]["name"])


def is_owned(obj: dict[str, Any], uid: str) -> bool:
    """Whether `obj` names the object with `uid` among its owners."""
    return any(
        owner.get("uid") == uid for owner in obj.get("metadata", {}).get("ownerReferences") or []
    )


def earliest(*delays: float | None) -> float | None:
    """The soonest of several requeue delays (None: no wish).

    >>> earliest(None, 30.0, 5.0), earliest(None, None)
    (5.0, None)
    """
    wishes = [d for d in delays if d is not None]
    return max(0.0, min(wishes)) if wishes else None


# What a user may write in metadata; the API server adds the rest.
USER_METADATA = ("name", "namespace", "labels", "annotations")


def user_document(body: dict[str, Any]) -> dict[str, Any]:
    """The resource as its author wrote it: no status, no server-set metadata."""
    meta = body.get("metadata") or {}
    annotations = {
        k: v
        for k, v in (meta.get("annotations") or {}).items()
        if not k.startswith(("kopf.zalando.org/", "kubectl.kubernetes.io/"))
        and not k.startswith("trainyard.dev/kopf")
    }
    metadata = {k: meta[k] for k in USER_METADATA if k in meta and k != "annotations"}
    if annotations:
        metadata["annotations"] = annotations
    return {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": metadata,
        "spec": body.get("spec"),
    }
