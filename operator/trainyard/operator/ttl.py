"""Clean-up of a finished run's children after `ttlSecondsAfterFinished`.

The run (with its status) and its checkpoints stay; its Jobs (and their pods),
Services, ConfigMap and rollout server go.
"""

from __future__ import annotations

from datetime import datetime

from trainyard.operator.status import seconds_left


def seconds_until_cleanup(
    *, completion_time: datetime | None, ttl_seconds: int | None, now: datetime
) -> float | None:
    """Seconds left before clean-up (≤ 0: due now), or None when there is no TTL or no finish."""
    return seconds_left(completion_time, ttl_seconds, now)


def is_cleanup_due(
    *, completion_time: datetime | None, ttl_seconds: int | None, now: datetime
) -> bool:
    left = seconds_until_cleanup(completion_time=completion_time, ttl_seconds=ttl_seconds, now=now)
    return left is not None and left <= 0
