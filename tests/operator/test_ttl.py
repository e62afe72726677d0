"""TTL clean-up as a table: due once ttlSecondsAfterFinished passed since completion."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from trainyard.operator.ttl import is_cleanup_due, seconds_until_cleanup

DONE = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("name", "completion", "ttl", "now", "left", "due"),
    [
        ("no TTL: kept forever", DONE, None, DONE + timedelta(days=30), None, False),
        ("not finished", None, 60, DONE, None, False),
        ("zero: at once", DONE, 0, DONE, 0, True),
        ("before", DONE, 60, DONE + timedelta(seconds=45), 15, False),
        ("after", DONE, 60, DONE + timedelta(seconds=61), -1, True),
    ],
)
def test_ttl(name, completion, ttl, now, left, due):
    assert seconds_until_cleanup(completion_time=completion, ttl_seconds=ttl, now=now) == left, name
    assert is_cleanup_due(completion_time=completion, ttl_seconds=ttl, now=now) is due, name
