"""One rank of test_checkpoint_deepspeed.py's ZeRO runs (run under torchrun, two CPU ranks).

python deepspeed_async_ranks.py STAGE WORKDIR: a training saved asynchronously
(WORKDIR/async, checkpoints uploaded to WORKDIR/store), with DeepSpeed's own synchronous
save of the same state after each (WORKDIR/sync/checkpoint-N/global_stepN), then resumed
from the async checkpoint of step 3 (WORKDIR/resumed).
Each rank writes what it saw to WORKDIR/rank-R.json; the test compares the files.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path

from transformers import TrainerCallback

from trainyard.api import TrainingRun
from trainyard.workloads.checkpoint import CheckpointSync, CheckpointSyncCallback
from trainyard.workloads.methods.common import detect_environment
from trainyard.workloads.storage import FileStore
from trainyard.workloads.train import build_context, build_trainer, init_deepspeed_comm

STEPS = 5


def run(stage: int, store: Path) -> TrainingRun:
    return TrainingRun.model_validate(
        {
            "apiVersion": "trainyard.dev/v1alpha1",
            "kind": "TrainingRun",
            "metadata": {"name": "ds-async"},
            "spec": {
                "method": "sft",
                "model": {"source": "builtin://tiny-qwen2"},
                "dataset": {"source": "builtin://datasets/alpaca"},
                "training": {
                    "maxSteps": STEPS,
                    "perDeviceBatchSize": 2,
                    "learningRate": 5e-3,
                    "loggingSteps": 1,
                },
                "checkpoint": {"everySteps": 1, "uri": f"file://{store}"},
                "distributed": {"gpusPerNode": 2, "deepspeed": {"zeroStage": stage}},
            },
        }
    )


class StopWriterAtSave(TrainerCallback):
    """Stops this rank's writer process before the save of `step` and lets it go on
    after that save returned, noting whether this rank's optimizer shard existed then."""

    def __init__(self, sync: CheckpointSyncCallback, step: int, rank: int) -> None:
        self.sync, self.step, self.rank = sync, step, rank
        self.shard_existed: bool | None = None
        self.pid = None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            self.pid = self.sync.saves._writer.pid
            os.kill(self.pid, signal.SIGSTOP)
        return control

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            tag = Path(args.output_dir) / f"checkpoint-{self.step}" / f"global_step{self.step}"
            self.shard_existed = any(tag.glob(f"*zero_pp_rank_{self.rank}_*optim_states.pt"))
            os.kill(self.pid, signal.SIGCONT)
        return control


class HoldFirstRanksWriter(TrainerCallback):
    """Stops rank 0's writer process before the save of `step` for `seconds`: rank 0
    then still holds the save of step + 1 when the save of step + 2 comes, rank 1 not
    (its writer took it), so the ranks must agree not to drop it."""

    def __init__(self, sync: CheckpointSyncCallback, step: int, seconds: float) -> None:
        self.sync, self.step, self.seconds = sync, step, seconds

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step and args.process_index == 0:
            pid = self.sync.saves._writer.pid
            os.kill(pid, signal.SIGSTOP)
            threading.Timer(self.seconds, os.kill, (pid, signal.SIGCONT)).start()
        return control


class ReferenceSaves(TrainerCallback):
    """DeepSpeed's own synchronous save of the same state, right after each async save
    returned (before the next step): `engine.save_checkpoint` into `directory`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.trainer = None

    def on_save(self, args, state, control, **kwargs):
        target = self.directory / f"checkpoint-{state.global_step}"
        self.trainer.model_wrapped.save_checkpoint(str(target))
        return control


def train(document: TrainingRun, output: Path, store: Path, *, resume=None) -> dict:
    trainer = build_trainer(build_context(document, output, detect_environment()))
    trainer.args.save_total_limit = None  # keep every checkpoint to compare
    callback = CheckpointSyncCallback(CheckpointSync(FileStore(store)))
    callbacks = [callback]
    rank = trainer.args.process_index
    if resume is None:
        callbacks.append(StopWriterAtSave(callback, 2, rank))
        callbacks.append(HoldFirstRanksWriter(callback, 3, 5.0))
        callbacks.append(ReferenceSaves(output.parent / "sync"))
    for extra in callbacks:
        trainer.add_callback(extra)
        extra.trainer = trainer
    trainer.train(resume_from_checkpoint=resume)
    callback.sync.close()
    seen = {"global_step": trainer.state.global_step}
    seen["losses"] = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    if callback.saves is not None:
        seen["written"] = callback.saves.written
        seen["skipped"] = callback.saves.skipped
        seen["writer"] = callback.saves.writer
        seen["uploaded"] = callback.uploaded
        seen["engine_files"] = {s.step: s.engine_files for s in callback.saves.stats}
        seen["save_seconds"] = {s.step: s.snapshot_seconds for s in callback.saves.stats}
    if resume is None:
        seen["shard_existed_when_save_returned"] = callbacks[1].shard_existed
    return seen


def main() -> None:
    stage, work = int(sys.argv[1]), Path(sys.argv[2])
    init_deepspeed_comm(run(stage, work).spec, detect_environment())
    seen = {}
    seen["async"] = train(run(stage, work / "store"), work / "async", work / "store")
    seen["resumed"] = train(
        run(stage, work / "store-resumed"),
        work / "resumed",
        work / "store-resumed",
        resume=str(work / "async" / "checkpoint-3"),
    )
    rank = int(os.environ["RANK"])
    (work / f"rank-{rank}.json").write_text(json.dumps(seen))


if __name__ == "__main__":
    main()
