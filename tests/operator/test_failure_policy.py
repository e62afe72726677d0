"""The failure policy as a table: what each pod state means, and what each disruption costs."""

from __future__ import annotations

import pytest

from trainyard.operator import reasons
from trainyard.operator.failure_policy import Disruption, classify_attempt, classify_pod, decide


def pod(
    name="w-0", phase="Running", *, exit_code=None, reason=None, disruption=None, pod_reason=None
):
    status = {"phase": phase}
    if exit_code is not None:
        status["containerStatuses"] = [
            {
                "name": "trainer",
                "state": {"terminated": {"exitCode": exit_code, "reason": reason or "Error"}},
            }
        ]
    if disruption:
        status["conditions"] = [
            {"type": "DisruptionTarget", "status": "True", "reason": disruption}
        ]
    if pod_reason:
        status["reason"] = pod_reason
    return {"metadata": {"name": name}, "status": status}


@pytest.mark.parametrize(
    ("name", "given", "kind", "reason"),
    [
        ("healthy", pod(), None, None),
        ("pending", pod(phase="Pending"), None, None),
        ("succeeded", pod(phase="Succeeded", exit_code=0, reason="Completed"), None, None),
        (
            "preempted by the scheduler",
            pod(phase="Failed", exit_code=137, disruption="PreemptionByScheduler"),
            "preemption",
            reasons.PREEMPTED,
        ),
        (
            "evicted through the API",
            pod(phase="Failed", disruption="EvictionByEvictionAPI"),
            "preemption",
            reasons.EVICTED,
        ),
        (
            "node tainted away",
            pod(phase="Failed", disruption="DeletionByTaintManager"),
            "preemption",
            reasons.NODE_LOST,
        ),
        (
            "node shut down",
            pod(phase="Failed", pod_reason="NodeShutdown"),
            "preemption",
            reasons.NODE_LOST,
        ),
        ("node lost", pod(phase="Unknown", pod_reason="NodeLost"), "preemption", reasons.NODE_LOST),
        (
            "out of memory",
            pod(phase="Failed", exit_code=137, reason="OOMKilled"),
            "failure",
            reasons.OOM_KILLED,
        ),
        ("crash", pod(phase="Failed", exit_code=1), "failure", reasons.NON_ZERO_EXIT),
        ("failed without container state", pod(phase="Failed"), "failure", reasons.POD_FAILED),
    ],
)
def test_classify_pod(name, given, kind, reason):
    found = classify_pod(given)
    assert (found.kind, found.reason) if found else (kind, reason) == (None, None), name
    if found is not None:
        assert (found.kind, found.reason) == (kind, reason), name


def test_preemption_of_one_worker_beats_the_crashes_it_causes_in_the_others():
    pods = [
        pod("w-0", "Failed", exit_code=1),
        pod("w-1", "Failed", exit_code=137, disruption="PreemptionByScheduler"),
    ]
    assert classify_attempt(None, pods).reason == reasons.PREEMPTED


@pytest.mark.parametrize(
    ("name", "condition", "kind", "reason"),
    [
        (
            "pod failure policy matched a disruption",
            {"reason": "PodFailurePolicy", "message": "Container trainer ... DisruptionTarget"},
            "preemption",
            reasons.PREEMPTED,
        ),
        (
            "backoff limit",
            {
                "reason": "BackoffLimitExceeded",
                "message": "Job has reached the specified backoff limit",
            },
            "failure",
            reasons.JOB_FAILED,
        ),
    ],
)
def test_a_failed_job_whose_pods_are_gone(name, condition, kind, reason):
    job = {
        "metadata": {"name": "r-attempt-0"},
        "status": {"conditions": [{"type": "Failed", "status": "True", **condition}]},
    }
    found = classify_attempt(job, [])
    assert (found.kind, found.reason) == (kind, reason), name


@pytest.mark.parametrize(
    ("name", "kind", "restarts", "preemptions", "max_restarts", "restart", "after"),
    [
        ("failure within budget", "failure", 0, 0, 2, True, (1, 0)),
        ("last failure in budget", "failure", 1, 5, 2, True, (2, 5)),
        ("budget used up", "failure", 2, 0, 2, False, (2, 0)),
        ("no budget at all", "failure", 0, 0, 0, False, (0, 0)),
        ("preemption is free", "preemption", 2, 0, 2, True, (2, 1)),
        ("preemption even with no budget", "preemption", 0, 7, 0, True, (0, 8)),
    ],
)
def test_decide(name, kind, restarts, preemptions, max_restarts, restart, after):
    decision = decide(
        Disruption(kind, "X", "m"),
        restarts=restarts,
        preemptions=preemptions,
        max_restarts=max_restarts,
    )
    assert (decision.restart, (decision.restarts, decision.preemptions)) == (restart, after), name
    if not restart:
        assert (
            decision.reason == reasons.RESTART_BUDGET_EXHAUSTED
            and f"maxRestarts={max_restarts}" in decision.message
        )
