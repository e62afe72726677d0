"""Suspend and resume through `spec.suspend`.

Suspending deletes the pods (their Job) and the rollout server and keeps the
ConfigMap, the Service and the checkpoints. Resuming starts a new attempt, which
the workload resumes from its latest complete checkpoint; a resume is neither a
failure nor a preemption, so it costs no restart budget.
"""

from __future__ import annotations

from typing import Any, Literal

from trainyard.api.training_run import RunCondition
from trainyard.operator import reasons
from trainyard.operator.outcome import ConditionChange, Outcome
from trainyard.operator.plan import ref
from trainyard.operator.status import is_condition_true

SUSPENDED_MESSAGE = (
    "suspended by spec.suspend; set it to false to resume from the latest checkpoint"
)

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


def outcome(
    *, suspend: bool, conditions: list[dict[str, Any]] | None, children: list[dict[str, Any]]
) -> Outcome | None:
    """Suspended: the accelerators' holders go, the rest stays. Resumed: a note (the
    next attempt starts). Neither: nothing to say."""
    transition = suspend_transition(suspend=suspend, conditions=conditions)
    if transition in ("suspend", "stay-suspended"):
        return Outcome(
            "suspend",
            reasons.SUSPENDED_BY_SPEC,
            SUSPENDED_MESSAGE,
            conditions=(
                ConditionChange(
                    RunCondition.SUSPENDED, True, reasons.SUSPENDED_BY_SPEC, SUSPENDED_MESSAGE
                ),
                ConditionChange(
                    RunCondition.RUNNING, False, reasons.SUSPENDED_BY_SPEC, "suspended"
                ),
            ),
            deletes=tuple(ref(c) for c in children if not kept_while_suspended(c)),
        )
    if transition == "resume":
        return Outcome(
            "resume",
            reasons.RESUMED,
            conditions=(
                ConditionChange(
                    RunCondition.SUSPENDED,
                    False,
                    reasons.RESUMED,
                    "resumed from the latest checkpoint",
                ),
            ),
        )
    return None
