"""The GPU checkpoint-stall benchmark's code path at toy size on CPU, so it keeps working
between the runs that have a GPU: it saves through a real Trainer both ways and prints
its ratios line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu" / "checkpoint_stall.py"


def test_checkpoint_stall_benchmark_runs_at_toy_size(tmp_path):
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--rounds", "1", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    last = done.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"stall_vs_sync_save=\d+\.\d\d queue_stall_vs_sync_save=\d+\.\d\d", last)
    # Both ways wrote transformers' checkpoint layout.
    for way in ("sync", "async"):
        newest = max((tmp_path / way).glob("checkpoint-*"), key=lambda p: int(p.name[11:]))
        names = {p.name for p in newest.iterdir()}
        assert {"model.safetensors", "optimizer.pt", "trainer_state.json"} <= names, names
