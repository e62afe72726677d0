"""Async checkpoint saves: the training step pays for a copy of the state, not for the write.

`AsyncSaves(trainer).install()` makes the Trainer's own `_save_checkpoint` (TRL's
override included: model card, GRPO's entropy state, stateful callbacks, rotation) run
as always, with its two heavy writes deferred: `_save` (the model's weights) and
`_save_optimizer_and_scheduler` (the optimizer state) copy the tensors into host memory
(reused buffers, pinned where CUDA is present) and return; a writer *process* forked
from this one (checkpoint_writer.WriterProcess; the buffers are shared memory) writes
them with the same calls transformers makes (`save_pretrained(state_dict=...)`,
`torch.save`), so the checkpoint-N/ layout and `resume_from_checkpoint` stay exactly
transformers', and serializing never holds the training process's GIL. A background
thread hands each save to it, uploads and rotates.

The host copy itself runs beside the next step where it can (`overlap`, plain torch
optimizers): the save builds the snapshot's structure and returns; a copy thread (on
CUDA a side stream) copies the tensors while the next step's forward and backward
passes only read them, and a step pre-hook on the optimizer makes its step, the first
write to the weights and moments, wait for the copy (CheckFreq's pipelined snapshot).
Under DeepSpeed or FSDP the copy is made during the save.

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

Under DeepSpeed, `engine.save_checkpoint` (called by the trainer's save) writes every
file of global_stepN/ (ZeRO optimizer shards, model states) through its checkpoint
engine's `save(state_dict, path)`: during an async save the engine's
TorchCheckpointEngine is swapped for one whose `save` copies the state dict into this
save's host buffers and leaves the torch.save (same keywords) to the writer. Each
rank has its own AsyncSaves and writer process; the ranks agree on which saves are
dropped (a collective at each save), and the first rank of a node reports a
checkpoint written (`on_written`, the upload) only once every rank of the node has
written its shards (markers beside checkpoint-N/). The files load tensor for tensor as
DeepSpeed's own (requires_grad included); the bytes differ where DeepSpeed saves views
of its flat buffers: torch.save writes the whole shared storage once, the writer each
tensor's own (ZeRO-2's mp_rank_00_model_states.pt is a little larger).
DeepSpeed's decoupled/fast checkpoint writers (`checkpoint.writer`) are left alone:
they hand the live tensors to their own process (no snapshot: the next step changes
them) and block in `commit` until the files are written.

What stays synchronous: DeepSpeed's collectives and small files inside
`save_checkpoint` (its barriers, `latest`, zero_to_fp32.py), the copy of its state to
host memory (DeepSpeed updates its flat partitions in place), FSDP's own optimizer and
shard writes, the small files (RNG, scheduler, trainer state, tokenizer), a DeepSpeed
state the copy cannot walk (a tensor inside an object: written during the save, with a
warning), and any save while `load_best_model_at_end` needs to read checkpoints back
(those fall back to the trainer's own save entirely). A checkpoint-N/ may hold
`latest` before its shards are written: it is complete only when `on_written` says so.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from trainyard.workloads.checkpoint_writer import (
    PARTIAL_SUFFIX,
    WRITER_NICENESS,
    WRITER_PROCESS_SUPPORTED,
    Arena,
    Rotated,
    Snapshot,
    WriterError,
    WriterProcess,
    WriterThread,
    background_priority,
    copy_tensors,
    copy_to_host,
)

__all__ = ["PARTIAL_SUFFIX", "WRITER_NICENESS", "AsyncSaves", "SaveStats", "copy_to_host"]

logger = logging.getLogger(__name__)

OPTIMIZER_NAME = "optimizer.pt"


@dataclass
class SaveStats:
    """What the training step paid and what the writer did, per save (seconds)."""

    step: int
    snapshot_seconds: float = 0.0  # the save call itself
    copy_seconds: float | None = None  # the host copy (overlapped: beside the next step)
    blocked_seconds: float = 0.0  # how long the next optimizer step waited for that copy
    write_seconds: float | None = None
    skipped: bool = False
    engine_files: int = 0  # DeepSpeed checkpoint-engine files left to the writer


@dataclass
class _PendingSave:
    step: int
    directory: Path
    buffers: dict[str, Arena]
    # What the writer does, in order (checkpoint_writer.run_ops; a Snapshot is sent as
    # its pickled structure)
    ops: list[tuple] = field(default_factory=list)
    stats: SaveStats | None = None
    keep_last: int | None = None
    # Overlapped copy: (host buffer, live tensor) pairs copied beside the next step
    copies: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    copied: threading.Event = field(default_factory=threading.Event)
    copy_error: BaseException | None = None
    engine_files: int = 0  # files of DeepSpeed's checkpoint engine among the ops


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
        writer: str = "auto",
        overlap: bool = True,
    ) -> None:
        if writer not in ("auto", "process", "thread"):
            raise ValueError(f"writer: {writer!r} is not one of 'auto', 'process', 'thread'")
        if writer == "process" and not WRITER_PROCESS_SUPPORTED:
            raise ValueError("writer: 'process' needs os.fork and os.memfd_create (Linux)")
        self.trainer = trainer
        # "process": the writes run in a process forked on the first save (off this
        # process's GIL); "thread": on a thread of this process; "auto": process where
        # supported.
        self.writer = "process" if writer == "auto" and WRITER_PROCESS_SUPPORTED else writer
        # Copy the state beside the next step's forward and backward passes, which
        # only read it; the optimizer's step (the first write) waits for the copy.
        self.overlap = overlap
        self._copying: _PendingSave | None = None
        self._hooked: Any = None  # the optimizer whose step waits for copies
        self._hook_handle: Any = None
        self._writer: WriterProcess | WriterThread | None = None
        self._writer_model: Any = None
        self._released: list[int] = []
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
        self._free: list[dict[str, Arena]] = []
        self._closed = False
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self.skipped: list[int] = []
        self.stats: list[SaveStats] = []
        self.written: list[int] = []
        self._logged = 0  # stats already summed up in the log

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
            self._wait_copy()
            step = trainer.state.global_step
            directory = Path(trainer._get_output_dir(trial=trial)) / (
                f"{PREFIX_CHECKPOINT_DIR}-{step}"
            )
            if self._shared_checkpoints():
                # A marker left by a launch that died before its first rank read it
                # must not stand for this save's (it is written after DeepSpeed's
                # barriers in this save, which the first rank waits behind).
                _marker(directory, trainer.args.process_index).unlink(missing_ok=True)
            dropped = self._take_outdated()
            with self._changed:
                if dropped is not None:
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
                with self._engine_writes_deferred(self._current):
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

    def _take_outdated(self) -> _PendingSave | None:
        """The save still waiting for the writer, when this new one outdates it (newest
        wins; its host buffers are reused: two sets at most, one being written); with
        `coalesce=False`, wait until the writer has taken it instead.

        Under DeepSpeed each rank's writer holds that rank's shards of the same
        checkpoint, so the ranks agree (a collective; every rank saves at the same
        step): the save is dropped only where every rank can still drop it; otherwise
        each rank lets its writer take it, and a checkpoint-N/ is whole or gone."""
        with self._changed:
            while not self.coalesce and self._waiting is not None:
                self._changed.wait()
            # Held here, the writer cannot start it while the ranks decide.
            held, self._waiting = self._waiting, None
        if not self._shared_checkpoints() or _every_rank(held is not None, self.trainer):
            return held
        if held is not None:
            with self._changed:
                self._waiting = held
                self._changed.notify_all()
                while self._waiting is not None:
                    self._changed.wait()
        return None

    def _shared_checkpoints(self) -> bool:
        """Whether the ranks write parts of the same checkpoint (DeepSpeed's shards)."""
        return self.trainer.is_deepspeed_enabled and self.trainer.args.world_size > 1

    # ------------------------------------------------------------------ snapshot

    @contextlib.contextmanager
    def _engine_writes_deferred(self, pending: _PendingSave):
        """DeepSpeed's `engine.save_checkpoint` writes each file through its checkpoint
        engine's `save(state_dict, path)`: for the length of this save, a plain
        TorchCheckpointEngine is replaced by one whose `save` copies the state into
        this save's host buffers (now: DeepSpeed updates its flat partitions in place
        at the next step) and leaves the torch.save to the writer. Its collectives,
        directories, `latest` and zero_to_fp32.py stay where DeepSpeed has them."""
        engine = None
        if self.trainer.is_deepspeed_enabled:
            engine = getattr(self.trainer, "deepspeed", None) or self.trainer.model_wrapped
        own = getattr(engine, "checkpoint_engine", None)
        if own is None or type(own).__name__ != "TorchCheckpointEngine":
            # Not started yet, or a decoupled / fast / DataStates engine: its own way.
            yield
            return
        engine.checkpoint_engine = _DeferredCheckpointEngine(self, own, pending)
        try:
            yield
        finally:
            engine.checkpoint_engine = own

    def _defer_engine_save(self, pending: _PendingSave, own: Any, state_dict, path: str) -> None:
        target = Path(path)
        # Keyed by file name (the same every save: the buffers are reused).
        key = f"deepspeed:{target.name}"
        try:
            snapshot = self._copy(state_dict, pending, key)
            # Pickled now: besides tensors the state holds live objects (the loss
            # scaler) that the next steps change.
            structure = snapshot.dumps()
        except Exception:  # a tensor inside an object copy_to_host does not walk
            logger.warning("%s is written during the save: its state is not copyable", path)
            own.save(state_dict, path)
            return
        options = {}
        if hasattr(own, "zipfile_serialization"):
            options["_use_new_zipfile_serialization"] = own.zipfile_serialization
        # ZeRO-3 without a gathered 16-bit model calls save_checkpoint twice per save:
        # the later copy of a file replaces the earlier one.
        kept = [
            op
            for op in pending.ops
            if not (op[0] == "torch" and op[1] == str(target.parent) and op[2] == target.name)
        ]
        if len(kept) == len(pending.ops):
            pending.engine_files += 1
        pending.ops[:] = kept
        pending.ops.append(("torch", str(target.parent), target.name, structure, options))

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
        snapshot = self._copy(state_dict, pending, "model")
        directory.mkdir(parents=True, exist_ok=True)
        # The small files are written now, as transformers does, so the directory holds
        # the same files whichever way it was saved.
        processing = trainer.processing_class
        if processing is None:
            processing = getattr(trainer.data_collator, "tokenizer", None)
        if processing is not None:
            processing.save_pretrained(str(directory))
        torch.save(trainer.args, directory / "training_args.bin")

        if isinstance(model, PreTrainedModel) or _is_peft(model):
            # The writer's model is this one as of its first save: bring what
            # save_pretrained writes besides the weights up to date.
            names = ["peft_config"] if _is_peft(model) else ["config", "generation_config"]
            attrs = {n: getattr(model, n) for n in names if getattr(model, n, None) is not None}
            with contextlib.suppress(Exception):  # not picklable: the writer's own copy
                pending.ops.append(("attrs", pickle.dumps(attrs)))
            pending.ops.append(("pretrained", str(directory), snapshot))
        else:
            pending.ops.append(("safetensors", str(directory), "model.safetensors", snapshot))

    def _defer_optimizer(self, pending: _PendingSave, directory: Path) -> None:
        trainer = self.trainer
        snapshot = self._copy(trainer.optimizer.state_dict(), pending, "optimizer")
        directory.mkdir(parents=True, exist_ok=True)
        # Scheduler and scaler state are small: write them the trainer's way, now.
        import warnings

        from transformers.trainer_pt_utils import reissue_pt_warnings

        if trainer.lr_scheduler is not None:
            with warnings.catch_warnings(record=True) as caught:
                torch.save(trainer.lr_scheduler.state_dict(), directory / "scheduler.pt")
            reissue_pt_warnings(caught)

        pending.ops.append(("torch", str(directory), OPTIMIZER_NAME, snapshot))

    def _copy(self, value: Any, pending: _PendingSave, key: str) -> Snapshot:
        old = pending.buffers.get(key)
        snapshot = copy_to_host(
            value,
            pending.buffers,
            key,
            shared=self.writer == "process",
            pin=self.pin,
            deferred=pending.copies if self._overlapping() else None,
        )
        if old is not None and old is not snapshot.arena:
            with self._changed:
                self._released.append(old.id)
        return snapshot

    def _overlapping(self) -> bool:
        """Whether this save's copy may run beside the next step: only where every
        write to the state goes through one torch optimizer's step (not DeepSpeed or
        FSDP, whose engines update parameters their own way)."""
        trainer = self.trainer
        if not self.overlap or trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
            return False
        optimizer = _torch_optimizer(getattr(trainer, "optimizer", None))
        if optimizer is None:
            return False
        if self._hooked is not optimizer:
            if self._hook_handle is not None:
                self._hook_handle.remove()
            self._hook_handle = optimizer.register_step_pre_hook(
                lambda *_: self._wait_copy(blocking_step=True)
            )
            self._hooked = optimizer
        return True

    def _start_copy(self, pending: _PendingSave) -> None:
        ready = None
        if any(source.is_cuda for _, source in pending.copies):
            ready = torch.cuda.Event()
            ready.record()  # the copies start once the training stream got here
        self._copying = pending

        def run() -> None:
            started = time.perf_counter()
            try:
                copy_tensors(pending.copies, ready)
            except BaseException as error:
                pending.copy_error = error  # the writer fails this save (never uploaded)
            finally:
                pending.stats.copy_seconds = time.perf_counter() - started
                pending.copies.clear()
                pending.copied.set()

        threading.Thread(target=run, name="ckpt-copy", daemon=True).start()

    def _wait_copy(self, blocking_step: bool = False) -> None:
        """Until the last save's copy is done (the next step may then write)."""
        pending = self._copying
        if pending is None:
            return
        if not pending.copied.is_set():
            started = time.perf_counter()
            pending.copied.wait()
            if blocking_step:
                pending.stats.blocked_seconds += time.perf_counter() - started
        if self._copying is pending:
            self._copying = None

    def _model(self) -> Any:
        return self.trainer.accelerator.unwrap_model(self.trainer.model, keep_torch_compile=False)

    def _start_writer(self) -> None:
        """The writer for this trainer's model (on the training thread: a forked
        child dies with the thread that forked it)."""
        model = self._model()
        if self._writer is not None and self._writer_model is model:
            return
        if self._writer is not None:  # a new model object: a writer that holds it
            self.wait()
            self._writer.close()
        self._writer_model = model
        if self.writer == "thread":
            self._writer = WriterThread(model)
            return
        trainer = self.trainer
        plain = not (trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled)

        def free_inherited() -> None:
            # The child writes from the shared buffers only: let go of its copy of the
            # weights and optimizer state (CPU training: otherwise each page the trainer
            # writes next would be copied for this process to keep).
            if not plain or any(p.device.type != "cpu" for p in model.parameters()):
                return
            with contextlib.suppress(Exception):
                model.to("meta")
            optimizer = getattr(trainer, "optimizer", None)
            optimizer = getattr(optimizer, "optimizer", optimizer)
            with contextlib.suppress(Exception):
                optimizer.state.clear()

        self._writer = WriterProcess(model, free_inherited)

    def _seal(self, seconds: float) -> None:
        dropped = None
        if self._current is not None and self._current.ops:
            try:
                self._start_writer()
            except BaseException:
                with self._changed:
                    self._free.append(self._current.buffers)
                    self._current = None
                raise
        with self._changed:
            pending, self._current = self._current, None
            if pending is None:
                return
            pending.stats = SaveStats(
                pending.step, snapshot_seconds=seconds, engine_files=pending.engine_files
            )
            self.stats.append(pending.stats)
            if self._error is not None:
                error, self._error = self._error, None
                raise error
            dropped, self._waiting = self._waiting, pending
            if pending.copies:
                self._start_copy(pending)
            else:
                pending.copied.set()
                if pending.stats.copy_seconds is None:
                    pending.stats.copy_seconds = 0.0
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
        background_priority(threading.get_native_id())
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
            pending.copied.wait()
            started = time.perf_counter()
            try:
                if pending.copy_error is not None:
                    raise pending.copy_error
                if pending.ops:
                    with self._changed:
                        released, self._released = self._released, []
                    ops = [
                        tuple(x.dumps() if isinstance(x, Snapshot) else x for x in op)
                        for op in pending.ops
                    ]
                    self._write(pending, ops, released)
                pending.stats.write_seconds = time.perf_counter() - started
                if not self._ranks_wrote(pending, True):
                    logger.warning(
                        "checkpoint-%d is not whole: another rank's write failed", pending.step
                    )
                    pending.stats.skipped = True
                    shutil.rmtree(pending.directory, ignore_errors=True)
                    with self._changed:
                        self.skipped.append(pending.step)
                    if self.on_skip is not None:
                        self.on_skip(pending.step)
                    continue
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
            except Rotated:
                self._ranks_wrote(pending, False)
                logger.info("checkpoint-%d was rotated away while it was written", pending.step)
                pending.stats.skipped = True
                shutil.rmtree(pending.directory, ignore_errors=True)
                with self._changed:
                    self.skipped.append(pending.step)
                if self.on_skip is not None:
                    self.on_skip(pending.step)
            except BaseException as error:
                with contextlib.suppress(Exception):
                    self._ranks_wrote(pending, False)
                logger.exception("writing checkpoint-%d failed", pending.step)
                # Without its deferred files the directory is no checkpoint: it goes.
                shutil.rmtree(pending.directory, ignore_errors=True)
                with self._changed:
                    self._error = self._error or error
            finally:
                pending.ops.clear()
                with self._changed:
                    self._free.append(pending.buffers)
                    self._writing = False
                    self.writing_step = None
                    self._changed.notify_all()

    def _ranks_wrote(self, pending: _PendingSave, ok: bool) -> bool:
        """Under DeepSpeed the ranks of a node write their shards into one checkpoint-N/:
        each rank but the node's first leaves a marker beside it once its writer is done
        (or failed); the node's first rank, whose `on_written` uploads the directory,
        waits for them all. True when every rank of this node wrote its part."""
        if not self._shared_checkpoints():
            return ok
        args = self.trainer.args
        ranks = _node_ranks(args.process_index, args.local_process_index, args.world_size)
        directory = pending.directory
        if args.process_index != ranks[0]:
            marker = _marker(directory, args.process_index)
            partial = marker.with_name(marker.name + PARTIAL_SUFFIX)
            partial.write_text("ok" if ok else "failed")
            os.replace(partial, marker)
            return ok
        markers = [_marker(directory, r) for r in ranks[1:]]
        while not all(m.exists() for m in markers):
            time.sleep(0.02)
        for marker in markers:
            ok = marker.read_text() == "ok" and ok
            marker.unlink()
        return ok

    def _write(self, pending: _PendingSave, ops: list[tuple], released: list[int]) -> None:
        """Hand one save to the writer. When the writer process fails (killed, or a
        model whose saving it cannot do in a forked child), this save and the later
        ones are written on this thread instead: training goes on, checkpoints too."""
        writer = self._writer
        arenas = list(pending.buffers.values())
        try:
            writer.write(ops, arenas, released)
        except WriterError as error:
            if not isinstance(writer, WriterProcess):
                raise
            logger.warning(
                "the checkpoint writer process failed; checkpoint-%d and later ones are "
                "written in the training process instead: %s",
                pending.step,
                error,
            )
            writer.close()
            directory = pending.directory
            for leftover in directory.parent.glob(f".{directory.name}{PARTIAL_SUFFIX}-*"):
                shutil.rmtree(leftover, ignore_errors=True)
            fallback = WriterThread(self._writer_model)
            with self._changed:
                if self._writer is writer:
                    self._writer, self.writer = fallback, "thread"
            fallback.write(ops, arenas, [])

    def wait(self) -> None:
        """Block until every sealed save is written; raise the first write error."""
        self._wait_copy()
        with self._changed:
            while self._waiting is not None or self._writing:
                self._changed.wait()
            if self._error is not None:
                error, self._error = self._error, None
                raise error

    def _log_stats(self) -> None:
        import statistics

        stats, self._logged = self.stats[self._logged :], len(self.stats)
        if not stats:
            return

        def median(values: list[float | None]) -> float:
            known = [v for v in values if v is not None]
            return statistics.median(known) if known else 0.0

        logger.info(
            "async checkpoint saves: %d (%d skipped); the training step paid: save call "
            "median %.3fs, waits for the host copy %.3fs in all; host copy median %.3fs, "
            "write median %.2fs (writer: %s)",
            len(stats),
            sum(s.skipped for s in stats),
            median([s.snapshot_seconds for s in stats]),
            sum(s.blocked_seconds for s in stats),
            median([s.copy_seconds for s in stats]),
            median([s.write_seconds for s in stats]),
            self.writer,
        )

    def close(self) -> None:
        """Wait for the writes, then stop the writer and free the host buffers (a later
        save starts them again)."""
        try:
            self.wait()
        finally:
            self._log_stats()
            with self._changed:
                self._closed = True
                self._changed.notify_all()
            if self._thread is not None:
                self._thread.join()
            with self._changed:
                self._thread = None
                self._closed = False
                free, self._free = self._free, []
                self._released.clear()
            if self._writer is not None:
                self._writer.close()
                self._writer = None
                self._writer_model = None
            if self._hook_handle is not None:
                self._hook_handle.remove()
                self._hook_handle = self._hooked = None
            for buffers in free:
                for arena in buffers.values():
                    arena.release()


class _DeferredCheckpointEngine:
    """DeepSpeed's checkpoint engine during one async save: `save` defers the write to
    the writer (AsyncSaves._defer_engine_save); everything else (create, makedirs,
    commit, load, is_data_parallel_writer, ...) is the engine's own."""

    def __init__(self, saves: AsyncSaves, own: Any, pending: _PendingSave) -> None:
        self._saves = saves
        self._own = own
        self._pending = pending

    def save(self, state_dict, path: str) -> None:
        self._saves._defer_engine_save(self._pending, self._own, state_dict, path)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._own, name)


def _every_rank(flag: bool, trainer: Any) -> bool:
    """Whether flag holds on every rank (a collective)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([int(flag)], dtype=torch.int32, device=trainer.args.device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def _marker(directory: Path, rank: int) -> Path:
    """Where `rank` says it wrote its part of checkpoint `directory` (beside it)."""
    return directory.parent / f".{directory.name}.rank-{rank}"


def _node_ranks(rank: int, local_rank: int, world_size: int) -> range:
    """The global ranks on this node (torchrun numbers a node's ranks consecutively)."""
    size = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE")
    first = rank - local_rank
    return range(first, first + (int(size) if size else world_size))


def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer | None:
    """The innermost torch optimizer (accelerate's wrapper is one too, but its step
    does not run the step hooks; the optimizer it wraps does), or None."""
    found = None
    while optimizer is not None:
        if isinstance(optimizer, torch.optim.Optimizer):
            found = optimizer
        optimizer = getattr(optimizer, "optimizer", None)
    return found


def _is_peft(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)
