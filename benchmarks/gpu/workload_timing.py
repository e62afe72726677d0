"""Time a TrainingRun through the workload's own code: `trainyard.workloads.train`
resolves sources, prepares data and builds the TRL trainer exactly as in a pod; a
callback times each optimizer step, so start-up and the first (warm-up) steps can be
left out of the steady-state numbers.
"""

from __future__ import annotations

import os
import socket
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainerCallback


@dataclass
class StepTimes:
    """Per-step wall times and the trainer's logs."""

    seconds: list[float] = field(default_factory=list)
    logs: list[dict[str, Any]] = field(default_factory=list)

    def steady(self, warmup: int) -> list[float]:
        """Step times after the first `warmup` steps (CUDA init, allocator, kernels picked)."""
        kept = self.seconds[warmup:]
        if not kept:
            raise ValueError(
                f"only {len(self.seconds)} steps timed; need more than warmup={warmup}"
            )
        return kept

    def median(self, warmup: int) -> float:
        return statistics.median(self.steady(warmup))

    def mean(self, warmup: int) -> float:
        return statistics.fmean(self.steady(warmup))


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step, synchronised with the GPU so queued kernels count."""

    def __init__(self) -> None:
        self.times = StepTimes()
        self._started: float | None = None

    @staticmethod
    def _sync() -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        self._started = time.perf_counter()
        return control

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        if self._started is not None:
            self.times.seconds.append(time.perf_counter() - self._started)
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs:
            self.times.logs.append({"step": state.global_step, **logs})
        return control


def single_process_distributed_env() -> None:
    """RANK/WORLD_SIZE/MASTER_* for one process, as torchrun would set them (DeepSpeed
    initialises torch.distributed from them)."""
    if "WORLD_SIZE" in os.environ:
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(
        RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip


def train_run(document: dict[str, Any], output_dir: Path) -> tuple[Any, StepTimes]:
    """Train the TrainingRun document with the workload's builders; (trainer, step times)."""
    from trainyard.api import parse_resource
    from trainyard.workloads.methods.common import detect_environment
    from trainyard.workloads.train import build_context, build_trainer

    run = parse_resource(document)
    output_dir.mkdir(parents=True, exist_ok=True)
    timer = StepTimer()
    ctx = build_context(run, output_dir, detect_environment())
    ctx.callbacks.append(timer)
    trainer = build_trainer(ctx)
    trainer.train()
    return trainer, timer.times


def training_run(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "trainyard.dev/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": name},
        "spec": spec,
    }


def peak_memory_gib() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated() / 2**30


def print_table(title: str, rows: list[tuple[str, str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    for key, value in rows:
        table.add_row(key, value)
    Console().print(table)
