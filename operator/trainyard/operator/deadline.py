"""`runPolicy.activeDeadlineSeconds`: fail a run that has been active for too long.

The clock starts when all workers first ran (`status.startTime`), and starts again when
a suspended run is resumed, as a Kubernetes Job's does: time spent suspended, or queued
before the gang ever ran, does not count. Gang restarts do not stop it.
"""

from __future__ import annotations

from datetime import datetime

from trainyard.operator import reasons, status
from trainyard.operator.outcome import Outcome


def active_since(*, start_time: datetime | None, resumed_at: datetime | None) -> datetime | None:
    """When the deadline clock started: the later of the first start and the last resume."""
    return max((t for t in (start_time, resumed_at) if t is not None), default=None)


def seconds_left(
    *, active_since: datetime | None, deadline_seconds: int | None, now: datetime
) -> float | None:
    """Seconds before the deadline (≤ 0: passed), or None without a deadline or a start."""
    return status.seconds_left(active_since, deadline_seconds, now)


def outcome(
    *,
    deadline_seconds: int | None,
    start_time: datetime | None,
    resumed_at: datetime | None,
    now: datetime,
) -> Outcome | None:
    """Fail the run once its active time passed the deadline; else say when to look again."""
    since = active_since(start_time=start_time, resumed_at=resumed_at)
    left = seconds_left(active_since=since, deadline_seconds=deadline_seconds, now=now)
    if left is None:
        return None
    if left > 0:
        return Outcome("note", requeue_after=left)
    assert since is not None
    return Outcome(
        "fail",
        reasons.DEADLINE_EXCEEDED,
        f"active since {status.format_time(since)} for more than "
        f"runPolicy.activeDeadlineSeconds={deadline_seconds}; stopping every worker",
    )
