"""Checkpoint sync: upload each save in the background, resume from the newest good one.

Layout under the checkpoint URI:

    step-N/<files>            one saved checkpoint (transformers' checkpoint-N dir)
    step-N/manifest.json      written LAST: files, sizes, sha256 — marks step-N complete
    latest                    {"step": N, ...}, moved after the manifest is written
    final/<files>, final/manifest.json   the exported model/adapter, same protocol

A step without a manifest is an upload that never finished; a step whose files do not
match its manifest is corrupt. Neither is ever resumed from or named by `latest`.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from trainyard.workloads.storage import FileStore, ObjectStore, S3Store, open_store

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LATEST = "latest"
FINAL = "final"
MANIFEST_FORMAT = "trainyard.dev/checkpoint/v1"
STEP_PATTERN = re.compile(r"step-(\d+)")
STAGING_DIR = ".trainyard-sync"


class CheckpointUploadError(RuntimeError):
    """A background checkpoint upload failed; raised when the queue is drained."""


@dataclass(frozen=True)
class UploadResult:
    """One finished (or failed) upload, as reported to metrics."""

    name: str
    step: int | None
    files: int = 0
    bytes: int = 0
    seconds: float = 0.0
    error: str | None = None


@dataclass
class ResumeAttempt:
    """Why a checkpoint was or was not used on resume; kept for logs and tests."""

    step: int
    ok: bool
    reason: str = ""


def hash_file(path: Path, chunk_size: int = 8 * 1024 * 1024) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def list_local_files(directory: Path) -> dict[str, Path]:
    """Relative posix path → file, for every regular file under directory."""
    return {
        path.relative_to(directory).as_posix(): path
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def build_manifest(directory: Path, step: int | None) -> dict:
    files = list_local_files(directory)
    # hashlib releases the GIL on large buffers, so files hash in parallel.
    with concurrent.futures.ThreadPoolExecutor(min(4, max(1, len(files)))) as pool:
        digests = dict(zip(files, pool.map(hash_file, files.values()), strict=True))
    entries = [
        {"path": rel, "size": path.stat().st_size, "sha256": digests[rel]}
        for rel, path in files.items()
    ]
    return {
        "format": MANIFEST_FORMAT,
        "step": step,
        "createdAt": datetime.now(UTC).isoformat(),
        "totalBytes": sum(e["size"] for e in entries),
        "files": entries,
    }


def upload_checkpoint(
    store: ObjectStore, directory: Path, name: str, step: int | None
) -> UploadResult:
    """Upload directory to `name/`, then its manifest; the manifest is the commit."""
    started = time.perf_counter()
    files = list_local_files(directory)
    if not files:
        raise CheckpointUploadError(f"checkpoint directory {directory} holds no files")
    # A manifest left from an earlier attempt at this name would vouch for files that
    # are about to be replaced; drop it first so a crash leaves the name incomplete.
    store.delete([f"{name}/{MANIFEST}"])
    with concurrent.futures.ThreadPoolExecutor(1) as hasher:
        manifest_future = hasher.submit(build_manifest, directory, step)
        store.upload_files({f"{name}/{rel}": path for rel, path in files.items()})
        manifest = manifest_future.result()
    stored = store.list_objects(name)
    for entry in manifest["files"]:
        size = stored.get(f"{name}/{entry['path']}")
        if size != entry["size"]:
            raise CheckpointUploadError(
                f"{store.uri}/{name}/{entry['path']} holds {size} bytes after upload, "
                f"expected {entry['size']}; the manifest was not written"
            )
    store.put_bytes(f"{name}/{MANIFEST}", json.dumps(manifest, indent=1).encode())
    return UploadResult(
        name=name,
        step=step,
        files=len(files),
        bytes=manifest["totalBytes"],
        seconds=time.perf_counter() - started,
    )


def read_latest(store: ObjectStore) -> int | None:
    raw = store.get_bytes(LATEST)
    if raw is None:
        return None
    try:
        return int(json.loads(raw)["step"])
    except (ValueError, KeyError, TypeError):
        logger.warning("ignoring unreadable %s/%s: %r", store.uri, LATEST, raw[:200])
        return None


def write_latest(store: ObjectStore, step: int) -> None:
    pointer = {
        "step": step,
        "path": f"step-{step}",
        "manifest": f"step-{step}/{MANIFEST}",
        "updatedAt": datetime.now(UTC).isoformat(),
    }
    store.put_bytes(LATEST, json.dumps(pointer).encode())


def find_steps(store: ObjectStore) -> tuple[dict[int, dict[str, int]], set[int]]:
    """All step-N prefixes with their objects, and the steps that have a manifest."""
    objects: dict[int, dict[str, int]] = {}
    for key, size in store.list_objects().items():
        head, _, rest = key.partition("/")
        match = STEP_PATTERN.fullmatch(head)
        if match and rest:
            objects.setdefault(int(match.group(1)), {})[rest] = size
    complete = {step for step, files in objects.items() if MANIFEST in files}
    return objects, complete


def delete_step(store: ObjectStore, step: int, files: dict[str, int]) -> None:
    # Manifest first: if deletion stops halfway the step reads as incomplete, not corrupt.
    store.delete([f"step-{step}/{MANIFEST}"])
    store.delete([f"step-{step}/{rel}" for rel in files if rel != MANIFEST])


def apply_retention(store: ObjectStore, keep_last: int | None) -> list[int]:
    """Delete old complete steps beyond keep_last and unfinished uploads older than the
    newest complete step. Never deletes the step `latest` names. Returns deleted steps."""
    objects, complete = find_steps(store)
    if not complete:
        return []
    newest = max(complete)
    keep = set(sorted(complete)[-keep_last:]) if keep_last else set(complete)
    latest = read_latest(store)
    if latest is not None:
        keep.add(latest)
    doomed = sorted(
        step for step in objects if step not in keep and (step in complete or step < newest)
    )
    for step in doomed:
        delete_step(store, step, objects[step])
    return doomed


def verify_download(
    store: ObjectStore, name: str, manifest: dict, stored: dict[str, int], target: Path
) -> str | None:
    """Download name/ into target and check it against manifest; None when it verifies,
    otherwise why not."""
    entries = manifest.get("files")
    if not isinstance(entries, list) or not entries:
        return "manifest lists no files"
    wanted: dict[str, Path] = {}
    for entry in entries:
        rel = entry.get("path", "")
        local = (target / rel).resolve()
        if not rel or not local.is_relative_to(target.resolve()):
            return f"manifest names an unsafe path {rel!r}"
        if stored.get(rel) != entry.get("size"):
            return f"{rel}: stored size {stored.get(rel)} != manifest size {entry.get('size')}"
        wanted[f"{name}/{rel}"] = local
    store.download_files(wanted)
    for entry in entries:
        local = target / entry["path"]
        if local.stat().st_size != entry["size"]:
            return f"{entry['path']}: downloaded {local.stat().st_size} bytes, expected {entry['size']}"
        if hash_file(local) != entry["sha256"]:
            return f"{entry['path']}: sha256 does not match the manifest"
    return None


class CheckpointSync:
    """Uploads checkpoints on one background thread, resumes and exports.

    `uri` is `s3://bucket/prefix` or `file://path` (or an already opened store);
    store_options are `open_store`'s S3 settings (endpoint, region, addressing_style,
    credentials_dir, max_concurrency). `on_upload` is called from the worker thread
    with every UploadResult, failed ones included (metrics hook). Upload threads run
    `upload_niceness` steps nicer than training, so they take idle CPU, not the step's.
    """

    def __init__(
        self,
        uri: str | S3Store | FileStore,
        *,
        keep_last: int | None = None,
        on_upload: Callable[[UploadResult], None] | None = None,
        upload_niceness: int = 10,
        **store_options,
    ) -> None:
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"checkpoint.keepLast must be at least 1, got {keep_last}")
        self.store = open_store(uri, **store_options) if isinstance(uri, str) else uri
        self.keep_last = keep_last
        self.on_upload = on_upload
        # One worker: saves upload in order and never two at once, so `latest` only
        # moves forward and retention never races an upload.
        self._worker = concurrent.futures.ThreadPoolExecutor(
            1,
            thread_name_prefix="ckpt-sync",
            initializer=lower_thread_priority,
            initargs=(upload_niceness,),
        )
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
        snapshot = snapshot_directory(Path(directory))
        future = self._worker.submit(self._upload_step, snapshot, step)
        with self._lock:
            self._pending.append(future)
        return future

    def _upload_step(self, snapshot: Path, step: int) -> UploadResult:
        try:
            result = upload_checkpoint(self.store, snapshot, f"step-{step}", step)
            write_latest(self.store, step)
            deleted = apply_retention(self.store, self.keep_last)
            logger.info(
                "checkpoint step %d: %d bytes to %s/step-%d in %.2fs%s",
                step,
                result.bytes,
                self.store.uri,
                step,
                result.seconds,
                f"; removed old steps {deleted}" if deleted else "",
            )
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
            self.on_upload(result)

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
            reason = None
            try:
                manifest = json.loads(self.store.get_bytes(f"{name}/{MANIFEST}") or b"null")
                if not isinstance(manifest, dict) or manifest.get("step") != step:
                    reason = "manifest is unreadable or names another step"
                else:
                    reason = verify_download(self.store, name, manifest, objects[step], partial)
            except (ValueError, OSError) as error:
                reason = f"{type(error).__name__}: {error}"
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


def lower_thread_priority(niceness: int) -> None:
    """Make the calling thread nicer; threads it starts (boto3's transfer pool) inherit it.

    Linux keeps a nice value per thread, so training threads are not affected.
    """
    if niceness <= 0 or not hasattr(os, "setpriority"):
        return
    tid = threading.get_native_id()
    try:
        os.setpriority(
            os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + niceness)
        )
    except OSError as error:  # some sandboxes forbid it; uploads still work
        logger.debug("could not lower checkpoint upload priority: %s", error)


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
    """Uploads every checkpoint the Trainer saves (rank 0) and drains at train end."""

    def __init__(self, sync: CheckpointSync) -> None:
        self.sync = sync
        self.uploaded: list[int] = []

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            self.sync.submit(checkpoint, state.global_step)
            self.uploaded.append(state.global_step)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            # Raises CheckpointUploadError: a run whose checkpoints did not reach
            # storage must not look successful.
            self.sync.wait()
        return control


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
