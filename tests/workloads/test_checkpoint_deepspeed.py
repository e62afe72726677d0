"""Async checkpoint saves under DeepSpeed ZeRO: two CPU ranks over gloo under torchrun.

One launch (deepspeed_async_ranks.py) trains a run saved asynchronously (DeepSpeed's own
files, the ZeRO shards among them, written by each rank's writer process), with
DeepSpeed's synchronous save of the same state after each save to compare with, then
resumes it from an async checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TORCHRUN = shutil.which("torchrun")
RANKS_SCRIPT = Path(__file__).with_name("deepspeed_async_ranks.py")


def launch(stage: int, work: Path, cache: Path) -> list[dict]:
    command = [
        TORCHRUN or sys.executable,
        *([] if TORCHRUN else ["-m", "torch.distributed.run"]),
        "--standalone",
        "--nproc_per_node",
        "2",
        str(RANKS_SCRIPT),
        str(stage),
        str(work),
    ]
    environment = {
        **os.environ,
        "TRAINYARD_CACHE": str(cache),
        "TRAINYARD_METRICS_PORT": "off",
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
    }
    completed = subprocess.run(
        command, env=environment, capture_output=True, text=True, timeout=300, check=False
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return [json.loads((work / f"rank-{r}.json").read_text()) for r in (0, 1)]


def assert_loads_equal(mine, theirs, where: str) -> None:
    """The same structure, tensor for tensor (dtype, shape, requires_grad, values)."""
    if isinstance(theirs, torch.Tensor):
        assert isinstance(mine, torch.Tensor), where
        assert (mine.dtype, mine.shape) == (theirs.dtype, theirs.shape), where
        assert mine.requires_grad == theirs.requires_grad, where
        assert torch.equal(mine, theirs), where
    elif isinstance(theirs, dict):
        assert type(mine) is type(theirs) and list(mine) == list(theirs), where
        for key in theirs:
            assert_loads_equal(mine[key], theirs[key], f"{where}.{key}")
    elif isinstance(theirs, list | tuple):
        assert type(mine) is type(theirs) and len(mine) == len(theirs), where
        for i, (a, b) in enumerate(zip(mine, theirs, strict=True)):
            assert_loads_equal(a, b, f"{where}[{i}]")
    elif hasattr(theirs, "__dict__"):  # DeepSpeed's loss scaler, slice mappings
        assert type(mine) is type(theirs), where
        assert_loads_equal(vars(mine), vars(theirs), where)
    else:
        assert mine == theirs, where


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_shards_are_written_by_the_writer_and_load_as_deepspeeds_own(
    stage, tmp_path, tmp_path_factory, monkeypatch
):
    pytest.importorskip("deepspeed")
    from trainyard.workloads import builtin

    cache = tmp_path_factory.getbasetemp() / "trainyard-cache"
    monkeypatch.setenv("TRAINYARD_CACHE", str(cache))
    builtin.model_path("tiny-qwen2")  # once here: two ranks building it at once collide

    ranks = launch(stage, tmp_path, cache)
    for seen in ranks:
        saved = seen["async"]
        assert saved["writer"] == "process"
        # Rank 0's writer was stopped from before the save of step 3 for 5 s: on its own
        # it would have dropped the save of step 4 at step 5 (newest wins), but rank 1's
        # writer had already taken its part, so both write every step (rank 0's save
        # of step 5 waited for its writer instead).
        assert saved["written"] == [1, 2, 3, 4, 5] and saved["skipped"] == []
        # With this rank's writer process stopped, the save of step 2 returned before
        # the rank's optimizer shard existed: the training step did not write it.
        assert saved["shard_existed_when_save_returned"] is False
        # Every save left DeepSpeed's files to the writer: rank 0 its optimizer shard and
        # the model states, rank 1 its shard (ZeRO-3: its own model states too).
        files = 2 if seen is ranks[0] or stage == 3 else 1
        assert set(saved["engine_files"].values()) == {files}
        # Resumed from its checkpoint-3, steps 4 and 5 train as they did the first time.
        assert seen["resumed"]["global_step"] == 5
        assert seen["resumed"]["losses"][3:] == pytest.approx(saved["losses"][3:])
    assert ranks[0]["async"]["save_seconds"]["5"] > 1.0
    assert ranks[0]["async"]["uploaded"] == ranks[0]["async"]["written"]

    for step in ranks[0]["async"]["written"]:
        mine = tmp_path / "async" / f"checkpoint-{step}" / f"global_step{step}"
        theirs = tmp_path / "sync" / f"checkpoint-{step}" / f"global_step{step}"
        names = sorted(p.name for p in theirs.iterdir())
        assert sorted(p.name for p in mine.iterdir()) == names
        assert any("zero_pp_rank_1" in n and n.endswith("optim_states.pt") for n in names)
        # ZeRO-3: each rank's own model states too.
        assert any("zero_pp_rank_1" in n and "model_states" in n for n in names) == (stage == 3)
        for name in names:
            assert_loads_equal(
                torch.load(mine / name, weights_only=False),
                torch.load(theirs / name, weights_only=False),
                f"step {step} {name}",
            )
        assert (mine.parent / "latest").read_text() == f"global_step{step}"
    # Uploaded only once both ranks' shards were written; no marker left behind.
    final = tmp_path / "store" / "step-5" / "global_step5"
    assert sorted(p.name for p in final.iterdir()) == names
    assert not list((tmp_path / "async").glob(".checkpoint-*"))
