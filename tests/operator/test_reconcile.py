"""reconcile(): observed state in, plan and status out. Table cases built with a fluent fixture."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from operator_fakes import training_run

from trainyard.api import parse_resource, validate_resource
from trainyard.operator import reasons
from trainyard.operator.builders import render_children
from trainyard.operator.progress import MetricsSample
from trainyard.operator.reconcile import Observed, Plan, desired_names, reconcile
from trainyard.operator.status import find_condition

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
UID = "0b1c2d3e-run"


class World:
    """A run and what exists around it; `.reconcile()` gives the plan, `.apply()` pretends it happened."""

    def __init__(self, **spec: Any):
        self.run = training_run("demo", **spec)
        self.run["metadata"].update(uid=UID, generation=1, resourceVersion="10")
        self.children: list[dict[str, Any]] = []
        self.pods: list[dict[str, Any]] = []
        self.metrics: MetricsSample | None = None
        self.now = NOW

    def with_status(self, **status: Any) -> World:
        self.run.setdefault("status", {}).update(status)
        return self

    def with_children(self, attempt: int = 0) -> World:
        run = parse_resource(
            {k: v for k, v in self.run.items() if k != "status"}
            | {"metadata": {"name": "demo", "namespace": "ml"}}
        )
        for child in render_children(run, uid=UID, restart_attempt=attempt):
            child = copy.deepcopy(child)
            child["metadata"]["uid"] = f"uid-{child['metadata']['name']}"
            self.children.append(child)
        return self

    def job(self, attempt: int = 0) -> dict[str, Any]:
        return next(
            c
            for c in self.children
            if c["kind"] == "Job" and c["metadata"]["name"] == f"demo-attempt-{attempt}"
        )

    def with_pods(self, phase: str = "Running", attempt: int = 0, **failure: Any) -> World:
        job = self.job(attempt)
        for index in range(job["spec"]["completions"]):
            status: dict[str, Any] = {"phase": phase}
            if index == 0 and failure:
                status = {
                    "phase": "Failed",
                    "containerStatuses": [{"name": "trainer", "state": {"terminated": failure}}],
                }
            self.pods.append(
                {
                    "metadata": {
                        "name": f"demo-attempt-{attempt}-{index}",
                        "ownerReferences": [{"uid": job["metadata"]["uid"]}],
                    },
                    "status": status,
                }
            )
        return self

    def with_job_status(self, attempt: int = 0, **status: Any) -> World:
        self.job(attempt)["status"] = status
        return self

    def at(self, now: datetime) -> World:
        self.now = now
        return self

    def reconcile(self) -> Plan:
        return reconcile(
            Observed(
                run=self.run,
                children=self.children,
                pods=self.pods,
                metrics=self.metrics,
                now=self.now,
            )
        )

    def apply(self, plan: Plan) -> World:
        """What the I/O layer does with a plan, on the world's own state."""
        self.run["status"] = copy.deepcopy(plan.status)
        gone = {(d.kind, d.name) for d in plan.deletes}
        self.children = [c for c in self.children if (c["kind"], c["metadata"]["name"]) not in gone]
        self.pods = [
            p
            for p in self.pods
            if not any(
                ("Job", c["metadata"]["name"]) in gone
                and p["metadata"]["ownerReferences"][0]["uid"] == c["metadata"]["uid"]
                for c in self.children
            )
        ]
        for manifest in plan.creates:
            created = copy.deepcopy(manifest)
            created["metadata"]["uid"] = f"uid-{manifest['metadata']['name']}"
            self.children.append(created)
        return self


def kinds(items) -> list[tuple[str, str]]:
    """(kind, name) of manifests to create or ChildRefs to delete."""
    return [
        (m.kind, m.name) if hasattr(m, "kind") else (m["kind"], m["metadata"]["name"])
        for m in items
    ]


def condition(plan: Plan, type_: str) -> dict[str, Any] | None:
    return find_condition(plan.status.get("conditions"), type_)


def test_new_run_creates_its_children_and_reports_pending():
    plan = World().reconcile()
    assert kinds(plan.creates) == [
        ("ConfigMap", "demo-config-0"),
        ("Service", "demo-workers"),
        ("Job", "demo-attempt-0"),
    ]
    assert plan.deletes == ()
    assert plan.status["phase"] == "Pending" and plan.status["observedGeneration"] == 1
    assert condition(plan, "Valid")["status"] == "True"
    assert plan.status_patch == plan.status


def test_second_reconcile_of_a_converged_run_plans_nothing():
    world = World().with_children().with_pods("Running")
    first = world.reconcile()
    assert first.creates == () and first.status["phase"] == "Running"
    world.apply(first).at(NOW + timedelta(minutes=1))
    second = world.reconcile()
    assert second.is_empty, second


def test_missing_child_is_created_again_and_nothing_is_duplicated():
    world = World().with_children()
    world.children = [c for c in world.children if c["kind"] != "Service"]
    assert kinds(world.reconcile().creates) == [("Service", "demo-workers")]


def test_children_of_another_run_with_the_same_name_are_not_ours():
    world = World().with_children()
    for child in world.children:
        child["metadata"]["ownerReferences"][0]["uid"] = "previous-run-uid"
    assert len(world.reconcile().creates) == 3


@pytest.mark.parametrize("phase", ["Succeeded", "Failed"])
def test_finished_runs_stay_finished(phase):
    world = (
        World()
        .with_status(phase=phase, completionTime="2026-01-01T11:00:00Z", restartAttempt=0)
        .with_children()
    )
    world.children = [c for c in world.children if c["kind"] != "Job"]
    plan = world.reconcile()
    assert plan.creates == () and plan.deletes == ()
    assert plan.status["phase"] == phase


def test_invalid_spec_is_reported_with_the_validate_message_and_creates_nothing():
    world = World(distributed={"nodes": 0})
    expected = validate_resource(
        {k: v for k, v in world.run.items() if k != "status"}
        | {"metadata": {"name": "demo", "namespace": "ml"}}
    )
    plan = world.reconcile()
    assert plan.creates == () and plan.status["phase"] == "Invalid"
    valid = condition(plan, "Valid")
    assert (valid["status"], valid["reason"], valid["message"]) == (
        "False",
        reasons.INVALID_SPEC,
        "; ".join(expected),
    )
    assert valid["message"].startswith("spec.distributed.nodes:")
    assert world.apply(plan).reconcile().is_empty, (
        "no retry storm: the same invalid spec writes nothing again"
    )


@pytest.mark.parametrize(
    ("name", "failure", "restarts", "preemptions", "reason"),
    [
        ("crash uses the budget", {"exitCode": 1, "reason": "Error"}, 1, 0, reasons.NON_ZERO_EXIT),
        ("oom uses the budget", {"exitCode": 137, "reason": "OOMKilled"}, 1, 0, reasons.OOM_KILLED),
    ],
)
def test_failed_worker_restarts_the_gang_as_a_new_attempt(
    name, failure, restarts, preemptions, reason
):
    world = World().with_status(
        restartAttempt=0,
        restarts=0,
        preemptions=0,
        checkpoints={"latestStep": 40, "latestUri": "s3://ckpt/demo/step-40"},
    )
    world.with_children().with_pods(**failure)
    plan = world.reconcile()
    assert kinds(plan.deletes) == [("Job", "demo-attempt-0")], name
    # A new attempt gets its own config and Job; the old config goes on the next pass.
    assert kinds(plan.creates) == [("ConfigMap", "demo-config-1"), ("Job", "demo-attempt-1")], name
    assert (plan.status["restarts"], plan.status["preemptions"], plan.status["restartAttempt"]) == (
        restarts,
        preemptions,
        1,
    )
    assert plan.status["phase"] == "Restarting" and plan.restart_reason == reason
    assert "checkpoint step 40" in condition(plan, "Running")["message"]


def test_exhausted_budget_fails_the_run_and_deletes_its_job():
    world = World(runPolicy={"maxRestarts": 1}).with_status(
        restartAttempt=1, restarts=1, preemptions=0
    )
    world.with_children(attempt=1).with_pods(attempt=1, exitCode=2, reason="Error")
    plan = world.reconcile()
    assert plan.creates == () and kinds(plan.deletes) == [("Job", "demo-attempt-1")]
    assert (
        plan.status["phase"] == "Failed" and plan.status["completionTime"] == "2026-01-01T12:00:00Z"
    )
    assert condition(plan, "Failed")["reason"] == reasons.RESTART_BUDGET_EXHAUSTED
    assert world.apply(plan).reconcile().is_empty


def test_a_stale_attempts_job_is_deleted():
    world = World().with_status(restartAttempt=1).with_children(attempt=0)
    plan = world.reconcile()
    assert ("Job", "demo-attempt-0") in kinds(plan.deletes) and ("Job", "demo-attempt-1") in kinds(
        plan.creates
    )


def test_completed_job_succeeds_the_run():
    world = World().with_status(restartAttempt=0).with_children().with_pods("Succeeded")
    world.with_job_status(conditions=[{"type": "Complete", "status": "True"}], succeeded=2)
    plan = world.reconcile()
    assert (
        plan.status["phase"] == "Succeeded"
        and condition(plan, "Succeeded")["reason"] == reasons.JOB_COMPLETED
    )
    assert plan.creates == ()


def test_suspend_then_resume():
    world = World(suspend=True).with_status(restartAttempt=0).with_children().with_pods()
    plan = world.reconcile()
    assert kinds(plan.deletes) == [("Job", "demo-attempt-0")] and plan.creates == ()
    assert plan.status["phase"] == "Suspended" and condition(plan, "Suspended")["status"] == "True"
    world.apply(plan)
    assert world.reconcile().is_empty, "staying suspended writes nothing"
    world.run["spec"]["suspend"] = False
    resumed = world.reconcile()
    assert kinds(resumed.creates) == [("ConfigMap", "demo-config-1"), ("Job", "demo-attempt-1")]
    assert condition(resumed, "Suspended")["reason"] == reasons.RESUMED
    assert (resumed.status["restarts"], resumed.status["preemptions"]) == (0, 0)


@pytest.mark.parametrize(
    ("name", "restart_on_stall", "expect_restart"),
    [("stalled is reported", False, False), ("stalled restarts when asked", True, True)],
)
def test_stall_after_the_timeout(name, restart_on_stall, expect_restart):
    world = World(
        runPolicy={"maxRestarts": 2, "stallTimeoutSeconds": 600, "restartOnStall": restart_on_stall}
    )
    world.with_children().with_pods()
    world.metrics = MetricsSample(step=7)
    world.apply(world.reconcile())
    assert world.run["status"]["phase"] == "Running"
    plan = world.at(NOW + timedelta(seconds=601)).reconcile()
    stalled = condition(plan, "Stalled")
    assert (plan.restart_reason == reasons.STALLED) == expect_restart, name
    if expect_restart:
        assert plan.status["restarts"] == 1
        assert kinds(plan.creates) == [("ConfigMap", "demo-config-1"), ("Job", "demo-attempt-1")]
        assert (stalled["status"], stalled["reason"]) == ("False", reasons.RESTARTING)
    else:
        assert (stalled["status"], stalled["reason"]) == ("True", reasons.NO_PROGRESS)
        assert "stallTimeoutSeconds=600" in stalled["message"] and plan.creates == ()
        later = world.apply(plan).at(NOW + timedelta(seconds=900)).reconcile()
        assert later.is_empty, "a run that stays stalled is not rewritten on every resync"


def test_progress_and_checkpoint_come_from_rank_0():
    world = World().with_children().with_pods()
    world.metrics = MetricsSample(step=30, total_steps=100, loss=1.2, checkpoint_step=20)
    plan = world.reconcile()
    assert plan.status["progress"]["step"] == 30 and plan.status["progress"]["loss"] == 1.2
    assert plan.status["checkpoints"] == {"latestStep": 20, "latestUri": "s3://ckpt/demo/step-20"}


def test_ttl_cleans_up_the_children_of_a_finished_run():
    world = World(runPolicy={"ttlSecondsAfterFinished": 60}).with_status(
        phase="Succeeded", completionTime="2026-01-01T11:59:00Z", restartAttempt=0
    )
    world.with_children().with_job_status(conditions=[{"type": "Complete", "status": "True"}])
    early = world.at(NOW - timedelta(seconds=30)).reconcile()
    assert early.deletes == () and early.requeue_after == pytest.approx(30)
    due = world.at(NOW).reconcile()
    assert sorted(kinds(due.deletes)) == [
        ("ConfigMap", "demo-config-0"),
        ("Job", "demo-attempt-0"),
        ("Service", "demo-workers"),
    ]
    assert condition(due, "CleanedUp")["reason"] == reasons.TTL_EXPIRED


def _example_runs():
    import yaml

    root = Path(__file__).resolve().parents[2] / "examples"
    for path in sorted(root.rglob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if isinstance(document, dict) and document.get("kind") == "TrainingRun":
                yield pytest.param(document, id=f"{path.name}:{document['metadata']['name']}")


@pytest.mark.parametrize("document", list(_example_runs()))
@pytest.mark.parametrize("attempt", [0, 2])
def test_desired_names_match_what_the_builders_render(document, attempt):
    run = parse_resource(document)
    rendered = {
        (m["kind"], m["metadata"]["name"])
        for m in render_children(run, uid=UID, restart_attempt=attempt)
    }
    assert desired_names(run, attempt) == rendered


def test_converged_resync_still_notices_a_missing_child_by_name():
    world = World().with_children().with_pods()
    world.apply(world.reconcile())
    world.children = [c for c in world.children if c["kind"] != "ConfigMap"]
    assert kinds(world.reconcile().creates) == [("ConfigMap", "demo-config-0")], (
        "a missing child is noticed by name"
    )


def test_active_deadline_fails_the_run_and_stops_every_worker():
    world = World(runPolicy={"activeDeadlineSeconds": 3600, "maxRestarts": 3})
    world.with_children().with_pods()
    world.apply(world.reconcile())
    assert world.run["status"]["startTime"] == "2026-01-01T12:00:00Z"
    assert world.at(NOW + timedelta(seconds=3599)).reconcile().is_empty

    plan = world.at(NOW + timedelta(seconds=3600)).reconcile()
    failed = condition(plan, "Failed")
    assert plan.status["phase"] == "Failed" and failed["reason"] == reasons.DEADLINE_EXCEEDED
    assert "runPolicy.activeDeadlineSeconds=3600" in failed["message"]
    assert kinds(plan.deletes) == [("Job", "demo-attempt-0")] and plan.creates == ()
    assert plan.status["restarts"] == 0, "a deadline is not a failure to retry"
    assert world.apply(plan).at(NOW + timedelta(hours=5)).reconcile().is_empty


def test_a_spec_edit_applies_from_the_next_attempt_and_the_status_says_so():
    world = World().with_children().with_pods()
    world.apply(world.reconcile())
    applied = world.run["status"]["appliedSpec"]
    assert set(applied) >= {"method", "model", "dataset"}
    assert "suspend" not in applied and "runPolicy" not in applied

    # runPolicy is read at every reconcile: no pending change to report.
    world.run["spec"]["runPolicy"] = {"maxRestarts": 7}
    world.run["metadata"]["generation"] = 2
    assert condition(world.reconcile(), "SpecApplied") is None

    world.run["spec"].setdefault("training", {})["learningRate"] = 1e-4
    world.run["metadata"]["generation"] = 3
    plan = world.reconcile()
    pending = condition(plan, "SpecApplied")
    assert (pending["status"], pending["reason"]) == ("False", reasons.SPEC_CHANGE_PENDING)
    assert pending["message"].startswith("spec.training changed")
    assert plan.creates == () and plan.deletes == (), "the running attempt is left alone"
    world.apply(plan)

    world.run["spec"]["suspend"] = True
    suspended = world.reconcile()
    assert "applies when the run resumes" in condition(suspended, "SpecApplied")["message"]
    world.apply(suspended)
    world.run["spec"]["suspend"] = False
    resumed = world.reconcile()
    assert kinds(resumed.creates) == [("ConfigMap", "demo-config-1"), ("Job", "demo-attempt-1")]
    run_json = json.loads(resumed.creates[0]["data"]["run.json"])
    assert run_json["spec"]["training"]["learningRate"] == 1e-4
    applied_now = condition(resumed, "SpecApplied")
    assert (applied_now["status"], applied_now["reason"]) == ("True", reasons.SPEC_APPLIED)
    # The suspended attempt's pods are gone: its config goes in the same pass.
    assert kinds(resumed.deletes) == [("ConfigMap", "demo-config-0")]
    assert world.apply(resumed).reconcile().is_empty


# -- a finishing gang, a finished run's leftovers, when to look again -------------------------


def test_ranks_that_finished_while_rank0_uploads_keep_the_run_running():
    world = World(distributed={"nodes": 4, "gpusPerNode": 1}).with_status(
        phase="Running", restartAttempt=0
    )
    world.with_children().with_pods("Succeeded")
    world.pods[0]["status"] = {"phase": "Running"}  # rank 0 still uploads the final model
    plan = world.reconcile()
    assert plan.status["phase"] == "Running"
    assert plan.status["message"] == "1 of 4 workers running, 3 finished"
    assert condition(plan, "Running")["status"] == "True"


def test_a_gang_with_a_missing_worker_is_pending():
    world = World(distributed={"nodes": 4, "gpusPerNode": 1}).with_children().with_pods("Running")
    world.pods.pop()
    plan = world.reconcile()
    assert plan.status["phase"] == "Pending"
    assert plan.status["message"] == "waiting for workers: 3 of 4 running"


@pytest.mark.parametrize(
    ("phase", "job_complete", "deleted"),
    [
        ("Succeeded", True, [("Deployment", "demo-vllm")]),
        ("Succeeded", False, [("Deployment", "demo-vllm"), ("Job", "demo-attempt-0")]),
        ("Failed", False, [("Deployment", "demo-vllm"), ("Job", "demo-attempt-0")]),
    ],
    ids=["succeeded keeps its complete Job", "succeeded with a live Job", "failed"],
)
def test_a_finished_run_converges_to_no_workers_and_no_servers(phase, job_complete, deleted):
    """An operator killed between the terminal status write and its deletes left them."""
    import yaml

    example = yaml.safe_load(
        (Path(__file__).resolve().parents[2] / "examples" / "grpo-run.yaml").read_text()
    )
    world = World(**example["spec"]).with_status(
        phase=phase, completionTime="2026-01-01T11:59:00Z", restartAttempt=0
    )
    world.run["metadata"]["name"] = "demo"
    world.with_children()
    if job_complete:
        world.with_job_status(conditions=[{"type": "Complete", "status": "True"}])
    plan = world.reconcile()
    assert sorted(kinds(plan.deletes)) == deleted
    assert plan.status["phase"] == phase
    assert world.apply(plan).reconcile().is_empty, "and then stays converged"


@pytest.mark.parametrize(
    ("policy", "phase", "expected"),
    [
        ({}, "Running", 100.0),
        ({}, "Pending", None),
        ({"activeDeadlineSeconds": 4}, "Running", 4.0),
        ({"activeDeadlineSeconds": 4}, "Pending", 4.0),
        ({"stallTimeoutSeconds": 60}, "Running", 61.0),
    ],
    ids=["progress period", "nothing to wait for", "deadline", "deadline while pending", "stall"],
)
def test_requeue_after_is_the_next_clock_that_can_change_the_run(policy, phase, expected):
    world = World(runPolicy=policy).with_status(startTime="2026-01-01T12:00:00Z")
    world.with_children().with_pods("Running" if phase == "Running" else "Pending")
    plan = reconcile(
        Observed(
            run=world.run,
            children=world.children,
            pods=world.pods,
            now=NOW,
            progress_seconds=100.0,
        )
    )
    assert plan.status["phase"] == phase
    assert plan.requeue_after == (None if expected is None else pytest.approx(expected, abs=0.01))
