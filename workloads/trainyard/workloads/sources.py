"""Where models, tokenizers and datasets come from: `hf://`, `s3://`, `file://`, `builtin://`, `run://`.

A source URI is resolved to something transformers or datasets can open: a local
directory or file, or a hub id with a revision. S3 objects are downloaded once into the
cache directory under a file lock, so the ranks of one node share a single download.

The URI grammar and what `run://` names are the pod contract's
(`trainyard.api.contract`), shared with the operator; this module only resolves.

>>> parse_source("hf://Qwen/Qwen2.5-0.5B@main")
SourceURI(scheme='hf', path='Qwen/Qwen2.5-0.5B', revision='main')
>>> parse_source("run://sft-stage/step-200")
SourceURI(scheme='run', path='sft-stage/step-200', revision=None)
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainyard.api import contract
from trainyard.workloads import builtin

if TYPE_CHECKING:
    from datasets import Dataset

logger = logging.getLogger("trainyard.sources")
DATA_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
Source = contract.SourceURI


class SourceError(ValueError):
    """A source URI that cannot be resolved; the message says which field and what is allowed."""


def parse_source(uri: str, field: str = "source") -> Source:
    """Split a source URI into scheme, path and (for `hf://`) revision (the contract's grammar)."""
    try:
        return contract.parse_source(uri)
    except contract.SourceURIError as error:
        raise SourceError(f"{field}: {error}") from None


# --------------------------------------------------------------------------- hub

HUB_PROBE_SECONDS = 5.0
"""How long to wait for the hub before saying it cannot be reached (the libraries'
own retries take a minute before they fail)."""


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_cache() -> Path:
    """The Hugging Face hub cache, as huggingface_hub finds it (read at call time)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hub_cached(repo: str, repo_type: str) -> bool:
    """Whether the Hugging Face cache holds anything of this repository."""
    return (hub_cache() / f"{repo_type}s--{repo.replace('/', '--')}").is_dir()


def unreachable(endpoint: str, timeout: float = HUB_PROBE_SECONDS) -> str | None:
    """Why an HTTP endpoint (the hub, an S3 endpoint) cannot be reached (name lookup or TCP connect, within `timeout`
    seconds), or None when it can."""
    import socket
    import threading
    from urllib.parse import urlsplit

    url = urlsplit(endpoint)
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    outcome: list[str | None] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as error:
            outcome.append(str(error) or type(error).__name__)

    # A name lookup has no timeout of its own; a thread bounds it.
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return outcome[0] if outcome else f"no answer within {timeout:g} s"


def check_hub_source(uri: str, repo: str, repo_type: str, field: str) -> None:
    """Fail in seconds, saying what to do, when a hub source is neither cached nor reachable."""
    if hub_cached(repo, repo_type):
        return
    endpoint = hub_endpoint()
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        reason = "HF_HUB_OFFLINE is set"
    else:
        reason = unreachable(endpoint)
    if reason is None:
        return
    download = "huggingface-cli download " + (
        repo if repo_type == "model" else f"--repo-type dataset {repo}"
    )
    raise SourceError(
        f"{field}: {uri} is not in the Hugging Face cache and the hub ({endpoint}) cannot be "
        f"reached ({reason}); connect to the network, or download it first (`{download}`) "
        "into the cache (HF_HOME), or try the spec offline with `trainyard run FILE --tiny`"
    )


# --------------------------------------------------------------------------- S3


@dataclass(frozen=True)
class S3Settings:
    """How to reach the object store (from `spec.storage.s3`); boto3's default chain for credentials."""

    endpoint: str | None = None
    region: str | None = None
    addressing_style: str = "auto"

    @classmethod
    def from_spec(cls, storage: Any) -> S3Settings:
        s3 = getattr(storage, "s3", None) if storage is not None else None
        if s3 is None:
            return cls(endpoint=os.environ.get("AWS_ENDPOINT_URL"))
        return cls(s3.endpoint, s3.region, getattr(s3, "addressing_style", "auto"))

    def store_options(self) -> dict[str, Any]:
        """Keyword arguments of `storage.open_store` for an s3:// URI."""
        return {
            "endpoint": self.endpoint,
            "region": self.region,
            "addressing_style": self.addressing_style,
        }


def s3_problem(error: BaseException) -> str | None:
    """One line for an S3 error a user fixes by hand (credentials, endpoint, bucket), or
    None for any other error.

    >>> from botocore.exceptions import NoCredentialsError
    >>> s3_problem(NoCredentialsError()).split(";")[0]
    'no S3 credentials found'
    """
    try:
        from botocore import exceptions
    except ImportError:
        return None
    if isinstance(error, exceptions.NoCredentialsError):
        return (
            "no S3 credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and "
            "AWS_ENDPOINT_URL for MinIO and other S3-compatible stores), or on a cluster name a "
            "Secret in storage.s3.credentialsSecret"
        )
    if isinstance(error, exceptions.EndpointConnectionError):
        return (
            f"cannot reach the S3 endpoint ({error}); check storage.s3.endpoint or "
            "AWS_ENDPOINT_URL and the network"
        )
    if isinstance(error, exceptions.ClientError):
        code = error.response.get("Error", {}).get("Code", "")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403"):
            return (
                f"S3 refused the credentials ({code}); check AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or the Secret in storage.s3.credentialsSecret) and "
                "the bucket's permissions"
            )
        if code in ("NoSuchBucket", "404"):
            return f"the S3 bucket does not exist ({code}); check the URI's bucket name"
    return None


def cache_dir(kind: str) -> Path:
    path = builtin.cache_root() / kind
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def node_locked(path: Path):
    """Hold an exclusive lock next to `path`, so only one process on the node fills it."""
    lock_path = path.with_name(path.name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def download_s3(uri: str, settings: S3Settings, field: str = "source") -> Path:
    """Download `s3://bucket/key` (every object under the prefix, or the one object) to the cache.

    Returns the local directory or file. A cached file is kept while the object's size
    and ETag are those it was downloaded with (recorded beside the cache entry), so a
    restarted pod does not download a model again, and a dataset uploaded again under
    the same key, same size or not, is downloaded again. Credentials come from the
    storage module (mounted Secret, else boto3's default chain).
    """
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    key = key.strip("/")
    if not bucket or not key:
        raise SourceError(f"{field}: {uri!r} names no object; expected s3://bucket/key")
    # The S3 client retries a refused connection for many seconds before it gives up.
    reason = unreachable(settings.endpoint) if settings.endpoint else None
    if reason is not None:
        raise SourceError(
            f"{field}: {uri}: cannot reach the S3 endpoint {settings.endpoint} ({reason}); "
            "check storage.s3.endpoint or AWS_ENDPOINT_URL and the network"
        )
    try:
        return _download_s3(uri, bucket, key, settings, field)
    except Exception as error:
        problem = s3_problem(error)
        if problem is None:
            raise
        raise SourceError(f"{field}: {uri}: {problem}") from None


def _download_s3(uri: str, bucket: str, key: str, settings: S3Settings, field: str) -> Path:
    import json

    from trainyard.workloads.storage import open_store

    target = cache_dir("s3") / bucket / key
    record = target.with_name(f".{target.name}.versions.json")
    with node_locked(target):
        store = open_store(f"s3://{bucket}/{key}", **settings.store_options())
        listed = store.list_versions()
        single = "" in listed and len(listed) == 1  # one object, e.g. a JSONL or Parquet file
        if not listed:
            raise SourceError(
                f"{field}: nothing found at {uri} (no object and no objects under it)"
            )
        try:
            cached = json.loads(record.read_text()) if record.is_file() else {}
        except ValueError:
            cached = {}
        versions = {name: [size, etag] for name, (size, etag) in listed.items()}
        stale = {}
        for name, (size, etag) in versions.items():
            if name.endswith("/") or (name == "" and not single):
                continue
            local = target if name == "" else target / name
            if not (
                local.is_file()
                and local.stat().st_size == size
                and cached.get(name) == [size, etag]
            ):
                stale[name] = local
        if single:
            if stale:
                partial = target.with_name(target.name + ".partial")
                parent, _, name = key.rpartition("/")
                open_store(f"s3://{bucket}/{parent}", **settings.store_options()).download_files(
                    {name: partial}
                )
                partial.replace(target)
        else:
            store.download_files(stale)
            # An object deleted from the prefix must not stay in the data (a removed shard).
            for local in [p for p in target.rglob("*") if p.is_file()]:
                if local.relative_to(target).as_posix() not in versions:
                    local.unlink()
        record.write_text(json.dumps(versions))
    return target


# ------------------------------------------------------------------ run://RUN


def run_checkpoint_uri(uri: str, own_checkpoint_uri: str | None, field: str = "source") -> str:
    """Where the checkpoint named by `run://RUN[/step-N|final|latest]` lies.

    The contract's rule (`trainyard.api.contract.runs_root`): under `$TRAINYARD_RUNS_URI`
    when the operator or the local runner sets it, otherwise under the parent of this
    run's own checkpoint URI. Without a checkpoint the run's exported `final/` model is meant.
    """
    try:
        reference = contract.parse_run_reference(uri)
    except contract.SourceURIError as error:
        raise SourceError(f"{field}: {error}") from None
    root = contract.runs_root(own_checkpoint_uri, os.environ)
    if not root:
        raise SourceError(
            f"{field}: {uri!r} needs to know where runs keep checkpoints: set checkpoint.uri "
            f"(runs share its parent) or {contract.Env.RUNS_URI}"
        )
    return contract.run_checkpoint_uri(reference, root)


def _resolve_run(uri: str, own_checkpoint_uri: str | None, s3: S3Settings, field: str) -> Path:
    """The local path of the checkpoint a `run://` source names.

    Under a runs root on this machine (`file://`), a run's checkpoints may also lie in an
    output folder of `trainyard run` (`ROOT/NAME-YYYYmmdd-HHMMSS/checkpoints`): the newest
    such folder whose run file names the run, and that holds the checkpoint, is taken.
    """
    from trainyard.workloads import local_spec

    location = run_checkpoint_uri(uri, own_checkpoint_uri, field)
    reference = contract.parse_run_reference(uri)
    root = location.rsplit("/", 2)[0]
    candidates = [location]
    if root.startswith("file://"):
        candidates += [
            f"{run.rstrip('/')}/{reference.checkpoint}"
            for run in local_spec.local_run_uris(Path(root.removeprefix("file://")), reference.run)
        ]
    for candidate in candidates:
        if reference.is_latest:
            found = _latest_checkpoint(candidate.rsplit("/", 1)[0], s3)
            if found is None:
                continue
            candidate = found
        try:
            local = _to_local(candidate, s3, field)
        except SourceError:
            continue
        if local.exists():
            logger.info("%s: %s is %s", field, uri, candidate)
            return local
    if not root.startswith("file://"):
        raise SourceError(f"{field}: {uri} resolves to {location}, which does not exist")
    folder = root.removeprefix("file://")
    raise SourceError(
        f"{field}: {uri} resolves to {location}, which does not exist, nor does any output "
        f"folder of `trainyard run` for run {reference.run!r} under {folder} hold "
        f"{reference.checkpoint}; train {reference.run!r} first, or point "
        "`trainyard run --runs-root DIR` at the folder that holds its output folder"
    )


def _latest_checkpoint(run_uri: str, s3: S3Settings) -> str | None:
    """The newest complete checkpoint of a run, as the checkpoint store decides."""
    from trainyard.workloads import checkpoint

    return checkpoint.find_latest_complete(run_uri, s3)


def _to_local(uri: str, s3: S3Settings, field: str) -> Path:
    if uri.startswith("s3://"):
        return download_s3(uri, s3, field)
    return Path(uri.removeprefix("file://"))


# ------------------------------------------------------------------ models


def resolve_model(
    uri: str,
    *,
    revision: str | None = None,
    storage: Any = None,
    checkpoint_uri: str | None = None,
    field: str = "model.source",
) -> tuple[str, dict[str, Any]]:
    """Turn a model or tokenizer source into `(name_or_path, from_pretrained kwargs)`.

    A hub model is left to transformers to download (by id, with its revision), once
    it is known to be in the cache or the hub to answer (`check_hub_source`).
    """
    source = parse_source(uri, field)
    s3 = S3Settings.from_spec(storage)
    if source.scheme == "hf":
        rev = revision or source.revision
        check_hub_source(uri, source.path, "model", field)
        return source.path, ({"revision": rev} if rev else {})
    if source.scheme == "builtin":
        try:
            return str(builtin.model_path(source.path)), {}
        except ValueError as error:
            raise SourceError(f"{field}: {error}") from None
    if source.scheme == "run":
        return str(_resolve_run(uri, checkpoint_uri, s3, field)), {}
    local = _to_local(uri, s3, field)
    if not local.is_dir():
        raise SourceError(
            f"{field}: {uri} is not a directory; a model source must hold config.json and weights"
        )
    return str(local), {}


def local_model_dir(
    uri: str,
    *,
    storage: Any = None,
    checkpoint_uri: str | None = None,
    field: str = "model.source",
) -> str:
    """A model source as a local directory: `resolve_model`, with a hub model downloaded
    into the hub cache (for code that loads with `local_files_only`)."""
    path, kwargs = resolve_model(uri, storage=storage, checkpoint_uri=checkpoint_uri, field=field)
    if parse_source(uri, field).scheme == "hf":
        from huggingface_hub import snapshot_download

        path = snapshot_download(path, revision=kwargs.get("revision"))
    return path


def adapter_base(path: str) -> str | None:
    """The base model an adapter directory was trained on, or None for a full model."""
    config = Path(path) / "adapter_config.json"
    if not config.is_file():
        return None
    import json

    return json.loads(config.read_text()).get("base_model_name_or_path")


# ------------------------------------------------------------------ datasets


def load_dataset_source(
    uri: str,
    *,
    split: str = "train",
    config: str | None = None,
    storage: Any = None,
    field: str = "dataset.source",
) -> Dataset:
    """Load a dataset from a source URI: JSONL, JSON, Parquet or CSV files, a saved dataset,
    a hub dataset id (with its `config`, the subset, where it has several), or a built-in
    dataset."""
    source = parse_source(uri, field)
    if source.scheme == "builtin":
        name = source.path.removeprefix("datasets/")
        if not source.path.startswith("datasets/"):
            raise SourceError(
                f"{field}: {uri!r} is a built-in model name; built-in datasets are "
                + ", ".join(f"builtin://datasets/{n}" for n in sorted(builtin.DATASETS))
            )
        try:
            return builtin.build_dataset(name)
        except ValueError as error:
            raise SourceError(f"{field}: {error}") from None
    if source.scheme == "hf":
        import datasets

        check_hub_source(uri, source.path, "dataset", field)
        return datasets.load_dataset(source.path, config, revision=source.revision, split=split)
    if source.scheme == "run":
        raise SourceError(f"{field}: run:// names a model checkpoint, not a dataset")
    local = _to_local(uri, S3Settings.from_spec(storage), field)
    return load_local_dataset(local, field)


def load_local_dataset(path: Path, field: str = "dataset.source") -> Dataset:
    """A dataset from a local file, a directory of data files, or a `save_to_disk` directory."""
    import datasets

    if not path.exists():
        raise SourceError(f"{field}: {path} does not exist")
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "state.json").exists():
            loaded = datasets.load_from_disk(str(path))
            return loaded["train"] if isinstance(loaded, datasets.DatasetDict) else loaded
        files = sorted(p for p in path.rglob("*") if p.suffix in DATA_SUFFIXES and p.is_file())
        kinds = {DATA_SUFFIXES[p.suffix] for p in files}
        if len(kinds) != 1:
            raise SourceError(
                f"{field}: {path} must hold data files of one kind "
                f"({', '.join(sorted(DATA_SUFFIXES))}); found {sorted(kinds) or 'none'}"
            )
        return datasets.load_dataset(kinds.pop(), data_files=[str(p) for p in files], split="train")
    kind = data_file_kind(path, field)
    return datasets.load_dataset(kind, data_files=str(path), split="train")


def data_file_kind(path: Path, field: str = "dataset.source") -> str:
    """The `datasets` builder of a data file, by its suffix; SourceError for another suffix."""
    kind = DATA_SUFFIXES.get(path.suffix)
    if kind is None:
        raise SourceError(
            f"{field}: {path.name} has an unknown suffix; allowed: {', '.join(sorted(DATA_SUFFIXES))}"
        )
    return kind


def first_rows(path: Path, limit: int = 8) -> list[dict[str, Any]]:
    """The first rows of a JSON Lines or CSV file, read without loading the file ([] for
    other kinds): enough to check its columns before a run starts."""
    import csv
    import itertools
    import json

    rows: list[dict[str, Any]] = []
    with open(path, encoding="utf-8", errors="replace") as handle:
        if path.suffix == ".csv":
            return list(itertools.islice(csv.DictReader(handle), limit))
        if path.suffix != ".jsonl":
            return []
        for line in itertools.islice(handle, limit * 4):
            if line.strip():
                try:
                    row = json.loads(line)
                except ValueError:
                    return []
                if isinstance(row, dict):
                    rows.append(row)
            if len(rows) >= limit:
                break
    return rows
