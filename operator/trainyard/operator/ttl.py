"""Clean-up of a finished run's children after `ttlSecondsAfterFinished`.

The run (with its status) and its checkpoints stay; its Jobs (and their pods),
Services, ConfigMap and rollout server go.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from trainyard.api.training_run import RunCondition
from trainyard.operator import reasons
from trainyard.operator.outcome import ConditionChange, Outcome
from trainyard.operator.plan import ref
from trainyard.operator.status import seconds_left


def seconds_until_cleanup(
    *, completion_time: datetime | None, ttl_seconds: int | None, now: datetime
) -> float | None:
    """Seconds left before clean-up (≤ 0: due now), or None when there is no TTL or no finish."""
    return seconds_left(completion_time, ttl_seconds, now)


def outcome(
    *,
    completion_time: datetime | None,
    ttl_seconds: int | None,
    children: list[dict[str, Any]],
    leftovers: list[dict[str, Any]],
    now: datetime,
) -> Outcome:
    """A finished run: its children go when the TTL is due; until then only `leftovers`
    (what still holds accelerators) go, and the run comes back when the TTL is due."""
    left = seconds_until_cleanup(completion_time=completion_time, ttl_seconds=ttl_seconds, now=now)
    if left is not None and left <= 0:
        cleaned = (
            (
                ConditionChange(
                    RunCondition.CLEANED_UP,
                    True,
                    reasons.TTL_EXPIRED,
                    f"children deleted {ttl_seconds}s after the run finished",
                ),
            )
            if children
            else ()
        )
        return Outcome("keep-finished", conditions=cleaned, deletes=tuple(ref(c) for c in children))
    return Outcome("keep-finished", deletes=tuple(ref(c) for c in leftovers), requeue_after=left)
