"""TTL clean-up as a table: due once ttlSecondsAfterFinished passed since completion."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from trainyard.operator import ttl

DONE = datetime(2026, 1, 1, tzinfo=UTC)
JOB = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "r-worker", "namespace": "ns"}}
ROLLOUT = {
    "apiVersion": "apps/v1",
    "kind": "Deployment",
    "metadata": {"name": "r-rollout", "namespace": "ns"},
}


@pytest.mark.parametrize(
    ("name", "completion", "ttl_seconds", "now", "left", "due"),
    [
        ("no TTL: kept forever", DONE, None, DONE + timedelta(days=30), None, False),
        ("not finished", None, 60, DONE, None, False),
        ("zero: at once", DONE, 0, DONE, 0, True),
        ("before", DONE, 60, DONE + timedelta(seconds=45), 15, False),
        ("after", DONE, 60, DONE + timedelta(seconds=61), -1, True),
    ],
)
def test_ttl(name, completion, ttl_seconds, now, left, due):
    assert (
        ttl.seconds_until_cleanup(completion_time=completion, ttl_seconds=ttl_seconds, now=now)
        == left
    ), name
    decided = ttl.outcome(
        completion_time=completion,
        ttl_seconds=ttl_seconds,
        children=[JOB, ROLLOUT],
        leftovers=[ROLLOUT],
        now=now,
    )
    assert decided.action == "keep-finished", name
    deleted = {d.name for d in decided.deletes}
    if due:
        # Every child goes, the run says so, and nothing is scheduled after it.
        assert deleted == {"r-worker", "r-rollout"}, name
        assert [c.type for c in decided.conditions] == ["CleanedUp"], name
        assert decided.requeue_after is None, name
    else:
        # Only what still holds accelerators goes; the run comes back when the TTL is due.
        assert deleted == {"r-rollout"}, name
        assert decided.conditions == (), name
        assert decided.requeue_after == left, name


def test_ttl_due_with_nothing_left_sets_no_condition():
    decided = ttl.outcome(completion_time=DONE, ttl_seconds=0, children=[], leftovers=[], now=DONE)
    assert decided.deletes == () and decided.conditions == ()
