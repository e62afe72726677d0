"""kopf's peering rule, as the runtime reads it from the peering objects."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from trainyard.operator.leadership import judge

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def peer(priority: int, *, seen_ago: float = 0, lifetime: int = 60) -> dict:
    seen = (NOW - timedelta(seconds=seen_ago)).isoformat()
    return {"priority": priority, "lifetime": lifetime, "lastseen": seen}


CASES = {
    "alone": ({"me": peer(5)}, True, ()),
    "a lower peer": ({"me": peer(5), "low": peer(1)}, True, ()),
    "a higher peer": ({"me": peer(5), "high": peer(9)}, False, ("high",)),
    "an equal peer (kopf pauses both)": ({"me": peer(5), "twin": peer(5)}, False, ("twin",)),
    "a higher peer that died": ({"me": peer(5), "high": peer(9, seen_ago=61)}, True, ()),
    "a higher peer that left (lifetime 0)": (
        {"me": peer(5), "high": peer(9, lifetime=0)},
        True,
        (),
    ),
    "not announced by kopf yet": ({"high": peer(1)}, False, ("(not announced yet)",)),
}


@pytest.mark.parametrize(("peers", "active", "blocking"), CASES.values(), ids=CASES.keys())
def test_active_unless_a_live_peer_has_a_higher_or_equal_priority(peers, active, blocking):
    verdict = judge([{"status": peers}], identity="me", priority=5, now=NOW)
    assert (verdict.active, verdict.blocking) == (active, blocking)


def test_a_standby_looks_again_when_the_blocking_peer_would_expire():
    verdict = judge(
        [{"status": {"me": peer(5), "high": peer(9, seen_ago=50)}}],
        identity="me",
        priority=5,
        now=NOW,
    )
    assert verdict.recheck_at == NOW + timedelta(seconds=10)


def test_every_peering_object_counts():
    verdict = judge(
        [{"status": {"me": peer(5)}}, {"status": {"other": peer(7)}}],
        identity="me",
        priority=5,
        now=NOW,
    )
    assert not verdict.active


def test_without_a_peering_object_kopf_runs_unpaused_and_so_does_the_runtime():
    assert judge([], identity="me", priority=5, now=NOW).active
