"""Model, tokenizer and dataset sources: hf://, s3:// (moto over HTTP), file://, builtin://, run://."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainyard.api.common import S3Storage, Storage
from trainyard.workloads import builtin, sources
from trainyard.workloads.sources import Source, SourceError


@pytest.fixture(autouse=True)
def trainyard_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("TRAINYARD_CACHE", str(tmp_path_factory.getbasetemp() / "trainyard-cache"))
    monkeypatch.delenv("TRAINYARD_RUNS_URI", raising=False)


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """A cache of its own, so downloads in one test never satisfy another's."""
    monkeypatch.setenv("TRAINYARD_CACHE", str(tmp_path / "cache"))
    # Built-in models still come from the shared session cache path.
    return tmp_path / "cache"


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("hf://Qwen/Qwen2.5-0.5B", Source("hf", "Qwen/Qwen2.5-0.5B")),
        ("hf://Qwen/Qwen2.5-0.5B@v1.0", Source("hf", "Qwen/Qwen2.5-0.5B", "v1.0")),
        ("s3://models/qwen/step-5", Source("s3", "models/qwen/step-5")),
        ("file:///data/model", Source("file", "/data/model")),
        ("builtin://datasets/chat", Source("builtin", "datasets/chat")),
        ("run://sft-stage/step-200", Source("run", "sft-stage/step-200")),
    ],
)
def test_parse_source(uri, expected):
    assert sources.parse_source(uri) == expected


@pytest.mark.parametrize("uri", ["gs://bucket/model", "Qwen/Qwen2.5", "hf://", "http://x/y"])
def test_unknown_sources_say_what_is_allowed(uri):
    with pytest.raises(SourceError, match=r"model\.source: .* allowed: hf://org/name\[@revision\]"):
        sources.parse_source(uri, "model.source")


@pytest.fixture
def reachable_hub(monkeypatch):
    """HF_ENDPOINT pointing at a TCP server on 127.0.0.1 that accepts connections."""
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    yield
    server.close()


def closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_hub_models_keep_their_id_and_revision(reachable_hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    assert sources.resolve_model("hf://org/name@abc") == ("org/name", {"revision": "abc"})
    # model.revision wins over an @revision in the source.
    assert sources.resolve_model("hf://org/name@abc", revision="main") == (
        "org/name",
        {"revision": "main"},
    )
    assert sources.resolve_model("hf://org/name") == ("org/name", {})


@pytest.mark.parametrize("offline", ["probe", "HF_HUB_OFFLINE"])
def test_an_unreachable_hub_is_known_in_seconds_with_what_to_do(tmp_path, monkeypatch, offline):
    import time

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    if offline == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    started = time.monotonic()
    with pytest.raises(SourceError) as raised:
        sources.resolve_model("hf://org/name")
    message = str(raised.value)
    assert message.startswith("model.source: hf://org/name is not in the Hugging Face cache")
    assert "cannot be reached" in message and "huggingface-cli download org/name" in message
    assert "--tiny" in message
    with pytest.raises(SourceError, match="huggingface-cli download --repo-type dataset org/d"):
        sources.load_dataset_source("hf://org/d")
    # Bounded by the probe's own timeout, not transformers' minute of retries.
    assert time.monotonic() - started < 4 * sources.HUB_PROBE_SECONDS

    # A model already in the cache is left to transformers, hub or not.
    (tmp_path / "cache" / "models--org--name").mkdir(parents=True)
    assert sources.resolve_model("hf://org/name") == ("org/name", {})


def test_builtin_and_file_models_resolve_to_directories(tmp_path):
    path, kwargs = sources.resolve_model("builtin://tiny-llama")
    assert (Path(path) / "config.json").is_file() and kwargs == {}
    assert sources.resolve_model(f"file://{path}") == (path, {})
    (tmp_path / "weights.bin").write_bytes(b"0")
    with pytest.raises(SourceError, match="model.source: .* is not a directory"):
        sources.resolve_model(f"file://{tmp_path / 'weights.bin'}")


def upload_tree(endpoint: str, bucket: str, prefix: str, directory: Path) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    for file in directory.rglob("*"):
        if file.is_file():
            client.upload_file(str(file), bucket, f"{prefix}/{file.relative_to(directory)}")


def test_s3_model_prefix_is_downloaded_once_and_loads(s3_endpoint, s3_bucket, fresh_cache):
    from transformers import AutoModelForCausalLM

    model_dir = builtin.model_path("tiny-qwen2")
    upload_tree(s3_endpoint, s3_bucket, "models/tiny", model_dir)
    storage = Storage(s3=S3Storage(endpoint=s3_endpoint))

    path, _ = sources.resolve_model(f"s3://{s3_bucket}/models/tiny", storage=storage)
    local = Path(path)
    assert local.is_relative_to(fresh_cache)
    assert sorted(p.name for p in local.iterdir() if not p.name.endswith(".lock")) == sorted(
        p.name for p in model_dir.iterdir()
    )
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.model_type == "qwen2"

    stamp = (local / "model.safetensors").stat().st_mtime_ns
    assert sources.resolve_model(f"s3://{s3_bucket}/models/tiny/", storage=storage)[0] == path
    assert (local / "model.safetensors").stat().st_mtime_ns == stamp  # not downloaded again


def test_s3_single_jsonl_object_is_a_dataset(s3_endpoint, s3_bucket, fresh_cache, tmp_path):
    import boto3

    rows = builtin.build_dataset_rows("preference")[:5]
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    boto3.client("s3", endpoint_url=s3_endpoint).put_object(
        Bucket=s3_bucket, Key="data/pairs.jsonl", Body=data
    )
    storage = Storage(s3=S3Storage(endpoint=s3_endpoint))
    dataset = sources.load_dataset_source(f"s3://{s3_bucket}/data/pairs.jsonl", storage=storage)
    assert dataset.to_list() == rows


def test_s3_objects_uploaded_again_are_downloaded_again(s3_endpoint, s3_bucket, fresh_cache):
    """The cache keeps a file only while the object's ETag is the one it was downloaded
    with: a dataset fixed and uploaded again (same key, same size) is not served stale."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint)
    storage = Storage(s3=S3Storage(endpoint=s3_endpoint))
    first = {"prompt": "Say hi", "completion": "hi"}
    second = {"prompt": "Say yo", "completion": "yo"}  # same length: same size
    for key in ("data/train.jsonl", "shards/part-0.jsonl"):
        client.put_object(Bucket=s3_bucket, Key=key, Body=json.dumps(first).encode() + b"\n")
    single, prefix = f"s3://{s3_bucket}/data/train.jsonl", f"s3://{s3_bucket}/shards"
    assert sources.load_dataset_source(single, storage=storage).to_list() == [first]
    assert sources.load_dataset_source(prefix, storage=storage).to_list() == [first]
    cached = sources.download_s3(single, sources.S3Settings.from_spec(storage))
    stamp = cached.stat().st_mtime_ns
    assert sources.download_s3(single, sources.S3Settings.from_spec(storage)) == cached
    assert cached.stat().st_mtime_ns == stamp, "an unchanged object is not downloaded again"

    for key in ("data/train.jsonl", "shards/part-0.jsonl"):
        client.put_object(Bucket=s3_bucket, Key=key, Body=json.dumps(second).encode() + b"\n")
    assert sources.load_dataset_source(single, storage=storage).to_list() == [second]
    assert sources.load_dataset_source(prefix, storage=storage).to_list() == [second]
    # A shard deleted from the prefix leaves the cached data too.
    client.put_object(Bucket=s3_bucket, Key="shards/part-1.jsonl", Body=b'{"prompt": "a"}\n')
    assert len(sources.load_dataset_source(prefix, storage=storage)) == 2
    client.delete_object(Bucket=s3_bucket, Key="shards/part-1.jsonl")
    assert sources.load_dataset_source(prefix, storage=storage).to_list() == [second]
    # A key that only starts like the object is a different object.
    client.put_object(Bucket=s3_bucket, Key="data/train.jsonl.bak", Body=b"not json")
    assert sources.load_dataset_source(single, storage=storage).to_list() == [second]


def test_missing_s3_object_is_a_clear_error(s3_endpoint, s3_bucket, fresh_cache):
    storage = Storage(s3=S3Storage(endpoint=s3_endpoint))
    with pytest.raises(SourceError, match=r"dataset.source: nothing found at s3://"):
        sources.load_dataset_source(f"s3://{s3_bucket}/nope.jsonl", storage=storage)


def test_missing_s3_credentials_are_one_line_saying_what_to_set(
    s3_endpoint, s3_bucket, fresh_cache, monkeypatch
):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    storage = Storage(s3=S3Storage(endpoint=s3_endpoint))
    with pytest.raises(SourceError) as raised:
        sources.load_dataset_source(f"s3://{s3_bucket}/train.jsonl", storage=storage)
    message = str(raised.value)
    assert message.startswith(f"dataset.source: s3://{s3_bucket}/train.jsonl: no S3 credentials")
    assert "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in message
    assert "\n" not in message


def test_an_unreachable_s3_endpoint_is_one_line(fresh_cache):
    storage = Storage(s3=S3Storage(endpoint=f"http://127.0.0.1:{closed_port()}"))
    with pytest.raises(SourceError, match=r"dataset.source: s3://b/x.jsonl: cannot reach the S3"):
        sources.load_dataset_source("s3://b/x.jsonl", storage=storage)


def test_local_dataset_files(tmp_path):
    from datasets import Dataset

    rows = builtin.build_dataset_rows("alpaca")[:6]
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    parquet = tmp_path / "parquet" / "part-0.parquet"
    parquet.parent.mkdir()
    Dataset.from_list(rows).to_parquet(str(parquet))
    saved = tmp_path / "saved"
    Dataset.from_list(rows).save_to_disk(str(saved))

    for uri in (
        f"file://{jsonl}",
        f"file://{parquet}",
        f"file://{parquet.parent}",
        f"file://{saved}",
    ):
        assert sources.load_dataset_source(uri).to_list() == rows, uri


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "missing.jsonl", "does not exist"),
        (lambda d: (d / "data.txt").write_text("x") and d / "data.txt", "unknown suffix"),
        (lambda d: d, "must hold data files of one kind"),
    ],
)
def test_bad_local_datasets_are_clear_errors(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(SourceError, match=f"dataset.source: .*{message}"):
        sources.load_dataset_source(f"file://{path}")


def test_builtin_dataset_names_are_checked():
    assert sources.load_dataset_source("builtin://datasets/text").num_rows > 0
    with pytest.raises(SourceError, match="builtin://datasets/chat"):
        sources.load_dataset_source("builtin://tiny-qwen2")
    with pytest.raises(SourceError, match="unknown built-in dataset 'nope'"):
        sources.load_dataset_source("builtin://datasets/nope")


@pytest.mark.parametrize(
    ("uri", "own", "env", "expected"),
    [
        ("run://sft", "s3://ckpt/runs/dpo", None, "s3://ckpt/runs/sft/final"),
        ("run://sft/step-200", "s3://ckpt/runs/dpo/", None, "s3://ckpt/runs/sft/step-200"),
        ("run://sft/latest", None, "file:///data/runs", "file:///data/runs/sft/latest"),
        ("run://sft/final", "s3://a/b", "s3://ckpt/runs", "s3://ckpt/runs/sft/final"),
    ],
)
def test_run_references_resolve_under_the_runs_root(uri, own, env, expected, monkeypatch):
    if env:
        monkeypatch.setenv("TRAINYARD_RUNS_URI", env)
    assert sources.run_checkpoint_uri(uri, own) == expected


def test_run_reference_without_a_root_or_with_a_bad_step_is_an_error():
    with pytest.raises(SourceError, match="set checkpoint.uri"):
        sources.run_checkpoint_uri("run://sft", None)
    with pytest.raises(SourceError, match="run://RUN/step-N"):
        sources.run_checkpoint_uri("run://sft/step-x", "s3://a/b")


def test_run_latest_takes_the_newest_complete_checkpoint(tmp_path):
    """run://RUN/latest goes through the checkpoint store: a step without a manifest is skipped."""
    from trainyard.workloads.checkpoint import CheckpointSync

    model_dir = builtin.model_path("tiny-qwen2")
    runs = tmp_path / "runs"
    sync = CheckpointSync(f"file://{runs}/sft")
    sync.submit(model_dir, 4)
    sync.close()
    # An upload that never finished: files but no manifest.
    (runs / "sft" / "step-9").mkdir()
    (runs / "sft" / "step-9" / "config.json").write_text("{}")

    path, _ = sources.resolve_model("run://sft/latest", checkpoint_uri=f"file://{runs}/dpo")
    assert Path(path) == runs / "sft" / "step-4"
    assert (Path(path) / "model.safetensors").is_file()
    with pytest.raises(SourceError, match=r"run://sft/step-7 resolves to .*does not exist"):
        sources.resolve_model("run://sft/step-7", checkpoint_uri=f"file://{runs}/dpo")


def test_adapter_directories_name_their_base(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/m"}))
    assert sources.adapter_base(str(tmp_path)) == "/m"
    assert sources.adapter_base(str(builtin.model_path("tiny-qwen2"))) is None
