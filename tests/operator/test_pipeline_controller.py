"""The TrainingPipeline controller with the TrainingRun and PromotionGate controllers, all on
the real operator against the API emulation over HTTP. Resync is 10 minutes (conftest):
a stage advances only on events — its run succeeding, its gate's verdict.

The test plays kubelet and rank 0 (its /metrics report the loss the gate judges).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from operator_fakes import JOBS, NAMESPACE, RUNS, eventually

from trainyard.api.pipeline import RETRY_ANNOTATION, PipelineCondition
from trainyard.operator import reasons

pytestmark = pytest.mark.timeout(120)

PIPELINES = "trainyard.dev/v1alpha1/trainingpipelines"
GATES = "trainyard.dev/v1alpha1/promotiongates"
SERVERS = "trainyard.dev/v1alpha1/inferenceservers"


@pytest.fixture
def api_with_pipelines(api):
    api.declare(PIPELINES, "TrainingPipeline")
    api.declare(GATES, "PromotionGate")
    api.declare(SERVERS, "InferenceServer")
    return api


def pipeline(port: int, *, threshold: float = 2.0, third: bool = False) -> dict[str, Any]:
    """sft (gated) → dpo (no gate), and with `third` → rl (gated), each from the one before."""

    def stage(name: str, source: str, gate: bool) -> dict[str, Any]:
        body: dict[str, Any] = {
            "name": name,
            "run": {
                "method": "sft",
                "model": {"source": source},
                "dataset": {"source": "s3://data/train.jsonl"},
                "checkpoint": {"uri": f"s3://ckpt/chain/{name}"},
                "metrics": {"port": port},
                "runPolicy": {"maxRestarts": 0},
            },
        }
        if gate:
            body["gate"] = {"criteria": [f"loss <= {threshold}"]}
        return body

    return {
        "apiVersion": "trainyard.dev/v1alpha1",
        "kind": "TrainingPipeline",
        "metadata": {"name": "chain", "namespace": NAMESPACE},
        "spec": {
            "stages": [
                stage("sft", "hf://sshleifer/tiny-gpt2", gate=True),
                stage("dpo", "run://previous", gate=False),
                *([stage("rl", "run://previous", gate=True)] if third else []),
            ]
        },
    }


def status(api) -> dict[str, Any]:
    return (api.get(PIPELINES, NAMESPACE, "chain") or {}).get("status") or {}


def condition(api, type_: str) -> dict[str, Any] | None:
    return next((c for c in status(api).get("conditions") or [] if c["type"] == type_), None)


async def train(api, kubelet, run: str, attempt: int = 0) -> None:
    job = await eventually(lambda: api.get(JOBS, NAMESPACE, f"{run}-attempt-{attempt}"))
    await kubelet.start_pods(job)
    await eventually(lambda: (kubelet.status(run).get("progress") or {}).get("loss") is not None)
    await kubelet.complete_job(job)
    await eventually(lambda: kubelet.status(run).get("phase") == "Succeeded")


async def write_provenance(api, stage: str) -> dict[str, Any]:
    """Play the stage's provenance Job: wait for it, then mark it complete."""
    name = f"chain-{stage}-provenance"
    job = await eventually(lambda: api.get(JOBS, NAMESPACE, name))
    await api.patch_object(
        JOBS,
        NAMESPACE,
        name,
        {"status": {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}},
        status=True,
    )
    return job


async def test_three_stages_advance_as_runs_succeed_and_gates_pass(
    api_with_pipelines, kubelet, start_operator, rank0_metrics
):
    api = api_with_pipelines
    rank0_metrics.values = {
        "trainyard_step": 10,
        "trainyard_total_steps": 10,
        "trainyard_loss": 1.5,
    }
    async with start_operator() as metrics:
        await api.put_object(PIPELINES, pipeline(rank0_metrics.port, third=True))
        await eventually(lambda: kubelet.run("chain-sft"))
        assert api.get(GATES, NAMESPACE, "chain-sft-gate") is not None
        assert kubelet.run("chain-dpo") is None, "the next stage waits for the gate"
        await train(api, kubelet, "chain-sft")
        await write_provenance(api, "sft")
        dpo = await eventually(lambda: kubelet.run("chain-dpo"))
        assert dpo["spec"]["model"]["source"] == "s3://ckpt/chain/sft/final"
        sft = status(api)["stages"][0]
        assert (sft["phase"], sft["verdict"]) == ("Promoted", "Passed")
        assert (
            metrics.pipeline_stage.labels(namespace=NAMESPACE, pipeline="chain")._value.get() == 1
        )
        await train(api, kubelet, "chain-dpo")
        await write_provenance(api, "dpo")
        rl = await eventually(lambda: kubelet.run("chain-rl"))
        assert rl["spec"]["model"]["source"] == "s3://ckpt/chain/dpo/final"
        assert api.get(GATES, NAMESPACE, "chain-rl-gate") is not None
        assert status(api).get("phase") == "Running"
        await train(api, kubelet, "chain-rl")
        await write_provenance(api, "rl")
        await eventually(lambda: status(api).get("phase") == "Succeeded")
        assert condition(api, PipelineCondition.SUCCEEDED)["reason"] == reasons.ALL_PROMOTED
        assert [s["phase"] for s in status(api)["stages"]] == ["Promoted"] * 3
        assert [s.get("verdict") for s in status(api)["stages"]] == ["Passed", None, "Passed"]


async def test_a_rejected_stage_stops_the_pipeline_and_a_retry_trains_it_again(
    api_with_pipelines, kubelet, start_operator, rank0_metrics
):
    api = api_with_pipelines
    rank0_metrics.values = {
        "trainyard_step": 10,
        "trainyard_total_steps": 10,
        "trainyard_loss": 2.5,
    }
    async with start_operator():
        await api.put_object(PIPELINES, pipeline(rank0_metrics.port))
        await train(api, kubelet, "chain-sft")
        await eventually(lambda: status(api).get("phase") == "Failed")
        failed = condition(api, PipelineCondition.FAILED)
        assert failed["reason"] == reasons.GATE_REJECTED
        assert "stage sft" in failed["message"] and "loss" in failed["message"]
        assert kubelet.run("chain-dpo") is None
        first = kubelet.run("chain-sft")["metadata"]["uid"]

        rank0_metrics.values["trainyard_loss"] = 1.2  # the cause is fixed
        await api.patch_object(
            PIPELINES, NAMESPACE, "chain", {"metadata": {"annotations": {RETRY_ANNOTATION: "sft"}}}
        )
        await eventually(
            lambda: (
                (kubelet.run("chain-sft") or {}).get("metadata", {}).get("uid") not in (None, first)
            )
        )
        await train(api, kubelet, "chain-sft")
        await write_provenance(api, "sft")
        await eventually(lambda: kubelet.run("chain-dpo"))
        assert condition(api, PipelineCondition.FAILED)["status"] == "False"


async def test_deleting_the_pipeline_deletes_its_runs_and_gates(
    api_with_pipelines, kubelet, start_operator, rank0_metrics
):
    api = api_with_pipelines
    async with start_operator():
        await api.put_object(PIPELINES, pipeline(rank0_metrics.port))
        await eventually(lambda: kubelet.run("chain-sft"))
        await api.delete_object(PIPELINES, NAMESPACE, "chain")
        assert kubelet.run("chain-sft") is None
        assert api.get(GATES, NAMESPACE, "chain-sft-gate") is None
        assert api.objects(JOBS, NAMESPACE) == []
        assert api.objects(RUNS, NAMESPACE) == []


async def test_the_serve_stage_serves_the_first_promoted_model_and_rolls_to_the_next(
    api_with_pipelines, kubelet, start_operator, rank0_metrics
):
    api = api_with_pipelines
    rank0_metrics.values = {
        "trainyard_step": 10,
        "trainyard_total_steps": 10,
        "trainyard_loss": 1.5,
    }
    body = pipeline(rank0_metrics.port)
    body["spec"]["serve"] = {"gpus": 1, "servedModelName": "chain"}
    async with start_operator():
        await api.put_object(PIPELINES, body)
        await train(api, kubelet, "chain-sft")
        await write_provenance(api, "sft")
        server = await eventually(lambda: api.get(SERVERS, NAMESPACE, "chain-serve"))
        assert server["spec"]["model"]["source"] == "s3://ckpt/chain/sft/final"
        assert server["metadata"]["ownerReferences"][0]["kind"] == "TrainingPipeline"
        await eventually(lambda: api.get("apps/v1/deployments", NAMESPACE, "chain-serve-server"))
        await train(api, kubelet, "chain-dpo")
        await write_provenance(api, "dpo")
        await eventually(
            lambda: (
                api.get(SERVERS, NAMESPACE, "chain-serve")["spec"]["model"]["source"]
                == "s3://ckpt/chain/dpo/final"
            )
        )
        await eventually(lambda: status(api).get("phase") == "Succeeded")
        assert status(api)["serving"] == {
            "server": "chain-serve",
            "model": "s3://ckpt/chain/dpo/final",
        }


async def test_a_pipeline_resumes_after_the_operator_restarts_mid_stage_with_provenance(
    api_with_pipelines, kubelet, start_operator, rank0_metrics
):
    api = api_with_pipelines
    rank0_metrics.values = {
        "trainyard_step": 10,
        "trainyard_total_steps": 10,
        "trainyard_loss": 1.5,
    }
    async with start_operator():
        await api.put_object(PIPELINES, pipeline(rank0_metrics.port))
        job = await eventually(lambda: api.get(JOBS, NAMESPACE, "chain-sft-attempt-0"))
        await kubelet.start_pods(job)
    # the operator is gone while the stage trains; a new one takes over
    async with start_operator():
        await eventually(lambda: (kubelet.status("chain-sft").get("progress") or {}).get("loss"))
        await kubelet.complete_job(job)
        await eventually(lambda: api.get(JOBS, NAMESPACE, "chain-sft-provenance"))
    # and again while the provenance Job writes
    async with start_operator():
        await write_provenance(api, "sft")
        await eventually(lambda: kubelet.run("chain-dpo"))
        await train(api, kubelet, "chain-dpo")
        await write_provenance(api, "dpo")
        await eventually(lambda: status(api).get("phase") == "Succeeded")
    runs = sorted(r["metadata"]["name"] for r in api.objects(RUNS, NAMESPACE))
    assert runs == ["chain-dpo", "chain-sft"], "no stage ran twice"
    jobs = sorted(j["metadata"]["name"] for j in api.objects(JOBS, NAMESPACE))
    assert jobs == [
        "chain-dpo-attempt-0",
        "chain-dpo-provenance",
        "chain-sft-attempt-0",
        "chain-sft-provenance",
    ]
    sft, dpo = status(api)["stages"]
    for stage in (sft, dpo):
        assert stage["dataset"] == "s3://data/train.jsonl"
        assert stage["specHash"] and stage["startedAt"] and stage["finishedAt"]
    assert sft["verdict"] == "Passed" and sft["model"] == "s3://ckpt/chain/sft/final"
    assert dpo["inputModel"] == sft["model"] and dpo["model"] == "s3://ckpt/chain/dpo/final"
    for stage in (sft, dpo):
        assert stage["image"] and stage["provenance"]["written"] is True
        assert stage["provenance"]["uri"] == f"{stage['model']}/provenance.json"
    assert sft["gateResults"][0]["criterion"] == "loss <= 2"
    for stage in (sft, dpo):  # what the provenance Job was told to write, every field set
        config_map = api.get("v1/configmaps", NAMESPACE, f"chain-{stage['name']}-provenance")
        record = json.loads(config_map["data"]["provenance.json"])["record"]
        assert record["model"] == stage["model"] and record["inputModel"] == stage["inputModel"]
        for key in ("specHash", "image", "startedAt", "finishedAt", "trainedSteps", "runUid"):
            assert record[key], key
        assert record["dataset"]["source"] == "s3://data/train.jsonl"
    assert record["gate"] is None  # dpo has no gate
    sft_record = json.loads(
        api.get("v1/configmaps", NAMESPACE, "chain-sft-provenance")["data"]["provenance.json"]
    )["record"]
    assert sft_record["gate"]["verdict"] == "Passed"
    assert sft_record["gate"]["results"][0]["result"] == "Passed"
