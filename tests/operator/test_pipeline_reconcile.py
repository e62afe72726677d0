"""reconcile_pipeline(): stage runs and gates in, plan and status out. Named table cases."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from typing import Any

import pytest

from trainyard.api.pipeline import RETRY_ANNOTATION, PipelineCondition
from trainyard.operator import reasons
from trainyard.operator.builders.pipeline import STAGE_HASH_ANNOTATION
from trainyard.operator.pipeline_reconcile import PipelineObserved, reconcile_pipeline
from trainyard.operator.plan import Plan

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
UID = "pipe-uid"


def stage(name: str, *, source: str = "run://previous", gate: dict | None = None) -> dict:
    body: dict[str, Any] = {
        "name": name,
        "run": {
            "method": "sft",
            "model": {"source": source},
            "dataset": {"source": "s3://data/train.jsonl"},
            "checkpoint": {"uri": f"s3://ckpt/p/{name}"},
        },
    }
    if gate is not None:
        body["gate"] = gate
    return body


GATE = {"criteria": ["eval_loss <= 1.8"]}


class Pipeline:
    """A pipeline and what exists around it; `.reconcile()` plans, `.apply()` pretends."""

    def __init__(self, *stages: dict):
        self.body = {
            "apiVersion": "trainyard.dev/v1alpha1",
            "kind": "TrainingPipeline",
            "metadata": {"name": "p", "namespace": "ml", "uid": UID, "generation": 1},
            "spec": {"stages": list(stages)},
        }
        self.children: list[dict[str, Any]] = []

    def reconcile(self) -> Plan:
        return reconcile_pipeline(PipelineObserved(self.body, self.children, NOW))

    def apply(self, plan: Plan) -> Pipeline:
        self.body["status"] = copy.deepcopy(plan.status)
        gone = {(d.kind, d.name) for d in plan.deletes}
        self.children = [c for c in self.children if (c["kind"], c["metadata"]["name"]) not in gone]
        for manifest in plan.creates:
            child = copy.deepcopy(manifest)
            child["metadata"]["uid"] = f"uid-{child['metadata']['name']}"
            self.children.append(child)
        return self

    def child(self, kind: str, name: str) -> dict[str, Any]:
        return next(c for c in self.children if c["kind"] == kind and c["metadata"]["name"] == name)

    def run_phase(self, name: str, phase: str, message: str = "") -> Pipeline:
        self.child("TrainingRun", name)["status"] = {"phase": phase, "message": message}
        return self

    def verdict(self, name: str, verdict: str, message: str = "", **extra: Any) -> Pipeline:
        self.child("PromotionGate", name)["status"] = {
            "verdict": verdict,
            "message": message,
            **extra,
        }
        return self

    def step(self) -> Plan:
        plan = self.reconcile()
        self.apply(plan)
        return plan

    def provenance(self, stage: str, outcome: str = "Complete", message: str = "") -> Pipeline:
        """The stage's provenance Job finished (`Complete` or `Failed`)."""
        self.child("Job", f"p-{stage}-provenance")["status"] = {
            "conditions": [{"type": outcome, "status": "True", "message": message}]
        }
        return self

    def promote(self, stage: str) -> Plan:
        """The stage's provenance Job is made and completes: the walk goes on."""
        assert created(self.step()) == [
            f"ConfigMap/p-{stage}-provenance",
            f"Job/p-{stage}-provenance",
        ]
        return self.provenance(stage).step()


def task_of(pipeline: Pipeline, stage: str) -> dict[str, Any]:
    config_map = pipeline.child("ConfigMap", f"p-{stage}-provenance")
    return json.loads(config_map["data"]["provenance.json"])


def created(plan: Plan) -> list[str]:
    return [f"{m['kind']}/{m['metadata']['name']}" for m in plan.creates]


def condition(plan: Plan, type_: str) -> dict[str, Any] | None:
    return next((c for c in plan.status.get("conditions") or [] if c["type"] == type_), None)


def test_the_first_stage_starts_with_its_gate_and_nothing_else():
    pipeline = Pipeline(stage("sft", source="hf://org/base", gate=GATE), stage("dpo"))
    plan = pipeline.step()
    assert created(plan) == ["TrainingRun/p-sft", "PromotionGate/p-sft-gate"]
    run = pipeline.child("TrainingRun", "p-sft")
    assert run["metadata"]["ownerReferences"][0]["uid"] == UID
    assert run["metadata"]["labels"]["trainyard.dev/pipeline"] == "p"
    assert pipeline.child("PromotionGate", "p-sft-gate")["spec"]["run"] == "p-sft"
    assert plan.status["phase"] == "Running" and plan.status["currentStage"] == "sft"
    assert pipeline.reconcile().is_empty, "running twice writes nothing"


def test_the_next_stage_starts_only_when_the_gate_passed_with_the_promoted_model():
    pipeline = Pipeline(stage("sft", source="hf://org/base", gate=GATE), stage("dpo"))
    pipeline.step()
    pipeline.run_phase("p-sft", "Succeeded")
    plan = pipeline.step()
    assert created(plan) == [] and plan.status["stages"][0]["phase"] == "Gating"
    pipeline.verdict("p-sft-gate", "Passed", promotedModel="s3://ckpt/p/sft/final")
    plan = pipeline.step()
    assert created(plan) == ["ConfigMap/p-sft-provenance", "Job/p-sft-provenance"], (
        "the model is handed on once provenance.json lies beside it"
    )
    assert plan.status["stages"][0]["provenance"]["uri"] == "s3://ckpt/p/sft/final/provenance.json"
    assert pipeline.reconcile().is_empty, "the next stage waits for the provenance Job"
    plan = pipeline.provenance("sft").step()
    assert created(plan) == ["TrainingRun/p-dpo"]
    assert plan.status["stages"][0]["provenance"]["written"] is True
    assert pipeline.child("TrainingRun", "p-dpo")["spec"]["model"]["source"] == (
        "s3://ckpt/p/sft/final"
    )
    assert plan.status["stages"][1]["inputModel"] == "s3://ckpt/p/sft/final"
    pipeline.run_phase("p-dpo", "Succeeded")
    plan = pipeline.promote("dpo")
    assert plan.status["phase"] == "Succeeded"
    assert condition(plan, PipelineCondition.SUCCEEDED)["reason"] == reasons.ALL_PROMOTED


@pytest.mark.parametrize(
    ("verdict", "phase", "condition_type", "reason"),
    [
        ("Failed", "Failed", PipelineCondition.FAILED, reasons.GATE_REJECTED),
        ("AwaitingApproval", "Paused", PipelineCondition.PAUSED, reasons.AWAITING_PERSON),
        ("Inconclusive", "Paused", PipelineCondition.PAUSED, reasons.AWAITING_PERSON),
        ("Evaluating", "Running", None, None),
    ],
    ids=["rejected stops", "awaiting approval pauses", "inconclusive pauses", "evaluating waits"],
)
def test_a_gate_that_did_not_pass(verdict, phase, condition_type, reason):
    pipeline = Pipeline(stage("sft", source="hf://org/base", gate=GATE), stage("dpo"))
    pipeline.step()
    pipeline.run_phase("p-sft", "Succeeded").verdict("p-sft-gate", verdict, "eval_loss 2.1 > 1.8")
    plan = pipeline.step()
    assert plan.status["phase"] == phase
    assert created(plan) == [], "the next stage does not start"
    if condition_type is not None:
        found = condition(plan, condition_type)
        assert found["status"] == "True" and found["reason"] == reason
        assert "p-sft-gate" in found["message"]
    if verdict == "Failed":
        assert "eval_loss 2.1 > 1.8" in plan.status["message"]
        assert plan.status["stages"][0]["phase"] == "Rejected"


def test_a_failed_run_fails_the_pipeline_naming_the_stage_and_retry_runs_it_again():
    pipeline = Pipeline(stage("sft", source="hf://org/base", gate=GATE), stage("dpo"))
    pipeline.step()
    pipeline.run_phase("p-sft", "Failed", "RestartBudgetExhausted: OOM")
    plan = pipeline.step()
    assert plan.status["phase"] == "Failed"
    assert "stage sft" in plan.status["message"] and "OOM" in plan.status["message"]
    pipeline.body["metadata"]["annotations"] = {RETRY_ANNOTATION: "sft"}
    plan = pipeline.step()
    assert sorted((d.kind, d.name) for d in plan.deletes) == [
        ("PromotionGate", "p-sft-gate"),
        ("TrainingRun", "p-sft"),
    ]
    assert condition(plan, PipelineCondition.RETRIED)["status"] == "True"
    plan = pipeline.step()
    assert created(plan) == ["TrainingRun/p-sft", "PromotionGate/p-sft-gate"]
    assert condition(plan, PipelineCondition.FAILED)["status"] == "False"
    assert pipeline.reconcile().is_empty, "the same annotation is not acted on twice"


def test_a_promoted_stage_is_never_retried():
    pipeline = Pipeline(stage("sft", source="hf://org/base"), stage("dpo"))
    pipeline.step()
    pipeline.run_phase("p-sft", "Succeeded")
    pipeline.promote("sft")
    pipeline.body["metadata"]["annotations"] = {RETRY_ANNOTATION: "sft"}
    plan = pipeline.step()
    assert plan.deletes == ()
    refused = condition(plan, PipelineCondition.RETRIED)
    assert refused["status"] == "False" and refused["reason"] == reasons.RETRY_REFUSED


def test_editing_a_started_stage_is_refused_in_status_and_an_unstarted_one_applies():
    pipeline = Pipeline(stage("sft", source="hf://org/base"), stage("dpo"))
    pipeline.step()
    stages = pipeline.body["spec"]["stages"]
    stages[0]["run"]["training"] = {"learningRate": 1.0e-5}  # started: refused
    stages[1]["run"]["training"] = {"learningRate": 5.0e-7}  # not started: applies
    plan = pipeline.step()
    edited = condition(plan, PipelineCondition.SPEC_APPLIED)
    assert edited["status"] == "False" and "sft" in edited["message"]
    assert "training" not in pipeline.child("TrainingRun", "p-sft")["spec"]
    pipeline.run_phase("p-sft", "Succeeded")
    pipeline.promote("sft")
    assert pipeline.child("TrainingRun", "p-dpo")["spec"]["training"]["learningRate"] == 5.0e-7
    stale = pipeline.child("TrainingRun", "p-sft")["metadata"]["annotations"]
    assert STAGE_HASH_ANNOTATION in stale


def test_a_bad_pipeline_is_invalid_and_makes_nothing():
    pipeline = Pipeline(stage("sft"))  # the first stage has no previous stage
    plan = pipeline.reconcile()
    assert plan.status["phase"] == "Invalid" and plan.creates == ()
    assert "stages[0].run.model.source" in condition(plan, PipelineCondition.VALID)["message"]


def test_the_serve_block_serves_the_newest_promoted_model_and_rolls_on_each_promotion():
    pipeline = Pipeline(stage("sft", source="hf://org/base"), stage("dpo"))
    pipeline.body["spec"]["serve"] = {"gpus": 1, "servedModelName": "assistant"}
    plan = pipeline.step()
    assert "InferenceServer/p-serve" not in created(plan), "nothing promoted yet"
    pipeline.run_phase("p-sft", "Succeeded")
    assert "InferenceServer/p-serve" not in created(pipeline.step()), "provenance first"
    plan = pipeline.provenance("sft").step()
    assert created(plan) == ["TrainingRun/p-dpo", "InferenceServer/p-serve"]
    server = pipeline.child("InferenceServer", "p-serve")
    assert server["spec"]["model"] == {"source": "s3://ckpt/p/sft/final"}
    assert server["spec"]["servedModelName"] == "assistant"
    assert plan.status["serving"] == {"server": "p-serve", "model": "s3://ckpt/p/sft/final"}
    assert pipeline.reconcile().is_empty
    pipeline.run_phase("p-dpo", "Succeeded")
    pipeline.step()
    plan = pipeline.provenance("dpo").reconcile()
    (rolled,) = plan.updates
    assert rolled["metadata"]["name"] == "p-serve"
    assert rolled["spec"]["model"] == {"source": "s3://ckpt/p/dpo/final"}
    assert plan.status["phase"] == "Succeeded"


def test_a_promoted_stage_writes_provenance_with_the_stages_pod_settings_and_a_complete_record():
    pipeline = Pipeline(stage("sft", source="hf://org/base@v1", gate=GATE), stage("dpo"))
    first = pipeline.body["spec"]["stages"][0]["run"]
    first["image"] = "registry.example/trainer:7"
    first["storage"] = {"s3": {"endpoint": "http://minio:9000", "credentialsSecret": "s3-creds"}}
    pipeline.step()
    pipeline.child("TrainingRun", "p-sft")["status"] = {
        "phase": "Succeeded",
        "completionTime": "2026-01-01T13:00:00Z",
        "progress": {"step": 40},
    }
    results = [{"criterion": "eval_loss <= 1.8", "metric": "eval_loss", "result": "Passed"}]
    pipeline.verdict(
        "p-sft-gate",
        "Passed",
        "every criterion passed",
        results=results,
        approval={"by": "alice", "at": "2026-01-01T13:05:00Z"},
    )
    plan = pipeline.step()
    job = pipeline.child("Job", "p-sft-provenance")
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "registry.example/trainer:7"
    assert container["command"][:3] == ["python", "-m", "trainyard.workloads.provenance"]
    env = {e["name"]: e for e in container["env"]}
    assert env["AWS_ENDPOINT_URL"]["value"] == "http://minio:9000"
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "s3-creds"
    assert pod["automountServiceAccountToken"] is False
    assert job["metadata"]["ownerReferences"][0]["uid"] == UID
    assert job["metadata"]["labels"]["trainyard.dev/pipeline"] == "p"
    task = task_of(pipeline, "sft")
    record = task["record"]
    assert task["storage"]["s3"]["endpoint"] == "http://minio:9000"
    assert record["model"] == "s3://ckpt/p/sft/final"
    assert record["inputModel"] == "hf://org/base@v1"
    assert record["dataset"]["source"] == "s3://data/train.jsonl"
    assert record["image"] == "registry.example/trainer:7"
    assert record["startedAt"] == "2026-01-01T12:00:00Z"
    assert record["finishedAt"] == "2026-01-01T13:00:00Z"
    assert record["trainedSteps"] == 40 and record["specHash"]
    assert record["gate"]["results"] == results
    assert record["gate"]["approval"]["by"] == "alice"
    sft = plan.status["stages"][0]
    assert sft["approvedBy"] == "alice" and sft["gateResults"] == results
    assert sft["image"] == "registry.example/trainer:7"


def test_a_failed_provenance_write_is_recorded_and_the_pipeline_goes_on():
    pipeline = Pipeline(stage("sft", source="hf://org/base"), stage("dpo"))
    pipeline.step()
    pipeline.run_phase("p-sft", "Succeeded")
    pipeline.step()
    plan = pipeline.provenance("sft", "Failed", "BackoffLimitExceeded").step()
    assert created(plan) == ["TrainingRun/p-dpo"]
    written = plan.status["stages"][0]["provenance"]
    assert written["written"] is False and "BackoffLimitExceeded" in written["message"]


def test_a_model_without_storage_keeps_its_provenance_in_status_only():
    pipeline = Pipeline(stage("sft", source="hf://org/base"), stage("dpo"))
    del pipeline.body["spec"]["stages"][0]["run"]["checkpoint"]
    pipeline.step()
    pipeline.run_phase("p-sft", "Succeeded")
    plan = pipeline.step()
    assert created(plan) == ["TrainingRun/p-dpo"]
    assert plan.status["stages"][0]["provenance"]["written"] is False


def test_a_promoted_lora_adapter_is_served_by_name_on_the_model_it_was_trained_on():
    pipeline = Pipeline(stage("sft", source="hf://org/base"), stage("dpo"), stage("full"))
    for name in ("sft", "dpo"):  # LoRA, then LoRA stacked on it, then the full model
        pipeline.body["spec"]["stages"][("sft", "dpo").index(name)]["run"]["peft"] = {"r": 8}
    pipeline.body["spec"]["serve"] = {"gpus": 1, "servedModelName": "assistant"}
    pipeline.step()
    pipeline.run_phase("p-sft", "Succeeded")
    pipeline.promote("sft")
    server = pipeline.child("InferenceServer", "p-serve")["spec"]
    assert server["model"] == {"source": "hf://org/base"}
    assert server["adapters"] == [{"name": "assistant", "source": "s3://ckpt/p/sft/final"}]
    assert server["servedModelName"] == "assistant-base"
    pipeline.run_phase("p-dpo", "Succeeded")
    pipeline.step()
    (rolled,) = pipeline.provenance("dpo").reconcile().updates
    assert rolled["spec"]["model"] == {"source": "s3://ckpt/p/dpo/final/base"}, (
        "stacked: the merged base saved beside the adapter"
    )
    assert rolled["spec"]["adapters"][0]["source"] == "s3://ckpt/p/dpo/final"
    pipeline.step()
    pipeline.run_phase("p-full", "Succeeded")
    pipeline.step()
    (rolled,) = pipeline.provenance("full").reconcile().updates
    assert rolled["spec"]["model"] == {"source": "s3://ckpt/p/full/final"}
    assert "adapters" not in rolled["spec"] and rolled["spec"]["servedModelName"] == "assistant"
