"""Stall detection: a run whose step has not moved for `stallTimeoutSeconds`."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from trainyard.api.training_run import RunCondition
from trainyard.operator import reasons
from trainyard.operator.outcome import ConditionChange, Outcome
from trainyard.operator.status import format_time


@dataclass(frozen=True)
class StallCheck:
    stalled: bool
    idle_seconds: float


def check_stall(
    *,
    last_progress: datetime | None,
    running_since: datetime | None,
    now: datetime,
    timeout_seconds: int | None,
) -> StallCheck:
    """Idle time counts from the later of the last step change and the gang's start."""
    start = max((t for t in (last_progress, running_since) if t is not None), default=None)
    if timeout_seconds is None or start is None:
        return StallCheck(False, 0.0)
    idle = (now - start).total_seconds()
    return StallCheck(idle >= timeout_seconds, idle)


def outcome(
    *,
    timeout_seconds: int | None,
    running_since: datetime | None,
    last_progress: datetime | None,
    was_stalled: bool,
    restart_on_stall: bool,
    now: datetime,
) -> Outcome | None:
    """A running gang whose step has not moved: the Stalled condition, and a restart when
    runPolicy.restartOnStall asks; else when the timeout would pass (checked once then)."""
    if timeout_seconds is None or running_since is None:
        return None
    check = check_stall(
        last_progress=last_progress,
        running_since=running_since,
        now=now,
        timeout_seconds=timeout_seconds,
    )
    if check.stalled:
        # No idle counter in the message: it would change the status on every look.
        since = max(t for t in (last_progress, running_since) if t is not None)
        message = (
            f"the step has not moved since {format_time(since)} "
            f"(runPolicy.stallTimeoutSeconds={timeout_seconds})"
        )
        stalled = ConditionChange(RunCondition.STALLED, True, reasons.NO_PROGRESS, message)
        return Outcome(
            "restart" if restart_on_stall else "note",
            reasons.STALLED,
            message,
            conditions=(stalled,),
        )
    moving = (
        (ConditionChange(RunCondition.STALLED, False, reasons.PROGRESSING, "the step is moving"),)
        if was_stalled
        else ()
    )
    return Outcome(
        "note", conditions=moving, requeue_after=timeout_seconds - check.idle_seconds + 1.0
    )
