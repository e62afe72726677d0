"""Checkpoint sync: upload each save in the background, resume from the newest good one.

The layout and its rules (manifest last, `latest`, retention) are in checkpoint_store.
Uploads run in one background child process (`python -m trainyard.workloads.checkpoint_store
--serve`, under SCHED_IDLE), one at a time: training keeps its cores and its GIL, and a crashed upload
cannot take the trainer down with it. When saves come faster than uploads finish, the
newest waiting save replaces the older one (coalescing), so training never queues.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from trainyard.workloads.checkpoint_store import (
    FINAL,
    LATEST,
    MANIFEST,
    PART_TIMEOUT_SECONDS,
    CheckpointUploadError,
    UploadResult,
    apply_retention,
    files_for_ranks,
    find_steps,
    read_latest,
    upload_checkpoint,
    verify_download,
    write_latest,
)
from trainyard.workloads.storage import FileStore, S3Store, open_store

__all__ = [
    "FINAL",
    "LATEST",
    "MANIFEST",
    "CheckpointSync",
    "CheckpointSyncCallback",
    "CheckpointResumeError",
    "CheckpointUploadError",
    "ResumeAttempt",
    "ResumeGroup",
    "UploadResult",
    "apply_retention",
    "find_latest_complete",
    "read_latest",
    "write_latest",
]

logger = logging.getLogger(__name__)

STAGING_DIR = ".trainyard-sync"
# Lines of an upload process's stderr that go into the error of a failed upload.
STDERR_TAIL_LINES = 20


@dataclass
class ResumeAttempt:
    """Why a checkpoint was or was not used on resume, and what this node downloaded of
    it (none where another node's download failed first); kept for logs and tests."""

    step: int
    ok: bool
    reason: str = ""
    files: int = 0
    bytes: int = 0
    seconds: float = 0.0
    selective: bool = False
    """Only the shared files and this node's ranks' own were downloaded."""


class CheckpointResumeError(RuntimeError):
    """The store could not be read while resuming, on this node or another."""


@dataclass(frozen=True)
class ResumeGroup:
    """The processes of a run that resume together (train.py: torch.distributed).

    `share(value)` returns global rank 0's value on every rank (broadcast_object_list);
    `gather(value)` every rank's value, in rank order, on every rank (all_gather_object).
    `ranks` are the global ranks of this process's node: the first of them downloads
    for all of them. `selective`: a rank reads only its own per-rank files (False where
    the DeepSpeed config makes every rank read every rank's: elastic or universal
    checkpoints)."""

    rank: int
    ranks: range
    world_size: int
    share: Callable[[Any], Any]
    gather: Callable[[Any], list]
    selective: bool = True

    @property
    def downloads(self) -> bool:
        return self.rank == self.ranks.start


class CheckpointSync:
    """Uploads checkpoints in the background, newest first; resumes and exports.

    `uri` is `s3://bucket/prefix` or `file://path` (or an already opened store);
    store_options are `open_store`'s S3 settings (endpoint, region, addressing_style,
    credentials_dir, max_concurrency, multipart_threshold, multipart_chunksize).
    `on_upload` is called from the background thread with every UploadResult, failed
    ones included (metrics hook); `on_skip` with each step skipped by coalescing.
    Uploads run in one child process under SCHED_IDLE (Linux; elsewhere
    `upload_niceness` steps nicer than training), so they take only CPU time training
    leaves; `upload_niceness=0` runs it as training runs.

    One upload runs at a time and at most one more waits: when a save comes while one
    waits, the newer replaces it (`coalesce`): training never waits for the network,
    local snapshots stay bounded, and `latest` only moves forward. The newest save is
    never dropped, so the last checkpoint is always uploaded before `wait` returns.

    On a run of several `nodes`, every node's sync uploads the files its disk holds;
    node 0's commits the step once the others' parts of the same restart `attempt` are
    stored (checkpoint_store: parts). Nodes do not coalesce: each must upload the same
    steps as node 0, which waits for their parts.
    """

    def __init__(
        self,
        uri: str | S3Store | FileStore,
        *,
        keep_last: int | None = None,
        on_upload: Callable[[UploadResult], None] | None = None,
        on_skip: Callable[[int], None] | None = None,
        upload_niceness: int = 10,
        node: int = 0,
        nodes: int = 1,
        attempt: str = "0",
        part_timeout: float = PART_TIMEOUT_SECONDS,
        coalesce: bool = True,
        **store_options,
    ) -> None:
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"checkpoint.keepLast must be at least 1, got {keep_last}")
        self.store = open_store(uri, **store_options) if isinstance(uri, str) else uri
        self.keep_last = keep_last
        self.on_upload = on_upload
        self.on_skip = on_skip
        self.upload_niceness = upload_niceness
        self.node, self.nodes, self.attempt = node, nodes, attempt
        self.part_timeout = part_timeout
        self.coalesce = coalesce and nodes == 1
        self._changed = threading.Condition()
        self._queue: list[_Job] = []
        self._closed = False
        self._thread: threading.Thread | None = None
        self._uploader: _Uploader | None = None
        self._since_wait: list[concurrent.futures.Future] = []
        self.results: list[UploadResult] = []
        self.skipped: list[int] = []
        self._reported = 0
        self.errors: list[BaseException] = []
        self.resume_attempts: list[ResumeAttempt] = []

    @property
    def last_step(self) -> int | None:
        """The newest step uploaded and named by `latest` in this process."""
        steps = [r.step for r in self.results if r.error is None and r.name.startswith("step-")]
        return max(steps) if steps else None

    def submit(self, directory: str | os.PathLike[str], step: int) -> concurrent.futures.Future:
        """Queue the upload of a saved checkpoint dir as step-N and return at once.

        The files are hard-linked into a staging dir first (a copy where links are not
        possible), so the trainer may rotate the checkpoint away while it uploads. The
        future's result is the UploadResult, or None when a newer save replaced it."""
        directory = Path(directory)
        if self.node > 0 and not directory.is_dir():
            # This node saved nothing of the step (plain DDP: node 0 saves); its empty
            # part still tells node 0 it is done.
            snapshot = directory
        else:
            snapshot = snapshot_directory(directory, step)
        job = _Job(snapshot, step, concurrent.futures.Future())
        replaced: list[_Job] = []
        with self._changed:
            if self._closed:
                raise CheckpointUploadError(f"checkpoint sync to {self.store.uri} is closed")
            if self.coalesce:
                replaced, self._queue = self._queue, []
                self.skipped.extend(old.step for old in replaced)
            self._queue.append(job)
            self._since_wait.append(job.future)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="ckpt-sync", daemon=True)
                self._thread.start()
            self._changed.notify_all()
        for old in replaced:
            self._skip(old, job.step)
        return job.future

    def _skip(self, job: _Job, newer: int) -> None:
        logger.info(
            "checkpoint step %d not uploaded: step %d was saved before its upload could "
            "start (newest wins)",
            job.step,
            newer,
        )
        if job.snapshot.parent.name == STAGING_DIR:
            shutil.rmtree(job.snapshot, ignore_errors=True)
        if self.on_skip is not None:
            try:
                self.on_skip(job.step)
            except Exception:
                logger.exception("checkpoint on_skip hook failed for step %d", job.step)
        job.future.set_result(None)

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._queue and not self._closed:
                    self._changed.wait()
                if not self._queue:
                    return
                job = self._queue.pop(0)
                # Steps skipped since the previous upload began, reported with this one.
                coalesced = tuple(
                    step for step in self.skipped[self._reported :] if step < job.step
                )
                self._reported = len(self.skipped)
            try:
                result = dataclasses.replace(
                    self._upload_step(job.snapshot, job.step), coalesced=coalesced
                )
                self._record(result)
                job.future.set_result(result)
            except BaseException as error:
                job.future.set_exception(error)

    def _upload_step(self, snapshot: Path, step: int) -> UploadResult:
        try:
            if self._uploader is None:
                self._uploader = _Uploader(self._uploader_command())
            answer = self._uploader.run(
                {"directory": str(snapshot), "step": step, "keep_last": self.keep_last}
            )
            if answer.get("error"):
                raise CheckpointUploadError(
                    f"upload of step {step} to {self.store.uri} failed: {answer['error']}\n"
                    f"{self._uploader.stderr_tail()}"
                )
            return UploadResult(**{**answer, "coalesced": tuple(answer.get("coalesced") or ())})
        except Exception as error:
            logger.error("checkpoint step %d upload to %s failed: %s", step, self.store.uri, error)
            self._record(
                UploadResult(f"step-{step}", step, error=f"{type(error).__name__}: {error}")
            )
            raise
        finally:
            if snapshot.parent.name == STAGING_DIR:
                shutil.rmtree(snapshot, ignore_errors=True)

    def _uploader_command(self) -> list[str]:
        return [
            sys.executable, "-m", "trainyard.workloads.checkpoint_store", "--serve",
            "--uri", self.store.uri,
            "--store-options", json.dumps(self.store.options),
            "--niceness", str(self.upload_niceness),
            "--node", str(self.node),
            "--nodes", str(self.nodes),
            "--attempt", self.attempt,
            "--part-timeout", str(self.part_timeout),
        ]  # fmt: skip

    def _record(self, result: UploadResult) -> None:
        with self._changed:
            self.results.append(result)
        if self.on_upload is not None:
            try:
                self.on_upload(result)
            except Exception:  # a broken metrics hook must not fail a good upload
                logger.exception("checkpoint on_upload hook failed for %s", result.name)

    def wait(self) -> list[UploadResult]:
        """Block until every queued upload finished; return those since the last wait
        (skipped ones left out) and raise if any of them failed."""
        with self._changed:
            pending, self._since_wait = self._since_wait, []
        done = []
        for future in pending:
            try:
                result = future.result()
            except Exception as error:
                self.errors.append(error)
                continue
            if result is not None:
                done.append(result)
        if self.errors:
            raise CheckpointUploadError(
                f"{len(self.errors)} checkpoint upload(s) to {self.store.uri} failed; "
                f"first: {self.errors[0]}"
            ) from self.errors[0]
        return done

    def close(self) -> None:
        try:
            self.wait()
        finally:
            with self._changed:
                self._closed = True
                self._changed.notify_all()
            if self._thread is not None:
                self._thread.join()
            if self._uploader is not None:
                self._uploader.close()

    def export_final(
        self, directory: str | os.PathLike[str], *, name: str = FINAL, step: int | None = None
    ) -> UploadResult:
        """Upload the final model/adapter dir to URI/final/ (manifest last), after the
        queued step uploads. Synchronous: the run is not done until this returns."""
        self.wait()
        result = upload_checkpoint(self.store, Path(directory), name, step)
        self._record(result)
        return result

    def resume(
        self, directory: str | os.PathLike[str], group: ResumeGroup | None = None
    ) -> Path | None:
        """Download the newest checkpoint whose manifest verifies into
        directory/checkpoint-N and return that path (for
        `trainer.train(resume_from_checkpoint=...)`); None when there is none.

        With a `group` every rank of the run calls this: rank 0 lists the complete
        steps for all, each node's first process downloads the step's shared files and
        its node's ranks' own (`files_for_ranks`), and only when every node's download
        verifies do all ranks resume from it; otherwise all move on to the next older
        step together. The node's other processes download nothing and use the first
        one's files once the gather (which they enter with it) returns."""
        directory = Path(directory)
        self.resume_attempts = []
        if group is None:
            objects, complete = find_steps(self.store)
            for step in sorted(complete, reverse=True):
                attempt = self._download_step(directory, step, objects[step])
                self.resume_attempts.append(attempt)
                if attempt.ok:
                    return directory / f"{PREFIX_CHECKPOINT_DIR}-{step}"
            return None
        return self._resume_together(directory, group)

    def _resume_together(self, directory: Path, group: ResumeGroup) -> Path | None:
        listed = group.share(_outcome(lambda: find_steps(self.store)) if group.rank == 0 else None)
        objects, complete = _result(listed, "rank 0 could not list the checkpoints")
        ranks = group.ranks if group.selective else None
        for step in sorted(complete, reverse=True):
            mine = None
            if group.downloads:
                mine = _outcome(
                    lambda step=step: self._download_step(
                        directory, step, objects[step], ranks, group.world_size
                    )
                )
            # Also the barrier after which the node's other processes read its files.
            answers = group.gather(mine)
            attempts = {
                rank: _result(answer, f"resuming from step-{step} on the node of rank {rank}")
                for rank, answer in enumerate(answers)
                if answer is not None
            }
            failed = "; ".join(
                f"node of rank {rank}: {attempt.reason}"
                for rank, attempt in attempts.items()
                if not attempt.ok
            )
            attempt = attempts.get(group.rank) or ResumeAttempt(step, not failed, failed)
            if not failed:
                self.resume_attempts.append(attempt)
                if group.rank == 0:
                    logger.info("every node verified %s/step-%d", self.store.uri, step)
                return directory / f"{PREFIX_CHECKPOINT_DIR}-{step}"
            if attempt.ok:
                # This node's download verified, another's did not: all fall back together.
                shutil.rmtree(directory / f"{PREFIX_CHECKPOINT_DIR}-{step}", ignore_errors=True)
                attempt = dataclasses.replace(attempt, ok=False, reason=failed)
            self.resume_attempts.append(attempt)
            if group.rank == 0:
                logger.warning("no node resumes from %s/step-%d: %s", self.store.uri, step, failed)
        return None

    def _download_step(
        self,
        directory: Path,
        step: int,
        stored: dict[str, int],
        ranks: range | None = None,
        world_size: int | None = None,
    ) -> ResumeAttempt:
        """Download step-N (of `ranks`' files only, see files_for_ranks) into
        directory/checkpoint-N once it verifies; a failed one leaves nothing behind."""
        name = f"step-{step}"
        started = time.perf_counter()
        partial = directory / f".{PREFIX_CHECKPOINT_DIR}-{step}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        try:
            manifest = json.loads(self.store.get_bytes(f"{name}/{MANIFEST}") or b"null")
        except ValueError:
            manifest = None
        # A bad checkpoint is skipped; a store that cannot be read raises instead,
        # since starting over from step 0 would be worse than failing the pod.
        entries: list[dict] = []
        wanted: list[dict] = []
        if not isinstance(manifest, dict) or manifest.get("step") != step:
            reason = "manifest is unreadable or names another step"
        else:
            entries = manifest.get("files") if isinstance(manifest.get("files"), list) else []
            wanted = files_for_ranks(entries, ranks, world_size)
            reason = verify_download(self.store, name, manifest, stored, partial, wanted)
        attempt = ResumeAttempt(
            step,
            reason is None,
            reason or "",
            files=len(wanted),
            bytes=sum(int(entry.get("size") or 0) for entry in wanted),
            seconds=time.perf_counter() - started,
            selective=len(wanted) < len(entries),
        )
        if reason is not None:
            logger.warning("not resuming from %s/%s: %s", self.store.uri, name, reason)
            shutil.rmtree(partial, ignore_errors=True)
            return attempt
        target = directory / f"{PREFIX_CHECKPOINT_DIR}-{step}"
        shutil.rmtree(target, ignore_errors=True)
        os.replace(partial, target)
        logger.info(
            "resume: downloaded %s/%s to %s: %d files, %d bytes in %.2fs (%s)",
            self.store.uri,
            name,
            target,
            attempt.files,
            attempt.bytes,
            attempt.seconds,
            f"shared files and ranks {ranks.start}-{ranks.stop - 1}'s of {world_size}"
            if attempt.selective
            else "every file",
        )
        return attempt


def _outcome(compute: Callable[[], Any]) -> tuple[bool, Any]:
    """(True, value), or (False, the error as text): what one rank sends the others, so
    a store error on one rank stops every rank instead of leaving them in a collective."""
    try:
        return True, compute()
    except Exception as error:
        logger.exception("resume failed on this rank")
        return False, f"{type(error).__name__}: {error}"


def _result(outcome: tuple[bool, Any], context: str) -> Any:
    ok, value = outcome
    if not ok:
        raise CheckpointResumeError(f"{context}: {value}" if context else value)
    return value


def snapshot_directory(directory: Path, step: int | None = None) -> Path:
    """Hard-link directory's files into a sibling staging dir; returns the snapshot."""
    if not directory.is_dir():
        raise CheckpointUploadError(f"checkpoint directory {directory} does not exist")
    name = directory.name if step is None else f"{directory.name}.step-{step}"
    target = directory.parent / STAGING_DIR / name
    shutil.rmtree(target, ignore_errors=True)

    def link_or_copy(source: str, destination: str) -> None:
        try:
            os.link(source, destination)
        except OSError:
            shutil.copy2(source, destination)

    shutil.copytree(directory, target, copy_function=link_or_copy)
    return target


@dataclass
class _Job:
    snapshot: Path
    step: int
    future: concurrent.futures.Future


class _Uploader:
    """One long-lived `python -m trainyard.workloads.checkpoint_store --serve` child:
    a job per stdin line, an answer per stdout line; it exits when its stdin closes,
    so it never outlives the trainer. Used from the sync's one thread only."""

    def __init__(self, command: list[str]) -> None:
        self.command = command
        self.process: subprocess.Popen | None = None
        self._stderr: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)

    def _start(self) -> subprocess.Popen:
        process = subprocess.Popen(
            self.command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
        )

        def forward(stream) -> None:
            for line in stream:
                self._stderr.append(line.rstrip())
                logger.info("uploader: %s", line.rstrip())

        threading.Thread(target=forward, args=(process.stderr,), daemon=True).start()
        return process

    def run(self, job: dict) -> dict:
        if self.process is None or self.process.poll() is not None:
            self.process = self._start()
        try:
            self.process.stdin.write(json.dumps(job) + "\n")
            self.process.stdin.flush()
            line = self.process.stdout.readline()
        except OSError:
            line = ""
        if not line:
            code = self.process.wait()
            self.process = None
            raise CheckpointUploadError(
                f"the upload process exited with {code} during step {job['step']}:\n"
                f"{self.stderr_tail()}"
            )
        return json.loads(line)

    def stderr_tail(self) -> str:
        return "\n".join(self._stderr)

    def close(self) -> None:
        if self.process is None:
            return
        with contextlib.suppress(OSError):
            self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None


class CheckpointSyncCallback(TrainerCallback):
    """Uploads every checkpoint the Trainer saves and drains at train end: the main
    process, and on a run of several nodes each node's first process too (each node
    holds its own ranks' shards).

    Given the trainer (`callback.trainer = trainer`, as train.py does for every callback
    with that attribute) and `async_saves`, the trainer's saves become async snapshots
    (checkpoint_snapshot.AsyncSaves): a checkpoint is uploaded once its background
    write is done and every rank has saved its part (under DeepSpeed, once every rank of
    the node has written its shards: AsyncSaves waits for their markers)."""

    def __init__(self, sync: CheckpointSync, *, async_saves: bool = True) -> None:
        self.sync = sync
        self.async_saves = async_saves
        self.saves = None
        self.uploaded: list[int] = []
        self._trainer = None
        self._lock = threading.Lock()
        self._written: set[int] = set()
        self._saved: dict[int, Path] = {}

    @property
    def trainer(self):
        return self._trainer

    @trainer.setter
    def trainer(self, trainer) -> None:
        from trainyard.workloads.checkpoint_snapshot import AsyncSaves

        self._trainer = trainer
        if trainer is None or not self.async_saves:
            return
        saves = AsyncSaves(
            trainer,
            on_written=self._on_written,
            on_skip=self._on_skip,
            # Where uploads must not skip steps (several nodes), writes must not either.
            coalesce=self.sync.coalesce,
        )
        self.saves = saves if saves.install() else None

    def _uploads(self, state) -> bool:
        return state.is_world_process_zero or (self.sync.nodes > 1 and state.is_local_process_zero)

    def _on_skip(self, step: int) -> None:
        with self._lock:
            self._saved.pop(step, None)
        with self.sync._changed:
            self.sync.skipped.append(step)
        if self.sync.on_skip is not None:
            self.sync.on_skip(step)

    def _on_written(self, directory: Path, step: int) -> None:
        with self._lock:
            self._written.add(step)
            ready = self._saved.pop(step, None)
        if ready is not None:
            self._submit(ready, step)

    def _submit(self, directory: Path, step: int) -> None:
        self.sync.submit(directory, step)
        self.uploaded.append(step)

    def on_save(self, args, state, control, **kwargs):
        # Every rank gets here after saving; some of its files (its RNG state) come after
        # DeepSpeed's own barrier, so wait for all before the uploader snapshots the dir.
        wait_for_every_rank()
        if self._uploads(state):
            step = state.global_step
            checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{step}"
            if self.saves is None:
                self._submit(checkpoint, step)
                return control
            # Uploaded when both this rank's background write and every rank's save are
            # done, whichever comes last.
            with self._lock:
                written = step in self._written
                if not written:
                    self._saved[step] = checkpoint
            if written:
                self._submit(checkpoint, step)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.saves is not None:
            # Every write done; the writer process stops and the host buffers are freed
            # (the final save_model after training is synchronous).
            self.saves.close()
        if self._uploads(state):
            # Raises CheckpointUploadError: a run whose checkpoints did not reach
            # storage must not look successful.
            self.sync.wait()
        return control


def wait_for_every_rank() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def find_latest_complete(uri: str, s3=None) -> str | None:
    """URI of the newest step under uri that has a manifest, or None.

    For reading another run's checkpoints (`run://RUN/latest`); the caller downloads
    it. `s3` is anything with endpoint/region/addressing_style (sources.S3Settings,
    api.S3Storage)."""
    options = {}
    if s3 is not None and uri.startswith("s3://"):
        options = {
            "endpoint": getattr(s3, "endpoint", None),
            "region": getattr(s3, "region", None),
            "addressing_style": getattr(s3, "addressing_style", None) or "auto",
        }
    _, complete = find_steps(open_store(uri, **options))
    if not complete:
        return None
    return f"{uri.rstrip('/')}/step-{max(complete)}"
