"""Suspend and resume through `spec.suspend`.

Suspending deletes the pods (their Job) and the rollout server and keeps the
ConfigMap, the Service and the checkpoints. Resuming starts a new attempt, which
the workload resumes from its latest complete checkpoint; a resume is neither a
failure nor a preemption, so it costs no restart budget.
"""

from __future__ import annotations

from typing import Any, Literal

from trainyard.api.training_run import RunCondition
from trainyard.operator.status import is_condition_true

Transition = Literal["suspend", "resume", "stay-suspended", "none"]

# Kinds whose objects hold accelerators: these go while suspended.
SUSPENDED_KINDS = frozenset({"Job", "Deployment"})


def suspend_transition(*, suspend: bool, conditions: list[dict[str, Any]] | None) -> Transition:
    was_suspended = is_condition_true(conditions, RunCondition.SUSPENDED)
    if suspend:
        return "stay-suspended" if was_suspended else "suspend"
    return "resume" if was_suspended else "none"


def kept_while_suspended(child: dict[str, Any]) -> bool:
    return child.get("kind") not in SUSPENDED_KINDS
