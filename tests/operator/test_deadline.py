"""activeDeadlineSeconds as a table: the clock starts at the first start or the last resume."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from trainyard.operator import deadline, reasons

START = datetime(2026, 1, 1, tzinfo=UTC)
HOUR = timedelta(hours=1)


@pytest.mark.parametrize(
    ("name", "start", "resumed", "limit", "now", "left", "exceeded"),
    [
        ("no deadline", START, None, None, START + 100 * HOUR, None, False),
        ("never ran: queued time does not count", None, None, 60, START + HOUR, None, False),
        ("before", START, None, 3600, START + HOUR / 2, 1800, False),
        ("exactly at the deadline", START, None, 3600, START + HOUR, 0, True),
        ("after", START, None, 3600, START + 2 * HOUR, -3600, True),
        (
            "resumed: the clock starts again",
            START,
            START + 5 * HOUR,
            3600,
            START + 5.5 * HOUR,
            1800,
            False,
        ),
        ("resumed long ago", START, START + HOUR, 3600, START + 3 * HOUR, -3600, True),
    ],
)
def test_deadline(name, start, resumed, limit, now, left, exceeded):
    since = deadline.active_since(start_time=start, resumed_at=resumed)
    assert deadline.seconds_left(active_since=since, deadline_seconds=limit, now=now) == left, name
    decided = deadline.outcome(
        deadline_seconds=limit, start_time=start, resumed_at=resumed, now=now
    )
    if left is None:
        assert decided is None, name
    elif exceeded:
        assert (decided.action, decided.reason) == ("fail", reasons.DEADLINE_EXCEEDED), name
        assert f"activeDeadlineSeconds={limit}" in decided.message, name
    else:
        assert (decided.action, decided.requeue_after) == ("note", left), name
        assert not decided.decisive, name
