"""Suspend transitions as a table: what spec.suspend and the Suspended condition mean together."""

from __future__ import annotations

import pytest

from trainyard.operator.suspend import kept_while_suspended, suspend_transition

SUSPENDED = [{"type": "Suspended", "status": "True"}]
RESUMED = [{"type": "Suspended", "status": "False"}]


@pytest.mark.parametrize(
    ("name", "suspend", "conditions", "transition"),
    [
        ("running run gets suspended", True, None, "suspend"),
        ("suspended run stays suspended", True, SUSPENDED, "stay-suspended"),
        ("suspended run resumes", False, SUSPENDED, "resume"),
        ("resumed run just runs", False, RESUMED, "none"),
        ("never suspended", False, None, "none"),
    ],
)
def test_suspend_transition(name, suspend, conditions, transition):
    assert suspend_transition(suspend=suspend, conditions=conditions) == transition, name


@pytest.mark.parametrize(
    ("kind", "kept"),
    [("ConfigMap", True), ("Service", True), ("Job", False), ("Deployment", False)],
)
def test_only_children_without_accelerators_are_kept(kind, kept):
    assert kept_while_suspended({"kind": kind}) is kept
