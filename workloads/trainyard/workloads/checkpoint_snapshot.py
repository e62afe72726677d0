"""Async checkpoint saves: the training step pays for a copy of the state, not for the write.

`AsyncSaves(trainer).install()` makes the Trainer's own `_save_checkpoint` (TRL's
override included: model card, GRPO's entropy state, stateful callbacks, rotation) run
as always, with its two heavy writes deferred: `_save` (the model's weights) and
`_save_optimizer_and_scheduler` (the optimizer state) copy the tensors into host memory
(pinned where CUDA is present) and return; one background thread writes them with the
same calls transformers makes (`save_pretrained(state_dict=...)`, `torch.save`), so the
checkpoint-N/ layout and `resume_from_checkpoint` stay exactly transformers'.

Why not torch.distributed.checkpoint's `async_save`: it writes DCP's own `.distcp`
layout, which `Trainer.train(resume_from_checkpoint=...)` does not read; it fits FSDP
training loops that also load with DCP. The trainer's own save path, with its writes
moved off the step, keeps every file name and format the Hugging Face tools expect.

Each save writes into its own checkpoint-N/ (files appear under temporary names and
are renamed when whole), so a save never touches the one still being written. When a
save is sealed while an older one still waits to be written, the older one is dropped
(newest wins; `skipped` and `on_skip` say which; with `coalesce=False`, as on runs of
several nodes, the new save waits for the writer instead): at most two snapshots are
in host memory. A dropped or unfinished checkpoint-N/ is never uploaded (`on_written` hands a
checkpoint to the uploader only once all its files are written) and a dropped one is
deleted, so no incomplete directory is left behind for long.

What stays synchronous: DeepSpeed's and FSDP's own optimizer/shard writes
(`engine.save_checkpoint` is a collective over the ranks), the small files (RNG,
scheduler, trainer state, tokenizer), and any save while `load_best_model_at_end`
needs to read checkpoints back (those fall back to the trainer's own save entirely).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

logger = logging.getLogger(__name__)

OPTIMIZER_NAME = "optimizer.pt"
# The writer thread runs this much nicer than training (Linux schedules threads one by
# one), so serializing a checkpoint takes idle CPU before the step's.
WRITER_NICENESS = 10
PARTIAL_SUFFIX = ".writing"


HostBuffers = dict[tuple, torch.Tensor]


def copy_to_host(value: Any, pin: bool = False, buffers: HostBuffers | None = None) -> Any:
    """A copy of value with every tensor copied into (pinned) host memory; dicts, lists
    and tuples rebuilt, anything else shared (ints, strings: immutable).

    `buffers` (path in the structure → tensor) are reused when shape and dtype match
    and filled in otherwise: a fresh allocation of GBs costs a page fault per page (and
    pinning costs more), a reused buffer only the copy. A tensor that appears twice
    (tied weights) is copied once and stays shared, so save_pretrained sees the tie."""
    buffers = {} if buffers is None else buffers
    copies: dict[tuple, torch.Tensor] = {}

    def copy(item: Any, path: tuple) -> Any:
        if isinstance(item, torch.Tensor):
            # state_dict() detaches each entry anew: tied weights are two tensor objects
            # over one storage, so they are known by where their data lies.
            where = (
                item.device,
                item.untyped_storage().data_ptr(),
                item.storage_offset(),
                tuple(item.shape),
                item.stride(),
                item.dtype,
            )
            if where not in copies:
                source = item.detach()
                target = buffers.get(path)
                if target is None or target.shape != source.shape or target.dtype != source.dtype:
                    target = torch.empty(
                        source.shape, dtype=source.dtype, pin_memory=pin and source.is_cuda
                    )
                    buffers[path] = target
                copies[where] = target.copy_(source, non_blocking=pin and source.is_cuda)
            return copies[where]
        if isinstance(item, dict):
            return type(item)((k, copy(v, (*path, k))) for k, v in item.items())
        if isinstance(item, list | tuple):
            return type(item)(copy(v, (*path, i)) for i, v in enumerate(item))
        return item

    result = copy(value, ())
    if pin and torch.cuda.is_available():
        torch.cuda.synchronize()  # the non-blocking copies must land before the step goes on
    return result


@dataclass
class SaveStats:
    """What the training step paid and what the writer did, per save (seconds)."""

    step: int
    snapshot_seconds: float = 0.0
    write_seconds: float | None = None
    skipped: bool = False


@dataclass
class _PendingSave:
    step: int
    directory: Path
    buffers: HostBuffers
    writes: list[Callable[[], None]] = field(default_factory=list)
    stats: SaveStats | None = None
    keep_last: int | None = None


class _Rotated(Exception):
    """The trainer's rotation removed a checkpoint while it was being written."""


class AsyncSaves:
    """Defers a Trainer's heavy checkpoint writes to one background thread.

    `on_written(directory, step)` runs on that thread once checkpoint-N is complete on
    disk (the upload hook); `on_skip(step)` for each save dropped because a newer one
    came first. Call `wait()` before reading checkpoints back and at the end of
    training; it raises the first write error."""

    def __init__(
        self,
        trainer: Any,
        *,
        on_written: Callable[[Path, int], None] | None = None,
        on_skip: Callable[[int], None] | None = None,
        coalesce: bool = True,
    ) -> None:
        self.trainer = trainer
        # False: never drop a save; a save that finds one still waiting for the writer
        # waits until the writer takes it (every node of a multi-node run must write
        # the same steps: node 0 commits a step only with every node's part).
        self.coalesce = coalesce
        self.on_written = on_written
        self.on_skip = on_skip
        self.pin = torch.cuda.is_available()
        self._changed = threading.Condition()
        self._current: _PendingSave | None = None  # being built by the training step
        self._waiting: _PendingSave | None = None  # sealed, not yet started
        self._writing = False
        self.writing_step: int | None = None  # the save the writer works on now
        self._free: list[HostBuffers] = []
        self._closed = False
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self.skipped: list[int] = []
        self.stats: list[SaveStats] = []
        self.written: list[int] = []

    @staticmethod
    def unsupported(trainer: Any) -> str | None:
        """Why this trainer's saves must stay synchronous, or None."""
        args = trainer.args
        if args.load_best_model_at_end:
            return "load_best_model_at_end reads checkpoints back as they are saved"
        if args.push_to_hub:
            return "push_to_hub uploads each checkpoint directory as soon as it is saved"
        if getattr(trainer, "is_fsdp_xla_enabled", False):
            return "XLA saves through xm.save"
        return None

    def install(self) -> bool:
        """Route the trainer's saves through this object; False (and a log line) when
        they must stay synchronous."""
        reason = self.unsupported(self.trainer)
        if reason is not None:
            logger.info("checkpoints are saved synchronously: %s", reason)
            return False
        trainer = self.trainer
        save_checkpoint = trainer._save_checkpoint
        save_weights = trainer._save
        save_optimizer = trainer._save_optimizer_and_scheduler
        plain_optimizer = not (trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled)

        def _save_checkpoint(model, trial):
            started = time.perf_counter()
            step = trainer.state.global_step
            directory = Path(trainer._get_output_dir(trial=trial)) / (
                f"{PREFIX_CHECKPOINT_DIR}-{step}"
            )
            dropped = None
            with self._changed:
                while not self.coalesce and self._waiting is not None:
                    self._changed.wait()
                # A save still waiting for the writer is outdated by this one: drop it
                # now and reuse its host buffers (two sets at most: one being written).
                if self._waiting is not None:
                    dropped, self._waiting = self._waiting, None
                    buffers = dropped.buffers
                else:
                    buffers = self._free.pop() if self._free else {}
                self._current = _PendingSave(step, directory, buffers)
            if dropped is not None:
                self._drop(dropped, step)
            # Rotation waits for the writer: an older checkpoint is deleted only once
            # the newer one is whole on disk (and its deletion leaves the step too).
            limit, trainer.args.save_total_limit = trainer.args.save_total_limit, None
            try:
                save_checkpoint(model, trial)
            except BaseException:
                with self._changed:
                    self._free.append(buffers)
                    self._current = None
                raise
            finally:
                trainer.args.save_total_limit = limit
            self._current.keep_last = limit
            self._seal(time.perf_counter() - started)

        def _save(output_dir=None, state_dict=None):
            pending = self._current
            if pending is None or not trainer.args.should_save:
                return save_weights(output_dir, state_dict)
            self._defer_weights(pending, Path(output_dir or trainer.args.output_dir), state_dict)

        def _save_optimizer_and_scheduler(output_dir):
            pending = self._current
            if pending is None or not plain_optimizer or not trainer.args.should_save:
                return save_optimizer(output_dir)
            self._defer_optimizer(pending, Path(output_dir))

        trainer._save_checkpoint = _save_checkpoint
        trainer._save = _save
        trainer._save_optimizer_and_scheduler = _save_optimizer_and_scheduler
        return True

    # ------------------------------------------------------------------ snapshot

    def _defer_weights(self, pending: _PendingSave, directory: Path, state_dict) -> None:
        from transformers import PreTrainedModel

        trainer = self.trainer
        model = trainer.accelerator.unwrap_model(trainer.model, keep_torch_compile=False)
        if state_dict is None:
            state_dict = model.state_dict()
            if _is_peft(model):
                # An adapter checkpoint holds the adapter: copy only what PEFT will save.
                trainable = {name for name, p in model.named_parameters() if p.requires_grad}
                state_dict = {
                    k: v
                    for k, v in state_dict.items()
                    if k in trainable or "lora_" in k or "modules_to_save" in k
                }
        snapshot = copy_to_host(state_dict, self.pin, pending.buffers.setdefault(("model",), {}))
        directory.mkdir(parents=True, exist_ok=True)
        # The small files are written now, as transformers does, so the directory holds
        # the same files whichever way it was saved.
        processing = trainer.processing_class
        if processing is None:
            processing = getattr(trainer.data_collator, "tokenizer", None)
        if processing is not None:
            processing.save_pretrained(str(directory))
        torch.save(trainer.args, directory / "training_args.bin")

        def write() -> None:
            staging = _staging(directory)
            if isinstance(model, PreTrainedModel) or _is_peft(model):
                model.save_pretrained(str(staging), state_dict=snapshot)
            else:
                import safetensors.torch

                safetensors.torch.save_file(
                    snapshot, str(staging / "model.safetensors"), metadata={"format": "pt"}
                )
            _move_into(staging, directory)

        pending.writes.append(write)

    def _defer_optimizer(self, pending: _PendingSave, directory: Path) -> None:
        trainer = self.trainer
        snapshot = copy_to_host(
            trainer.optimizer.state_dict(), self.pin, pending.buffers.setdefault(("optimizer",), {})
        )
        directory.mkdir(parents=True, exist_ok=True)
        # Scheduler and scaler state are small: write them the trainer's way, now.
        import warnings

        from transformers.trainer_pt_utils import reissue_pt_warnings

        if trainer.lr_scheduler is not None:
            with warnings.catch_warnings(record=True) as caught:
                torch.save(trainer.lr_scheduler.state_dict(), directory / "scheduler.pt")
            reissue_pt_warnings(caught)

        def write() -> None:
            staging = _staging(directory)
            torch.save(snapshot, staging / OPTIMIZER_NAME)
            _move_into(staging, directory)

        pending.writes.append(write)

    def _seal(self, seconds: float) -> None:
        dropped = None
        with self._changed:
            pending, self._current = self._current, None
            if pending is None:
                return
            pending.stats = SaveStats(pending.step, snapshot_seconds=seconds)
            self.stats.append(pending.stats)
            if self._error is not None:
                error, self._error = self._error, None
                raise error
            dropped, self._waiting = self._waiting, pending
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="ckpt-write", daemon=True)
                self._thread.start()
            self._changed.notify_all()
        if dropped is not None:
            self._drop(dropped, pending.step)

    def _drop(self, dropped: _PendingSave, newer: int) -> None:
        logger.info(
            "checkpoint-%d not written: checkpoint-%d was saved before its write could "
            "start (newest wins)",
            dropped.step,
            newer,
        )
        dropped.stats.skipped = True
        # Its small files are already there; without its weights it must not stay.
        shutil.rmtree(dropped.directory, ignore_errors=True)
        with self._changed:
            self.skipped.append(dropped.step)
        if self.on_skip is not None:
            self.on_skip(dropped.step)

    # ------------------------------------------------------------------ writer

    def _run(self) -> None:
        with contextlib.suppress(OSError, AttributeError):  # not Linux: same priority
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICENESS)
        while True:
            with self._changed:
                while self._waiting is None and not self._closed:
                    self._changed.wait()
                if self._waiting is None:
                    return
                pending, self._waiting = self._waiting, None
                self._writing = True
                self._changed.notify_all()
                self.writing_step = pending.step
            started = time.perf_counter()
            try:
                for write in pending.writes:
                    write()
                pending.stats.write_seconds = time.perf_counter() - started
                self.written.append(pending.step)
                if self.on_written is not None:
                    self.on_written(pending.directory, pending.step)
                if pending.keep_last and self.trainer.args.should_save:
                    rotate_checkpoints(
                        output_dir=str(pending.directory.parent),
                        save_total_limit=pending.keep_last,
                        best_model_checkpoint=self.trainer.state.best_model_checkpoint,
                        use_mtime=False,
                    )
            except _Rotated:
                logger.info("checkpoint-%d was rotated away while it was written", pending.step)
                pending.stats.skipped = True
                shutil.rmtree(pending.directory, ignore_errors=True)
                with self._changed:
                    self.skipped.append(pending.step)
                if self.on_skip is not None:
                    self.on_skip(pending.step)
            except BaseException as error:
                logger.exception("writing checkpoint-%d failed", pending.step)
                with self._changed:
                    self._error = self._error or error
            finally:
                pending.writes.clear()
                with self._changed:
                    self._free.append(pending.buffers)
                    self._writing = False
                    self.writing_step = None
                    self._changed.notify_all()

    def wait(self) -> None:
        """Block until every sealed save is written; raise the first write error."""
        with self._changed:
            while self._waiting is not None or self._writing:
                self._changed.wait()
            if self._error is not None:
                error, self._error = self._error, None
                raise error

    def close(self) -> None:
        try:
            self.wait()
        finally:
            with self._changed:
                self._closed = True
                self._changed.notify_all()
            if self._thread is not None:
                self._thread.join()


def _is_peft(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def _staging(directory: Path) -> Path:
    """A fresh hidden sibling to write into; renamed file by file when complete."""
    staging = directory.parent / f".{directory.name}{PARTIAL_SUFFIX}-{threading.get_ident()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def _move_into(staging: Path, directory: Path) -> None:
    """Rename each written file into directory (atomic per file), then drop staging.

    The directory keeps its modification time: the trainer's rotation orders
    checkpoints by it, and an older checkpoint finished late must not look newest."""
    try:
        try:
            times = directory.stat()
        except FileNotFoundError:
            raise _Rotated(str(directory)) from None
        for path in sorted(staging.rglob("*")):
            if path.is_file():
                target = directory / path.relative_to(staging)
                if target.parent != directory:  # an adapter saved under its own name
                    target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.replace(path, target)
                except FileNotFoundError:
                    raise _Rotated(str(directory)) from None
        os.utime(directory, ns=(times.st_atime_ns, times.st_mtime_ns))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
