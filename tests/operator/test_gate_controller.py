"""The PromotionGate controller against the API emulation over HTTP (real kopf, real HTTP).

Resync is 10 minutes here (conftest): a gate moves only on events — of itself, of its
run (the registration follows TrainingRuns), of its evaluation Job. The test plays the
evaluation pod: it writes a real eval.json (EvalResults) where the gate's task says,
then completes the Job as the Job controller would.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from operator_fakes import CONFIGMAPS, JOBS, NAMESPACE, RUNS, eventually, training_run

from trainyard.api.verdict import APPROVED_BY_ANNOTATION, EvalResults, MetricSamples

pytestmark = pytest.mark.timeout(120)

GATES = "trainyard.dev/v1alpha1/promotiongates"


@pytest.fixture
def api_with_gates(api):
    api.declare(GATES, "PromotionGate")
    return api


def promotion_gate(name: str, run: str | None = None, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "trainyard.dev/v1alpha1",
        "kind": "PromotionGate",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {"criteria": ["accuracy >= 0.6"]},
    }
    if run is not None:
        body["spec"]["run"] = run
    body["spec"].update(spec)
    return body


def evaluation(**extra: Any) -> dict[str, Any]:
    return {"suite": ["accuracy"], "dataset": "builtin://datasets/alpaca", **extra}


def gate_status(api, name: str) -> dict[str, Any]:
    return (api.get(GATES, NAMESPACE, name) or {}).get("status") or {}


def verdict(api, name: str) -> str | None:
    return gate_status(api, name).get("verdict")


async def finish_run(api, kubelet, name: str) -> None:
    job = await eventually(lambda: api.get(JOBS, NAMESPACE, f"{name}-attempt-0"))
    await kubelet.start_pods(job)
    await kubelet.complete_job(job)
    await eventually(lambda: kubelet.status(name).get("phase") == "Succeeded")


def write_results(task_uri: str, accuracy: float, n: int = 0) -> EvalResults:
    """What the evaluation pod writes last: eval.json at the task's output."""
    samples = {}
    if n:
        hits = round(accuracy * n)
        values = [1.0] * hits + [0.0] * (n - hits)
        samples["accuracy"] = MetricSamples(ids=[str(i) for i in range(n)], values=values)
    results = EvalResults(model="file:///m", metrics={"accuracy": accuracy}, samples=samples)
    path = Path(task_uri.removeprefix("file://")) / "eval.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results.to_yaml_dict()))
    return results


def task_of(api, job_name: str) -> dict[str, Any]:
    config_map = api.get(CONFIGMAPS, NAMESPACE, job_name)
    return json.loads(config_map["data"]["evaluation.json"])


async def complete(api, job_name: str) -> None:
    await api.patch_object(
        JOBS,
        NAMESPACE,
        job_name,
        {
            "status": {
                "succeeded": 1,
                "active": 0,
                "conditions": [{"type": "Complete", "status": "True"}],
            }
        },
        status=True,
    )


async def test_a_gate_waits_for_its_run_evaluates_and_passes(
    api_with_gates, kubelet, start_operator, tmp_path
):
    api = api_with_gates
    ckpt = f"file://{tmp_path}/ckpt/sft"
    async with start_operator() as metrics:
        await api.put_object(GATES, promotion_gate("release", "sft", evaluation=evaluation()))
        await eventually(lambda: verdict(api, "release") == "Pending")
        assert "TrainingRun sft" in gate_status(api, "release")["message"]
        await api.put_object(RUNS, training_run("sft", checkpoint={"uri": ckpt}))
        await eventually(lambda: "to succeed" in gate_status(api, "release").get("message", ""))
        assert api.get(JOBS, NAMESPACE, "release-eval-1") is None, "no evaluation before success"

        await finish_run(api, kubelet, "sft")
        job = await eventually(lambda: api.get(JOBS, NAMESPACE, "release-eval-1"))
        await eventually(lambda: verdict(api, "release") == "Evaluating")
        assert job["metadata"]["labels"]["trainyard.dev/gate"] == "release"
        assert job["metadata"]["ownerReferences"][0]["kind"] == "PromotionGate"
        pod = job["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["automountServiceAccountToken"] is False
        task = task_of(api, "release-eval-1")
        assert task["model"]["source"] == f"{ckpt}/final"
        assert task["output"] == f"{ckpt}/final/eval/release"

        write_results(task["output"], accuracy=0.75)
        await complete(api, "release-eval-1")
        await eventually(lambda: verdict(api, "release") == "Passed")
        status = gate_status(api, "release")
        assert status["reason"] == "CriteriaMet"
        assert status["promotedModel"] == f"{ckpt}/final"
        assert status["evalResults"] == f"{ckpt}/final/eval/release/eval.json"
        (result,) = status["results"]
        assert result["criterion"] == "accuracy >= 0.6"
        assert result["observed"] == 0.75
        assert metrics.gate_verdict.labels(NAMESPACE, "release", "Passed")._value.get() == 1
        assert metrics.gate_verdict.labels(NAMESPACE, "release", "Evaluating")._value.get() == 0
        assert metrics.gate_criterion_value.labels(
            NAMESPACE, "release", "accuracy >= 0.6"
        )._value.get() == pytest.approx(0.75)
        assert metrics.gate_criterion_threshold.labels(
            NAMESPACE, "release", "accuracy >= 0.6"
        )._value.get() == pytest.approx(0.6)
        assert metrics.gate_verdicts.labels(NAMESPACE, "release", "Passed")._value.get() == 1


async def test_a_gate_fails_naming_the_criterion(api_with_gates, kubelet, start_operator, tmp_path):
    api = api_with_gates
    ckpt = f"file://{tmp_path}/ckpt/sft"
    async with start_operator():
        await api.put_object(RUNS, training_run("sft", checkpoint={"uri": ckpt}))
        await finish_run(api, kubelet, "sft")
        await api.put_object(
            GATES,
            promotion_gate(
                "strict", "sft", criteria=["accuracy >= 0.9", "loss <= 5"], evaluation=evaluation()
            ),
        )
        await eventually(lambda: api.get(JOBS, NAMESPACE, "strict-eval-1"))
        write_results(task_of(api, "strict-eval-1")["output"], accuracy=0.5)
        await complete(api, "strict-eval-1")
        await eventually(lambda: verdict(api, "strict") == "Failed")
        status = gate_status(api, "strict")
        # the run's final metrics (loss is absent from its progress) stand beside eval.json's
        assert status["reason"] == "MetricMissing"
        assert "accuracy >= 0.9" in status["message"]
        by_criterion = {r["criterion"]: r for r in status["results"]}
        assert by_criterion["accuracy >= 0.9"]["result"] == "Failed"
        assert by_criterion["accuracy >= 0.9"]["observed"] == 0.5
        assert "loss was not reported" in status["message"]


async def test_a_failed_evaluation_job_fails_the_gate_with_its_reason(
    api_with_gates, kubelet, start_operator, tmp_path
):
    api = api_with_gates
    async with start_operator():
        await api.put_object(RUNS, training_run("sft", checkpoint={"uri": f"file://{tmp_path}/c"}))
        await finish_run(api, kubelet, "sft")
        await api.put_object(GATES, promotion_gate("broken", "sft", evaluation=evaluation()))
        await eventually(lambda: api.get(JOBS, NAMESPACE, "broken-eval-1"))
        await api.patch_object(
            JOBS,
            NAMESPACE,
            "broken-eval-1",
            {
                "status": {
                    "failed": 3,
                    "conditions": [
                        {
                            "type": "Failed",
                            "status": "True",
                            "reason": "BackoffLimitExceeded",
                            "message": "Job has reached the specified backoff limit",
                        }
                    ],
                }
            },
            status=True,
        )
        await eventually(lambda: verdict(api, "broken") == "Failed")
        status = gate_status(api, "broken")
        assert status["reason"] == "EvaluationFailed"
        assert "BackoffLimitExceeded" in status["message"]


async def test_manual_approval_by_annotation_on_run_metrics(
    api_with_gates, kubelet, start_operator
):
    api = api_with_gates
    async with start_operator() as metrics:
        await api.put_object(RUNS, training_run("sft"))
        await finish_run(api, kubelet, "sft")
        await api.patch_object(
            RUNS, NAMESPACE, "sft", {"status": {"progress": {"loss": 0.8}}}, status=True
        )
        await api.put_object(
            GATES, promotion_gate("approve", "sft", criteria=["loss <= 1.0"], manualApproval=True)
        )
        await eventually(lambda: verdict(api, "approve") == "AwaitingApproval")
        assert gate_status(api, "approve")["awaitingSince"]
        assert api.objects(JOBS, NAMESPACE, "trainyard.dev/gate=approve") == []
        await api.patch_object(
            GATES,
            NAMESPACE,
            "approve",
            {"metadata": {"annotations": {APPROVED_BY_ANNOTATION: "alice"}}},
        )
        await eventually(lambda: verdict(api, "approve") == "Passed")
        status = gate_status(api, "approve")
        assert status["reason"] == "Approved"
        assert status["approval"]["by"] == "alice"
        assert (
            metrics.gate_verdict.labels(NAMESPACE, "approve", "AwaitingApproval")._value.get() == 0
        )


async def test_a_bad_gate_is_invalid_and_the_operator_goes_on(
    api_with_gates, kubelet, start_operator
):
    api = api_with_gates
    async with start_operator() as metrics:
        await api.put_object(GATES, promotion_gate("bad", "sft", criteria=["accuracy >>> 0.6"]))
        await api.put_object(GATES, promotion_gate("good", "missing-run"))
        await eventually(lambda: verdict(api, "bad") == "Invalid")
        status = gate_status(api, "bad")
        assert "criteria[0]" in status["message"] and "accuracy >>> 0.6" in status["message"]
        valid = next(c for c in status["conditions"] if c["type"] == "Valid")
        assert valid["status"] == "False" and valid["reason"] == "InvalidSpec"
        assert metrics.reconciles.labels(result="invalid")._value.get() >= 1
        await eventually(lambda: verdict(api, "good") == "Pending")
        # the operator still serves runs
        await api.put_object(RUNS, training_run("after"))
        await eventually(lambda: api.get(JOBS, NAMESPACE, "after-attempt-0"))


async def test_deleting_the_gate_deletes_its_evaluation(
    api_with_gates, kubelet, start_operator, tmp_path
):
    api = api_with_gates
    async with start_operator() as metrics:
        await api.put_object(RUNS, training_run("sft", checkpoint={"uri": f"file://{tmp_path}/c"}))
        await finish_run(api, kubelet, "sft")
        await api.put_object(GATES, promotion_gate("doomed", "sft", evaluation=evaluation()))
        await eventually(lambda: api.get(JOBS, NAMESPACE, "doomed-eval-1"))
        await eventually(lambda: verdict(api, "doomed") == "Evaluating")
        await api.delete_object(GATES, NAMESPACE, "doomed")
        await eventually(lambda: api.get(JOBS, NAMESPACE, "doomed-eval-1") is None)
        assert api.get(CONFIGMAPS, NAMESPACE, "doomed-eval-1") is None
        await eventually(
            lambda: (
                metrics.registry.get_sample_value(
                    "trainyard_gate_verdict",
                    {"namespace": NAMESPACE, "gate": "doomed", "verdict": "Evaluating"},
                )
                is None
            )
        )


async def test_an_operator_restarted_mid_gate_decides_once(
    api_with_gates, kubelet, start_operator, tmp_path
):
    api = api_with_gates
    async with start_operator():
        await api.put_object(RUNS, training_run("sft", checkpoint={"uri": f"file://{tmp_path}/c"}))
        await finish_run(api, kubelet, "sft")
        await api.put_object(GATES, promotion_gate("restarted", "sft", evaluation=evaluation()))
        await eventually(lambda: verdict(api, "restarted") == "Evaluating")
    # while no operator runs, the evaluation pod finishes
    write_results(task_of(api, "restarted-eval-1")["output"], accuracy=0.9)
    await complete(api, "restarted-eval-1")
    async with start_operator() as metrics:
        await eventually(lambda: verdict(api, "restarted") == "Passed")
        decided_at = gate_status(api, "restarted")["decidedAt"]
    async with start_operator() as again:
        await eventually(
            lambda: again.gate_verdict.labels(NAMESPACE, "restarted", "Passed")._value.get() == 1
        )
    assert gate_status(api, "restarted")["decidedAt"] == decided_at
    assert [j["metadata"]["name"] for j in api.objects(JOBS, NAMESPACE)] == [
        "restarted-eval-1",
        "sft-attempt-0",
    ], "one evaluation, never started again"
    assert metrics.gate_verdicts.labels(NAMESPACE, "restarted", "Passed")._value.get() == 1
    assert again.gate_verdicts.labels(NAMESPACE, "restarted", "Passed")._value.get() == 0, (
        "a verdict reached before this process started is not counted again"
    )


async def test_a_decision_is_announced_as_a_kubernetes_event(
    api_with_gates, kubelet, start_operator, operator_config
):
    import dataclasses

    api = api_with_gates
    async with start_operator(dataclasses.replace(operator_config, post_events=True)):
        await api.put_object(RUNS, training_run("sft"))
        await finish_run(api, kubelet, "sft")
        await api.patch_object(
            RUNS, NAMESPACE, "sft", {"status": {"progress": {"loss": 2.5}}}, status=True
        )
        await api.put_object(GATES, promotion_gate("announced", "sft", criteria=["loss <= 1"]))
        await eventually(lambda: verdict(api, "announced") == "Failed")

        def decisions() -> list[dict[str, Any]]:
            return [
                e
                for e in api.objects("v1/events", NAMESPACE)
                if e.get("involvedObject", {}).get("name") == "announced"
            ]

        (event,) = await eventually(decisions)
        assert (event["type"], event["reason"]) == ("Warning", "CriterionFailed")
        assert "loss <= 1" in event["message"]
        assert event["involvedObject"]["kind"] == "PromotionGate"
        await api.patch_object(
            GATES, NAMESPACE, "announced", {"metadata": {"annotations": {"touched": "yes"}}}
        )
        await eventually(
            lambda: (
                (api.get(GATES, NAMESPACE, "announced") or {})
                .get("metadata", {})
                .get("annotations", {})
                .get("touched")
            )
        )
    assert len(decisions()) == 1, "one decision, one Event"
