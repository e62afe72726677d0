"""The evaluation of a checkpoint in S3 (a real moto server over HTTP): the model is read
from the bucket, and eval.json lands beside it where a gate reads it."""

from __future__ import annotations

import os
import uuid

import pytest

from tests.workloads.conftest import DUMMY_AWS_ENV, start_moto_server
from trainyard.api.gate import EvaluationTask
from trainyard.api.verdict import eval_results_uri
from trainyard.workloads import builtin
from trainyard.workloads.evaluate.runner import read_results, run_task

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    saved = {k: os.environ.get(k) for k in DUMMY_AWS_ENV}
    os.environ.update(DUMMY_AWS_ENV)
    process, endpoint = start_moto_server()
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    bucket = f"gates-{uuid.uuid4().hex[:8]}"
    client.create_bucket(Bucket=bucket)
    # A finished run's exported model, where run://tiny-sft/final points.
    for path in builtin.model_path("tiny-qwen2").iterdir():
        if path.is_file():
            client.upload_file(str(path), bucket, f"runs/tiny-sft/final/{path.name}")
    yield endpoint, bucket, client
    process.terminate()
    process.wait(timeout=10)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.mark.parametrize("model", ["s3://{bucket}/runs/tiny-sft/final", "run://tiny-sft"])
def test_eval_json_is_written_beside_the_checkpoint_in_s3(s3, model, tmp_path, monkeypatch):
    endpoint, bucket, client = s3
    monkeypatch.setenv("TRAINYARD_CACHE", str(tmp_path / "cache"))
    storage = {"s3": {"endpoint": endpoint, "addressingStyle": "path"}}
    task = EvaluationTask.model_validate(
        {
            "model": {"source": model.format(bucket=bucket)},
            "evaluation": {
                "suite": ["perplexity"],
                "dataset": "builtin://datasets/text",
                "maxSamples": 4,
            },
            "storage": storage,
            # The judged run's own checkpoint root: run://NAME resolves beside it.
            "checkpointUri": f"s3://{bucket}/runs/this-run",
        }
    )
    evaluated = run_task(task, log=lambda message: None)
    checkpoint = f"s3://{bucket}/runs/tiny-sft/final"
    assert evaluated.output_uri == f"{checkpoint}/eval"
    keys = {
        o["Key"]
        for o in client.list_objects_v2(Bucket=bucket, Prefix="runs/tiny-sft/final/eval/")[
            "Contents"
        ]
    }
    assert {
        f"runs/tiny-sft/final/eval/{name}"
        for name in ("eval.json", "eval-examples.jsonl", "eval-report.md", "eval-metrics.png")
    } <= keys
    assert eval_results_uri(checkpoint) == f"{checkpoint}/eval/eval.json"
    read = read_results(evaluated.output_uri, task.storage)
    assert read.metrics == evaluated.results.metrics
    assert read.metrics["perplexity"] > 1
