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


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def two_nodes(document: dict, tmp_path: Path, cache: Path, attempt: str) -> dict:
    """Two torchrun launches of one rank each, as two pods of the operator's indexed Job:
    node ranks 0 and 1, a static rendezvous at node 0, and a disk of their own each.
    Returns node 0's result.json."""
    run_json = tmp_path / "run.json"
    run_json.write_text(json.dumps(document))
    port = free_port()
    launches = []
    for node in (0, 1):
        output = tmp_path / f"attempt-{attempt}" / f"node-{node}"
        command = [
            TORCHRUN or sys.executable,
            *([] if TORCHRUN else ["-m", "torch.distributed.run"]),
            "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(node),
            "--master_addr", "127.0.0.1", "--master_port", str(port),
            "-m", "trainyard.workloads.train", str(run_json), "--output", str(output),
        ]  # fmt: skip
        environment = {
            **os.environ,
            "TRAINYARD_CACHE": str(cache),
            "TRAINYARD_METRICS_PORT": "0",
            "TRAINYARD_RESTART_ATTEMPT": attempt,
            "OMP_NUM_THREADS": "1",
            "DS_ACCELERATOR": "cpu",
        }
        log = open(tmp_path / f"attempt-{attempt}-node-{node}.log", "w")  # noqa: SIM115
        launches.append((subprocess.Popen(command, env=environment, stdout=log, stderr=log), log))
    for process, log in launches:
        process.wait(timeout=420)
        log.close()
    for process, log in launches:
        assert process.returncode == 0, Path(log.name).read_text()[-4000:]
    return json.loads((tmp_path / f"attempt-{attempt}" / "node-0" / "result.json").read_text())


@pytest.mark.slow
def test_two_nodes_store_every_nodes_zero_shards_and_both_resume(tmp_path, cache):
    """ZeRO-2 over two nodes: each node's disk holds its own rank's optimizer shard and
    RNG state. The step is complete only with both nodes' files in its manifest, and a
    restarted gang (fresh disks) resumes on both nodes from it, each node downloading
    the shared files and its own rank's files only."""
    pytest.importorskip("deepspeed")
    store = tmp_path / "store"
    document = run_document(
        distributed={"nodes": 2, "gpusPerNode": 1, "deepspeed": {"zeroStage": 2}},
        checkpoint={"uri": f"file://{store}", "everySteps": 2, "keepLast": 2},
    )
    first = two_nodes(document, tmp_path, cache, attempt="0")
    assert first["worldSize"] == 2 and first["globalStep"] == 2

    manifest = json.loads((store / "step-2" / "manifest.json").read_text())
    paths = {entry["path"] for entry in manifest["files"]}
    shards = {p.rsplit("/", 1)[-1] for p in paths if "optim_states" in p}
    assert shards == {
        "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
    } or shards == {
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    }, paths
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= paths
    # Node 1's shard came from node 1's disk: node 0's never held it.
    node0 = tmp_path / "attempt-0" / "node-0" / "checkpoint-2"
    assert not any("pp_rank_1" in p.name for p in node0.rglob("*"))
    assert manifest["nodes"] == 2 and json.loads((store / "latest").read_text())["step"] == 2

    document["spec"]["training"]["maxSteps"] = 4
    second = two_nodes(document, tmp_path, cache, attempt="1")
    assert second["globalStep"] == 4
    assert second["resumedFrom"].endswith("checkpoint-2")
    # The ranks agreed on step 2, and each node downloaded the shared files and its own
    # rank's shard and RNG state only: what DeepSpeed and the Trainer read there.
    for node, other in ((0, 1), (1, 0)):
        resumed = tmp_path / "attempt-1" / f"node-{node}" / "checkpoint-2"
        names = {p.name for p in resumed.rglob("*") if p.is_file()}
        assert f"rng_state_{node}.pth" in names and f"rng_state_{other}.pth" not in names
        assert any(f"pp_rank_{node}_" in name for name in names), names
        assert not any(f"pp_rank_{other}_" in name for name in names), names
        assert {"trainer_state.json", "latest", "mp_rank_00_model_states.pt"} <= names
        log = (tmp_path / f"attempt-1-node-{node}.log").read_text()
        assert f"shared files and ranks {node}-{node}'s of 2" in log, log[-4000:]
        assert f"resuming from {resumed}" in log
    # Node 1 trained on from step 2 with node 0 and saved its shard of step 4.
    node1 = tmp_path / "attempt-1" / "node-1"
    assert any("pp_rank_1_" in p.name for p in (node1 / "checkpoint-4").rglob("*"))
    assert json.loads((store / "latest").read_text())["step"] == 4
