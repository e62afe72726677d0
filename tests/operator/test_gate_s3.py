"""eval.json in S3: the gate controller reads it from moto's standalone server (real HTTP,
real boto3), and results_store tells a missing eval.json from a storage it cannot reach."""

from __future__ import annotations

import importlib.util
import json
import uuid
from pathlib import Path

import pytest
from operator_fakes import JOBS, NAMESPACE, RUNS, eventually, training_run
from test_gate_controller import GATES, complete, evaluation, finish_run, promotion_gate, task_of

from trainyard.api.verdict import EvalResults
from trainyard.operator.results_store import ResultsUnavailable, read_results

pytestmark = pytest.mark.timeout(120)


def _workload_fixtures():
    """tests/workloads/conftest.py's moto server helpers (one copy of them)."""
    path = Path(__file__).resolve().parents[1] / "workloads" / "conftest.py"
    spec = importlib.util.spec_from_file_location("workload_s3_fixtures", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


S3 = _workload_fixtures()


@pytest.fixture(scope="module")
def moto_endpoint():
    process, endpoint = S3.start_moto_server()
    yield endpoint
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture
def s3(moto_endpoint, monkeypatch):
    """A fresh bucket; the process's AWS settings point at moto (dummy credentials)."""
    import boto3

    for key, value in S3.DUMMY_AWS_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    bucket = f"gate-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=bucket)
    return client, bucket, moto_endpoint


def put_results(client, uri: str, accuracy: float) -> None:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    results = EvalResults(model="s3://x", metrics={"accuracy": accuracy})
    client.put_object(
        Bucket=bucket, Key=f"{key}/eval.json", Body=json.dumps(results.to_yaml_dict())
    )


async def test_a_gate_reads_eval_json_from_s3_and_passes(api, kubelet, start_operator, s3):
    client, bucket, endpoint = s3
    api.declare(GATES, "PromotionGate")
    ckpt = f"s3://{bucket}/runs/sft"
    async with start_operator():
        await api.put_object(
            RUNS,
            training_run("sft", checkpoint={"uri": ckpt}, storage={"s3": {"endpoint": endpoint}}),
        )
        await finish_run(api, kubelet, "sft")
        await api.put_object(GATES, promotion_gate("s3-gate", "sft", evaluation=evaluation()))
        await eventually(lambda: api.get(JOBS, NAMESPACE, "s3-gate-eval-1"))
        task = task_of(api, "s3-gate-eval-1")
        assert task["output"] == f"{ckpt}/final/eval/s3-gate"
        put_results(client, task["output"], accuracy=0.7)
        await complete(api, "s3-gate-eval-1")
        await eventually(
            lambda: (
                ((api.get(GATES, NAMESPACE, "s3-gate") or {}).get("status") or {}).get("verdict")
                == "Passed"
            )
        )
        status = api.get(GATES, NAMESPACE, "s3-gate")["status"]
        assert status["evalResults"] == f"{ckpt}/final/eval/s3-gate/eval.json"
        assert status["results"][0]["observed"] == 0.7


async def test_results_store_reads_s3_with_the_environment_endpoint(s3, monkeypatch):
    client, bucket, endpoint = s3
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    put_results(client, f"s3://{bucket}/m/eval/g", accuracy=0.5)
    read = await read_results(f"s3://{bucket}/m/eval/g/eval.json")
    assert read.results is not None and read.results.metrics == {"accuracy": 0.5}
    missing = await read_results(f"s3://{bucket}/m/eval/other/eval.json")
    assert missing.results is None and "no eval.json at" in missing.problem
    client.put_object(Bucket=bucket, Key="bad/eval.json", Body=b'{"metrics": {}}')
    bad = await read_results(f"s3://{bucket}/bad/eval.json")
    assert bad.results is None and bad.problem.startswith("eval.json is not valid: model")


async def test_an_unreachable_store_is_retried_not_judged(s3):
    with pytest.raises(ResultsUnavailable, match="s3://"):
        await read_results("s3://nowhere/eval.json", endpoint=f"http://127.0.0.1:{S3.free_port()}")
