"""Object stores against a real moto S3 server over HTTP and a real directory."""

from __future__ import annotations

import os

import boto3
import pytest
from botocore.exceptions import NoCredentialsError

from trainyard.workloads.storage import (
    FileStore,
    S3Store,
    StorageError,
    StorageUri,
    open_store,
    parse_storage_uri,
    read_credentials_dir,
)

MiB = 1024 * 1024


@pytest.fixture(params=["s3", "file"])
def store(request, tmp_path):
    """The same contract, once per store kind."""
    if request.param == "file":
        return FileStore(tmp_path / "store" / "ckpts")
    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = request.getfixturevalue("s3_bucket")
    return S3Store(bucket, "runs/r1", endpoint=endpoint, region="us-east-1")


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("s3://bucket", StorageUri("s3", "bucket", "")),
        ("s3://bucket/a/b/", StorageUri("s3", "bucket", "a/b")),
        ("file:///abs/dir/", StorageUri("file", None, "/abs/dir")),
        ("file://rel/dir", StorageUri("file", None, "rel/dir")),
    ],
    ids=["bucket-only", "prefix-trailing-slash", "file-absolute", "file-relative"],
)
def test_parse_storage_uri(uri, expected):
    assert parse_storage_uri(uri) == expected


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("gs://bucket/x", "allowed: s3://bucket/prefix"),
        ("/plain/path", "no supported scheme"),
        ("s3:///prefix", "names no bucket"),
        ("file://", "names no directory"),
    ],
    ids=["other-scheme", "no-scheme", "no-bucket", "no-path"],
)
def test_parse_storage_uri_refuses(uri, message):
    with pytest.raises(ValueError, match=message):
        parse_storage_uri(uri)


def test_bytes_round_trip(store):
    assert store.get_bytes("latest") is None
    store.put_bytes("latest", b'{"step": 3}')
    assert store.get_bytes("latest") == b'{"step": 3}'
    store.put_bytes("latest", b'{"step": 4}')
    assert store.get_bytes("latest") == b'{"step": 4}'


def test_upload_list_download_delete(store, tmp_path):
    source = tmp_path / "src"
    (source / "sub").mkdir(parents=True)
    big = os.urandom(12 * MiB + 123)  # above the 8 MiB multipart threshold
    (source / "model.safetensors").write_bytes(big)
    (source / "config.json").write_text('{"a": 1}')
    (source / "sub" / "rng.pth").write_bytes(b"\x00" * 10)

    store.upload_files(
        {
            "step-1/model.safetensors": source / "model.safetensors",
            "step-1/config.json": source / "config.json",
            "step-1/sub/rng.pth": source / "sub" / "rng.pth",
        }
    )
    store.put_bytes("latest", b"{}")

    assert store.list_objects("step-1") == {
        "step-1/model.safetensors": len(big),
        "step-1/config.json": 8,
        "step-1/sub/rng.pth": 10,
    }
    assert set(store.list_objects()) == {*store.list_objects("step-1"), "latest"}
    assert sorted(store.list_children()) == ["latest", "step-1"]

    target = tmp_path / "dst"
    store.download_files(
        {"step-1/model.safetensors": target / "m", "step-1/sub/rng.pth": target / "x" / "r"}
    )
    assert (target / "m").read_bytes() == big
    assert (target / "x" / "r").read_bytes() == b"\x00" * 10

    store.delete(["step-1/model.safetensors", "step-1/sub/rng.pth", "missing/key"])
    assert store.list_objects("step-1") == {"step-1/config.json": 8}


def test_large_file_goes_up_in_parts(s3_endpoint, s3_bucket, tmp_path):
    path = tmp_path / "shard.safetensors"
    path.write_bytes(os.urandom(20 * MiB))
    store = S3Store(
        s3_bucket, "p", endpoint=s3_endpoint, multipart_threshold=5 * MiB,
        multipart_chunksize=5 * MiB, max_concurrency=4,
    )  # fmt: skip
    store.upload_files({"shard.safetensors": path})
    head = boto3.client("s3", endpoint_url=s3_endpoint).head_object(
        Bucket=s3_bucket, Key="p/shard.safetensors"
    )
    # A multipart object's ETag ends in -<number of parts>.
    assert head["ETag"].strip('"').endswith("-4")
    assert head["ContentLength"] == 20 * MiB


def test_file_store_refuses_keys_outside_root(tmp_path):
    store = FileStore(tmp_path / "root")
    with pytest.raises(StorageError, match="outside"):
        store.put_bytes("../escape", b"x")


def test_file_store_delete_prunes_empty_dirs(tmp_path):
    store = FileStore(tmp_path / "root")
    store.put_bytes("step-1/a/b.bin", b"x")
    store.delete(["step-1/a/b.bin"])
    assert not (tmp_path / "root" / "step-1").exists()
    assert (tmp_path / "root").is_dir()


def test_open_store_by_scheme(s3_endpoint, s3_bucket, tmp_path):
    s3 = open_store(f"s3://{s3_bucket}/x/", endpoint=s3_endpoint, addressing_style="path")
    assert isinstance(s3, S3Store) and s3.uri == f"s3://{s3_bucket}/x"
    local = open_store(f"file://{tmp_path}/c")
    assert isinstance(local, FileStore) and local.root == tmp_path / "c"


def test_credentials_from_mounted_secret(s3_endpoint, s3_bucket, tmp_path, monkeypatch):
    # With no credentials in the environment, only the Secret files can sign requests.
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    secret = tmp_path / "secret"
    secret.mkdir()
    with pytest.raises(NoCredentialsError):
        S3Store(s3_bucket, endpoint=s3_endpoint, credentials_dir=secret).put_bytes("k", b"v")

    (secret / "accessKeyId").write_text("from-secret\n")
    (secret / "secretAccessKey").write_text("s3cr3t\n")
    monkeypatch.setenv("TRAINYARD_S3_CREDENTIALS_DIR", str(secret))
    assert read_credentials_dir() == {
        "aws_access_key_id": "from-secret",
        "aws_secret_access_key": "s3cr3t",
    }
    store = S3Store(s3_bucket, endpoint=s3_endpoint)
    store.put_bytes("k", b"v")
    assert store.get_bytes("k") == b"v"


def test_half_a_key_pair_is_a_clear_error(tmp_path):
    (tmp_path / "AWS_ACCESS_KEY_ID").write_text("id")
    with pytest.raises(StorageError, match="add a file named AWS_SECRET_ACCESS_KEY"):
        read_credentials_dir(tmp_path)
