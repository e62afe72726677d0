"""What one policy decides for a run, in one shape every policy returns.

Each policy module (suspend, deadline, failure_policy, stall, ttl) looks at its part of
the observation and answers with an `Outcome`, or None when it has nothing to say;
reconcile asks them in one ordered table and carries out the first decisive answer
(JobSet's policies, in Python).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from trainyard.operator.plan import ChildRef

Action = Literal["keep-finished", "suspend", "resume", "succeed", "fail", "restart", "note"]


@dataclass(frozen=True)
class ConditionChange:
    """A condition to set (type, True/False, reason, message)."""

    type: str
    status: bool
    reason: str
    message: str


@dataclass(frozen=True)
class Outcome:
    """A policy's answer: what to do with the gang, why, and what else changes.

    `note` and `resume` outcomes change conditions (a Stalled run that does not restart,
    a resumed one) and let the next policy speak; the others decide the walk. `counters`
    are (restarts, preemptions) after a failure policy's decision.
    """

    action: Action
    reason: str = ""
    message: str = ""
    conditions: tuple[ConditionChange, ...] = ()
    deletes: tuple[ChildRef, ...] = ()
    requeue_after: float | None = None
    counters: tuple[int, int] | None = None

    @property
    def decisive(self) -> bool:
        return self.action not in ("note", "resume")
