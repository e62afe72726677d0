"""The checkpoint layout in an object store: manifests, the `latest` pointer, retention.

Layout under the checkpoint URI:

    step-N/<files>            one saved checkpoint (transformers' checkpoint-N dir)
    step-N/manifest.json      written LAST: files, sizes, sha256 — marks step-N complete
    latest                    {"step": N, ...}, moved after the manifest is written
    final/<files>, final/manifest.json   the exported model/adapter, same protocol

A step without a manifest is an upload that never finished; a step whose files do not
match its manifest is corrupt. Neither is ever resumed from or named by `latest`.

This module does not import torch or transformers: `checkpoint.CheckpointSync` runs
`python -m trainyard.workloads.checkpoint_store` as a separate, nicer process for each
upload, so boto3's threads never compete with training for the GIL.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import os
import re
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from trainyard.workloads.storage import ObjectStore, open_store

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LATEST = "latest"
FINAL = "final"
MANIFEST_FORMAT = "trainyard.dev/checkpoint/v1"
STEP_PATTERN = re.compile(r"step-(\d+)")


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
    # Writes a killed uploader left half done: invisible to listings, but they take space.
    for key, handle in store.list_unfinished():
        match = STEP_PATTERN.fullmatch(key.partition("/")[0])
        if match and int(match.group(1)) < newest and int(match.group(1)) not in keep:
            store.abort_unfinished(key, handle)
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


def sync_step(
    store: ObjectStore, directory: Path, step: int, keep_last: int | None
) -> UploadResult:
    """Upload directory as step-N, move `latest` to it, then apply retention."""
    result = upload_checkpoint(store, directory, f"step-{step}", step)
    write_latest(store, step)
    deleted = apply_retention(store, keep_last)
    logger.info(
        "checkpoint step %d: %d bytes to %s/step-%d in %.2fs%s",
        step,
        result.bytes,
        store.uri,
        step,
        result.seconds,
        f"; removed old steps {deleted}" if deleted else "",
    )
    return result


def main(argv: list[str] | None = None) -> int:
    """Upload one checkpoint dir as step-N; print the UploadResult as JSON on stdout."""
    parser = argparse.ArgumentParser(prog="python -m trainyard.workloads.checkpoint_store")
    parser.add_argument("--uri", required=True, help="s3://bucket/prefix or file://path")
    parser.add_argument("--store-options", default="{}", help="JSON of open_store() options")
    parser.add_argument("--directory", required=True, type=Path)
    parser.add_argument("--step", required=True, type=int)
    parser.add_argument("--keep-last", type=int, default=None)
    parser.add_argument("--niceness", type=int, default=0, help="added to this process's nice")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.niceness > 0:
        os.nice(args.niceness)
    store = open_store(args.uri, **json.loads(args.store_options))
    result = sync_step(store, args.directory, args.step, args.keep_last)
    print(json.dumps(dataclasses.asdict(result)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
