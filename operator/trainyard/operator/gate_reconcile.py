"""Reconcile one PromotionGate: observed gate, run, evaluation children and results in,
a plan and the status the verdict gives out.

Pure and level-triggered, like `reconcile.reconcile` for runs. The decisions, in order:

| situation | verdict (reason) | writes |
|---|---|---|
| the spec does not parse | Invalid (InvalidSpec), the validate message | status |
| already Passed or Failed | unchanged (a decision is final) | nothing |
| `trainyard.dev/rejected-by` before any result | Failed (Rejected) | status; a running evaluation Job deleted |
| the run is missing / not finished | Pending (RunNotFound / RunNotFinished), naming the run | status |
| the run failed | Failed (RunFailed) | status |
| no evaluation | the verdict on the run's final metrics | status |
| evaluation, no Job for the current attempt | Evaluating (Evaluating) | ConfigMap + Job `<gate>-eval-<n>` |
| the Job runs | Evaluating (Evaluating) | status |
| the Job failed (after its retries) | Failed (EvaluationFailed), with the Job's reason | status |
| the Job completed, eval.json missing | Failed (EvaluationFailed), naming where it was looked for | status |
| the Job completed, eval.json read | the verdict on it (`trainyard.api.verdict.judge`) | status |
| inconclusive, `moreSamples` not used yet | Evaluating (MoreSamples) | attempt 2 on up to moreSamples records |

Manual approval: `seen_decisions` turns the annotations into decisions with the time
they were first seen (kept in status), `judge` counts an approval only when it was seen
after the criteria were judged. Annotation edits are gate events, so they reconcile.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from trainyard.api import InvalidResource, TrainingRun, parse_resource
from trainyard.api.common import ModelSource
from trainyard.api.contract import CHECKPOINT_FINAL
from trainyard.api.gate import (
    Evaluation,
    PromotionGate,
    PromotionGateStatus,
    evaluation_task,
)
from trainyard.api.training_run import RunPhase
from trainyard.api.verdict import (
    INCONCLUSIVE,
    REJECTED,
    REPORT_FILE,
    EvalResults,
    GateVerdict,
    awaiting_since_of,
    eval_output_uri,
    eval_results_uri,
    judge,
    seen_decisions,
    with_run_metrics,
)
from trainyard.operator import reasons
from trainyard.operator.builders.evaluation import evaluation_name, render_evaluation
from trainyard.operator.plan import ChildRef, Plan, user_document
from trainyard.operator.status import format_time, own_status, set_condition, status_patch

KIND = "PromotionGate"
EVENT_SOURCE = "trainyard-operator"


class GateCondition(StrEnum):
    """The condition types the operator sets on a PromotionGate."""

    VALID = "Valid"
    """The spec passed validation (False: status.message says what to fix)."""
    EVALUATED = "Evaluated"
    """The metrics the gate judges are in (eval.json read, or the run's final metrics)."""
    PASSED = "Passed"
    """The verdict: True when Passed, False when Failed, Unknown while undecided."""


class GateVerdictName(StrEnum):
    """status.verdict values this module sets itself (`judge` gives the others)."""

    PENDING = "Pending"
    EVALUATING = "Evaluating"
    PASSED = "Passed"
    FAILED = "Failed"
    INVALID = "Invalid"


DECIDED = frozenset({GateVerdictName.PASSED, GateVerdictName.FAILED})

# Reasons (one CamelCase word each) besides the verdict's own (trainyard.api.verdict).
INVALID_SPEC = reasons.INVALID_SPEC
SPEC_VALID = reasons.SPEC_VALID
RUN_NOT_FOUND = "RunNotFound"
RUN_NOT_FINISHED = "RunNotFinished"
RUN_FAILED = "RunFailed"
NO_MODEL = "NoModel"
EVALUATING = "Evaluating"
MORE_SAMPLES = "MoreSamples"
EVALUATION_FAILED = "EvaluationFailed"
RESULTS_READ = "ResultsRead"
RUN_METRICS = "RunMetrics"
UNDECIDED = "Undecided"

# A Job's state, from its conditions (batch/v1 condition types Complete and Failed).
JOB_COMPLETE = "Complete"
JOB_FAILED = "Failed"
JOB_RUNNING = "Running"

# A run's final metrics (status.progress) under the names criteria use.
PROGRESS_METRICS = {
    "loss": "loss",
    "rewardMean": "reward_mean",
    "kl": "kl",
    "step": "step",
    "epoch": "epoch",
}


@dataclass(frozen=True)
class EvalReading:
    """What the I/O layer read of one evaluation Job's eval.json (read once per Job uid)."""

    job_uid: str
    uri: str
    results: EvalResults | None
    problem: str | None = None
    """Why there are no results (absent, not valid), for the status message."""


@dataclass(frozen=True)
class GateObserved:
    """Everything a gate's reconcile looks at, read by the I/O layer."""

    gate: dict[str, Any]
    run: dict[str, Any] | None = None
    """The TrainingRun spec.run names (None: it does not exist, or the gate names none)."""
    children: list[dict[str, Any]] = field(default_factory=list)
    """The gate's evaluation ConfigMaps and Jobs."""
    reading: EvalReading | None = None
    """eval.json of the current attempt's completed Job, when read."""
    now: datetime | None = None
    image: str | None = None
    """The operator's default trainer image (evaluations of gates without a run image)."""


@dataclass(frozen=True)
class ResultsWanted:
    """The eval.json the reconcile needs read: that of a completed evaluation Job."""

    job_uid: str
    uri: str
    endpoint: str | None = None
    """The judged run's storage.s3.endpoint, where set."""


# -- what the I/O layer asks ----------------------------------------------------------------


def run_name_of(gate: dict[str, Any]) -> str | None:
    """spec.run of a gate body (unparsed: a run event maps to gates through it)."""
    spec = gate.get("spec")  # read before validation (on every run event): any shape may come
    run = spec.get("run") if isinstance(spec, dict) else None
    return run if isinstance(run, str) else None


def results_wanted(
    gate_body: dict[str, Any], run_body: dict[str, Any] | None, children: list[dict[str, Any]]
) -> ResultsWanted | None:
    """Which eval.json to read: the current attempt's, once its Job has completed."""
    gate = _parse_gate(gate_body)
    if gate is None or gate.spec.evaluation is None:
        return None
    if (gate_body.get("status") or {}).get("verdict") in DECIDED:
        return None  # a decision is final: nothing more to read
    attempts = int((gate_body.get("status") or {}).get("evaluationAttempts") or 0)
    if attempts < 1:
        return None
    job = _child(children, "Job", evaluation_name(gate.metadata.name, attempts))
    if job is None or _job_state(job)[0] != JOB_COMPLETE:
        return None
    run = _parse_run(run_body)
    base = _results_base(gate, run)
    if isinstance(base, _Problem):
        return None
    s3 = run.spec.storage.s3 if run is not None and run.spec.storage else None
    return ResultsWanted(
        job_uid=job["metadata"].get("uid", ""),
        uri=eval_results_uri(base, gate.metadata.name),
        endpoint=s3.endpoint if s3 is not None else None,
    )


# -- the reconcile --------------------------------------------------------------------------


@dataclass
class _Problem:
    reason: str
    message: str


class _Status:
    """The status being computed: typed fields, then conditions on the dict."""

    def __init__(self, body: dict[str, Any], now: datetime):
        self.old: dict[str, Any] | None = body.get("status")
        self.generation: int | None = (body.get("metadata") or {}).get("generation")
        self.now = now
        try:
            self.previous = PromotionGateStatus.model_validate(own_status(self.old))
        except ValueError:  # a status someone else wrote by hand
            self.previous = PromotionGateStatus()
        self.model = self.previous.model_copy()
        self.conditions: list[dict[str, Any]] | None = [
            dict(c) for c in (own_status(self.old).get("conditions") or [])
        ]
        self.creates: list[dict[str, Any]] = []
        self.deletes: list[ChildRef] = []

    def set(self, **fields: Any) -> None:
        self.model = self.model.model_copy(update=fields)

    def condition(self, type_: GateCondition, status: bool | str, reason: str, message: str):
        self.conditions = set_condition(
            self.conditions,
            str(type_),
            status,
            reason,
            message,
            now=self.now,
            generation=self.generation,
        )

    def verdict(self, verdict: str, reason: str, message: str) -> None:
        self.set(verdict=verdict, reason=reason, message=message)

    def plan(self) -> Plan:
        self.set(observed_generation=self.generation)
        verdict = self.model.verdict
        if verdict == GateVerdictName.PASSED:
            self.condition(
                GateCondition.PASSED, True, self.model.reason or "", self.model.message or ""
            )
        elif verdict == GateVerdictName.FAILED:
            self.condition(
                GateCondition.PASSED, False, self.model.reason or "", self.model.message or ""
            )
        elif verdict != GateVerdictName.INVALID:
            self.condition(
                GateCondition.PASSED,
                "Unknown",
                self.model.reason or UNDECIDED,
                self.model.message or "",
            )
        new = {k: v for k, v in self.model.to_yaml_dict().items() if k != "conditions"}
        new = _finite(new)
        new["conditions"] = self.conditions or []
        return Plan(
            status_patch=status_patch(self.old, new),
            deletes=tuple(self.deletes),
            creates=tuple(self.creates),
            status=new,
        )


def reconcile(observed: GateObserved) -> Plan:
    """The plan that moves the gate toward a verdict, and the status that tells why."""
    body = observed.gate
    now = observed.now or datetime.now(UTC)
    status = _Status(body, now)
    try:
        gate = _parse(body)
    except InvalidResource as invalid:
        message = "; ".join(invalid.problems)
        status.condition(GateCondition.VALID, False, INVALID_SPEC, message)
        status.verdict(GateVerdictName.INVALID, INVALID_SPEC, f"fix the spec: {message}")
        return status.plan()
    status.condition(GateCondition.VALID, True, SPEC_VALID, "the spec is valid")
    if status.previous.verdict in DECIDED:
        return status.plan()  # a decision is final; only the conditions' generation moves

    approval, rejection = seen_decisions(
        (body.get("metadata") or {}).get("annotations"), status.previous, now
    )
    spec = gate.spec
    run = None
    model_uri: str | None = spec.model.source if spec.model is not None else None
    if spec.run is not None:
        found = _run_state(spec.run, observed.run)
        if isinstance(found, _Problem):
            if rejection is not None:
                return _rejected_early(status, gate, observed, rejection)
            verdict = (
                GateVerdictName.FAILED if found.reason == RUN_FAILED else GateVerdictName.PENDING
            )
            status.verdict(verdict, found.reason, found.message)
            if verdict == GateVerdictName.FAILED:
                status.set(decided_at=format_time(now))
            return status.plan()
        run = found
        model_uri = _final_model(run)
    if rejection is not None and spec.evaluation is not None and not _has_results(gate, observed):
        return _rejected_early(status, gate, observed, rejection)
    status.set(model=model_uri)

    if spec.evaluation is None:
        assert run is not None  # a model gate without an evaluation does not parse
        metrics = run_metrics(observed.run or {})
        status.condition(
            GateCondition.EVALUATED,
            True,
            RUN_METRICS,
            f"the final metrics of TrainingRun {spec.run}",
        )
        return _judged(status, gate, metrics, approval, rejection, model_uri)
    return _evaluate(status, gate, run, observed, spec.evaluation, approval, rejection, model_uri)


def _evaluate(
    status: _Status,
    gate: PromotionGate,
    run: TrainingRun | None,
    observed: GateObserved,
    evaluation: Evaluation,
    approval: Any,
    rejection: Any,
    model_uri: str | None,
) -> Plan:
    name = gate.metadata.name
    base = _results_base(gate, run)
    if isinstance(base, _Problem):
        status.verdict(GateVerdictName.FAILED, base.reason, base.message)
        status.set(decided_at=format_time(status.now))
        return status.plan()
    output = eval_output_uri(base, name)
    results_uri = eval_results_uri(base, name)
    attempts = max(status.previous.evaluation_attempts or 0, 1)
    job_name = evaluation_name(name, attempts)
    status.set(
        evaluation_attempts=attempts,
        evaluation_job=job_name,
        eval_results=results_uri,
        report=f"{output}/{REPORT_FILE}",
    )
    job = _child(observed.children, "Job", job_name)
    if job is None:
        return _start(status, gate, run, observed, evaluation, attempts, model_uri, output)
    state, why = _job_state(job)
    if state == JOB_FAILED:
        message = f"evaluation Job {job_name} failed: {why}"
        status.condition(GateCondition.EVALUATED, False, EVALUATION_FAILED, message)
        status.verdict(GateVerdictName.FAILED, EVALUATION_FAILED, message)
        status.set(decided_at=format_time(status.now))
        return status.plan()
    if state != JOB_COMPLETE:
        message = f"evaluation Job {job_name} is running (attempt {attempts})"
        status.condition(GateCondition.EVALUATED, False, EVALUATING, message)
        status.verdict(GateVerdictName.EVALUATING, EVALUATING, message)
        return status.plan()
    reading = observed.reading
    if reading is None or reading.job_uid != job["metadata"].get("uid", ""):
        return status.plan()  # the I/O layer reads it before the next reconcile
    if reading.results is None:
        message = (
            f"evaluation Job {job_name} completed but its results are not usable: "
            f"{reading.problem or 'no eval.json'} ({reading.uri})"
        )
        status.condition(GateCondition.EVALUATED, False, EVALUATION_FAILED, message)
        status.verdict(GateVerdictName.FAILED, EVALUATION_FAILED, message)
        status.set(decided_at=format_time(status.now))
        return status.plan()
    results = reading.results
    if run is not None:
        results = with_run_metrics(results, run_metrics(observed.run or {}))
    status.condition(
        GateCondition.EVALUATED,
        True,
        RESULTS_READ,
        f"eval.json of {job_name} read from {reading.uri}",
    )
    status.set(baseline_model=results.baseline.model if results.baseline else None)
    plan_status = _judge(status, gate, results, approval, rejection, model_uri)
    more = evaluation.more_samples
    if (
        plan_status.criteria_outcome == INCONCLUSIVE
        and not plan_status.decided
        and attempts == 1
        and more is not None
        and evaluation.max_samples is not None
        and more > evaluation.max_samples
    ):
        next_attempt = attempts + 1
        message = (
            f"inconclusive on {evaluation.max_samples} records: evaluating again on up to "
            f"{more} (attempt {next_attempt})"
        )
        status.set(
            evaluation_attempts=next_attempt,
            evaluation_job=evaluation_name(name, next_attempt),
            awaiting_since=None,
        )
        status.condition(GateCondition.EVALUATED, False, MORE_SAMPLES, message)
        status.verdict(GateVerdictName.EVALUATING, MORE_SAMPLES, message)
        more_evaluation = evaluation.model_copy(update={"max_samples": more})
        status.creates.extend(
            _render(gate, run, observed, more_evaluation, next_attempt, model_uri, output)
        )
        return status.plan()
    return status.plan()


def _start(
    status: _Status,
    gate: PromotionGate,
    run: TrainingRun | None,
    observed: GateObserved,
    evaluation: Evaluation,
    attempt: int,
    model_uri: str | None,
    output: str,
) -> Plan:
    if attempt > 1 and evaluation.more_samples is not None:
        evaluation = evaluation.model_copy(update={"max_samples": evaluation.more_samples})
    status.creates.extend(_render(gate, run, observed, evaluation, attempt, model_uri, output))
    message = (
        f"evaluation Job {evaluation_name(gate.metadata.name, attempt)} created (attempt {attempt})"
    )
    status.condition(GateCondition.EVALUATED, False, EVALUATING, message)
    status.verdict(GateVerdictName.EVALUATING, EVALUATING, message)
    return status.plan()


def _render(
    gate: PromotionGate,
    run: TrainingRun | None,
    observed: GateObserved,
    evaluation: Evaluation,
    attempt: int,
    model_uri: str | None,
    output: str,
) -> list[dict[str, Any]]:
    model = gate.spec.model or ModelSource(source=model_uri or "")
    task = evaluation_task(evaluation, model=model, output=output, run=run.spec if run else None)
    uid = (observed.gate.get("metadata") or {}).get("uid", "")
    return render_evaluation(gate, task, uid=uid, attempt=attempt, run=run, image=observed.image)


def _judge(
    status: _Status,
    gate: PromotionGate,
    results: EvalResults | dict[str, float],
    approval: Any,
    rejection: Any,
    model_uri: str | None,
) -> GateVerdict:
    spec = gate.spec
    verdict = judge(
        spec,
        results,
        now=status.now,
        approval=approval,
        rejection=rejection,
        awaiting_since=awaiting_since_of(status.previous),
        seed=spec.evaluation.seed if spec.evaluation else 0,
    )
    status.model = verdict.apply(status.model)
    status.set(promoted_model=model_uri if verdict.verdict == GateVerdictName.PASSED else None)
    return verdict


def _judged(
    status: _Status,
    gate: PromotionGate,
    results: EvalResults | dict[str, float],
    approval: Any,
    rejection: Any,
    model_uri: str | None,
) -> Plan:
    _judge(status, gate, results, approval, rejection, model_uri)
    return status.plan()


def _rejected_early(
    status: _Status, gate: PromotionGate, observed: GateObserved, rejection: Any
) -> Plan:
    """A person rejected before any result: fail now, stop a running evaluation."""
    status.set(rejection=rejection.to_status(), decided_at=format_time(status.now))
    status.verdict(
        GateVerdictName.FAILED,
        REJECTED,
        f"rejected by {rejection.by} at {format_time(rejection.at)} before the criteria were judged",
    )
    for child in observed.children:
        if child.get("kind") == "Job" and _job_state(child)[0] == JOB_RUNNING:
            status.deletes.append(
                ChildRef(child.get("apiVersion") or "batch/v1", "Job", child["metadata"]["name"])
            )
    return status.plan()


def _has_results(gate: PromotionGate, observed: GateObserved) -> bool:
    """Whether the current attempt's eval.json is in (then `judge` weighs the rejection)."""
    attempts = int((observed.gate.get("status") or {}).get("evaluationAttempts") or 0)
    if attempts < 1 or observed.reading is None or observed.reading.results is None:
        return False
    job = _child(observed.children, "Job", evaluation_name(gate.metadata.name, attempts))
    return job is not None and job["metadata"].get("uid") == observed.reading.job_uid


def decision_event(gate: dict[str, Any], status: dict[str, Any], now: datetime) -> dict[str, Any]:
    """The core/v1 Event announcing a gate's decision (`kubectl describe promotiongate`):
    Normal when it passed, Warning when it failed, the status' reason and message."""
    meta = gate.get("metadata") or {}
    verdict = status.get("verdict")
    stamp = format_time(now)
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {
            "name": f"{meta.get('name')}.{int(now.timestamp() * 1e6):x}",
            "namespace": meta.get("namespace"),
        },
        "involvedObject": {
            "apiVersion": gate.get("apiVersion"),
            "kind": KIND,
            "name": meta.get("name"),
            "namespace": meta.get("namespace"),
            "uid": meta.get("uid"),
        },
        "type": "Normal" if verdict == GateVerdictName.PASSED else "Warning",
        "reason": status.get("reason") or str(verdict),
        "message": (status.get("message") or str(verdict))[:1024],
        "source": {"component": EVENT_SOURCE},
        "reportingComponent": EVENT_SOURCE,
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
    }


# -- reading the observation ----------------------------------------------------------------


def _document(body: dict[str, Any], kind: str = "PromotionGate") -> dict[str, Any]:
    """The resource as its author wrote it (`plan.user_document`), its kind defaulted."""
    document = user_document(body)
    document["kind"] = document["kind"] or kind
    return document


def _parse(body: dict[str, Any]) -> PromotionGate:
    gate = parse_resource(_document(body))
    if not isinstance(gate, PromotionGate):
        raise InvalidResource([f"kind: {body.get('kind')!r} is not PromotionGate"])
    if gate.spec.model is not None and gate.spec.evaluation is None:
        raise InvalidResource(
            [
                "spec.evaluation: a gate on a model (spec.model) needs an evaluation: a model "
                "has no metrics of its own (or name the TrainingRun in spec.run instead)"
            ]
        )
    return gate


def _parse_gate(body: dict[str, Any]) -> PromotionGate | None:
    try:
        return _parse(body)
    except InvalidResource:
        return None


def _parse_run(body: dict[str, Any] | None) -> TrainingRun | None:
    if body is None:
        return None
    document = _document(body, "TrainingRun")
    try:
        run = parse_resource(document)
    except InvalidResource:
        return None
    return run if isinstance(run, TrainingRun) else None


def _run_state(name: str, body: dict[str, Any] | None) -> TrainingRun | _Problem:
    if body is None:
        return _Problem(RUN_NOT_FOUND, f"waiting for TrainingRun {name}: it does not exist")
    run_status = body.get("status") or {}
    phase = run_status.get("phase")
    if phase == RunPhase.FAILED:
        why = run_status.get("message") or "no message"
        return _Problem(RUN_FAILED, f"TrainingRun {name} failed: {why}")
    if phase != RunPhase.SUCCEEDED:
        return _Problem(
            RUN_NOT_FINISHED,
            f"waiting for TrainingRun {name} to succeed (phase: {phase or 'not reported yet'})",
        )
    run = _parse_run(body)
    if run is None:
        return _Problem(
            RUN_NOT_FINISHED, f"TrainingRun {name} succeeded but its spec no longer parses"
        )
    return run


def _final_model(run: TrainingRun) -> str | None:
    """Where a finished run's model lies: `checkpoint.uri/final` (the pod contract)."""
    checkpoint = run.spec.checkpoint.uri if run.spec.checkpoint else None
    return f"{checkpoint.rstrip('/')}/{CHECKPOINT_FINAL}" if checkpoint else None


def _results_base(gate: PromotionGate, run: TrainingRun | None) -> str | _Problem:
    """Where the evaluation writes: beside the judged model (s3:// or file://)."""
    if gate.spec.run is not None:
        uri = _final_model(run) if run is not None else None
        if uri is None:
            return _Problem(
                NO_MODEL,
                f"TrainingRun {gate.spec.run} has no checkpoint.uri: its model was never "
                "stored, so there is nothing to evaluate",
            )
        return uri
    source = gate.spec.model.source if gate.spec.model is not None else ""
    if source.startswith(("s3://", "file://")):
        return source
    return _Problem(
        NO_MODEL,
        f"spec.model.source {source!r}: the evaluation writes eval.json beside the model, "
        "which needs an s3:// or file:// model (or name the TrainingRun in spec.run)",
    )


def run_metrics(run: dict[str, Any]) -> dict[str, float]:
    """A finished run's final metrics from status.progress, under the criteria's names."""
    progress = (run.get("status") or {}).get("progress") or {}
    metrics: dict[str, float] = {}
    for key, name in PROGRESS_METRICS.items():
        value = progress.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            metrics[name] = float(value)
    if "reward_mean" in metrics:
        metrics.setdefault("reward", metrics["reward_mean"])
    return metrics


def _child(children: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any] | None:
    return next(
        (c for c in children if c.get("kind") == kind and c["metadata"].get("name") == name), None
    )


def _job_state(job: dict[str, Any]) -> tuple[str, str]:
    """("Complete" | "Failed" | "Running", why) of a Job, from its conditions."""
    job_status = job.get("status") or {}
    for condition in job_status.get("conditions") or []:
        if condition.get("status") != "True":
            continue
        if condition.get("type") == JOB_COMPLETE:
            return JOB_COMPLETE, ""
        if condition.get("type") == JOB_FAILED:
            reason = condition.get("reason") or JOB_FAILED
            message = condition.get("message")
            return JOB_FAILED, f"{reason}: {message}" if message else reason
    return JOB_RUNNING, ""


def _finite(value: Any) -> Any:
    """NaN and infinities have no JSON form: a status carries them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
