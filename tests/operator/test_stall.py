"""Stall detection as a table: idle time counts from the later of the last step and the gang's start."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from trainyard.operator.stall import check_stall

T0 = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("name", "last_progress", "running_since", "now", "timeout", "stalled", "idle"),
    [
        ("no timeout set", T0, T0, T0 + timedelta(days=1), None, False, 0),
        ("never ran", None, None, T0, 60, False, 0),
        ("moving", T0, T0, T0 + timedelta(seconds=59), 60, False, 59),
        ("stuck exactly at the timeout", T0, T0, T0 + timedelta(seconds=60), 60, True, 60),
        ("no step yet: counts from the start", None, T0, T0 + timedelta(seconds=90), 60, True, 90),
        (
            "a restart resets the clock",
            T0,
            T0 + timedelta(seconds=100),
            T0 + timedelta(seconds=130),
            60,
            False,
            30,
        ),
    ],
)
def test_check_stall(name, last_progress, running_since, now, timeout, stalled, idle):
    check = check_stall(
        last_progress=last_progress, running_since=running_since, now=now, timeout_seconds=timeout
    )
    assert (check.stalled, check.idle_seconds) == (stalled, idle), name
