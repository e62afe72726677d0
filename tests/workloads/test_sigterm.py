"""SIGTERM (eviction, preemption, torchrun stopping the gang after another rank failed)
stops training like Ctrl-C: the save being written when it lands is finished and
uploaded, so `latest` names it and the restart resumes from it. Real training
subprocess, real moto S3 server; SIGTERM sent while a checkpoint is still in its
staging directory (the async writer has not finished it)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import transformers

from trainyard.workloads.checkpoint import CheckpointSync
from trainyard.workloads.storage import S3Store

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def run_document(checkpoint: dict, storage: dict) -> dict:
    return {
        "apiVersion": "trainyard.dev/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": "evicted"},
        "spec": {
            "method": "sft",
            "model": {"source": "builtin://tiny-qwen2"},
            "dataset": {"source": "builtin://datasets/alpaca"},
            "training": {"maxSteps": 500, "perDeviceBatchSize": 2, "loggingSteps": 1},
            "checkpoint": {"everySteps": 1, "keepLast": 3, **checkpoint},
            "storage": storage,
        },
    }


def in_flight(output: Path) -> int | None:
    """The step of a save still being written (its staging directory), if any."""
    found = (re.match(r"\.checkpoint-(\d+)\.", p.name) for p in output.glob(".checkpoint-*"))
    steps = [int(m.group(1)) for m in found if m]
    return max(steps) if steps else None


def test_sigterm_finishes_and_uploads_the_save_in_flight(tmp_path, s3_endpoint, s3_bucket):
    checkpoint = {"uri": f"s3://{s3_bucket}/runs/evicted"}
    run_file = tmp_path / "run.json"
    run_file.write_text(json.dumps(run_document(checkpoint, {"s3": {"endpoint": s3_endpoint}})))
    output = tmp_path / "out"
    env = dict(
        os.environ,
        TRAINYARD_CACHE=str(tmp_path / "cache"),
        TRAINYARD_METRICS_PORT="off",
        PYTHONUNBUFFERED="1",
    )
    log = (tmp_path / "train.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "trainyard.workloads.train", str(run_file), "--output", str(output)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        deadline = time.monotonic() + 300
        step = None
        # A save after the first (the writer is warm), caught while it is being written.
        while time.monotonic() < deadline and process.poll() is None:
            step = in_flight(output)
            if step is not None and step >= 2:
                break
            time.sleep(0.005)
        assert process.poll() is None and step is not None, (tmp_path / "train.log").read_text()
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()
    text = (tmp_path / "train.log").read_text()
    assert code == 128 + signal.SIGTERM, text
    assert "terminated (SIGTERM)" in text

    store = S3Store(s3_bucket, "runs/evicted", endpoint=s3_endpoint)
    latest = json.loads(store.get_bytes("latest") or b"{}")
    assert latest.get("step", 0) >= step, f"the save of step {step} in flight was lost: {latest}"
    restored = CheckpointSync(store).resume(tmp_path / "restored")
    assert restored is not None and restored.name == f"checkpoint-{latest['step']}"
    transformers.AutoModelForCausalLM.from_pretrained(restored)
