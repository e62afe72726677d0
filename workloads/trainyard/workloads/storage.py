"""Object storage for checkpoints: an S3-compatible bucket or a local directory.

Both stores speak in keys relative to the root the URI names (`s3://bucket/prefix` or
`file:///abs/path`), with `/` as separator, so checkpoint logic never sees which one
it talks to. Only this module imports boto3.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import hashlib
import math
import os
import shutil
import tempfile
import threading
import uuid
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

# Where a mounted Secret with S3 credentials lives; each key of the Secret is a file.
DEFAULT_CREDENTIALS_DIR = "/var/run/secrets/trainyard/s3"
CREDENTIALS_DIR_ENV = "TRAINYARD_S3_CREDENTIALS_DIR"
# The API documents the Secret keys as AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY; the
# camelCase names are what MinIO and many charts use. Either is accepted.
ACCESS_KEY_FILES = ("AWS_ACCESS_KEY_ID", "accessKeyId")
SECRET_KEY_FILES = ("AWS_SECRET_ACCESS_KEY", "secretAccessKey")
SESSION_TOKEN_FILES = ("AWS_SESSION_TOKEN", "sessionToken")

MiB = 1024 * 1024
# S3's limits on a multipart upload: parts of 5 MiB to 5 GiB, at most 10,000 of them.
MIN_PART = 5 * MiB
MAX_PART = 5 * 1024 * MiB
MAX_PARTS = 10_000
# Parts grow with the object up to this size, and past it only as S3's 10,000-part
# limit needs: throughput comes from many connections at once, each sending parts of
# 8-16 MiB (AWS's guidance, and the CRT client's default of 8 MiB), and a failed part
# resends little. Larger parts made uploads of a 1 GiB checkpoint slower, not faster
# (to moto's server here: 9.3 s with 52 MiB parts, 7.9 s with 16 MiB, 8.0 s with 8 MiB).
LARGE_PART = 16 * MiB
# Bytes of parts read ahead of the network across all files: bounds an upload's memory.
IN_FLIGHT_BYTES = 512 * MiB
# Files read (and hashed) at the same time; each one streams its parts to the senders.
READERS = 4


def part_size_for(size: int, chunksize: int = 8 * MiB, concurrency: int = 10) -> int:
    """Part size for an object of `size` bytes: `chunksize` for small objects, larger
    parts for large ones so each connection keeps about two parts to send, never more
    than S3's 10,000 parts nor outside its 5 MiB to 5 GiB.

    >>> [part_size_for(n * MiB) // MiB for n in (20, 300, 1024, 100 * 1024, 1024 * 1024)]
    [8, 15, 16, 16, 105]
    """
    wanted = min(max(chunksize, math.ceil(size / (2 * concurrency))), max(LARGE_PART, chunksize))
    wanted = max(wanted, math.ceil(size / MAX_PARTS), MIN_PART)
    return min(math.ceil(wanted / MiB) * MiB, MAX_PART)


class _ByteBudget:
    """Blocks a reader while more than `limit` bytes of parts wait to be sent."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0
        self.changed = threading.Condition()

    def acquire(self, count: int) -> None:
        with self.changed:
            while self.used and self.used + count > self.limit:
                self.changed.wait()
            self.used += count

    def release(self, count: int) -> None:
        with self.changed:
            self.used -= count
            self.changed.notify_all()


class StorageError(RuntimeError):
    """Storage could not be reached or used; the message says which URI and why."""


@dataclass(frozen=True)
class StorageUri:
    """A parsed storage URI: `s3://bucket/prefix` or `file://path`."""

    scheme: Literal["s3", "file"]
    bucket: str | None
    path: str
    """Key prefix without slashes at either end (s3), or a filesystem path (file)."""

    def __str__(self) -> str:
        if self.scheme == "s3":
            return f"s3://{self.bucket}/{self.path}" if self.path else f"s3://{self.bucket}"
        return f"file://{self.path}"


def parse_storage_uri(uri: str) -> StorageUri:
    """Split a checkpoint URI into scheme, bucket and path.

    >>> parse_storage_uri("s3://ckpts/runs/grpo-1/")
    StorageUri(scheme='s3', bucket='ckpts', path='runs/grpo-1')
    >>> parse_storage_uri("file:///data/ckpts")
    StorageUri(scheme='file', bucket=None, path='/data/ckpts')
    >>> parse_storage_uri("file://out/ckpts")
    StorageUri(scheme='file', bucket=None, path='out/ckpts')
    """
    scheme, sep, rest = uri.partition("://")
    if not sep or scheme not in ("s3", "file"):
        raise ValueError(
            f"checkpoint URI {uri!r} has no supported scheme; allowed: s3://bucket/prefix, "
            "file:///absolute/path, file://relative/path"
        )
    if scheme == "file":
        if not rest:
            raise ValueError(f"checkpoint URI {uri!r} names no directory; write file://PATH")
        # file:///abs keeps its leading slash; file://rel is relative to the working dir.
        return StorageUri("file", None, rest.rstrip("/") or "/")
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ValueError(f"checkpoint URI {uri!r} names no bucket; write s3://BUCKET/PREFIX")
    return StorageUri("s3", bucket, prefix.strip("/"))


class ObjectStore(Protocol):
    """Keys are relative to the store's root and use `/` between parts."""

    uri: str

    def upload_files(self, files: Mapping[str, Path]) -> dict[str, str]:
        """Upload local files (key → path) concurrently; return when all are stored, with
        each key's sha256 (hex) of the bytes that were sent."""

    def download_files(self, files: Mapping[str, Path]) -> None:
        """Download objects (key → local path) concurrently."""

    def put_bytes(self, key: str, data: bytes) -> None:
        """Store a small object in one request; readers see the old or the new whole."""

    def get_bytes(self, key: str) -> bytes | None:
        """Read a small object; None when it does not exist."""

    def list_objects(self, prefix: str = "") -> dict[str, int]:
        """Every key under prefix (recursively) with its size in bytes."""

    def list_children(self) -> list[str]:
        """Names of the top-level 'directories' under the root."""

    def delete(self, keys: Iterable[str]) -> None:
        """Delete the keys; missing ones are not an error."""

    def list_unfinished(self) -> list[tuple[str, str]]:
        """(key, handle) of writes that started and never finished (a killed uploader)."""

    def abort_unfinished(self, key: str, handle: str) -> None:
        """Throw away one unfinished write so it stops taking space."""


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p.strip("/"))


class S3Store:
    """An S3-compatible bucket through boto3; uploads use its transfer manager."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint: str | None = None,
        region: str | None = None,
        addressing_style: Literal["auto", "path", "virtual"] = "auto",
        credentials_dir: str | os.PathLike[str] | None = None,
        max_concurrency: int = 10,
        multipart_threshold: int = 8 * MiB,
        multipart_chunksize: int = 8 * MiB,
    ) -> None:
        import boto3
        import botocore.config
        from boto3.s3.transfer import TransferConfig

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        # What open_store needs to open this store again in another process.
        self.options = {
            "endpoint": endpoint,
            "region": region,
            "addressing_style": addressing_style,
            "credentials_dir": str(credentials_dir) if credentials_dir else None,
            "max_concurrency": max_concurrency,
            "multipart_threshold": multipart_threshold,
            "multipart_chunksize": multipart_chunksize,
        }
        self.uri = str(StorageUri("s3", bucket, self.prefix))
        self.max_concurrency = max_concurrency
        self.multipart_threshold = multipart_threshold
        self.multipart_chunksize = multipart_chunksize
        session = boto3.session.Session(**read_credentials_dir(credentials_dir))

        def client(**s3_options):
            return session.client(
                "s3",
                endpoint_url=endpoint,
                region_name=region,
                config=botocore.config.Config(
                    s3={"addressing_style": addressing_style, **s3_options},
                    # One pooled connection per concurrent part; the default 10 would
                    # queue them.
                    max_pool_connections=max(10, max_concurrency),
                    retries={"mode": "standard", "max_attempts": 5},
                    # botocore computes no checksum of its own (its default since 1.36
                    # is CRC32 on every request): upload_files sends each part's CRC32,
                    # computed on the sending thread from the bytes it sends, and a
                    # checkpoint's end-to-end check is its manifest's sha256, verified
                    # on every download.
                    request_checksum_calculation="when_required",
                    response_checksum_validation="when_required",
                ),
            )

        self.client = client()
        # The bulk of an upload (upload_files' objects and parts) goes without a
        # SigV4 signature of its body: over http botocore would otherwise hash every
        # byte with sha256 once more. Each request carries its CRC32, which the server
        # checks, and the manifest (signed, like every other request) holds every
        # file's sha256, checked on download. Over https botocore signs no bodies
        # that carry a checksum anyway.
        self._bulk = client(payload_signing_enabled=False)
        self.transfer_config = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_chunksize,
            max_concurrency=max_concurrency,
            # The CRT client would ignore endpoint/addressing settings on some versions.
            preferred_transfer_client="classic",
        )

    def _key(self, key: str) -> str:
        return _join(self.prefix, key)

    def _transfer(self, files: Mapping[str, Path], direction: Literal["up", "down"]) -> None:
        from boto3.s3.transfer import create_transfer_manager

        # One manager for all files: its thread pool runs parts of different files at
        # the same time, so many small files and one big file both keep it busy.
        with create_transfer_manager(self.client, self.transfer_config) as manager:
            futures = []
            for key, path in files.items():
                if direction == "up":
                    futures.append(manager.upload(str(path), self.bucket, self._key(key)))
                else:
                    Path(path).parent.mkdir(parents=True, exist_ok=True)
                    futures.append(manager.download(self.bucket, self._key(key), str(path)))
            for future in futures:
                future.result()

    def upload_files(self, files: Mapping[str, Path]) -> dict[str, str]:
        """Upload files in parallel parts; each file is read once, sequentially, and the
        same bytes feed its sha256 and the parts on their way (hashing overlaps sending).

        Parts of every file share one pool of `max_concurrency` connections, and at
        most IN_FLIGHT_BYTES of parts are read ahead, whatever the part size."""
        if not files:
            return {}
        sizes = {key: Path(path).stat().st_size for key, path in files.items()}
        senders = min(self.max_concurrency, sum(self._parts(size) for size in sizes.values()))
        budget = _ByteBudget(IN_FLIGHT_BYTES)
        # Large files first: they take longest, and small ones fill the gaps.
        order = sorted(files, key=lambda key: -sizes[key])
        with (
            concurrent.futures.ThreadPoolExecutor(max(senders, 1), "s3-part") as send_pool,
            concurrent.futures.ThreadPoolExecutor(min(READERS, len(files)), "s3-read") as readers,
        ):
            futures = {
                key: readers.submit(
                    self._upload_one, key, Path(files[key]), sizes[key], send_pool, budget
                )
                for key in order
            }
            return {key: futures[key].result() for key in files}

    def _parts(self, size: int) -> int:
        if size < self.multipart_threshold:
            return 1
        return math.ceil(size / part_size_for(size, self.multipart_chunksize, self.max_concurrency))

    def _upload_one(
        self,
        key: str,
        path: Path,
        size: int,
        send_pool: concurrent.futures.Executor,
        budget: _ByteBudget,
    ) -> str:
        digest = hashlib.sha256()
        full_key = self._key(key)
        if size < self.multipart_threshold:
            data = path.read_bytes()
            digest.update(data)
            self._bulk.put_object(
                Bucket=self.bucket, Key=full_key, Body=data, ChecksumCRC32=crc32(data)
            )
            return digest.hexdigest()
        part_size = part_size_for(size, self.multipart_chunksize, self.max_concurrency)
        # CRC32 per part, composed by S3 into the object's checksum: the server checks
        # every part as it arrives (a server that computes no checksum of its own
        # otherwise joins the whole object once more to compute CRC64NVME on complete).
        upload_id = self._bulk.create_multipart_upload(
            Bucket=self.bucket, Key=full_key, ChecksumAlgorithm="CRC32"
        )["UploadId"]
        sent: list[concurrent.futures.Future] = []

        def send(number: int, data: bytes) -> dict:
            try:
                checksum = crc32(data)  # here, in parallel: zlib releases the GIL
                response = self._bulk.upload_part(
                    Bucket=self.bucket, Key=full_key, UploadId=upload_id, PartNumber=number,
                    Body=data, ChecksumCRC32=checksum,
                )  # fmt: skip
            finally:
                budget.release(len(data))
            return {"PartNumber": number, "ETag": response["ETag"], "ChecksumCRC32": checksum}

        try:
            with open(path, "rb") as handle:
                number = read = 0
                while True:
                    budget.acquire(part_size)
                    data = handle.read(part_size)
                    if not data:
                        budget.release(part_size)
                        break
                    budget.release(part_size - len(data))
                    digest.update(data)
                    read += len(data)
                    number += 1
                    sent.append(send_pool.submit(send, number, data))
                    # A failed part stops the read early instead of after the whole file.
                    if any(f.done() and f.exception() for f in sent[-4:]):
                        break
            parts = [future.result() for future in sent]
            if read != size:
                raise StorageError(
                    f"{path} changed size while it was uploaded to {self.uri}/{key}: "
                    f"{size} bytes before, {read} read"
                )
            self._bulk.complete_multipart_upload(
                Bucket=self.bucket, Key=full_key, UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )  # fmt: skip
        except BaseException:
            for future in sent:
                future.cancel()
            concurrent.futures.wait(sent)
            # The original error says more; retention aborts what is left later.
            with contextlib.suppress(Exception):
                self.client.abort_multipart_upload(
                    Bucket=self.bucket, Key=full_key, UploadId=upload_id
                )
            raise
        return digest.hexdigest()

    def download_files(self, files: Mapping[str, Path]) -> None:
        self._transfer(files, "down")

    def put_bytes(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def get_bytes(self, key: str) -> bytes | None:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
        except self.client.exceptions.NoSuchKey:
            return None
        return response["Body"].read()

    def list_objects(self, prefix: str = "") -> dict[str, int]:
        root = _join(self.prefix, prefix)
        root = root + "/" if root else ""
        strip = len(self.prefix) + 1 if self.prefix else 0
        found: dict[str, int] = {}
        for page in self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=root
        ):
            for obj in page.get("Contents", []):
                found[obj["Key"][strip:]] = obj["Size"]
        return found

    def list_versions(self, prefix: str = "") -> dict[str, tuple[int, str]]:
        """Every key under prefix with its size and ETag (which changes with the content).

        The prefix's own key (an object named exactly like the prefix) is listed as ''."""
        root = _join(self.prefix, prefix)
        found: dict[str, tuple[int, str]] = {}
        for page in self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=root
        ):
            for obj in page.get("Contents", []):
                key = obj["Key"]
                if key == root:
                    found[""] = (obj["Size"], obj["ETag"])
                elif key.startswith(root + "/") or not root:
                    found[key[len(root) + 1 if root else 0 :]] = (obj["Size"], obj["ETag"])
        return found

    def list_children(self) -> list[str]:
        root = self.prefix + "/" if self.prefix else ""
        names = []
        for page in self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=root, Delimiter="/"
        ):
            for common in page.get("CommonPrefixes", []):
                names.append(common["Prefix"][len(root) :].rstrip("/"))
            for obj in page.get("Contents", []):
                names.append(obj["Key"][len(root) :])
        return names

    def delete(self, keys: Iterable[str]) -> None:
        batch = [{"Key": self._key(k)} for k in keys]
        # DeleteObjects takes at most 1000 keys per request.
        for start in range(0, len(batch), 1000):
            response = self.client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": batch[start : start + 1000], "Quiet": True}
            )
            if response.get("Errors"):
                first = response["Errors"][0]
                raise StorageError(
                    f"could not delete {first['Key']} in {self.uri}: {first.get('Message')}"
                )

    def list_unfinished(self) -> list[tuple[str, str]]:
        root = self.prefix + "/" if self.prefix else ""
        strip = len(root)
        found = []
        for page in self.client.get_paginator("list_multipart_uploads").paginate(
            Bucket=self.bucket, Prefix=root
        ):
            for upload in page.get("Uploads", []):
                found.append((upload["Key"][strip:], upload["UploadId"]))
        return found

    def abort_unfinished(self, key: str, handle: str) -> None:
        # Parts of an unfinished multipart upload are stored (and billed) until aborted.
        self.client.abort_multipart_upload(Bucket=self.bucket, Key=self._key(key), UploadId=handle)


class FileStore:
    """A directory on a local or mounted filesystem (PVC, NFS), same contract as S3Store."""

    def __init__(self, root: str | os.PathLike[str], *, max_concurrency: int = 4) -> None:
        self.root = Path(root).resolve()
        self.uri = f"file://{self.root}"
        self.max_concurrency = max_concurrency
        self.options: dict = {}

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root):
            raise StorageError(f"key {key!r} points outside {self.uri}")
        return path

    def _link_atomically(self, source: Path, target: Path) -> None:
        """Give target the contents of source: a hard link where both lie on one
        filesystem (no second copy on disk; checkpoint files are never rewritten in
        place), a copy elsewhere. Link or copy goes next to the target, then a rename:
        a reader never sees half a file."""
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}"
        try:
            try:
                os.link(source, tmp)
            except OSError:  # another filesystem, or one without hard links
                shutil.copyfile(source, tmp)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _link_all(self, pairs: list[tuple[Path, Path]], *, hashed: bool = False) -> list[str]:
        def one(source: Path, target: Path) -> str:
            self._link_atomically(source, target)
            return hash_file(target) if hashed else ""

        with concurrent.futures.ThreadPoolExecutor(self.max_concurrency) as pool:
            return [future.result() for future in [pool.submit(one, s, t) for s, t in pairs]]

    def upload_files(self, files: Mapping[str, Path]) -> dict[str, str]:
        pairs = [(Path(p), self._path(k)) for k, p in files.items()]
        return dict(zip(files, self._link_all(pairs, hashed=True), strict=True))

    def download_files(self, files: Mapping[str, Path]) -> None:
        self._link_all([(self._path(k), Path(p)) for k, p in files.items()])

    def put_bytes(self, key: str, data: bytes) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)

    def get_bytes(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            return None

    def list_objects(self, prefix: str = "") -> dict[str, int]:
        base = self._path(prefix) if prefix else self.root
        if not base.is_dir():
            return {}
        return {
            path.relative_to(self.root).as_posix(): path.stat().st_size
            for path in base.rglob("*")
            # Dot-files are our own in-flight temporaries.
            if path.is_file() and not path.name.startswith(".")
        }

    def list_children(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if not p.name.startswith("."))

    def delete(self, keys: Iterable[str]) -> None:
        parents = set()
        for key in keys:
            path = self._path(key)
            path.unlink(missing_ok=True)
            parents.add(path.parent)
        # Drop directories left empty, deepest first, but never the root itself.
        for parent in sorted(parents, key=lambda p: len(p.parts), reverse=True):
            while parent != self.root and parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
                parent = parent.parent

    def list_unfinished(self) -> list[tuple[str, str]]:
        if not self.root.is_dir():
            return []
        # _link_atomically's temporaries, `.<name>.<random>`, left by a killed copy.
        return [
            (
                (path.parent / path.name[1:].rsplit(".", 1)[0]).relative_to(self.root).as_posix(),
                path.name,
            )
            for path in self.root.rglob(".*")
            if path.is_file()
        ]

    def abort_unfinished(self, key: str, handle: str) -> None:
        (self._path(key).parent / handle).unlink(missing_ok=True)


def crc32(data: bytes) -> str:
    """S3's ChecksumCRC32 of data: the big-endian CRC32, base64.

    >>> crc32(b"hello")
    'NhCmhg=='
    """
    return base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()


def hash_file(path: Path, chunk_size: int = 8 * MiB) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def read_credentials_dir(directory: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """Read S3 keys from a mounted Secret directory as boto3 Session arguments.

    Returns {} when the directory does not exist, so boto3's default chain (env,
    profile, IRSA/web identity, instance metadata) applies.
    """
    directory = Path(directory or os.environ.get(CREDENTIALS_DIR_ENV) or DEFAULT_CREDENTIALS_DIR)
    if not directory.is_dir():
        return {}

    def first(names: tuple[str, ...]) -> str | None:
        for name in names:
            path = directory / name
            if path.is_file():
                return path.read_text().strip()
        return None

    access, secret = first(ACCESS_KEY_FILES), first(SECRET_KEY_FILES)
    if access is None and secret is None:
        return {}
    if access is None or secret is None:
        missing = ACCESS_KEY_FILES if access is None else SECRET_KEY_FILES
        raise StorageError(
            f"S3 credentials directory {directory} has only half a key pair: "
            f"add a file named {missing[0]} (or {missing[1]})"
        )
    credentials = {"aws_access_key_id": access, "aws_secret_access_key": secret}
    token = first(SESSION_TOKEN_FILES)
    if token:
        credentials["aws_session_token"] = token
    return credentials


def open_store(
    uri: str,
    *,
    endpoint: str | None = None,
    region: str | None = None,
    addressing_style: Literal["auto", "path", "virtual"] = "auto",
    credentials_dir: str | os.PathLike[str] | None = None,
    max_concurrency: int = 10,
    multipart_threshold: int = 8 * MiB,
    multipart_chunksize: int = 8 * MiB,
) -> S3Store | FileStore:
    """The store a checkpoint URI names; S3 options come from `storage.s3` of the run
    and are ignored for file:// URIs."""
    parsed = parse_storage_uri(uri)
    if parsed.scheme == "file":
        return FileStore(parsed.path)
    return S3Store(
        parsed.bucket or "",
        parsed.path,
        endpoint=endpoint,
        region=region,
        addressing_style=addressing_style,
        credentials_dir=credentials_dir,
        max_concurrency=max_concurrency,
        multipart_threshold=multipart_threshold,
        multipart_chunksize=multipart_chunksize,
    )
