"""provenance.json: what made a promoted model, written beside it.

A pipeline writes one beside every model it promotes: the stage (pipeline, stage, method,
spec hash, image, start and end), the input model and the data with what pins their
contents (a checkpoint's manifest hash, an S3 object's ETag, a file's sha256, a hub
revision), and the gate's verdict with each criterion and who approved. `trainyard
lineage URI` follows `inputModel` from one record to the next, back to the first model.

On a cluster the operator never touches the user's storage with its own credentials: a
one-pod Job with the stage's pod settings (image, storage Secret, scheduling) runs

    python -m trainyard.workloads.provenance /etc/trainyard/provenance.json

with the record the operator knows (status of the stage's run and gate); this module
adds the content fingerprints, which only a reader of the storage can take, and writes
`<model>/provenance.json`. `trainyard run PIPELINE.yaml` calls the same functions.
"""

from __future__ import annotations

import hashlib
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

PROVENANCE_FILE = "provenance.json"
MANIFEST_FILE = "manifest.json"
NOT_CONTENT = ("eval/", PROVENANCE_FILE)
"""Written beside a promoted model after it was made: not part of what it is."""


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _local_path(uri: str) -> Path | None:
    """The path a file:// URI or plain path names; None for any other scheme.

    >>> _local_path("file:///ckpt/sft/final"), _local_path("s3://b/k")
    (PosixPath('/ckpt/sft/final'), None)
    """
    if uri.startswith("file://"):
        return Path(unquote(urlparse(uri).path))
    if "://" not in uri:
        return Path(uri)
    return None


def _s3_store(uri: str, storage: dict[str, Any] | None):
    from trainyard.workloads.storage import open_store

    s3 = (storage or {}).get("s3") or {}
    return open_store(
        uri,
        endpoint=s3.get("endpoint"),
        region=s3.get("region"),
        addressing_style=s3.get("addressingStyle", "auto"),
    )


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _files_hash(root: Path) -> str:
    """sha256 over every file under root (relative path and content), in name order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = path.relative_to(root).as_posix()
        if relative.startswith(NOT_CONTENT):
            continue
        digest.update(relative.encode() + b"\0")
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return "sha256:" + digest.hexdigest()


def _versions_hash(versions: dict[str, tuple[int, str]]) -> str:
    lines = [
        f"{key}\t{size}\t{etag}"
        for key, (size, etag) in sorted(versions.items())
        if not key.startswith(NOT_CONTENT)
    ]
    return _sha256("\n".join(lines).encode())


def model_fingerprint(uri: str | None, storage: dict[str, Any] | None = None) -> dict[str, Any]:
    """What pins a model's contents: its checkpoint manifest's sha256 where it has one,
    else a hash of its files (local) or of its objects' ETags (S3); a hub revision; a
    built-in's name."""
    if not uri:
        return {}
    scheme = urlparse(uri).scheme if "://" in uri else "file"
    if scheme == "hf":
        revision = uri.partition("@")[2] or None
        return {"revision": revision or "unpinned (the hub's main when it was read)"}
    if scheme == "builtin":
        return {"builtin": uri.removeprefix("builtin://")}
    if scheme == "file":
        folder = _local_path(uri)
        assert folder is not None
        manifest = folder / MANIFEST_FILE
        if manifest.is_file():
            return {"manifestSha256": _sha256(manifest.read_bytes())}
        if folder.is_dir():
            return {"contentSha256": _files_hash(folder)}
        if folder.is_file():
            return {"contentSha256": _files_hash_one(folder)}
        return {"missing": f"nothing at {uri}"}
    if scheme == "s3":
        store = _s3_store(uri, storage)
        manifest_bytes = store.get_bytes(MANIFEST_FILE)
        if manifest_bytes is not None:
            return {"manifestSha256": _sha256(manifest_bytes)}
        versions = store.list_versions()
        if not versions:
            return {"missing": f"nothing at {uri}"}
        if set(versions) == {""}:
            size, etag = versions[""]
            return {"etag": etag.strip('"'), "size": size}
        return {"etagsSha256": _versions_hash(versions), "objects": len(versions)}
    return {"unpinned": f"{scheme}:// sources are not fingerprinted"}


def _files_hash_one(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def dataset_fingerprint(
    source: str | None, storage: dict[str, Any] | None = None
) -> dict[str, Any]:
    """What pins a dataset's contents: an S3 object's ETag (or its objects' ETags), a
    local file's sha256, a hub revision, a built-in's name."""
    return model_fingerprint(source, storage)


def complete(record: dict[str, Any], storage: dict[str, Any] | None = None) -> dict[str, Any]:
    """The record with the fingerprints of its model, input model and dataset."""
    done = dict(record)
    done["modelFingerprint"] = model_fingerprint(record.get("model"), storage)
    done["inputModelFingerprint"] = model_fingerprint(record.get("inputModel"), storage)
    dataset = dict(record.get("dataset") or {})
    dataset["fingerprint"] = dataset_fingerprint(dataset.get("source"), storage)
    done["dataset"] = dataset
    base = stacked_base(str(record.get("model") or ""), storage)
    if base is not None:
        done["stackedOn"] = base
    done["writtenAt"] = now()
    return done


STACKED_BASE = "base"
"""A stacked adapter's folder holding the merged base it was trained on (train.py)."""


def stacked_base(model: str, storage: dict[str, Any] | None = None) -> str | None:
    """`<model>/base` when the model is an adapter saved with its merged base (LoRA
    stacked on LoRA): serve that as the model and the adapter by name."""
    if not model:
        return None
    folder = _local_path(model)
    if folder is not None:
        found = (folder / STACKED_BASE / "config.json").is_file()
    elif model.startswith("s3://"):
        found = _s3_store(model, storage).get_bytes(f"{STACKED_BASE}/config.json") is not None
    else:
        return None
    return f"{model.rstrip('/')}/{STACKED_BASE}" if found else None


def write(record: dict[str, Any], storage: dict[str, Any] | None = None) -> str:
    """Write `record` as `<record.model>/provenance.json`; returns where."""
    model = str(record["model"])
    data = (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()
    folder = _local_path(model)
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / PROVENANCE_FILE).write_bytes(data)
    elif model.startswith("s3://"):
        _s3_store(model, storage).put_bytes(PROVENANCE_FILE, data)
    else:
        raise ValueError(f"{model}: provenance.json is written to s3:// or file:// only")
    return f"{model.rstrip('/')}/{PROVENANCE_FILE}"


def read(uri: str, storage: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The provenance.json beside the model at `uri`, or None when it has none (or the
    URI names no storage this reads: hub, built-in)."""
    folder = _local_path(uri)
    if folder is not None:
        path = folder / PROVENANCE_FILE
        return json.loads(path.read_text()) if path.is_file() else None
    if uri.startswith("s3://"):
        data = _s3_store(uri, storage).get_bytes(PROVENANCE_FILE)
        return json.loads(data) if data is not None else None
    return None


def chain(uri: str, storage: dict[str, Any] | None = None, limit: int = 50) -> list[dict[str, Any]]:
    """The records from `uri` back to the first model that has none (`origin: True`)."""
    records: list[dict[str, Any]] = []
    current: str | None = uri
    while current and len(records) < limit:
        record = read(current, storage)
        if record is None:
            records.append({"model": current, "origin": True})
            break
        records.append(record)
        current = record.get("inputModel")
    return records


def main(argv: list[str]) -> int:
    """Write provenance.json for the task file `argv[0]`: {"record": …, "storage": …}."""
    if len(argv) != 1:
        print("usage: python -m trainyard.workloads.provenance TASK.json", file=sys.stderr)
        return 2
    task = json.loads(Path(argv[0]).read_text())
    storage = task.get("storage")
    record = complete(task["record"], storage)
    where = write(record, storage)
    print(f"wrote {where}")
    print(json.dumps(record, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
