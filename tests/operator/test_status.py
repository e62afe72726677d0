"""Conditions keep their transition time while their status holds; status patches only carry changes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from trainyard.operator.status import find_condition, set_condition, status_patch

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
T1 = T0 + timedelta(minutes=5)


def test_new_condition_gets_now_and_the_generation():
    conditions = set_condition(None, "Valid", True, "SpecValid", "ok", now=T0, generation=3)
    assert conditions == [
        {
            "type": "Valid",
            "status": "True",
            "reason": "SpecValid",
            "message": "ok",
            "lastTransitionTime": "2026-01-01T12:00:00Z",
            "observedGeneration": 3,
        }
    ]


@pytest.mark.parametrize(
    ("name", "first", "second", "transition"),
    [
        ("same status keeps the time, even with a new reason", True, True, "2026-01-01T12:00:00Z"),
        ("flipped status takes the new time", True, False, "2026-01-01T12:05:00Z"),
        ("unknown to true is a transition", "Unknown", True, "2026-01-01T12:05:00Z"),
    ],
)
def test_transition_time_moves_only_when_the_status_changes(name, first, second, transition):
    conditions = set_condition(None, "Running", first, "A", "a", now=T0, generation=1)
    conditions = set_condition(conditions, "Running", second, "B", "b", now=T1, generation=2)
    running = find_condition(conditions, "Running")
    assert running["lastTransitionTime"] == transition, name
    assert (running["reason"], running["message"], running["observedGeneration"]) == ("B", "b", 2)


def test_conditions_are_keyed_by_type_and_keep_their_order():
    conditions = set_condition(None, "Valid", True, "A", "", now=T0, generation=1)
    conditions = set_condition(conditions, "Running", False, "B", "", now=T0, generation=1)
    conditions = set_condition(conditions, "Valid", False, "C", "", now=T1, generation=1)
    assert [(c["type"], c["status"]) for c in conditions] == [
        ("Valid", "False"),
        ("Running", "False"),
    ]


@pytest.mark.parametrize(
    ("name", "old", "new", "patch"),
    [
        (
            "nothing changed",
            {"phase": "Running", "restarts": 1},
            {"phase": "Running", "restarts": 1},
            None,
        ),
        (
            "one field changed",
            {"phase": "Pending", "restarts": 1},
            {"phase": "Running", "restarts": 1},
            {"phase": "Running"},
        ),
        (
            "a dropped field is nulled",
            {"phase": "Running", "message": "x"},
            {"phase": "Running"},
            {"message": None},
        ),
        (
            "kopf's own field is not ours to compare",
            {"phase": "Running", "kopf": {"progress": {}}},
            {"phase": "Running"},
            None,
        ),
        ("first status", None, {"phase": "Pending"}, {"phase": "Pending"}),
    ],
)
def test_status_patch_carries_only_changes(name, old, new, patch):
    assert status_patch(old, new) == patch, name
