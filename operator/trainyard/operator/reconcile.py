"""Reconcile one TrainingRun: observed state in, a plan and the new status out.

Pure and level-triggered: the same observation always gives the same plan, a run
whose children all exist gets an empty plan, and a finished run stays finished.
The I/O layer (`k8s.py`) carries the plan out in this order: status first (so a
restart counter is recorded before the restart happens and a crash in between can
never restart twice for free), then deletes, then creates.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from trainyard.api import InvalidResource, parse_resource
from trainyard.api.training_run import RunCondition, RunPhase, TrainingRun
from trainyard.operator import deadline, failure_policy, oom_recovery, reasons, stall, suspend, ttl
from trainyard.operator.builders import UnrenderableRun, child_names, render_children, sandbox
from trainyard.operator.builders import names as builder_names
from trainyard.operator.builders.labels import ATTEMPT_LABEL
from trainyard.operator.outcome import Outcome
from trainyard.operator.plan import ChildRef, Plan, earliest, is_owned, ref, user_document
from trainyard.operator.progress import MetricsSample, next_progress
from trainyard.operator.status import (
    TERMINAL_PHASES,
    StatusDraft,
    find_condition,
    format_time,
    parse_time,
    status_patch,
)


@dataclass(frozen=True)
class Observed:
    """Everything reconcile looks at, read by the I/O layer."""

    run: dict[str, Any]
    children: list[dict[str, Any]] = field(default_factory=list)
    pods: list[dict[str, Any]] = field(default_factory=list)
    metrics: MetricsSample | None = None
    now: datetime | None = None
    image: str | None = None
    vllm_image: str | None = None
    progress_seconds: float | None = None
    """How often a Running run's progress (rank 0's metrics) is read: its requeue period."""


def _attempt_pods(
    pods: list[dict[str, Any]], job: dict[str, Any] | None, attempt: int
) -> list[dict[str, Any]]:
    """Pods of this attempt's Job (by owner, or by the attempt label when owners are absent)."""
    if job is None:
        return []
    uid = job["metadata"].get("uid")
    return [
        p
        for p in pods
        if (uid and is_owned(p, uid))
        or (
            (p.get("metadata", {}).get("labels") or {}).get(ATTEMPT_LABEL) == str(attempt)
            and not p.get("metadata", {}).get("ownerReferences")
        )
    ]


def _pods_in_phase(pods: list[dict[str, Any]], phase: str) -> int:
    return sum(
        1
        for p in pods
        if p.get("status", {}).get("phase") == phase
        and not p.get("metadata", {}).get("deletionTimestamp")
    )


class _Status(StatusDraft):
    """A TrainingRun's status being computed."""

    def finish(self, phase: str, message: str) -> None:
        self.data["phase"] = phase
        self.data["message"] = message
        self.data.setdefault("completionTime", format_time(self.now))


def reconcile(observed: Observed) -> Plan:
    """The plan that moves the run toward its spec, and the status that tells the truth."""
    body = observed.run
    meta = body.get("metadata") or {}
    now = observed.now or datetime.now().astimezone()
    status = _Status(body.get("status"), meta.get("generation"), now)
    old_status = body.get("status")

    try:
        run = parse_resource(user_document(body))  # the same problems `trainyard validate` lists
    except InvalidResource as invalid:
        return _invalid(status, old_status, invalid.problems)
    assert isinstance(run, TrainingRun)
    try:
        return _reconcile_valid(observed, run, status, now)
    except UnrenderableRun as error:
        # A spec the API accepts but the builders cannot run is just as invalid.
        return _invalid(_Status(old_status, meta.get("generation"), now), old_status, [str(error)])


@dataclass
class _Facts:
    """What every policy of one reconcile reads (the attempt moves on a resume or restart)."""

    observed: Observed
    run: TrainingRun
    status: _Status
    old_status: dict[str, Any] | None
    ours: list[dict[str, Any]]
    attempt: int
    now: datetime
    requeues: list[float | None] = field(default_factory=list)
    restart_reason: str | None = None
    stall_checked: bool = False

    @property
    def spec(self) -> Any:
        return self.run.spec

    @property
    def job_name(self) -> str:
        return builder_names.worker_job_name(self.run.metadata.name, self.attempt)

    @property
    def job(self) -> dict[str, Any] | None:
        return next(
            (
                c
                for c in self.ours
                if c.get("kind") == "Job" and c["metadata"]["name"] == self.job_name
            ),
            None,
        )

    @property
    def attempt_pods(self) -> list[dict[str, Any]]:
        return _attempt_pods(self.observed.pods, self.job, self.attempt)

    def stale(self) -> list[ChildRef]:
        """Earlier attempts' Jobs and configs; a config goes once its attempt's pods are gone."""
        config_name = builder_names.config_map_name(self.run.metadata.name, self.attempt)
        return [
            ref(c)
            for c in self.ours
            if (c.get("kind") == "Job" and c["metadata"]["name"] != self.job_name)
            or (c.get("kind") == "ConfigMap" and c["metadata"]["name"] != config_name)
        ]

    def counters(self) -> dict[str, int]:
        return {
            "restarts": int(self.status.data.get("restarts") or 0),
            "preemptions": int(self.status.data.get("preemptions") or 0),
        }


# -- the policies, asked in this order; the first decisive outcome ends the walk ------------


def _suspend_policy(facts: _Facts) -> Outcome | None:
    return suspend.outcome(
        suspend=facts.spec.suspend,
        conditions=facts.status.data.get("conditions"),
        children=facts.ours,
    )


def _success_policy(facts: _Facts) -> Outcome | None:
    if failure_policy.job_condition(facts.job, "Complete") is None:
        return None
    return Outcome("succeed", reasons.JOB_COMPLETED, f"job {facts.job_name} completed")


def _deadline_policy(facts: _Facts) -> Outcome | None:
    suspended = find_condition(facts.status.data.get("conditions"), RunCondition.SUSPENDED)
    return deadline.outcome(
        deadline_seconds=facts.spec.run_policy.active_deadline_seconds,
        start_time=parse_time(facts.status.data.get("startTime")),
        resumed_at=parse_time(suspended.get("lastTransitionTime"))
        if suspended is not None and suspended.get("status") == "False"
        else None,
        now=facts.now,
    )


def _failure_policy(facts: _Facts) -> Outcome | None:
    disruption = failure_policy.classify_attempt(facts.job, facts.attempt_pods)
    recovery = oom_recovery.recover(
        disruption,
        settings=facts.spec.run_policy.oom_recovery,
        spec=facts.spec,
        recorded=facts.status.data.get("oomRecovery"),
        **facts.counters(),
        max_restarts=facts.spec.run_policy.max_restarts,
    )
    if recovery is not None:
        if recovery.status is not None:
            # recorded before the restart renders the next attempt's config from it
            facts.status.data["oomRecovery"] = recovery.status
            facts.run = oom_recovery.effective_run(facts.run, recovery.status)
        return recovery.outcome
    return failure_policy.outcome(
        disruption, **facts.counters(), max_restarts=facts.spec.run_policy.max_restarts
    )


def _progress_policy(facts: _Facts) -> Outcome | None:
    """Not a decision: the newest metrics go into the status before the stall check."""
    _take_progress(facts.status, facts.observed.metrics, facts.spec, facts.now)
    return None


def _stall_policy(facts: _Facts) -> Outcome | None:
    running = find_condition(facts.status.data.get("conditions"), RunCondition.RUNNING)
    if facts.job is None or running is None or running.get("status") != "True":
        return None
    facts.stall_checked = True
    stalled = stall.outcome(
        timeout_seconds=facts.spec.run_policy.stall_timeout_seconds,
        running_since=parse_time(running.get("lastTransitionTime")),
        last_progress=parse_time((facts.status.data.get("progress") or {}).get("updatedAt")),
        was_stalled=find_condition(facts.status.data.get("conditions"), RunCondition.STALLED)
        is not None,
        restart_on_stall=facts.spec.run_policy.restart_on_stall,
        now=facts.now,
    )
    if stalled is None or stalled.action != "restart":
        return stalled
    fate = failure_policy.outcome(
        failure_policy.Disruption("failure", reasons.STALLED, stalled.message),
        **facts.counters(),
        max_restarts=facts.spec.run_policy.max_restarts,
    )
    assert fate is not None
    return Outcome(
        fate.action, fate.reason, fate.message, stalled.conditions, counters=fate.counters
    )


POLICIES: tuple[tuple[str, Callable[[_Facts], Outcome | None]], ...] = (
    ("suspend", _suspend_policy),
    ("success", _success_policy),
    ("deadline", _deadline_policy),
    ("failure", _failure_policy),
    ("progress", _progress_policy),
    ("stall", _stall_policy),
)


def _reconcile_valid(observed: Observed, run: TrainingRun, status: _Status, now: datetime) -> Plan:
    meta = observed.run.get("metadata") or {}
    uid = meta.get("uid", "")
    status.condition(
        RunCondition.VALID,
        True,
        reasons.SPEC_VALID,
        "the spec is valid" + sandbox.isolation_note(run),  # which jail code rewards get
    )
    status.data["observedGeneration"] = meta.get("generation")
    facts = _Facts(
        observed=observed,
        # the batch a recovery from CUDA out-of-memory chose, in every config rendered
        run=oom_recovery.effective_run(run, status.data.get("oomRecovery")),
        status=status,
        old_status=observed.run.get("status"),
        ours=[c for c in observed.children if is_owned(c, uid)],
        attempt=int(status.data.get("restartAttempt") or 0),
        now=now,
    )
    if status.data.get("phase") in TERMINAL_PHASES:
        return _keep_finished(facts)
    for _, policy in POLICIES:
        outcome = policy(facts)
        if outcome is None:
            continue
        for change in outcome.conditions:
            status.condition(change.type, change.status, change.reason, change.message)
        facts.requeues.append(outcome.requeue_after)
        if outcome.counters is not None:
            status.data["restarts"], status.data["preemptions"] = outcome.counters
        if outcome.action == "resume":
            facts.attempt += 1
        if outcome.decisive:
            return ACTIONS[outcome.action](facts, outcome)
    return _converge(facts)


def _keep_finished(facts: _Facts) -> Plan:
    """A finished run stays finished; what still holds accelerators goes (an operator
    killed between the terminal status write and its deletes left it), the rest at the TTL."""
    status = facts.status
    failed = status.data.get("phase") == RunPhase.FAILED
    leftovers = [
        c
        for c in facts.ours
        if c.get("kind") == "Deployment"
        or (
            c.get("kind") == "Job"
            and (failed or failure_policy.job_condition(c, "Complete") is None)
        )
    ]
    outcome = ttl.outcome(
        completion_time=parse_time(status.data.get("completionTime")),
        ttl_seconds=facts.spec.run_policy.ttl_seconds_after_finished,
        children=facts.ours,
        leftovers=leftovers,
        now=facts.now,
    )
    for change in outcome.conditions:
        status.condition(change.type, change.status, change.reason, change.message)
    return _plan(status, facts.old_status, list(outcome.deletes), [], outcome.requeue_after)


def _suspend(facts: _Facts, outcome: Outcome) -> Plan:
    status, run = facts.status, facts.run
    status.data["restartAttempt"] = facts.attempt
    status.data["phase"] = RunPhase.SUSPENDED
    status.data["message"] = outcome.message
    existing = {(c.get("kind"), c["metadata"]["name"]) for c in facts.ours}
    kept = [
        m
        for m in render_children(
            run,
            uid=facts.observed.run["metadata"].get("uid", ""),
            image=facts.observed.image,
            vllm_image=facts.observed.vllm_image,
            restart_attempt=facts.attempt,
            suspend=True,
        )
        if suspend.kept_while_suspended(m)
    ]
    creates = [m for m in kept if (m["kind"], m["metadata"]["name"]) not in existing]
    _note_applied_spec(status, facts.observed.run, creates, suspended=True)
    return _plan(status, facts.old_status, list(outcome.deletes), creates)


def _succeed(facts: _Facts, outcome: Outcome) -> Plan:
    status = facts.status
    status.condition(RunCondition.RUNNING, False, outcome.reason, "all workers finished")
    status.condition(RunCondition.SUCCEEDED, True, outcome.reason, outcome.message)
    status.finish(RunPhase.SUCCEEDED, "training finished")
    _take_progress(status, facts.observed.metrics, facts.spec, facts.now)
    servers = [ref(c) for c in facts.ours if c.get("kind") == "Deployment"]  # rollout GPUs
    return _plan(status, facts.old_status, facts.stale() + servers, [], _ttl_requeue(facts))


def _fail(facts: _Facts, outcome: Outcome) -> Plan:
    """Stop every pod (a broken gang would hold its GPUs forever) and say why."""
    status = facts.status
    status.condition(RunCondition.RUNNING, False, outcome.reason, outcome.message)
    status.condition(RunCondition.FAILED, True, outcome.reason, outcome.message)
    status.finish(RunPhase.FAILED, outcome.message)
    workers = [ref(c) for c in facts.ours if c.get("kind") in ("Job", "Deployment")]
    return _plan(status, facts.old_status, facts.stale() + workers, [], _ttl_requeue(facts))


def _ttl_requeue(facts: _Facts) -> float | None:
    """A run that just finished comes back when its TTL is due (no event will say so)."""
    ttl_seconds = facts.spec.run_policy.ttl_seconds_after_finished
    return None if ttl_seconds is None else float(ttl_seconds)


def _restart(facts: _Facts, outcome: Outcome) -> Plan:
    """Record a gang restart, delete the attempt's Job, and start the next attempt."""
    status = facts.status
    deletes = facts.stale() + ([ref(facts.job)] if facts.job is not None else [])
    facts.attempt += 1
    status.data["restartAttempt"] = facts.attempt
    checkpoint = (status.data.get("checkpoints") or {}).get("latestStep")
    origin = (
        f"checkpoint step {checkpoint}"
        if checkpoint is not None
        else "the start (no complete checkpoint yet)"
    )
    status.condition(
        RunCondition.RUNNING,
        False,
        outcome.reason,
        f"{outcome.message}; restarting the gang from {origin}",
    )
    status.data["phase"] = RunPhase.RESTARTING
    status.data["message"] = f"{outcome.reason}: restarting from {origin}"
    if find_condition(status.data.get("conditions"), RunCondition.STALLED) is not None:
        status.condition(RunCondition.STALLED, False, reasons.RESTARTING, "a new attempt started")
    facts.restart_reason = outcome.reason
    return _converge(facts, deletes)


ACTIONS: dict[str, Callable[[_Facts, Outcome], Plan]] = {
    "suspend": _suspend,
    "succeed": _succeed,
    "fail": _fail,
    "restart": _restart,
}


def _converge(facts: _Facts, deletes: list[ChildRef] | None = None) -> Plan:
    """The attempt's children exist; the status says how far the gang is."""
    status, run = facts.status, facts.run
    status.data["restartAttempt"] = facts.attempt
    status.data.setdefault("restarts", 0)
    status.data.setdefault("preemptions", 0)
    deletes = deletes if deletes is not None else facts.stale()
    meta = facts.observed.run.get("metadata") or {}
    existing = {(c.get("kind"), c["metadata"]["name"]) for c in facts.ours} - {
        (d.kind, d.name) for d in deletes
    }
    spec_seen = (facts.old_status or {}).get("observedGeneration") == meta.get("generation")
    if spec_seen and desired_names(run, facts.attempt) <= existing:
        creates = []  # converged: rendering would only confirm it (a spec change renders again)
    else:
        desired = render_children(
            run,
            uid=meta.get("uid", ""),
            image=facts.observed.image,
            vllm_image=facts.observed.vllm_image,
            restart_attempt=facts.attempt,
            suspend=False,
        )
        creates = [m for m in desired if (m["kind"], m["metadata"]["name"]) not in existing]
    _note_applied_spec(status, facts.observed.run, creates)
    if facts.restart_reason is None:
        _observe_running(status, facts.spec, facts.attempt_pods, facts.job, facts.now)
    running = status.data.get("phase") == RunPhase.RUNNING
    if running and not facts.stall_checked:
        # the gang has just started running: the stall clock starts now
        started = _stall_policy(facts)
        facts.requeues.append(started.requeue_after if started is not None else None)
    progress = facts.observed.progress_seconds if running else None
    requeue = earliest(progress, *facts.requeues) if running or facts.requeues else None
    plan = _plan(status, facts.old_status, deletes, creates, requeue)
    return dataclasses.replace(plan, restart_reason=facts.restart_reason)


def desired_names(run: TrainingRun, attempt: int) -> set[tuple[str, str]]:
    """(kind, name) of every child this attempt should have: the builders' own naming."""
    return child_names(run, restart_attempt=attempt)


def _observe_running(
    status: _Status,
    spec: Any,
    pods: list[dict[str, Any]],
    job: dict[str, Any] | None,
    now: datetime,
) -> None:
    nodes = spec.distributed.nodes
    running = _pods_in_phase(pods, "Running")
    # Ranks that exited 0 while others still work (rank 0 uploading the final model)
    # are part of a running gang, not missing from it.
    finished = _pods_in_phase(pods, "Succeeded")
    if job is not None and running > 0 and running + finished >= nodes:
        status.data["phase"] = RunPhase.RUNNING
        status.data["message"] = (
            f"{running} of {nodes} workers running"
            if not finished
            else f"{running} of {nodes} workers running, {finished} finished"
        )
        status.data.setdefault("startTime", format_time(now))
        status.condition(RunCondition.RUNNING, True, reasons.PODS_RUNNING, status.data["message"])
        return
    if status.data.get("phase") != RunPhase.RESTARTING:
        status.data["phase"] = RunPhase.PENDING
    waiting = f"waiting for workers: {running} of {nodes} running"
    status.data["message"] = waiting
    previous = find_condition(status.data.get("conditions"), RunCondition.RUNNING)
    if (
        previous is None
        or previous.get("status") == "True"
        or previous.get("reason") in (reasons.PODS_RUNNING, reasons.WAITING_FOR_PODS)
    ):
        status.condition(RunCondition.RUNNING, False, reasons.WAITING_FOR_PODS, waiting)


def _take_progress(status: _Status, sample: MetricsSample | None, spec: Any, now: datetime) -> None:
    progress = next_progress(status.data.get("progress"), sample, now)
    if progress is not None:
        status.data["progress"] = progress
    if sample is not None and sample.checkpoint_step is not None and spec.checkpoint is not None:
        status.data["checkpoints"] = {
            "latestStep": sample.checkpoint_step,
            "latestUri": f"{spec.checkpoint.uri.rstrip('/')}/step-{sample.checkpoint_step}",
        }


# Read by the operator at every reconcile, so an edit takes effect at once.
LIVE_SPEC_FIELDS = frozenset({"suspend", "runPolicy"})


def spec_fingerprint(body: dict[str, Any]) -> dict[str, str]:
    """A short hash of each top-level spec field as the author wrote it (live fields left
    out): what `status.appliedSpec` records when an attempt's config is rendered."""
    spec = body.get("spec") or {}
    return {
        key: builder_names.short_hash(json.dumps(value, sort_keys=True))
        for key, value in sorted(spec.items())
        if key not in LIVE_SPEC_FIELDS
    }


def _note_applied_spec(
    status: _Status,
    body: dict[str, Any],
    creates: list[dict[str, Any]] | tuple[dict[str, Any], ...],
    *,
    suspended: bool = False,
) -> None:
    """Record the spec an attempt's config is rendered from, and say when the spec has
    moved on since: its pods keep the config they started with."""
    current = spec_fingerprint(body)
    if any(m.get("kind") == "ConfigMap" for m in creates) or not status.data.get("appliedSpec"):
        status.data["appliedSpec"] = current
    applied = status.data["appliedSpec"]
    changed = sorted(k for k in set(applied) | set(current) if applied.get(k) != current.get(k))
    if changed:
        fields = ", ".join(f"spec.{k}" for k in changed)
        when = (
            "it applies when the run resumes"
            if suspended
            else "it applies from the next attempt: suspend and resume the run to apply it now"
        )
        status.condition(
            RunCondition.SPEC_APPLIED,
            False,
            reasons.SPEC_CHANGE_PENDING,
            f"{fields} changed after this attempt's pods started with the run's config; {when}",
        )
    elif find_condition(status.data.get("conditions"), RunCondition.SPEC_APPLIED) is not None:
        status.condition(
            RunCondition.SPEC_APPLIED, True, reasons.SPEC_APPLIED, "the pods run the spec as it is"
        )


def _invalid(status: _Status, old_status: dict[str, Any] | None, problems: list[str]) -> Plan:
    message = "; ".join(problems)
    status.condition(RunCondition.VALID, False, reasons.INVALID_SPEC, message)
    status.data["phase"] = RunPhase.INVALID
    status.data["message"] = f"fix the spec: {message}"
    status.data["observedGeneration"] = status.generation
    return _plan(status, old_status, [], [])


def _plan(
    status: _Status,
    old_status: dict[str, Any] | None,
    deletes: list[ChildRef],
    creates: list[dict[str, Any]],
    requeue_after: float | None = None,
) -> Plan:
    return Plan(
        status_patch=status_patch(old_status, status.data),
        deletes=tuple(dict.fromkeys(deletes)),
        creates=tuple(creates),
        status=status.data,
        requeue_after=requeue_after,
    )
