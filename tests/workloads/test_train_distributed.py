"""The entrypoint under torchrun: two CPU ranks over gloo, and DeepSpeed ZeRO-2 on CPU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TORCHRUN = shutil.which("torchrun")


def run_document(**spec) -> dict:
    base = {
        "method": "sft",
        "model": {"source": "builtin://tiny-qwen2"},
        "dataset": {"source": "builtin://datasets/alpaca"},
        "training": {
            "maxSteps": 2,
            "perDeviceBatchSize": 2,
            "learningRate": 5e-3,
            "loggingSteps": 1,
        },
        "distributed": {"gpusPerNode": 2},
    }
    base.update(spec)
    return {
        "apiVersion": "trainyard.dev/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": "distributed-test"},
        "spec": base,
    }


def torchrun(document: dict, tmp_path: Path, cache: Path, **env) -> dict:
    """Run the entrypoint on two ranks; returns rank 0's result.json."""
    run_json = tmp_path / "run.json"
    run_json.write_text(json.dumps(document))
    output = tmp_path / "out"
    command = [
        TORCHRUN or sys.executable,
        *([] if TORCHRUN else ["-m", "torch.distributed.run"]),
        # standalone: a local rendezvous on a free port, so parallel sessions do not collide.
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "trainyard.workloads.train",
        str(run_json),
        "--output",
        str(output),
    ]
    environment = {
        **os.environ,
        "TRAINYARD_CACHE": str(cache),
        "TRAINYARD_METRICS_PORT": "0",
        "OMP_NUM_THREADS": "1",
        **env,
    }
    completed = subprocess.run(
        command, env=environment, capture_output=True, text=True, timeout=420, check=False
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads((output / "result.json").read_text())


@pytest.fixture
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "trainyard-cache"


@pytest.mark.slow
def test_two_ranks_train_with_lora_over_gloo(tmp_path, cache):
    result = torchrun(run_document(peft={"r": 4, "alpha": 8}), tmp_path, cache)
    assert result["worldSize"] == 2
    assert result["globalStep"] == 2
    history = [e for e in result["logHistory"] if "loss" in e]
    # num_tokens counts the whole world's batch: both ranks fed the same step.
    assert history[0]["num_tokens"] > 0 and len(history) == 2
    assert (tmp_path / "out" / "final" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "out" / "final" / "model.safetensors").exists()


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_on_cpu(stage, tmp_path, cache, monkeypatch):
    pytest.importorskip("deepspeed")
    from safetensors.torch import load_file

    from trainyard.workloads import builtin

    monkeypatch.setenv("TRAINYARD_CACHE", str(cache))

    document = run_document(distributed={"gpusPerNode": 2, "deepspeed": {"zeroStage": stage}})
    result = torchrun(document, tmp_path, cache, DS_ACCELERATOR="cpu")
    assert result["deepspeedZeroStage"] == stage
    assert result["worldSize"] == 2 and result["globalStep"] == 2
    losses = [e["loss"] for e in result["logHistory"] if "loss" in e]
    assert len(losses) == 2 and all(isinstance(x, float) for x in losses)
    # ZeRO-3 shards parameters; the saved model is gathered whole again.
    saved = load_file(str(tmp_path / "out" / "final" / "model.safetensors"))
    start = load_file(str(builtin.model_path("tiny-qwen2") / "model.safetensors"))
    assert all(saved[name].shape == tensor.shape for name, tensor in start.items())
