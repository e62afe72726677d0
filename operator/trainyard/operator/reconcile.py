"""Reconcile one TrainingRun: observed state in, a plan and the new status out.

Pure and level-triggered: the same observation always gives the same plan, a run
whose children all exist gets an empty plan, and a finished run stays finished.
The I/O layer (`k8s.py`) carries the plan out in this order: status first (so a
restart counter is recorded before the restart happens and a crash in between can
never restart twice for free), then deletes, then creates.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from trainyard.api import InvalidResource, parse_resource
from trainyard.api.training_run import RunCondition, RunPhase, TrainingRun
from trainyard.operator import deadline, failure_policy, reasons, stall, suspend, ttl
from trainyard.operator.builders import UnrenderableRun, child_names, render_children
from trainyard.operator.builders import names as builder_names
from trainyard.operator.builders.labels import ATTEMPT_LABEL
from trainyard.operator.plan import ChildRef, Plan, earliest, is_owned, ref
from trainyard.operator.progress import MetricsSample, next_progress
from trainyard.operator.status import (
    TERMINAL_PHASES,
    find_condition,
    format_time,
    own_status,
    parse_time,
    set_condition,
    status_patch,
)

# What a user may write in metadata; the API server adds the rest.
USER_METADATA = ("name", "namespace", "labels", "annotations")


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


def user_document(body: dict[str, Any]) -> dict[str, Any]:
    """The resource as its author wrote it: no status, no server-set metadata."""
    meta = body.get("metadata") or {}
    annotations = {
        k: v
        for k, v in (meta.get("annotations") or {}).items()
        if not k.startswith(("kopf.zalando.org/", "kubectl.kubernetes.io/"))
        and not k.startswith("trainyard.dev/kopf")
    }
    metadata = {k: meta[k] for k in USER_METADATA if k in meta and k != "annotations"}
    if annotations:
        metadata["annotations"] = annotations
    return {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": metadata,
        "spec": body.get("spec"),
    }


_ref, _is_owned = ref, is_owned


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
        if (uid and _is_owned(p, uid))
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


class _Status:
    """The status being computed, with the generation and clock every condition needs."""

    def __init__(self, old: dict[str, Any] | None, generation: int | None, now: datetime):
        self.data = own_status(old)
        self.generation = generation
        self.now = now

    def condition(self, type_: str, status: bool, reason: str, message: str) -> None:
        self.data["conditions"] = set_condition(
            self.data.get("conditions"),
            type_,
            status,
            reason,
            message,
            now=self.now,
            generation=self.generation,
        )

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


def _reconcile_valid(observed: Observed, run: TrainingRun, status: _Status, now: datetime) -> Plan:
    spec = run.spec
    meta = observed.run.get("metadata") or {}
    old_status = observed.run.get("status")
    uid = meta.get("uid", "")
    status.condition(RunCondition.VALID, True, reasons.SPEC_VALID, "the spec is valid")
    status.data["observedGeneration"] = meta.get("generation")

    ours = [c for c in observed.children if _is_owned(c, uid)]
    pods = observed.pods

    if status.data.get("phase") in TERMINAL_PHASES:
        return _finished(status, old_status, spec, ours, now)

    attempt = int(status.data.get("restartAttempt") or 0)
    transition = suspend.suspend_transition(
        suspend=spec.suspend, conditions=status.data.get("conditions")
    )
    if transition in ("suspend", "stay-suspended"):
        return _suspended(
            status,
            old_status,
            run,
            ours,
            uid,
            attempt,
            observed.image,
            observed.vllm_image,
            observed.run,
        )
    if transition == "resume":
        attempt += 1
        status.condition(
            RunCondition.SUSPENDED, False, reasons.RESUMED, "resumed from the latest checkpoint"
        )
    status.data["restartAttempt"] = attempt
    status.data.setdefault("restarts", 0)
    status.data.setdefault("preemptions", 0)

    job_name = builder_names.worker_job_name(run.metadata.name, attempt)
    job = next(
        (c for c in ours if c.get("kind") == "Job" and c["metadata"]["name"] == job_name), None
    )
    attempt_pods = _attempt_pods(pods, job, attempt)
    config_name = builder_names.config_map_name(run.metadata.name, attempt)
    # Earlier attempts' Jobs and configs; a config goes once its attempt's pods are gone.
    stale = [
        c
        for c in ours
        if (c.get("kind") == "Job" and c["metadata"]["name"] != job_name)
        or (c.get("kind") == "ConfigMap" and c["metadata"]["name"] != config_name)
    ]
    deletes = [_ref(c) for c in stale]

    if failure_policy.job_condition(job, "Complete") is not None:
        return _succeeded(status, old_status, observed.metrics, spec, ours, deletes, job_name, now)

    expired = _deadline_message(status, spec, now)
    if expired is not None:
        decision = failure_policy.Decision(
            restart=False,
            restarts=int(status.data.get("restarts") or 0),
            preemptions=int(status.data.get("preemptions") or 0),
            reason=reasons.DEADLINE_EXCEEDED,
            message=expired,
        )
        return _failed(status, old_status, decision, ours, deletes, spec)

    restart_reason = None
    disruption = failure_policy.classify_attempt(job, attempt_pods)
    if disruption is None:
        _take_progress(status, observed.metrics, spec, now)
        stalled = _stall_message(status, spec, now, job)
        if stalled is not None and spec.run_policy.restart_on_stall:
            disruption = failure_policy.Disruption("failure", reasons.STALLED, stalled)

    if disruption is not None:
        decision = failure_policy.decide(
            disruption,
            restarts=int(status.data.get("restarts") or 0),
            preemptions=int(status.data.get("preemptions") or 0),
            max_restarts=spec.run_policy.max_restarts,
        )
        status.data["restarts"], status.data["preemptions"] = (
            decision.restarts,
            decision.preemptions,
        )
        if not decision.restart:
            return _failed(status, old_status, decision, ours, deletes, spec)
        if job is not None:
            deletes.append(_ref(job))
        attempt = _restart(status, decision, attempt)
        restart_reason = decision.reason
        job, attempt_pods = None, []

    existing = {(c.get("kind"), c["metadata"]["name"]) for c in ours} - {
        (d.kind, d.name) for d in deletes
    }
    spec_seen = (old_status or {}).get("observedGeneration") == meta.get("generation")
    if spec_seen and desired_names(run, attempt) <= existing:
        creates = []  # converged: rendering would only confirm it (a spec change renders again)
    else:
        desired = render_children(
            run,
            uid=uid,
            image=observed.image,
            vllm_image=observed.vllm_image,
            restart_attempt=attempt,
            suspend=False,
        )
        creates = [m for m in desired if (m["kind"], m["metadata"]["name"]) not in existing]
    _note_applied_spec(status, observed.run, creates)

    if restart_reason is None:
        _observe_running(status, spec, attempt_pods, job, now)
    plan = _plan(status, old_status, deletes, creates)
    return Plan(
        plan.status_patch,
        plan.deletes,
        plan.creates,
        plan.status,
        restart_reason,
        _requeue_after(status, spec, observed.progress_seconds, now),
    )


def _requeue_after(
    status: _Status, spec: Any, progress_seconds: float | None, now: datetime
) -> float | None:
    """When to look again without an event: the next progress read while Running, the
    active deadline, the stall timeout (events cannot announce a clock running out)."""
    running = status.data.get("phase") == RunPhase.RUNNING
    suspended = find_condition(status.data.get("conditions"), RunCondition.SUSPENDED)
    since = deadline.active_since(
        start_time=parse_time(status.data.get("startTime")),
        resumed_at=parse_time(suspended.get("lastTransitionTime"))
        if suspended is not None and suspended.get("status") == "False"
        else None,
    )
    deadline_left = deadline.seconds_left(
        active_since=since, deadline_seconds=spec.run_policy.active_deadline_seconds, now=now
    )
    stall_left = None
    timeout = spec.run_policy.stall_timeout_seconds
    running_condition = find_condition(status.data.get("conditions"), RunCondition.RUNNING)
    if timeout is not None and running and running_condition is not None:
        moments = (
            parse_time((status.data.get("progress") or {}).get("updatedAt")),
            parse_time(running_condition.get("lastTransitionTime")),
        )
        last = max((t for t in moments if t is not None), default=None)
        left = None if last is None else timeout - (now - last).total_seconds()
        stall_left = left + 1.0 if left is not None and left > 0 else None  # once, not again
    return earliest(progress_seconds if running else None, deadline_left, stall_left)


def desired_names(run: TrainingRun, attempt: int) -> set[tuple[str, str]]:
    """(kind, name) of every child this attempt should have: the builders' own naming."""
    return child_names(run, restart_attempt=attempt)


def _succeeded(
    status: _Status,
    old_status: dict[str, Any] | None,
    sample: MetricsSample | None,
    spec: Any,
    ours: list[dict[str, Any]],
    deletes: list[ChildRef],
    job_name: str,
    now: datetime,
) -> Plan:
    status.condition(RunCondition.RUNNING, False, reasons.JOB_COMPLETED, "all workers finished")
    status.condition(
        RunCondition.SUCCEEDED, True, reasons.JOB_COMPLETED, f"job {job_name} completed"
    )
    status.finish(RunPhase.SUCCEEDED, "training finished")
    _take_progress(status, sample, spec, now)
    deletes = deletes + [
        _ref(c) for c in ours if c.get("kind") == "Deployment"
    ]  # free the rollout GPUs
    return _with_ttl(_plan(status, old_status, deletes, []), spec)


def _failed(
    status: _Status,
    old_status: dict[str, Any] | None,
    decision: failure_policy.Decision,
    ours: list[dict[str, Any]],
    deletes: list[ChildRef],
    spec: Any,
) -> Plan:
    """Out of budget: say why, and stop every pod (a broken gang would hold its GPUs forever)."""
    status.condition(RunCondition.RUNNING, False, decision.reason, decision.message)
    status.condition(RunCondition.FAILED, True, decision.reason, decision.message)
    status.finish(RunPhase.FAILED, decision.message)
    deletes = deletes + [
        _ref(c) for c in ours if c.get("kind") in ("Job", "Deployment") and _ref(c) not in deletes
    ]
    return _with_ttl(_plan(status, old_status, deletes, []), spec)


def _with_ttl(plan: Plan, spec: Any) -> Plan:
    """A run that just finished comes back when its TTL is due (no event will say so)."""
    ttl_seconds = spec.run_policy.ttl_seconds_after_finished
    if ttl_seconds is None:
        return plan
    return Plan(
        plan.status_patch, plan.deletes, plan.creates, plan.status, None, float(ttl_seconds)
    )


def _restart(status: _Status, decision: failure_policy.Decision, attempt: int) -> int:
    """Record a gang restart in the status; the next attempt's number."""
    attempt += 1
    status.data["restartAttempt"] = attempt
    checkpoint = (status.data.get("checkpoints") or {}).get("latestStep")
    origin = (
        f"checkpoint step {checkpoint}"
        if checkpoint is not None
        else "the start (no complete checkpoint yet)"
    )
    status.condition(
        RunCondition.RUNNING,
        False,
        decision.reason,
        f"{decision.message}; restarting the gang from {origin}",
    )
    status.data["phase"] = RunPhase.RESTARTING
    status.data["message"] = f"{decision.reason}: restarting from {origin}"
    if find_condition(status.data.get("conditions"), RunCondition.STALLED) is not None:
        status.condition(RunCondition.STALLED, False, reasons.RESTARTING, "a new attempt started")
    return attempt


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


def _deadline_message(status: _Status, spec: Any, now: datetime) -> str | None:
    """Why the run is past runPolicy.activeDeadlineSeconds, or None when it is not."""
    limit = spec.run_policy.active_deadline_seconds
    suspended = find_condition(status.data.get("conditions"), RunCondition.SUSPENDED)
    resumed_at = None
    if suspended is not None and suspended.get("status") == "False":
        resumed_at = parse_time(suspended.get("lastTransitionTime"))
    since = deadline.active_since(
        start_time=parse_time(status.data.get("startTime")), resumed_at=resumed_at
    )
    if not deadline.is_exceeded(active_since=since, deadline_seconds=limit, now=now):
        return None
    return (
        f"active since {format_time(since)} for more than "
        f"runPolicy.activeDeadlineSeconds={limit}; stopping every worker"
    )


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


def _stall_message(
    status: _Status, spec: Any, now: datetime, job: dict[str, Any] | None
) -> str | None:
    """Set the Stalled condition; the message when the run is stalled."""
    timeout = spec.run_policy.stall_timeout_seconds
    running = find_condition(status.data.get("conditions"), RunCondition.RUNNING)
    if timeout is None or job is None or running is None or running.get("status") != "True":
        return None
    last_progress = parse_time((status.data.get("progress") or {}).get("updatedAt"))
    running_since = parse_time(running.get("lastTransitionTime"))
    check = stall.check_stall(
        last_progress=last_progress, running_since=running_since, now=now, timeout_seconds=timeout
    )
    if check.stalled:
        # No idle counter in the message: it would change the status on every resync.
        since = max(t for t in (last_progress, running_since) if t is not None)
        message = f"the step has not moved since {format_time(since)} (runPolicy.stallTimeoutSeconds={timeout})"
        status.condition(RunCondition.STALLED, True, reasons.NO_PROGRESS, message)
        return message
    if find_condition(status.data.get("conditions"), RunCondition.STALLED) is not None:
        status.condition(RunCondition.STALLED, False, reasons.PROGRESSING, "the step is moving")
    return None


def _invalid(status: _Status, old_status: dict[str, Any] | None, problems: list[str]) -> Plan:
    message = "; ".join(problems)
    status.condition(RunCondition.VALID, False, reasons.INVALID_SPEC, message)
    status.data["phase"] = RunPhase.INVALID
    status.data["message"] = f"fix the spec: {message}"
    status.data["observedGeneration"] = status.generation
    return _plan(status, old_status, [], [])


def _finished(
    status: _Status,
    old_status: dict[str, Any] | None,
    spec: Any,
    ours: list[dict[str, Any]],
    now: datetime,
) -> Plan:
    completion = parse_time(status.data.get("completionTime"))
    ttl_seconds = spec.run_policy.ttl_seconds_after_finished
    # Whatever happened before (an operator killed between the status write and the
    # deletes), a finished run holds no GPUs: no rollout server, and no Job still running.
    leftovers = [
        _ref(c)
        for c in ours
        if c.get("kind") == "Deployment"
        or (
            c.get("kind") == "Job"
            and (
                status.data.get("phase") == RunPhase.FAILED
                or failure_policy.job_condition(c, "Complete") is None
            )
        )
    ]
    if ttl.is_cleanup_due(completion_time=completion, ttl_seconds=ttl_seconds, now=now):
        deletes = [_ref(c) for c in ours]
        if deletes:
            status.condition(
                RunCondition.CLEANED_UP,
                True,
                reasons.TTL_EXPIRED,
                f"children deleted {ttl_seconds}s after the run finished",
            )
        return _plan(status, old_status, deletes, [])
    plan = _plan(status, old_status, leftovers, [])
    left = ttl.seconds_until_cleanup(completion_time=completion, ttl_seconds=ttl_seconds, now=now)
    return Plan(plan.status_patch, plan.deletes, (), plan.status, None, left)


def _suspended(
    status: _Status,
    old_status: dict[str, Any] | None,
    run: TrainingRun,
    ours: list[dict[str, Any]],
    uid: str,
    attempt: int,
    image: str | None,
    vllm_image: str | None,
    run_body: dict[str, Any],
) -> Plan:
    deletes = [_ref(c) for c in ours if not suspend.kept_while_suspended(c)]
    status.data["restartAttempt"] = attempt
    status.data["phase"] = RunPhase.SUSPENDED
    status.data["message"] = (
        "suspended by spec.suspend; set it to false to resume from the latest checkpoint"
    )
    status.condition(
        RunCondition.SUSPENDED, True, reasons.SUSPENDED_BY_SPEC, status.data["message"]
    )
    status.condition(RunCondition.RUNNING, False, reasons.SUSPENDED_BY_SPEC, "suspended")
    existing = {(c.get("kind"), c["metadata"]["name"]) for c in ours}
    kept = [
        m
        for m in render_children(
            run, uid=uid, image=image, vllm_image=vllm_image, restart_attempt=attempt, suspend=True
        )
        if suspend.kept_while_suspended(m)
    ]
    creates = [m for m in kept if (m["kind"], m["metadata"]["name"]) not in existing]
    _note_applied_spec(status, run_body, creates, suspended=True)
    return _plan(status, old_status, deletes, creates)


def _plan(
    status: _Status,
    old_status: dict[str, Any] | None,
    deletes: list[ChildRef],
    creates: list[dict[str, Any]],
) -> Plan:
    return Plan(
        status_patch=status_patch(old_status, status.data),
        deletes=tuple(dict.fromkeys(deletes)),
        creates=tuple(creates),
        status=status.data,
    )
