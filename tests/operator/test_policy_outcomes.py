"""Each policy module's answer, as reconcile's table receives it: named cases per policy."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from trainyard.api.training_run import RunCondition
from trainyard.operator import deadline, failure_policy, reasons, stall, suspend, ttl

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
AGO = lambda seconds: NOW - timedelta(seconds=seconds)  # noqa: E731


@pytest.mark.parametrize(
    ("kwargs", "action", "requeue"),
    [
        ({"deadline_seconds": None, "start_time": AGO(10), "resumed_at": None}, None, None),
        ({"deadline_seconds": 60, "start_time": None, "resumed_at": None}, None, None),
        ({"deadline_seconds": 60, "start_time": AGO(10), "resumed_at": None}, "note", 50.0),
        ({"deadline_seconds": 60, "start_time": AGO(90), "resumed_at": AGO(20)}, "note", 40.0),
        ({"deadline_seconds": 60, "start_time": AGO(61), "resumed_at": None}, "fail", None),
    ],
    ids=["no deadline", "never ran", "running", "resumed restarts the clock", "passed"],
)
def test_deadline(kwargs, action, requeue):
    outcome = deadline.outcome(now=NOW, **kwargs)
    assert (outcome and outcome.action, outcome and outcome.requeue_after) == (action, requeue)
    if action == "fail":
        assert outcome.reason == reasons.DEADLINE_EXCEEDED
        assert "activeDeadlineSeconds=60" in outcome.message


@pytest.mark.parametrize(
    ("kwargs", "action", "conditions"),
    [
        ({"timeout_seconds": None}, None, []),
        ({"timeout_seconds": 60, "last_progress": AGO(10)}, "note", []),
        ({"timeout_seconds": 60, "last_progress": AGO(10), "was_stalled": True}, "note", ["False"]),
        ({"timeout_seconds": 60, "last_progress": AGO(70)}, "note", ["True"]),
        (
            {"timeout_seconds": 60, "last_progress": AGO(70), "restart_on_stall": True},
            "restart",
            ["True"],
        ),
    ],
    ids=["no timeout", "moving", "moving again", "stalled", "stalled, restart"],
)
def test_stall(kwargs, action, conditions):
    args = {
        "running_since": AGO(100),
        "last_progress": None,
        "was_stalled": False,
        "restart_on_stall": False,
        **kwargs,
    }
    outcome = stall.outcome(now=NOW, **args)
    assert (outcome and outcome.action) == action
    changes = [c for c in (outcome.conditions if outcome else ()) if c.type == RunCondition.STALLED]
    assert ["True" if c.status else "False" for c in changes] == conditions


def child(kind: str, name: str) -> dict:
    return {"apiVersion": "v1", "kind": kind, "metadata": {"name": name}}


@pytest.mark.parametrize(
    ("ttl_seconds", "finished_ago", "deleted", "requeue"),
    [
        (None, 10, ["Deployment/server"], None),
        (60, 10, ["Deployment/server"], 50.0),
        (60, 61, ["Deployment/server", "Job/job", "Service/svc"], None),
    ],
    ids=["no ttl: leftovers only", "ttl pending", "ttl due: everything"],
)
def test_ttl(ttl_seconds, finished_ago, deleted, requeue):
    children = [child("Job", "job"), child("Service", "svc"), child("Deployment", "server")]
    outcome = ttl.outcome(
        completion_time=AGO(finished_ago),
        ttl_seconds=ttl_seconds,
        children=children,
        leftovers=[children[2]],
        now=NOW,
    )
    assert sorted(f"{d.kind}/{d.name}" for d in outcome.deletes) == deleted
    assert outcome.requeue_after == requeue


@pytest.mark.parametrize(
    ("spec_suspend", "was_suspended", "action"),
    [
        (False, False, None),
        (True, False, "suspend"),
        (True, True, "suspend"),
        (False, True, "resume"),
    ],
    ids=["running", "suspend", "stay suspended", "resume"],
)
def test_suspend(spec_suspend, was_suspended, action):
    conditions = (
        [{"type": "Suspended", "status": "True", "reason": "x", "lastTransitionTime": "t"}]
        if was_suspended
        else []
    )
    children = [child("Job", "job"), child("ConfigMap", "config")]
    outcome = suspend.outcome(suspend=spec_suspend, conditions=conditions, children=children)
    assert (outcome and outcome.action) == action
    if action == "suspend":
        assert [d.name for d in outcome.deletes] == ["job"], "the config stays"


@pytest.mark.parametrize(
    ("kind", "restarts", "action", "counters"),
    [
        ("preemption", 2, "restart", (2, 1)),
        ("failure", 1, "restart", (2, 0)),
        ("failure", 2, "fail", (2, 0)),
    ],
    ids=["preemption is free", "failure within budget", "budget used up"],
)
def test_failure(kind, restarts, action, counters):
    outcome = failure_policy.outcome(
        failure_policy.Disruption(kind, reasons.NON_ZERO_EXIT, "rank 1 exited 1"),
        restarts=restarts,
        preemptions=0,
        max_restarts=2,
    )
    assert (outcome.action, outcome.counters) == (action, counters)
    assert failure_policy.outcome(None, restarts=0, preemptions=0, max_restarts=2) is None
