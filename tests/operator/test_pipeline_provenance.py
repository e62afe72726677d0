"""provenance.json on a cluster: the command of the provenance Job the pipeline renders, run
as its pod would run it (its env, the task from its ConfigMap), writes to moto's S3 server;
`trainyard lineage s3://…` reads the chain back."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import uuid
from typing import Any

import pytest
from test_gate_s3 import S3, moto_endpoint  # noqa: F401 (the moto server fixture)

from trainyard.api import parse_resource
from trainyard.cli.lineage import lineage_command
from trainyard.operator.builders.pipeline import PROVENANCE_TASK_PATH, render_provenance
from trainyard.operator.pipeline_reconcile import provenance_record

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def bucket(moto_endpoint, monkeypatch):  # noqa: F811 (the imported fixture)
    import boto3

    for key, value in S3.DUMMY_AWS_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    name = f"prov-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=name)
    return client, name, moto_endpoint


def pipeline(bucket: str, endpoint: str):
    def stage(name: str, source: str, dataset: str) -> dict[str, Any]:
        return {
            "name": name,
            "run": {
                "method": "sft",
                "model": {"source": source},
                "dataset": {"source": dataset},
                "checkpoint": {"uri": f"s3://{bucket}/p/{name}"},
                "storage": {"s3": {"endpoint": endpoint, "credentialsSecret": "s3-creds"}},
                "image": "registry.example/trainer:7",
            },
        }

    return parse_resource(
        {
            "apiVersion": "trainyard.dev/v1alpha1",
            "kind": "TrainingPipeline",
            "metadata": {"name": "p", "namespace": "ml"},
            "spec": {
                "stages": [
                    stage("sft", "hf://org/base@v1", f"s3://{bucket}/data/chat.jsonl"),
                    stage("dpo", "run://previous", f"s3://{bucket}/data/prefs"),
                ]
            },
        }
    )


def run_the_job(client, bucket: str, stage, pipeline, entry: dict, gate: dict | None, tmp_path):
    """Render the stage's provenance Job and run its container's command as the pod would:
    the task file from the ConfigMap, the env with the Secret's keys resolved."""
    run_body = {
        "apiVersion": "trainyard.dev/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": f"p-{stage.name}", "namespace": "ml", "uid": "run-uid"},
        "spec": stage.run.model_dump(by_alias=True, exclude_unset=True, mode="json"),
        "status": {"phase": "Succeeded", "progress": {"step": 12}},
    }
    record = provenance_record(pipeline, stage, entry, run_body, gate)
    config_map, job = render_provenance(
        pipeline, stage, uid="pipe-uid", record=record, run=parse_resource(run_body)
    )
    task = tmp_path / f"{stage.name}-task.json"
    task.write_text(config_map["data"]["provenance.json"])
    (container,) = job["spec"]["template"]["spec"]["containers"]
    secret = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    env = {**S3.DUMMY_AWS_ENV, "PATH": "/usr/bin:/bin"}
    for variable in container["env"]:
        if "value" in variable:
            env[variable["name"]] = variable["value"]
        elif variable["valueFrom"]["secretKeyRef"]["key"] in secret:
            env[variable["name"]] = secret[variable["valueFrom"]["secretKeyRef"]["key"]]
    command = [sys.executable if c == "python" else c for c in container["command"]]
    assert command[-1] == PROVENANCE_TASK_PATH
    command[-1] = str(task)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def put_model(client, bucket: str, prefix: str) -> bytes:
    client.put_object(Bucket=bucket, Key=f"{prefix}/model.safetensors", Body=b"weights")
    manifest = json.dumps({"files": [{"path": "model.safetensors", "size": 7}]}).encode()
    client.put_object(Bucket=bucket, Key=f"{prefix}/manifest.json", Body=manifest)
    return manifest


def test_the_provenance_jobs_command_writes_beside_the_model_in_s3_and_lineage_reads_it(
    bucket, tmp_path, capsys
):
    client, name, _ = bucket
    body = pipeline(name, bucket[2])
    sft, dpo = body.spec.stages
    sft_manifest = put_model(client, name, "p/sft/final")
    dpo_manifest = put_model(client, name, "p/dpo/final")
    client.put_object(Bucket=name, Key="data/chat.jsonl", Body=b'{"messages": []}\n')
    client.put_object(Bucket=name, Key="data/prefs/part-0.parquet", Body=b"rows")
    sft_model, dpo_model = f"s3://{name}/p/sft/final", f"s3://{name}/p/dpo/final"
    gate = {
        "verdict": "Passed",
        "message": "every criterion passed",
        "results": [{"criterion": "loss <= 2", "metric": "loss", "result": "Passed"}],
        "approval": {"by": "alice"},
    }
    common = {"specHash": "abc123", "image": "registry.example/trainer:7"}
    run_the_job(
        client,
        name,
        sft,
        body,
        {
            **common,
            "run": "p-sft",
            "gate": "p-sft-gate",
            "model": sft_model,
            "inputModel": "hf://org/base@v1",
            "startedAt": "2026-01-01T12:00:00Z",
            "finishedAt": "2026-01-01T13:00:00Z",
        },
        gate,
        tmp_path,
    )
    run_the_job(
        client,
        name,
        dpo,
        body,
        {
            **common,
            "run": "p-dpo",
            "model": dpo_model,
            "inputModel": sft_model,
            "startedAt": "2026-01-01T13:01:00Z",
            "finishedAt": "2026-01-01T14:00:00Z",
        },
        None,
        tmp_path,
    )
    written = json.loads(
        client.get_object(Bucket=name, Key="p/sft/final/provenance.json")["Body"].read()
    )
    assert written["modelFingerprint"] == {
        "manifestSha256": "sha256:" + hashlib.sha256(sft_manifest).hexdigest()
    }
    assert written["inputModelFingerprint"] == {"revision": "v1"}
    assert written["dataset"]["fingerprint"]["etag"]  # one object: its ETag
    assert written["gate"]["approval"]["by"] == "alice"
    assert written["trainedSteps"] == 12 and written["image"] == "registry.example/trainer:7"

    assert lineage_command([dpo_model, "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [r.get("stage") for r in records] == ["dpo", "sft", None]
    assert records[0]["modelFingerprint"]["manifestSha256"].endswith(
        hashlib.sha256(dpo_manifest).hexdigest()
    )
    assert records[0]["inputModelFingerprint"] == records[1]["modelFingerprint"]
    assert records[0]["dataset"]["fingerprint"]["objects"] == 1  # a prefix: its objects
    assert records[2] == {"model": "hf://org/base@v1", "origin": True}
    assert lineage_command([dpo_model]) == 0
    printed = capsys.readouterr().out
    assert "approved by alice" in printed and "loss <= 2: Passed" in printed


def test_lineage_of_a_model_without_provenance_says_so(bucket, capsys):
    _, name, _ = bucket
    assert lineage_command([f"s3://{name}/nothing/final"]) == 1
    assert "no provenance.json" in capsys.readouterr().out
