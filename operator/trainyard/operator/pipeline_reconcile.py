"""Reconcile one TrainingPipeline: observed stage runs and gates in, a plan and status out.

Pure and level-triggered, like the TrainingRun's. The stages are walked in order; each
is in one of these states, decided by a table on what exists:

| stage's run      | its gate                    | stage      | the walk                      |
|------------------|-----------------------------|------------|-------------------------------|
| absent           |                             | Running    | create run (+ gate), stop     |
| not finished     |                             | Running    | stop                          |
| Failed           |                             | Failed     | pipeline Failed, stop         |
| Succeeded        | none in the spec            | Promoted   | next stage                    |
| Succeeded        | Passed                      | Promoted   | next stage                    |
| Succeeded        | Failed                      | Rejected   | pipeline Failed, stop         |
| Succeeded        | AwaitingApproval/Inconcl.   | Gating     | pipeline Paused, stop         |
| Succeeded        | anything else / absent      | Gating     | (create the gate), stop       |

A promoted stage hands its model on only once `provenance.json` lies beside it: a one-pod
Job with the stage's pod settings (its image and storage credentials: the operator never
writes to the user's storage with its own) writes the record this status holds, plus the
content fingerprints only a storage reader can take. Job absent: create it, stop; running:
stop; Complete: next stage; Failed (after its retries), or a model with no s3:// or file://
storage: the stage's `provenance` says why not, and the walk goes on (the record stays in
this status).

A stage starts only when every stage before it was promoted, with `run://previous`
resolved to the model the previous stage promoted. A failed or rejected stage runs again
when the `trainyard.dev/retry` annotation names it (its run and gate are deleted, then
made anew); promoted stages never rerun. A stage edited after it started keeps what it
started with, and says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from trainyard.api import InvalidResource, TrainingRun, parse_resource
from trainyard.api.pipeline import (
    RETRY_ANNOTATION,
    PipelineCondition,
    Stage,
    TrainingPipeline,
)
from trainyard.operator import reasons
from trainyard.operator.builders.pipeline import (
    SERVED_MODEL_ANNOTATION,
    STAGE_HASH_ANNOTATION,
    hands_on_adapter,
    promoted_model,
    provenance_image,
    provenance_name,
    render_pipeline_server,
    render_provenance,
    render_stage_gate,
    render_stage_run,
    serve_server_name,
    serving_source,
    stage_gate_name,
    stage_hash,
    stage_run_name,
)
from trainyard.operator.plan import ChildRef, Plan, is_owned, ref, user_document
from trainyard.operator.status import StatusDraft, format_time, status_patch

WAITING_VERDICTS = {"AwaitingApproval", "Inconclusive"}


@dataclass(frozen=True)
class PipelineObserved:
    """The pipeline and its children (stage runs and gates, as the informers hold them)."""

    pipeline: dict[str, Any]
    children: list[dict[str, Any]] = field(default_factory=list)
    now: datetime | None = None
    image: str | None = None
    """The operator's default trainer image (a stage's run may name its own)."""


def reconcile_pipeline(observed: PipelineObserved) -> Plan:
    body = observed.pipeline
    meta = body.get("metadata") or {}
    now = observed.now or datetime.now().astimezone()
    status = StatusDraft(body.get("status"), meta.get("generation"), now)
    try:
        pipeline = parse_resource(user_document(body))
    except InvalidResource as invalid:
        message = "; ".join(invalid.problems)
        status.condition(PipelineCondition.VALID, False, reasons.INVALID_SPEC, message)
        status.data.update(phase="Invalid", message=f"fix the spec: {message}")
        status.data["observedGeneration"] = meta.get("generation")
        return _plan(body, status, [], [])
    assert isinstance(pipeline, TrainingPipeline)
    status.condition(PipelineCondition.VALID, True, reasons.SPEC_VALID, "the spec is valid")
    status.data["observedGeneration"] = meta.get("generation")
    return _walk(pipeline, meta.get("uid", ""), observed, status)


def _walk(
    pipeline: TrainingPipeline, uid: str, observed: PipelineObserved, status: StatusDraft
) -> Plan:
    ours = [c for c in observed.children if is_owned(c, uid)]
    by_name = {(c.get("kind"), c["metadata"]["name"]): c for c in ours}
    name = pipeline.metadata.name
    deletes: list[ChildRef] = []
    creates: list[dict[str, Any]] = []
    retry = _retry(pipeline, status, by_name)
    if retry is not None:
        deletes += retry
    previous_model: str | None = None
    served: tuple[str, str | None] | None = None  # (model, adapter) of the newest promotion
    adapter_before = False  # whether the model handed to this stage is a LoRA adapter
    stages: list[dict[str, Any]] = []
    edited: list[str] = []
    phase, message, current = "Running", "", None
    old_stages = {s["name"]: s for s in (status.data.get("stages") or [])}
    for stage in pipeline.spec.stages:
        run_name, gate_name = stage_run_name(name, stage.name), stage_gate_name(name, stage.name)
        run = by_name.get(("TrainingRun", run_name))
        gate = by_name.get(("PromotionGate", gate_name)) if stage.gate is not None else None
        if any(d.name in (run_name, gate_name) for d in deletes):
            run = gate = None  # being retried: made anew on a later look
            stages.append(_stage(stage, run_name, gate_name, "Pending", "retrying"))
            current, message = stage.name, f"stage {stage.name}: retrying"
            break
        entry = _stage(stage, run_name, gate_name, "Running", "", old_stages.get(stage.name))
        entry["inputModel"] = previous_model if _from_previous(stage) else stage.run.model.source
        stages.append(entry)
        current = stage.name
        if run is None:
            creates.append(render_stage_run(pipeline, stage, uid=uid, model_source=previous_model))
            manifest = render_stage_gate(pipeline, stage, uid=uid)
            if manifest is not None and gate is None:
                creates.append(manifest)
            entry.update(
                startedAt=format_time(status.now),
                specHash=stage_hash(stage),
                message=f"run {run_name}: Pending",
            )
            message = f"stage {stage.name}: training"
            break
        started_hash = (run["metadata"].get("annotations") or {}).get(STAGE_HASH_ANNOTATION)
        if started_hash != stage_hash(stage):
            edited.append(stage.name)
        run_status = run.get("status") or {}
        entry.update(specHash=started_hash, finishedAt=run_status.get("completionTime"))
        if run_status.get("phase") == "Failed":
            entry.update(phase="Failed", message=run_status.get("message") or "the run failed")
            phase = "Failed"
            message = (
                f"stage {stage.name}: run {run_name} failed ({entry['message']}); fix the cause, "
                f"then kubectl annotate trainingpipeline {name} {RETRY_ANNOTATION}={stage.name} --overwrite"
            )
            status.condition(PipelineCondition.FAILED, True, reasons.STAGE_FAILED, message)
            break
        if run_status.get("phase") != "Succeeded":
            entry["message"] = f"run {run_name}: {run_status.get('phase') or 'Pending'}"
            message = f"stage {stage.name}: training"
            break
        entry["image"] = provenance_image(_parse_run(run), observed.image)
        if stage.gate is None:
            entry.update(phase="Promoted", model=promoted_model(stage, run_name, None))
            entry["message"] = "no gate: promoted when the run succeeded"
            if not _provenance(pipeline, stage, entry, run, None, by_name, creates, observed):
                message = f"stage {stage.name}: writing provenance.json beside {entry['model']}"
                break
            previous_model = entry["model"]
            served = serving_source(stage, entry["model"], entry["inputModel"], adapter_before)
            adapter_before = hands_on_adapter(stage)
            continue
        if gate is None:
            manifest = render_stage_gate(pipeline, stage, uid=uid)
            assert manifest is not None
            creates.append(manifest)
            entry.update(phase="Gating", message=f"gate {gate_name} created")
            message = f"stage {stage.name}: gating"
            break
        gate_status = gate.get("status") or {}
        verdict = gate_status.get("verdict")
        entry["verdict"] = verdict
        entry["approvedBy"] = (gate_status.get("approval") or {}).get("by")
        entry["gateResults"] = gate_status.get("results")
        if verdict == "Passed":
            entry.update(phase="Promoted", model=promoted_model(stage, run_name, gate_status))
            entry["message"] = gate_status.get("message") or "the gate passed"
            if not _provenance(
                pipeline, stage, entry, run, gate_status, by_name, creates, observed
            ):
                message = f"stage {stage.name}: writing provenance.json beside {entry['model']}"
                break
            previous_model = entry["model"]
            served = serving_source(stage, entry["model"], entry["inputModel"], adapter_before)
            adapter_before = hands_on_adapter(stage)
            continue
        if verdict == "Failed":
            entry.update(phase="Rejected", message=gate_status.get("message") or "the gate failed")
            phase = "Failed"
            message = (
                f"stage {stage.name}: gate {gate_name} rejected the model ({entry['message']}); "
                f"kubectl annotate trainingpipeline {name} {RETRY_ANNOTATION}={stage.name} "
                "--overwrite trains the stage again"
            )
            status.condition(PipelineCondition.FAILED, True, reasons.GATE_REJECTED, message)
            break
        entry.update(phase="Gating", message=gate_status.get("message") or "judging")
        if verdict in WAITING_VERDICTS:
            phase = "Paused"
            message = (
                f"stage {stage.name}: gate {gate_name} is {verdict} and waits for a person: "
                f"kubectl annotate promotiongate {gate_name} trainyard.dev/approved-by=NAME "
                "(or trainyard.dev/rejected-by=NAME)"
            )
            status.condition(PipelineCondition.PAUSED, True, reasons.AWAITING_PERSON, message)
        else:
            message = f"stage {stage.name}: gating ({verdict or 'Pending'})"
        break
    else:
        phase, current = "Succeeded", None
        message = f"every stage was promoted; the model is {previous_model}"
        status.condition(PipelineCondition.SUCCEEDED, True, reasons.ALL_PROMOTED, message)

    if phase != "Paused":
        status.clear(PipelineCondition.PAUSED, reasons.NOT_WAITING, "no gate waits for a person")
    if phase not in ("Failed",):
        status.clear(
            PipelineCondition.FAILED, reasons.RETRYING, "the failed stage is running again"
        )
    if edited:
        status.condition(
            PipelineCondition.SPEC_APPLIED,
            False,
            reasons.SPEC_CHANGE_PENDING,
            f"stages {', '.join(edited)} changed after they started and keep the spec they "
            f"started with; retry a stage ({RETRY_ANNOTATION}=STAGE) to run its new spec",
        )
    else:
        status.clear(
            PipelineCondition.SPEC_APPLIED, reasons.SPEC_APPLIED, "every stage runs its spec"
        )
    updates = _serve(pipeline, uid, by_name, served, status, creates)
    status.data.update(phase=phase, message=message, stages=stages)
    if current is None:
        status.data.pop("currentStage", None)
    else:
        status.data["currentStage"] = current
    return _plan(observed.pipeline, status, deletes, creates, updates)


def _serve(
    pipeline: TrainingPipeline,
    uid: str,
    by_name: dict[tuple[str, str], dict[str, Any]],
    served: tuple[str, str | None] | None,
    status: StatusDraft,
    creates: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    """The `serve` block: an InferenceServer for the newest promoted model, made when the
    first stage is promoted and rolled (replaced whole; the server controller rolls its
    Deployment, old model served until the new one is ready) on every later promotion.
    A LoRA stage's adapter is served by name on the model it was trained on."""
    if pipeline.spec.serve is None or served is None:
        return []
    name = serve_server_name(pipeline.metadata.name)
    model, adapter = served
    manifest = render_pipeline_server(pipeline, uid=uid, model=model, adapter=adapter)
    server = by_name.get(("InferenceServer", name))
    status.data["serving"] = {"server": name, "model": model}
    if adapter is not None:
        status.data["serving"]["adapter"] = adapter
    model = adapter or model
    if server is None:
        creates.append(manifest)
        return []
    served = (server["metadata"].get("annotations") or {}).get(SERVED_MODEL_ANNOTATION)
    return [manifest] if served != model else []


def _provenance(
    pipeline: TrainingPipeline,
    stage: Stage,
    entry: dict[str, Any],
    run: dict[str, Any],
    gate_status: dict[str, Any] | None,
    by_name: dict[tuple[str, str], dict[str, Any]],
    creates: list[dict[str, Any]],
    observed: PipelineObserved,
) -> bool:
    """Whether the stage's provenance is settled (written, or why not recorded in
    `entry["provenance"]`); False while its Job is made or runs."""
    model = entry["model"]
    if not model.startswith(("s3://", "file://")):
        entry["provenance"] = {
            "written": False,
            "message": f"{model} is not on s3:// or file:// storage: the record is in this "
            "status only",
        }
        return True
    name = provenance_name(pipeline.metadata.name, stage.name)
    uri = f"{model.rstrip('/')}/provenance.json"
    job = by_name.get(("Job", name))
    if job is None:
        uid = (observed.pipeline.get("metadata") or {}).get("uid", "")
        record = provenance_record(pipeline, stage, entry, run, gate_status)
        creates.extend(
            render_provenance(
                pipeline,
                stage,
                uid=uid,
                record=record,
                run=_parse_run(run),
                image=observed.image,
            )
        )
        entry["provenance"] = {"uri": uri, "job": name, "message": f"job {name} writes it"}
        return False
    state, why = _job_state(job)
    if state == "Running":
        entry["provenance"] = {"uri": uri, "job": name, "message": f"job {name} writes it"}
        return False
    if state == "Complete":
        entry["provenance"] = {"uri": uri, "job": name, "written": True}
        return True
    entry["provenance"] = {
        "uri": uri,
        "job": name,
        "written": False,
        "message": f"job {name} failed ({why}): the record is in this status only; "
        f"kubectl logs job/{name} says why",
    }
    return True


def provenance_record(
    pipeline: TrainingPipeline,
    stage: Stage,
    entry: dict[str, Any],
    run: dict[str, Any],
    gate_status: dict[str, Any] | None,
) -> dict[str, Any]:
    """What made the stage's model, as far as the cluster knows it: the workload adds the
    fingerprints of the input model, the data and the model itself."""
    dataset = stage.run.dataset
    run_status = run.get("status") or {}
    gate: dict[str, Any] | None = None
    if gate_status is not None:
        gate = {
            "name": entry.get("gate"),
            "verdict": gate_status.get("verdict"),
            "message": gate_status.get("message"),
            "results": gate_status.get("results"),
            "approval": gate_status.get("approval"),
            "evalResults": gate_status.get("evalResults"),
        }
    return {
        "pipeline": pipeline.metadata.name,
        "namespace": pipeline.metadata.namespace,
        "stage": stage.name,
        "run": entry.get("run"),
        "runUid": (run.get("metadata") or {}).get("uid"),
        "method": stage.run.method,
        "model": entry.get("model"),
        "inputModel": entry.get("inputModel"),
        "dataset": {
            k: v
            for k, v in {
                "source": dataset.source,
                "config": dataset.config,
                "split": dataset.split,
            }.items()
            if v is not None
        },
        "specHash": entry.get("specHash"),
        "image": entry.get("image"),
        "startedAt": entry.get("startedAt"),
        "finishedAt": entry.get("finishedAt"),
        "trainedSteps": (run_status.get("progress") or {}).get("step"),
        "gate": gate,
    }


def _parse_run(body: dict[str, Any]) -> TrainingRun | None:
    try:
        run = parse_resource(user_document(body))
    except InvalidResource:
        return None
    return run if isinstance(run, TrainingRun) else None


def _job_state(job: dict[str, Any]) -> tuple[str, str]:
    """("Complete" | "Failed" | "Running", why) of a Job, from its batch/v1 conditions."""
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("status") != "True":
            continue
        if condition.get("type") == "Complete":
            return "Complete", ""
        if condition.get("type") == "Failed":
            reason = condition.get("reason") or "Failed"
            message = condition.get("message")
            return "Failed", f"{reason}: {message}" if message else reason
    return "Running", ""


def _retry(
    pipeline: TrainingPipeline,
    status: StatusDraft,
    by_name: dict[tuple[str, str], dict[str, Any]],
) -> list[ChildRef] | None:
    """A new `trainyard.dev/retry` value naming a failed or rejected stage: its run and gate go."""
    value = (pipeline.metadata.annotations or {}).get(RETRY_ANNOTATION)
    if not value or value == status.data.get("lastRetry"):
        return None
    status.data["lastRetry"] = value
    stage_name = value.split("#", 1)[0]
    stages = {s["name"]: s for s in status.data.get("stages") or []}
    if stage_name not in stages or stages[stage_name].get("phase") not in ("Failed", "Rejected"):
        known = ", ".join(
            s["name"] for s in stages.values() if s.get("phase") in ("Failed", "Rejected")
        )
        status.condition(
            PipelineCondition.RETRIED,
            False,
            reasons.RETRY_REFUSED,
            f"{RETRY_ANNOTATION}={value}: only a failed or rejected stage can be retried"
            + (f" ({known})" if known else "; none is"),
        )
        return None
    status.condition(
        PipelineCondition.RETRIED, True, reasons.RETRY_ACCEPTED, f"stage {stage_name} runs again"
    )
    name = pipeline.metadata.name
    return [
        ref(child)
        for key in (
            ("TrainingRun", stage_run_name(name, stage_name)),
            ("PromotionGate", stage_gate_name(name, stage_name)),
        )
        if (child := by_name.get(key)) is not None
    ]


def _from_previous(stage: Stage) -> bool:
    return stage.run.model.source == "run://previous"


def _stage(
    stage: Stage,
    run_name: str,
    gate_name: str,
    phase: str,
    message: str,
    old: dict[str, Any] | None = None,
) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": stage.name,
        "phase": phase,
        "run": run_name,
        "dataset": stage.run.dataset.source,
    }
    if stage.gate is not None:
        entry["gate"] = gate_name
    if old and old.get("startedAt"):
        entry["startedAt"] = old["startedAt"]
    if message:
        entry["message"] = message
    return entry


def _plan(
    body: dict[str, Any],
    status: StatusDraft,
    deletes: list[ChildRef],
    creates: list[dict[str, Any]],
    updates: list[dict[str, Any]] | None = None,
) -> Plan:
    stages = status.data.get("stages")
    if stages is not None:  # drop unset fields so an unchanged stage compares equal
        status.data["stages"] = [{k: v for k, v in s.items() if v is not None} for s in stages]
    return Plan(
        status_patch=status_patch(body.get("status"), status.data),
        deletes=tuple(dict.fromkeys(deletes)),
        creates=tuple(creates),
        status=status.data,
        updates=tuple(updates or ()),
    )
