"""The checkpoint layout in an object store: manifests, the `latest` pointer, retention.

Layout under the checkpoint URI:

    step-N/<files>            one saved checkpoint (transformers' checkpoint-N dir)
    step-N/manifest.json      written LAST: files, sizes, sha256 — marks step-N complete
    latest                    {"step": N, ...}, moved after the manifest is written
    final/<files>, final/manifest.json   the exported model/adapter, same protocol
    step-N/.parts/node-K.json the files node K (K > 0) uploaded for step N

On several nodes each node saves its own ranks' files to its own disk (DeepSpeed ZeRO
optimizer and parameter shards, per-process RNG states). Every node uploads what it
holds; node K > 0 ends its upload with a part manifest naming its files and the restart
attempt it belongs to. Node 0 waits for the parts of its own attempt, and only then
writes the step's manifest, listing every node's files: a step is complete only when
all of it is stored. On resume each node downloads the shared files and its own ranks'
(`files_for_ranks`; every file when the world size changed).

A step without a manifest is an upload that never finished; a step whose files do not
match its manifest is corrupt. Neither is ever resumed from or named by `latest`.

This module does not import torch or transformers: `checkpoint.CheckpointSync` runs
`python -m trainyard.workloads.checkpoint_store --serve` as one separate background process (SCHED_IDLE)
that uploads job after job, so boto3's threads never compete with training for the GIL
and no upload pays an interpreter start.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import os
import queue
import re
import sys
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from trainyard.workloads.storage import ObjectStore, hash_file, open_store

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LATEST = "latest"
FINAL = "final"
MANIFEST_FORMAT = "trainyard.dev/checkpoint/v1"
STEP_PATTERN = re.compile(r"step-(\d+)")
PARTS = ".parts"
# How long node 0 waits for the other nodes' parts of a step; they save at the same
# step, so a long wait means a node is gone (and its pod's failure restarts the gang).
PART_TIMEOUT_SECONDS = 1800.0


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
    coalesced: tuple[int, ...] = ()
    """Steps saved while this one waited and skipped in its favour (newest wins)."""


def list_local_files(directory: Path) -> dict[str, Path]:
    """Relative posix path → file, for every regular file under directory."""
    return {
        path.relative_to(directory).as_posix(): path
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def build_manifest(
    directory: Path, step: int | None, digests: dict[str, str] | None = None
) -> dict:
    """The manifest of directory's files; `digests` (relative path → sha256) are those
    the upload computed while sending, and files missing from it are hashed here."""
    files = list_local_files(directory)
    digests = dict(digests or {})
    missing = [rel for rel in files if rel not in digests]
    if missing:
        # hashlib releases the GIL on large buffers, so files hash in parallel.
        with concurrent.futures.ThreadPoolExecutor(min(4, len(missing))) as pool:
            digests.update(
                zip(missing, pool.map(hash_file, [files[r] for r in missing]), strict=True)
            )
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


def _upload_files(store: ObjectStore, directory: Path, name: str, step: int | None) -> dict:
    """Upload directory's files under `name/`, hashing each file from the same read
    that sends it; their manifest, once every object is stored with the right size."""
    files = list_local_files(directory)
    sent = store.upload_files({f"{name}/{rel}": path for rel, path in files.items()})
    digests = {key.removeprefix(f"{name}/"): digest for key, digest in (sent or {}).items()}
    manifest = build_manifest(directory, step, digests)
    _check_stored(store, name, manifest["files"])
    return manifest


def _check_stored(store: ObjectStore, name: str, entries: list[dict]) -> None:
    stored = store.list_objects(name)
    for entry in entries:
        size = stored.get(f"{name}/{entry['path']}")
        if size != entry["size"]:
            raise CheckpointUploadError(
                f"{store.uri}/{name}/{entry['path']} holds {size} bytes after upload, "
                f"expected {entry['size']}; the manifest was not written"
            )


def part_key(name: str, node: int) -> str:
    return f"{name}/{PARTS}/node-{node}.json"


def upload_part(
    store: ObjectStore, directory: Path, name: str, step: int, node: int, attempt: str
) -> UploadResult:
    """Upload node `node`'s files of a step, then its part manifest (node > 0).

    A node may hold no files of a step at all (plain DDP: only node 0 saves); its part
    then lists none, so node 0 still knows it is done."""
    started = time.perf_counter()
    store.delete([part_key(name, node)])
    if directory.is_dir():
        manifest = _upload_files(store, directory, name, step)
    else:
        manifest = {"format": MANIFEST_FORMAT, "step": step, "totalBytes": 0, "files": []}
    part = {**manifest, "node": node, "attempt": attempt}
    store.put_bytes(part_key(name, node), json.dumps(part, indent=1).encode())
    return UploadResult(
        name=f"{name}/{PARTS}/node-{node}",
        step=step,
        files=len(manifest["files"]),
        bytes=manifest["totalBytes"],
        seconds=time.perf_counter() - started,
    )


def collect_parts(
    store: ObjectStore,
    name: str,
    nodes: int,
    attempt: str,
    timeout: float = PART_TIMEOUT_SECONDS,
    poll: float = 1.0,
) -> list[dict]:
    """The file entries of nodes 1..nodes-1 for `name`, once each has uploaded its part
    for this `attempt`. A part from an earlier attempt (a gang restarted past this step
    before) is not this step's: it is waited past, never merged."""
    deadline = time.monotonic() + timeout
    parts: dict[int, dict] = {}
    while True:
        for node in range(1, nodes):
            if node in parts:
                continue
            raw = store.get_bytes(part_key(name, node))
            try:
                part = json.loads(raw) if raw is not None else None
            except ValueError:
                part = None
            if isinstance(part, dict) and str(part.get("attempt")) == attempt:
                parts[node] = part
        missing = [node for node in range(1, nodes) if node not in parts]
        if not missing:
            break
        if time.monotonic() > deadline:
            raise CheckpointUploadError(
                f"{store.uri}/{name}: node(s) {', '.join(map(str, missing))} did not upload "
                f"their part of attempt {attempt} within {timeout:.0f}s; the manifest was "
                "not written"
            )
        time.sleep(poll)
    entries: list[dict] = []
    for node in sorted(parts):
        entries.extend(parts[node].get("files") or [])
    return entries


def upload_checkpoint(
    store: ObjectStore,
    directory: Path,
    name: str,
    step: int | None,
    *,
    nodes: int = 1,
    attempt: str = "0",
    part_timeout: float = PART_TIMEOUT_SECONDS,
) -> UploadResult:
    """Upload directory to `name/`, then its manifest; the manifest is the commit.

    With nodes > 1 the manifest also lists the files the other nodes uploaded for this
    attempt (see `upload_part`), and is written only once all of them are stored."""
    started = time.perf_counter()
    if not list_local_files(directory):
        raise CheckpointUploadError(f"checkpoint directory {directory} holds no files")
    # A manifest left from an earlier attempt at this name would vouch for files that
    # are about to be replaced; drop it first so a crash leaves the name incomplete.
    store.delete([f"{name}/{MANIFEST}"])
    manifest = _upload_files(store, directory, name, step)
    if nodes > 1:
        own = {entry["path"]: entry for entry in manifest["files"]}
        for entry in collect_parts(store, name, nodes, attempt, part_timeout):
            seen = own.get(entry["path"])
            if seen is not None and seen["sha256"] != entry["sha256"]:
                raise CheckpointUploadError(
                    f"{store.uri}/{name}/{entry['path']}: two nodes saved different "
                    "contents under one name; the manifest was not written"
                )
            own.setdefault(entry["path"], entry)
        entries = sorted(own.values(), key=lambda entry: entry["path"])
        _check_stored(store, name, entries)
        manifest = {
            **manifest,
            "nodes": nodes,
            "totalBytes": sum(entry["size"] for entry in entries),
            "files": entries,
        }
    store.put_bytes(f"{name}/{MANIFEST}", json.dumps(manifest, indent=1).encode())
    return UploadResult(
        name=name,
        step=step,
        files=len(manifest["files"]),
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


# The files of one rank: transformers' Trainer saves and reads `rng_state_{process_index}.pth`
# (world size > 1); DeepSpeed names ZeRO optimizer shards and ZeRO-3 parameter shards by
# data-parallel rank and model-parallel rank.
RANK_FILE = re.compile(
    r"(?:.*/)?(?:rng_state_(?P<rng>\d+)\.pth"
    r"|(?:bf16_)?zero_pp_rank_(?P<dp>\d+)_mp_rank_(?P<mp>\d+)_(?:optim|model)_states\.pt)"
)


def file_rank(path: str) -> tuple[int, int] | None:
    """(rank, model-parallel rank) of a per-rank checkpoint file; None for a shared one.

    >>> file_rank("global_step2/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt")
    (1, 0)
    >>> file_rank("rng_state_3.pth"), file_rank("global_step2/mp_rank_00_model_states.pt")
    ((3, 0), None)
    """
    match = RANK_FILE.fullmatch(path)
    if match is None:
        return None
    if match["rng"] is not None:
        return int(match["rng"]), 0
    return int(match["dp"]), int(match["mp"])


def files_for_ranks(entries: list[dict], ranks: range | None, world_size: int | None) -> list[dict]:
    """The manifest entries the processes of global `ranks` read on resume, in a world of
    `world_size`: every shared file, and of the per-rank files (`file_rank`) their own.

    Only when the step was saved by a world of the same size: its per-rank files are
    then those of ranks 0..world_size-1, and with the same world size DeepSpeed loads
    each rank's own ZeRO shards only, the Trainer each rank's own RNG state. Otherwise
    (another world size: an elastic resume may read any rank's files; no per-rank files
    at all; model-parallel shards, whose data-parallel rank is not the global rank),
    and with ranks None, every entry.

    >>> step = [{"path": p} for p in ("config.json", "rng_state_0.pth", "rng_state_1.pth")]
    >>> [e["path"] for e in files_for_ranks(step, range(1, 2), 2)]
    ['config.json', 'rng_state_1.pth']
    >>> len(files_for_ranks(step, range(1, 2), 4))
    3
    """
    if ranks is None or world_size is None:
        return list(entries)
    owners = {entry["path"]: file_rank(entry["path"]) for entry in entries}
    saved = {owner[0] for owner in owners.values() if owner is not None}
    parallel = any(owner[1] != 0 for owner in owners.values() if owner is not None)
    if not saved or parallel or saved != set(range(world_size)):
        return list(entries)
    return [
        entry
        for entry in entries
        if owners[entry["path"]] is None or owners[entry["path"]][0] in ranks
    ]


def verify_download(
    store: ObjectStore,
    name: str,
    manifest: dict,
    stored: dict[str, int],
    target: Path,
    wanted: list[dict] | None = None,
) -> str | None:
    """Download name/ into target and check it against manifest; None when it verifies,
    otherwise why not. `wanted` (some of the manifest's entries: `files_for_ranks`)
    limits what is downloaded and hashed; every entry's stored size is checked all the
    same, so every node judges a step's completeness alike."""
    entries = manifest.get("files")
    if not isinstance(entries, list) or not entries:
        return "manifest lists no files"
    for entry in entries:
        rel = entry.get("path", "")
        local = (target / rel).resolve()
        if not rel or not local.is_relative_to(target.resolve()):
            return f"manifest names an unsafe path {rel!r}"
        if stored.get(rel) != entry.get("size"):
            return f"{rel}: stored size {stored.get(rel)} != manifest size {entry.get('size')}"
    wanted = entries if wanted is None else wanted
    store.download_files({f"{name}/{entry['path']}": target / entry["path"] for entry in wanted})
    for entry in wanted:
        local = target / entry["path"]
        if local.stat().st_size != entry["size"]:
            return f"{entry['path']}: downloaded {local.stat().st_size} bytes, expected {entry['size']}"
        if hash_file(local) != entry["sha256"]:
            return f"{entry['path']}: sha256 does not match the manifest"
    return None


def sync_step(
    store: ObjectStore,
    directory: Path,
    step: int,
    keep_last: int | None,
    *,
    node: int = 0,
    nodes: int = 1,
    attempt: str = "0",
    part_timeout: float = PART_TIMEOUT_SECONDS,
) -> UploadResult:
    """Upload directory as step-N, move `latest` to it, then apply retention.

    On node K > 0 of several, only upload that node's part: node 0 commits the step."""
    if node > 0:
        return upload_part(store, directory, f"step-{step}", step, node, attempt)
    result = upload_checkpoint(
        store,
        directory,
        f"step-{step}",
        step,
        nodes=nodes,
        attempt=attempt,
        part_timeout=part_timeout,
    )
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


def serve(args: argparse.Namespace) -> int:
    """Upload one job per stdin line (JSON: directory, step, keep_last) and answer each
    with one stdout line (an UploadResult, or {"error": ...}). Exits at once when stdin
    closes: the trainer that started it has ended (or died), and an orphan must not go
    on moving `latest`."""
    store = open_store(args.uri, **json.loads(args.store_options))
    jobs: queue.Queue[str] = queue.Queue()

    def read_jobs() -> None:
        for line in sys.stdin:
            jobs.put(line)
        os._exit(0)

    threading.Thread(target=read_jobs, name="jobs", daemon=True).start()
    while True:
        job = json.loads(jobs.get())
        try:
            result = sync_step(
                store,
                Path(job["directory"]),
                int(job["step"]),
                job.get("keep_last"),
                node=args.node,
                nodes=args.nodes,
                attempt=args.attempt,
                part_timeout=args.part_timeout,
            )
            answer = dataclasses.asdict(result)
        except Exception as error:
            logger.exception("upload of step %s failed", job.get("step"))
            answer = {"error": f"{type(error).__name__}: {error}"}
        print(json.dumps(answer), flush=True)


def main(argv: list[str] | None = None) -> int:
    """Upload one checkpoint dir as step-N; print the UploadResult as JSON on stdout."""
    parser = argparse.ArgumentParser(prog="python -m trainyard.workloads.checkpoint_store")
    parser.add_argument("--uri", required=True, help="s3://bucket/prefix or file://path")
    parser.add_argument("--store-options", default="{}", help="JSON of open_store() options")
    parser.add_argument("--directory", type=Path, help="the checkpoint dir to upload")
    parser.add_argument("--step", type=int, help="its step")
    parser.add_argument(
        "--serve", action="store_true", help="upload one JSON job per stdin line until EOF"
    )
    parser.add_argument("--keep-last", type=int, default=None)
    parser.add_argument(
        "--niceness",
        type=int,
        default=0,
        help="added to this process's nice; > 0 also SCHED_IDLE (Linux)",
    )
    parser.add_argument(
        "--node", type=int, default=0, help="this node's rank (torchrun GROUP_RANK)"
    )
    parser.add_argument("--nodes", type=int, default=1, help="number of nodes of the run")
    parser.add_argument("--attempt", default="0", help="restart attempt the upload belongs to")
    parser.add_argument(
        "--part-timeout",
        type=float,
        default=PART_TIMEOUT_SECONDS,
        help="seconds node 0 waits for the other nodes' parts",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.niceness > 0:
        os.nice(args.niceness)
        # Background work, as the checkpoint writer: CPU time nothing else wants.
        with contextlib.suppress(AttributeError, OSError):  # not Linux: the nice value
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    if args.serve:
        return serve(args)
    if args.directory is None or args.step is None:
        parser.error("--directory and --step are required without --serve")
    store = open_store(args.uri, **json.loads(args.store_options))
    result = sync_step(
        store,
        args.directory,
        args.step,
        args.keep_last,
        node=args.node,
        nodes=args.nodes,
        attempt=args.attempt,
        part_timeout=args.part_timeout,
    )
    print(json.dumps(dataclasses.asdict(result)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
