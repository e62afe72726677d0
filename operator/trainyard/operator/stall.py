"""Stall detection: a run whose step has not moved for `stallTimeoutSeconds`."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


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
