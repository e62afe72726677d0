"""gate_reconcile as a table: one named observation per decision, the verdict, reason and
writes it must give. Pure: no API server, a fixed clock."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from trainyard.api.gate import PromotionGateStatus
from trainyard.api.verdict import (
    APPROVED_BY_ANNOTATION,
    REJECTED_BY_ANNOTATION,
    EvalResults,
    MetricSamples,
)
from trainyard.operator import gate_controller
from trainyard.operator.builders.evaluation import GATE_LABEL, TASK_KEY
from trainyard.operator.gate_reconcile import (
    EvalReading,
    GateObserved,
    reconcile,
    results_wanted,
)

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
CKPT = "s3://ckpt/runs/sft"


def gate(
    *,
    run: str | None = "sft",
    status: dict | None = None,
    annotations: dict | None = None,
    **spec: Any,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "trainyard.dev/v1alpha1",
        "kind": "PromotionGate",
        "metadata": {"name": "release", "namespace": "ml", "uid": "gate-uid", "generation": 1},
        "spec": {"criteria": ["accuracy >= 0.6"], **spec},
    }
    if run is not None:
        body["spec"]["run"] = run
    if annotations:
        body["metadata"]["annotations"] = annotations
    if status is not None:
        body["status"] = status
    return body


def evaluation(**extra: Any) -> dict[str, Any]:
    return {"suite": ["accuracy"], "dataset": "s3://data/eval.jsonl", **extra}


def run(phase: str | None = "Succeeded", progress: dict | None = None, **spec: Any) -> dict:
    status: dict[str, Any] = {"phase": phase} if phase else {}
    if phase == "Failed":
        status["message"] = "restart budget exhausted (2 of 2)"
    if progress:
        status["progress"] = progress
    return {
        "apiVersion": "trainyard.dev/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": "sft", "namespace": "ml", "uid": "run-uid"},
        "spec": {
            "method": "sft",
            "model": {"source": "hf://sshleifer/tiny-gpt2"},
            "dataset": {"source": "s3://data/train.jsonl"},
            "distributed": {"nodes": 1, "gpusPerNode": 2},
            "checkpoint": {"uri": CKPT},
            **spec,
        },
        "status": status,
    }


def job(name: str = "release-eval-1", state: str | None = None, uid: str = "job-1") -> dict:
    conditions = []
    if state == "Complete":
        conditions = [{"type": "Complete", "status": "True"}]
    elif state == "Failed":
        conditions = [
            {
                "type": "Failed",
                "status": "True",
                "reason": "BackoffLimitExceeded",
                "message": "Job has reached the specified backoff limit",
            }
        ]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": "ml", "uid": uid},
        "status": {"conditions": conditions},
    }


def results(accuracy: float, n: int = 0) -> EvalResults:
    samples = {}
    if n:
        hits = round(accuracy * n)
        samples["accuracy"] = MetricSamples(
            ids=[str(i) for i in range(n)], values=[1.0] * hits + [0.0] * (n - hits)
        )
    return EvalResults(model=f"{CKPT}/final", metrics={"accuracy": accuracy}, samples=samples)


def reading(found: EvalResults | None, uid: str = "job-1") -> EvalReading:
    uri = f"{CKPT}/final/eval/release/eval.json"
    return EvalReading(uid, uri, found, None if found else f"no eval.json at {uri}")


EVALUATING = {"verdict": "Evaluating", "evaluationAttempts": 1, "evaluationJob": "release-eval-1"}
AWAITING = {
    "verdict": "AwaitingApproval",
    "awaitingSince": "2026-03-01T11:00:00Z",
    "model": f"{CKPT}/final",
}


@dataclass
class Case:
    observed: GateObserved
    verdict: str | None
    reason: str | None = None
    message: str = ""
    creates: list[str] = field(default_factory=list)
    deletes: list[str] = field(default_factory=list)


CASES = {
    "a criterion that does not parse is Invalid": Case(
        GateObserved(gate(criteria=["accuracy >>> 0.6"]), run()),
        "Invalid",
        "InvalidSpec",
        "criteria[0]",
    ),
    "a model gate without an evaluation is Invalid": Case(
        GateObserved(gate(run=None, model={"source": "s3://m/final"}), None),
        "Invalid",
        "InvalidSpec",
        "spec.evaluation",
    ),
    "a missing run keeps the gate Pending, naming it": Case(
        GateObserved(gate(), None), "Pending", "RunNotFound", "TrainingRun sft"
    ),
    "a running run keeps the gate Pending": Case(
        GateObserved(gate(), run("Running")), "Pending", "RunNotFinished", "phase: Running"
    ),
    "a failed run fails the gate": Case(
        GateObserved(gate(), run("Failed")), "Failed", "RunFailed", "restart budget exhausted"
    ),
    "no evaluation: the run's final metrics pass": Case(
        GateObserved(gate(criteria=["loss <= 1.0"]), run(progress={"loss": 0.7})),
        "Passed",
        "CriteriaMet",
    ),
    "no evaluation: a metric the run never reported fails": Case(
        GateObserved(gate(criteria=["eval_loss <= 1.0"]), run(progress={"loss": 0.7})),
        "Failed",
        "MetricMissing",
        "eval_loss was not reported",
    ),
    "an evaluation starts once the run succeeded": Case(
        GateObserved(gate(evaluation=evaluation()), run()),
        "Evaluating",
        "Evaluating",
        "release-eval-1",
        creates=["ConfigMap/release-eval-1", "Job/release-eval-1"],
    ),
    "a running evaluation Job keeps the gate Evaluating": Case(
        GateObserved(gate(evaluation=evaluation(), status=EVALUATING), run(), [job()]),
        "Evaluating",
        "Evaluating",
        "is running",
    ),
    "a failed evaluation Job fails the gate with its reason": Case(
        GateObserved(
            gate(evaluation=evaluation(), status=EVALUATING), run(), [job(state="Failed")]
        ),
        "Failed",
        "EvaluationFailed",
        "BackoffLimitExceeded",
    ),
    "a completed Job whose eval.json is not read yet changes nothing": Case(
        GateObserved(
            gate(evaluation=evaluation(), status=EVALUATING), run(), [job(state="Complete")]
        ),
        "Evaluating",
    ),
    "a completed Job without eval.json fails the gate": Case(
        GateObserved(
            gate(evaluation=evaluation(), status=EVALUATING),
            run(),
            [job(state="Complete")],
            reading(None),
        ),
        "Failed",
        "EvaluationFailed",
        "no eval.json at s3://ckpt/runs/sft/final/eval/release/eval.json",
    ),
    "eval.json that meets the criteria passes": Case(
        GateObserved(
            gate(evaluation=evaluation(), status=EVALUATING),
            run(),
            [job(state="Complete")],
            reading(results(0.8)),
        ),
        "Passed",
        "CriteriaMet",
    ),
    "eval.json below the threshold fails, naming the criterion": Case(
        GateObserved(
            gate(evaluation=evaluation(), status=EVALUATING),
            run(),
            [job(state="Complete")],
            reading(results(0.4)),
        ),
        "Failed",
        "CriterionFailed",
        "accuracy >= 0.6",
    ),
    "a reading of an older Job is not this attempt's": Case(
        GateObserved(
            gate(evaluation=evaluation(), status=EVALUATING),
            run(),
            [job(state="Complete", uid="job-2")],
            reading(results(0.8), uid="job-1"),
        ),
        "Evaluating",
    ),
    "manual approval: criteria met wait for a person": Case(
        GateObserved(
            gate(criteria=["loss <= 1"], manualApproval=True), run(progress={"loss": 0.5})
        ),
        "AwaitingApproval",
        "AwaitingApproval",
        APPROVED_BY_ANNOTATION,
    ),
    "manual approval: an approval seen after awaitingSince passes": Case(
        GateObserved(
            gate(
                criteria=["loss <= 1"],
                manualApproval=True,
                status=AWAITING,
                annotations={APPROVED_BY_ANNOTATION: "alice"},
            ),
            run(progress={"loss": 0.5}),
        ),
        "Passed",
        "Approved",
        "approved by alice",
    ),
    "manual approval: an approval seen before the criteria does not count": Case(
        GateObserved(
            gate(
                criteria=["loss <= 1"],
                manualApproval=True,
                annotations={APPROVED_BY_ANNOTATION: "alice"},
            ),
            run(progress={"loss": 0.5}),
        ),
        "AwaitingApproval",
        "AwaitingApproval",
        "does not count",
    ),
    "a rejection while evaluating fails the gate and stops the Job": Case(
        GateObserved(
            gate(
                evaluation=evaluation(),
                status=EVALUATING,
                annotations={REJECTED_BY_ANNOTATION: "bob"},
            ),
            run(),
            [job()],
        ),
        "Failed",
        "Rejected",
        "rejected by bob",
        deletes=["Job/release-eval-1"],
    ),
    "a rejection of judged results fails the gate": Case(
        GateObserved(
            gate(criteria=["loss <= 1"], annotations={REJECTED_BY_ANNOTATION: "bob"}),
            run(progress={"loss": 0.5}),
        ),
        "Failed",
        "Rejected",
        "rejected by bob",
    ),
    "an hf:// model has nowhere for eval.json": Case(
        GateObserved(gate(run=None, model={"source": "hf://org/m"}, evaluation=evaluation()), None),
        "Failed",
        "NoModel",
        "s3:// or file://",
    ),
    "a model gate evaluates beside its s3:// model": Case(
        GateObserved(gate(run=None, model={"source": "s3://m/final"}, evaluation=evaluation())),
        "Evaluating",
        "Evaluating",
        creates=["ConfigMap/release-eval-1", "Job/release-eval-1"],
    ),
    "inconclusive with moreSamples: a second evaluation on more records": Case(
        GateObserved(
            gate(
                criteria=[{"metric": "accuracy", "op": ">=", "value": 0.6, "confidence": 0.95}],
                evaluation=evaluation(maxSamples=10, moreSamples=200),
                status=EVALUATING,
            ),
            run(),
            [job(state="Complete")],
            reading(results(0.6, n=10)),
        ),
        "Evaluating",
        "MoreSamples",
        "evaluating again on up to 200",
        creates=["ConfigMap/release-eval-2", "Job/release-eval-2"],
    ),
    "inconclusive after the second evaluation waits for a person": Case(
        GateObserved(
            gate(
                criteria=[{"metric": "accuracy", "op": ">=", "value": 0.6, "confidence": 0.95}],
                evaluation=evaluation(maxSamples=10, moreSamples=200),
                status={**EVALUATING, "evaluationAttempts": 2, "evaluationJob": "release-eval-2"},
            ),
            run(),
            [job(state="Complete"), job("release-eval-2", "Complete", uid="job-2")],
            reading(results(0.6, n=10), uid="job-2"),
        ),
        "Inconclusive",
        "Inconclusive",
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_gate_decision(name):
    case = CASES[name]
    plan = reconcile(replace(case.observed, now=NOW))
    status = plan.status
    assert status.get("verdict") == case.verdict, status
    if case.reason is not None:
        assert status.get("reason") == case.reason, status
    assert case.message in (status.get("message") or ""), status.get("message")
    assert [f"{c['kind']}/{c['metadata']['name']}" for c in plan.creates] == case.creates
    assert [f"{d.kind}/{d.name}" for d in plan.deletes] == case.deletes
    PromotionGateStatus.model_validate(status)  # what the CRD's schema describes
    json.dumps(status, allow_nan=False)  # no NaN reaches the API server


def converge(observed: GateObserved) -> tuple[dict, Any]:
    """Apply one plan's status and reconcile again, as the runtime would."""
    plan = reconcile(observed)
    again = replace(
        observed, gate={**observed.gate, "status": plan.status}, now=NOW + timedelta(minutes=5)
    )
    return plan.status, reconcile(again)


@pytest.mark.parametrize(
    "name",
    [
        "a missing run keeps the gate Pending, naming it",
        "no evaluation: the run's final metrics pass",
        "a failed evaluation Job fails the gate with its reason",
        "eval.json that meets the criteria passes",
        "manual approval: criteria met wait for a person",
        "a bad criterion",
    ],
)
def test_a_second_reconcile_of_the_same_world_writes_nothing(name):
    observed = (
        CASES[name].observed
        if name in CASES
        else CASES["a criterion that does not parse is Invalid"].observed
    )
    _, plan = converge(replace(observed, now=NOW))
    assert plan.is_empty, plan


def test_a_decision_is_final():
    passed, _ = converge(
        replace(CASES["eval.json that meets the criteria passes"].observed, now=NOW)
    )
    later = GateObserved(
        gate(evaluation=evaluation(), status=passed, annotations={REJECTED_BY_ANNOTATION: "bob"}),
        run("Failed"),
        [],
        now=NOW + timedelta(hours=1),
    )
    plan = reconcile(later)
    assert plan.is_empty and plan.status["verdict"] == "Passed"


def test_the_evaluation_job_carries_the_runs_pod_settings_and_the_task():
    observed = GateObserved(
        gate(evaluation=evaluation()),
        run(
            scheduling={"queue": "team-a", "nodeSelector": {"gpu": "h100"}},
            storage={"s3": {"endpoint": "http://minio:9000", "credentialsSecret": "s3-creds"}},
        ),
        now=NOW,
        image="ghcr.io/trainyard/trainer:test",
    )
    config_map, created = reconcile(observed).creates
    assert {c["kind"] for c in (config_map, created)} <= set(gate_controller.CHILD_KINDS)
    for child in (config_map, created):
        assert child["metadata"]["labels"][GATE_LABEL] == "release"
        (owner,) = child["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["uid"], owner["controller"]) == (
            "PromotionGate",
            "gate-uid",
            True,
        )
    task = json.loads(config_map["data"][TASK_KEY])
    assert task["model"]["source"] == f"{CKPT}/final"
    assert task["output"] == f"{CKPT}/final/eval/release"
    assert task["checkpointUri"] == CKPT
    assert created["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert created["spec"]["suspend"] is True  # Kueue admits it
    pod = created["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "ghcr.io/trainyard/trainer:test"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2  # the run's per node
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["nodeSelector"] == {"gpu": "h100"}
    env = {e["name"]: e for e in container["env"]}
    assert env["AWS_ENDPOINT_URL"]["value"] == "http://minio:9000"
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "s3-creds"


def test_results_are_wanted_only_from_the_current_completed_job():
    body = gate(evaluation=evaluation(), status=EVALUATING)
    assert results_wanted(body, run(), [job()]) is None
    wanted = results_wanted(
        body, run(storage={"s3": {"endpoint": "http://minio:9000"}}), [job(state="Complete")]
    )
    assert wanted is not None
    assert (wanted.job_uid, wanted.uri, wanted.endpoint) == (
        "job-1",
        f"{CKPT}/final/eval/release/eval.json",
        "http://minio:9000",
    )
    assert results_wanted(gate(evaluation=evaluation()), run(), [job(state="Complete")]) is None
    assert results_wanted(gate(criteria=["x >>> 1"]), run(), []) is None


def test_the_crd_lists_exactly_the_conditions_and_verdicts_the_code_sets():
    import ast
    from pathlib import Path

    import yaml

    from trainyard.api.gate import VERDICTS
    from trainyard.operator import gate_reconcile
    from trainyard.operator.gate_reconcile import GateCondition, GateVerdictName

    repo = Path(__file__).resolve().parents[2]
    crd = yaml.safe_load((repo / "crds" / "trainyard.dev_promotiongates.yaml").read_text())
    status = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    documented = {
        word.strip(" .") for word in status["properties"]["conditions"]["description"].split(",")
    }
    assert documented == {c.value for c in GateCondition}
    assert set(status["properties"]["verdict"]["enum"]) == set(VERDICTS)
    assert {v.value for v in GateVerdictName} <= set(VERDICTS)
    # the module spells no condition type or verdict outside its constants
    tree = ast.parse(Path(gate_reconcile.__file__).read_text())
    constants = {
        id(node.value)
        for holder in [tree, *(c for c in tree.body if isinstance(c, ast.ClassDef))]
        for node in holder.body
        if isinstance(node, ast.Assign)
    }
    spelled = {
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in constants
    }
    names = {c.value for c in GateCondition} | set(VERDICTS)
    assert not spelled & names, spelled & names


@pytest.mark.parametrize(
    ("body", "run", "verdict"),
    [
        pytest.param(gate(), "sft", "Pending", id="named run"),
        pytest.param(
            gate(run=None, model={"source": "s3://m"}), None, "Invalid", id="model, no evaluation"
        ),
        pytest.param({"spec": "not a mapping"}, None, "Invalid", id="malformed spec"),
        pytest.param({"spec": {"run": 3}}, None, "Invalid", id="malformed run"),
        pytest.param({"spec": None}, None, "Invalid", id="no spec"),
    ],
)
def test_any_shape_of_gate_is_followed_and_judged_without_raising(body, run, verdict):
    from trainyard.operator.gate_reconcile import run_name_of

    assert run_name_of(body) == run
    observed = GateObserved({**body, "metadata": {"name": "g", "namespace": "ml"}}, now=NOW)
    assert reconcile(observed).status["verdict"] == verdict
