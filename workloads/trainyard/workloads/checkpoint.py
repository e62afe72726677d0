"""Checkpoint sync: upload each save in the background, resume from the newest good one.

The layout and its rules (manifest last, `latest`, retention) are in checkpoint_store.
Each upload runs as its own nicer child process (`python -m
trainyard.workloads.checkpoint_store`), one at a time: training keeps its cores and
its GIL, and a crashed upload cannot take the trainer down with it.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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
    "CheckpointUploadError",
    "ResumeAttempt",
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
    """Why a checkpoint was or was not used on resume; kept for logs and tests."""

    step: int
    ok: bool
    reason: str = ""


class CheckpointSync:
    """Uploads checkpoints in the background, one at a time; resumes and exports.

    `uri` is `s3://bucket/prefix` or `file://path` (or an already opened store);
    store_options are `open_store`'s S3 settings (endpoint, region, addressing_style,
    credentials_dir, max_concurrency, multipart_threshold, multipart_chunksize).
    `on_upload` is called from the background thread with every UploadResult, failed
    ones included (metrics hook). Upload processes run `upload_niceness` steps nicer
    than training, so they take idle CPU rather than the training step's.

    On a run of several `nodes`, every node's sync uploads the files its disk holds;
    node 0's commits the step once the others' parts of the same restart `attempt` are
    stored (checkpoint_store: parts).
    """

    def __init__(
        self,
        uri: str | S3Store | FileStore,
        *,
        keep_last: int | None = None,
        on_upload: Callable[[UploadResult], None] | None = None,
        upload_niceness: int = 10,
        node: int = 0,
        nodes: int = 1,
        attempt: str = "0",
        part_timeout: float = PART_TIMEOUT_SECONDS,
        **store_options,
    ) -> None:
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"checkpoint.keepLast must be at least 1, got {keep_last}")
        self.store = open_store(uri, **store_options) if isinstance(uri, str) else uri
        self.keep_last = keep_last
        self.on_upload = on_upload
        self.upload_niceness = upload_niceness
        self.node, self.nodes, self.attempt = node, nodes, attempt
        self.part_timeout = part_timeout
        # One worker: saves upload in order and never two at once, so `latest` only
        # moves forward and retention never races an upload.
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ckpt-sync")
        self._pending: list[concurrent.futures.Future] = []
        self._lock = threading.Lock()
        self.results: list[UploadResult] = []
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
        possible), so the trainer may rotate the checkpoint away while it uploads.
        """
        directory = Path(directory)
        if self.node > 0 and not directory.is_dir():
            # This node saved nothing of the step (plain DDP: node 0 saves); its empty
            # part still tells node 0 it is done.
            snapshot = directory
        else:
            snapshot = snapshot_directory(directory)
        future = self._worker.submit(self._upload_step, snapshot, step)
        with self._lock:
            self._pending.append(future)
        return future

    def _upload_step(self, snapshot: Path, step: int) -> UploadResult:
        command = [
            sys.executable, "-m", "trainyard.workloads.checkpoint_store",
            "--uri", self.store.uri,
            "--store-options", json.dumps(self.store.options),
            "--directory", str(snapshot),
            "--step", str(step),
            "--niceness", str(self.upload_niceness),
            "--node", str(self.node),
            "--nodes", str(self.nodes),
            "--attempt", self.attempt,
            "--part-timeout", str(self.part_timeout),
        ]  # fmt: skip
        if self.keep_last is not None:
            command += ["--keep-last", str(self.keep_last)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            for line in done.stderr.splitlines():
                logger.info("upload step %d: %s", step, line)
            if done.returncode != 0:
                tail = "\n".join(done.stderr.strip().splitlines()[-STDERR_TAIL_LINES:])
                raise CheckpointUploadError(
                    f"upload of step {step} to {self.store.uri} exited with {done.returncode}:\n"
                    f"{tail}"
                )
            result = UploadResult(**json.loads(done.stdout.strip().splitlines()[-1]))
        except Exception as error:
            logger.error("checkpoint step %d upload to %s failed: %s", step, self.store.uri, error)
            self._record(
                UploadResult(f"step-{step}", step, error=f"{type(error).__name__}: {error}")
            )
            raise
        finally:
            shutil.rmtree(snapshot, ignore_errors=True)
        self._record(result)
        return result

    def _record(self, result: UploadResult) -> None:
        with self._lock:
            self.results.append(result)
        if self.on_upload is not None:
            try:
                self.on_upload(result)
            except Exception:  # a broken metrics hook must not fail a good upload
                logger.exception("checkpoint on_upload hook failed for %s", result.name)

    def wait(self) -> list[UploadResult]:
        """Block until every queued upload finished; raise if any of them failed."""
        with self._lock:
            pending, self._pending = self._pending, []
        done = []
        for future in pending:
            try:
                done.append(future.result())
            except Exception as error:
                self.errors.append(error)
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
            self._worker.shutdown(wait=True)

    def export_final(
        self, directory: str | os.PathLike[str], *, name: str = FINAL, step: int | None = None
    ) -> UploadResult:
        """Upload the final model/adapter dir to URI/final/ (manifest last), after the
        queued step uploads. Synchronous: the run is not done until this returns."""
        self.wait()
        result = upload_checkpoint(self.store, Path(directory), name, step)
        self._record(result)
        return result

    def resume(self, directory: str | os.PathLike[str]) -> Path | None:
        """Download the newest checkpoint whose manifest verifies into
        directory/checkpoint-N and return that path (for
        `trainer.train(resume_from_checkpoint=...)`); None when there is none."""
        directory = Path(directory)
        objects, complete = find_steps(self.store)
        self.resume_attempts = []
        for step in sorted(complete, reverse=True):
            name = f"step-{step}"
            partial = directory / f".{PREFIX_CHECKPOINT_DIR}-{step}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            try:
                manifest = json.loads(self.store.get_bytes(f"{name}/{MANIFEST}") or b"null")
            except ValueError:
                manifest = None
            # A bad checkpoint is skipped; a store that cannot be read raises instead,
            # since starting over from step 0 would be worse than failing the pod.
            if not isinstance(manifest, dict) or manifest.get("step") != step:
                reason = "manifest is unreadable or names another step"
            else:
                reason = verify_download(self.store, name, manifest, objects[step], partial)
            if reason is not None:
                logger.warning("not resuming from %s/%s: %s", self.store.uri, name, reason)
                self.resume_attempts.append(ResumeAttempt(step, False, reason))
                shutil.rmtree(partial, ignore_errors=True)
                continue
            target = directory / f"{PREFIX_CHECKPOINT_DIR}-{step}"
            shutil.rmtree(target, ignore_errors=True)
            os.replace(partial, target)
            self.resume_attempts.append(ResumeAttempt(step, True))
            logger.info("resuming from %s/%s (downloaded to %s)", self.store.uri, name, target)
            return target
        return None


def snapshot_directory(directory: Path) -> Path:
    """Hard-link directory's files into a sibling staging dir; returns the snapshot."""
    if not directory.is_dir():
        raise CheckpointUploadError(f"checkpoint directory {directory} does not exist")
    target = directory.parent / STAGING_DIR / directory.name
    shutil.rmtree(target, ignore_errors=True)

    def link_or_copy(source: str, destination: str) -> None:
        try:
            os.link(source, destination)
        except OSError:
            shutil.copy2(source, destination)

    shutil.copytree(directory, target, copy_function=link_or_copy)
    return target


class CheckpointSyncCallback(TrainerCallback):
    """Uploads every checkpoint the Trainer saves and drains at train end: the main
    process, and on a run of several nodes each node's first process too (each node
    holds its own ranks' shards)."""

    def __init__(self, sync: CheckpointSync) -> None:
        self.sync = sync
        self.uploaded: list[int] = []

    def _uploads(self, state) -> bool:
        return state.is_world_process_zero or (self.sync.nodes > 1 and state.is_local_process_zero)

    def on_save(self, args, state, control, **kwargs):
        # Every rank gets here after saving; some of its files (its RNG state) come after
        # DeepSpeed's own barrier, so wait for all before the uploader snapshots the dir.
        wait_for_every_rank()
        if self._uploads(state):
            checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            self.sync.submit(checkpoint, state.global_step)
            self.uploaded.append(state.global_step)
        return control

    def on_train_end(self, args, state, control, **kwargs):
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
