"""Checkpoint sync against moto's S3 server over HTTP and a local directory store."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import boto3
import pytest
import torch
import transformers
from transformers import TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import rotate_checkpoints

from trainyard.api.common import S3Storage
from trainyard.workloads.checkpoint import (
    CheckpointSync,
    CheckpointSyncCallback,
    CheckpointUploadError,
    apply_retention,
    find_latest_complete,
    write_latest,
)
from trainyard.workloads.storage import FileStore, S3Store

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=32,
    )
    return transformers.Qwen2ForCausalLM(config)


@pytest.fixture
def save_checkpoint(tiny_model, tmp_path):
    """Write output_dir/checkpoint-N the way Trainer does: weights, config, state."""
    output_dir = tmp_path / "out"

    def save(step: int):
        directory = output_dir / f"checkpoint-{step}"
        tiny_model.save_pretrained(directory)
        TrainerState(global_step=step, max_steps=100).save_to_json(
            str(directory / "trainer_state.json")
        )
        return directory

    save.output_dir = output_dir
    return save


@pytest.fixture(params=["s3", "file"])
def store(request, tmp_path):
    if request.param == "file":
        return FileStore(tmp_path / "remote")
    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = request.getfixturevalue("s3_bucket")
    return S3Store(bucket, "runs/grpo-1", endpoint=endpoint)


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def steps_in(store) -> list[str]:
    return sorted(name for name in store.list_children() if name.startswith("step-"))


def latest_step(store) -> int:
    return json.loads(store.get_bytes("latest"))["step"]


def upload_each(sync, save_checkpoint, steps) -> None:
    """Save and upload steps one after the other (no coalescing between them)."""
    for step in steps:
        sync.submit(save_checkpoint(step), step)
        sync.wait()


def test_upload_writes_files_manifest_and_latest(store, save_checkpoint):
    sync = CheckpointSync(store)
    local = save_checkpoint(5)
    sync.submit(local, 5)
    [result] = sync.wait()

    manifest = json.loads(store.get_bytes("step-5/manifest.json"))
    local_files = sorted(p.name for p in local.iterdir())
    assert [f["path"] for f in manifest["files"]] == local_files
    for entry in manifest["files"]:
        assert entry["size"] == (local / entry["path"]).stat().st_size
        assert entry["sha256"] == sha256(local / entry["path"])
    assert manifest["step"] == 5 and manifest["createdAt"]
    assert manifest["totalBytes"] == sum(f["size"] for f in manifest["files"]) == result.bytes
    stored = store.list_objects("step-5")
    assert stored == {
        **{f"step-5/{f['path']}": f["size"] for f in manifest["files"]},
        "step-5/manifest.json": stored["step-5/manifest.json"],
    }
    assert latest_step(store) == 5 and sync.last_step == 5
    # The staging snapshot is gone; the trainer's own checkpoint is untouched.
    assert not (local.parent / ".trainyard-sync" / "checkpoint-5").exists()
    assert local.is_dir()


def test_keep_last_removes_older_steps(store, save_checkpoint):
    sync = CheckpointSync(store, keep_last=2)
    upload_each(sync, save_checkpoint, (1, 2, 3, 4))
    assert steps_in(store) == ["step-3", "step-4"]
    assert latest_step(store) == 4
    assert [r.step for r in sync.results] == [1, 2, 3, 4]


def test_retention_collects_unfinished_uploads_but_never_latest(store, save_checkpoint):
    sync = CheckpointSync(store)
    upload_each(sync, save_checkpoint, (1, 2, 3))
    # What an interrupted upload leaves behind: files, no manifest.
    weights = save_checkpoint(9) / "model.safetensors"
    store.upload_files({"step-0/model.safetensors": weights, "step-9/model.safetensors": weights})
    write_latest(store, 1)  # e.g. an operator rolled `latest` back by hand

    deleted = apply_retention(store, keep_last=1)

    # step-2 is old, step-0 an old unfinished upload; step-1 is what `latest` names and
    # step-9 may still be on its way.
    assert deleted == [0, 2]
    assert steps_in(store) == ["step-1", "step-3", "step-9"]


def start_unfinished_write(store, key: str) -> None:
    """What a killed uploader leaves: a multipart upload with a part, or a temp file."""
    if isinstance(store, S3Store):
        full_key = f"{store.prefix}/{key}"
        upload = store.client.create_multipart_upload(Bucket=store.bucket, Key=full_key)
        store.client.upload_part(
            Bucket=store.bucket, Key=full_key, UploadId=upload["UploadId"], PartNumber=1,
            Body=os.urandom(5 * MiB),
        )  # fmt: skip
    else:
        path = store.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.parent / f".{path.name}.k1ll3d0").write_bytes(os.urandom(1024))


def test_retention_aborts_unfinished_writes_of_old_steps(store, save_checkpoint):
    start_unfinished_write(store, "step-1/model.safetensors")
    start_unfinished_write(store, "step-5/model.safetensors")
    assert sorted(key for key, _ in store.list_unfinished()) == [
        "step-1/model.safetensors",
        "step-5/model.safetensors",
    ]
    sync = CheckpointSync(store)
    sync.submit(save_checkpoint(3), 3)
    sync.wait()
    # step-5 is newer than the newest complete step: it may still be on its way.
    assert [key for key, _ in store.list_unfinished()] == ["step-5/model.safetensors"]


def test_resume_downloads_newest_verified_checkpoint(store, save_checkpoint, tmp_path):
    sync = CheckpointSync(store)
    upload_each(sync, save_checkpoint, (10, 20))

    resumed = CheckpointSync(store).resume(tmp_path / "fresh")

    assert resumed == tmp_path / "fresh" / "checkpoint-20"
    original = save_checkpoint.output_dir / "checkpoint-20"
    assert {p.name: sha256(p) for p in resumed.iterdir()} == {
        p.name: sha256(p) for p in original.iterdir()
    }
    model = transformers.Qwen2ForCausalLM.from_pretrained(resumed)
    assert TrainerState.load_from_json(str(resumed / "trainer_state.json")).global_step == 20
    assert model.config.hidden_size == 16


def test_resume_with_nothing_stored_returns_none(store, tmp_path):
    assert CheckpointSync(store).resume(tmp_path / "fresh") is None


def test_upload_without_manifest_is_never_latest_nor_resumed(store, save_checkpoint, tmp_path):
    sync = CheckpointSync(store)
    sync.submit(save_checkpoint(10), 10)
    sync.wait()
    # An upload of step 20 that stopped before its manifest: every file is there.
    local = save_checkpoint(20)
    store.upload_files({f"step-20/{p.name}": p for p in local.iterdir()})

    assert latest_step(store) == 10
    resumed = CheckpointSync(store).resume(tmp_path / "fresh")
    assert resumed.name == "checkpoint-10"
    s3 = S3Storage(endpoint=store.client.meta.endpoint_url) if isinstance(store, S3Store) else None
    assert find_latest_complete(store.uri, s3) == f"{store.uri}/step-10"


@pytest.mark.parametrize("damage", ["same-size-bytes", "truncated", "deleted", "manifest"])
def test_corrupt_checkpoint_falls_back_to_previous(store, save_checkpoint, tmp_path, damage):
    sync = CheckpointSync(store)
    upload_each(sync, save_checkpoint, (10, 20))
    key = "step-20/model.safetensors"
    size = store.list_objects("step-20")[key]
    if damage == "deleted":
        store.delete([key])
    elif damage == "manifest":
        store.put_bytes("step-20/manifest.json", b'{"step": 20, "files": [tru')
    else:
        bad = tmp_path / "bad"
        bad.write_bytes(os.urandom(size if damage == "same-size-bytes" else size // 2))
        store.upload_files({key: bad})

    sync = CheckpointSync(store)
    resumed = sync.resume(tmp_path / "fresh")

    assert resumed.name == "checkpoint-10"
    failed, ok = sync.resume_attempts
    assert (failed.step, failed.ok, ok.step, ok.ok) == (20, False, 10, True)
    expected = {
        "same-size-bytes": "sha256 does not match",
        "manifest": "manifest is unreadable",
    }.get(damage, "stored size")
    assert expected in failed.reason
    assert not (tmp_path / "fresh" / ".checkpoint-20.partial").exists()


def test_export_final_uses_manifest_and_survives_retention(
    store, save_checkpoint, tiny_model, tmp_path
):
    sync = CheckpointSync(store, keep_last=1)
    sync.submit(save_checkpoint(1), 1)
    final = tmp_path / "final-model"
    tiny_model.save_pretrained(final)
    result = sync.export_final(final, step=1)
    sync.submit(save_checkpoint(2), 2)
    sync.wait()

    manifest = json.loads(store.get_bytes("final/manifest.json"))
    assert {f["path"]: f["sha256"] for f in manifest["files"]} == {
        p.name: sha256(p) for p in final.iterdir()
    }
    assert result.name == "final" and result.bytes == manifest["totalBytes"]
    assert steps_in(store) == ["step-2"] and "final/config.json" in store.list_objects("final")
    assert latest_step(store) == 2


def test_failed_upload_surfaces_at_train_end_and_moves_nothing(
    s3_endpoint, save_checkpoint, tmp_path
):
    store = S3Store("bucket-that-does-not-exist", "x", endpoint=s3_endpoint)
    callback = CheckpointSyncCallback(CheckpointSync(store))
    args = TrainingArguments(output_dir=str(save_checkpoint.output_dir), report_to=[])
    state = TrainerState(global_step=3, max_steps=10)
    save_checkpoint(3)
    callback.on_save(args, state, TrainerControl())

    with pytest.raises(CheckpointUploadError, match="NoSuchBucket"):
        callback.on_train_end(args, state, TrainerControl())
    assert callback.sync.last_step is None
    assert callback.sync.results[0].error and "NoSuchBucket" in callback.sync.results[0].error


def test_callback_uploads_on_rank_zero_even_after_rotation(store, save_checkpoint, tmp_path):
    sync = CheckpointSync(store, coalesce=False)
    callback = CheckpointSyncCallback(sync)
    output_dir = save_checkpoint.output_dir
    args = TrainingArguments(output_dir=str(output_dir), report_to=[], save_total_limit=1)
    saved = {}
    for step in (2, 4):
        directory = save_checkpoint(step)
        saved[step] = {p.name: sha256(p) for p in directory.iterdir()}
        # Trainer._save_checkpoint rotates old checkpoints before it calls on_save:
        # checkpoint-2 goes away while it may still be uploading.
        rotate_checkpoints(str(output_dir), save_total_limit=1, use_mtime=True)
        callback.on_save(args, TrainerState(global_step=step, max_steps=4), TrainerControl())
    assert not (output_dir / "checkpoint-2").exists()
    callback.on_train_end(args, TrainerState(global_step=4, max_steps=4), TrainerControl())

    assert steps_in(store) == ["step-2", "step-4"]
    assert callback.uploaded == [2, 4]
    for step in (2, 4):
        manifest = json.loads(store.get_bytes(f"step-{step}/manifest.json"))
        assert {f["path"]: f["sha256"] for f in manifest["files"]} == saved[step]


def test_callback_does_nothing_on_other_ranks(store, save_checkpoint):
    callback = CheckpointSyncCallback(CheckpointSync(store))
    args = TrainingArguments(output_dir=str(save_checkpoint.output_dir), report_to=[])
    state = TrainerState(global_step=2, max_steps=4, is_world_process_zero=False)
    save_checkpoint(2)
    callback.on_save(args, state, TrainerControl())
    callback.on_train_end(args, state, TrainerControl())
    assert store.list_objects() == {} and callback.uploaded == []


def test_keep_last_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="keepLast must be at least 1"):
        CheckpointSync(FileStore(tmp_path), keep_last=0)


KILLED_UPLOADER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from trainyard.workloads.checkpoint import CheckpointSync
    from trainyard.workloads.storage import S3Store

    endpoint, bucket, directory = sys.argv[1:]
    store = S3Store(bucket, "run", endpoint=endpoint, max_concurrency=1,
                    multipart_threshold=5 * 2**20, multipart_chunksize=5 * 2**20)
    sync = CheckpointSync(store)
    sync.submit(Path(directory), 20)
    sync.wait()
    """
)


def test_uploader_killed_midway_never_becomes_latest(
    s3_endpoint, s3_bucket, save_checkpoint, tmp_path
):
    store = S3Store(s3_bucket, "run", endpoint=s3_endpoint)
    sync = CheckpointSync(store)
    sync.submit(save_checkpoint(10), 10)
    sync.wait()
    big = save_checkpoint(20)
    (big / "optimizer.pt").write_bytes(os.urandom(200 * MiB))

    process = subprocess.Popen(
        [sys.executable, "-c", KILLED_UPLOADER, s3_endpoint, s3_bucket, str(big)],
        env=os.environ,
    )
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    deadline = time.monotonic() + 60
    # Kill it once a multipart upload of step-20 is under way.
    while time.monotonic() < deadline and process.poll() is None:
        uploads = client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", [])
        if any(u["Key"].startswith("run/step-20/") for u in uploads):
            break
        time.sleep(0.02)
    assert process.poll() is None, "the uploader finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()

    assert latest_step(store) == 10
    assert "step-20/manifest.json" not in store.list_objects()
    resumed = CheckpointSync(store).resume(tmp_path / "fresh")
    assert resumed.name == "checkpoint-10"

    # The next good upload cleans up what the killed one left, parts included.
    assert store.list_unfinished()
    sync = CheckpointSync(store)
    sync.submit(save_checkpoint(30), 30)
    sync.wait()
    assert client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
    assert steps_in(store) == ["step-10", "step-30"]


def test_node_parts_of_another_attempt_are_never_merged(store, save_checkpoint, tmp_path):
    """Node 0 of a restarted gang must not vouch for node 1's files of an earlier attempt
    at the same step: it waits for the part of its own attempt, and gives up loudly."""
    from trainyard.workloads.checkpoint_store import upload_part

    node1 = tmp_path / "node-1" / "checkpoint-4"
    node1.mkdir(parents=True)
    (node1 / "rng_state_1.pth").write_bytes(b"attempt 0")
    upload_part(store, node1, "step-4", 4, node=1, attempt="0")

    sync = CheckpointSync(store, nodes=2, attempt="1", part_timeout=1.0)
    sync.submit(save_checkpoint(4), 4)
    with pytest.raises(CheckpointUploadError, match=r"node\(s\) 1 did not upload their part"):
        sync.wait()
    assert store.get_bytes("step-4/manifest.json") is None and store.get_bytes("latest") is None

    (node1 / "rng_state_1.pth").write_bytes(b"attempt 1, node 1")
    part = CheckpointSync(store, node=1, nodes=2, attempt="1")
    part.submit(node1, 4)
    [part_result] = part.wait()
    assert part_result.files == 1 and store.get_bytes("latest") is None  # node 0 commits
    sync = CheckpointSync(store, nodes=2, attempt="1", part_timeout=5.0)
    sync.submit(save_checkpoint.output_dir / "checkpoint-4", 4)
    [result] = sync.wait()
    manifest = json.loads(store.get_bytes("step-4/manifest.json"))
    entry = next(f for f in manifest["files"] if f["path"] == "rng_state_1.pth")
    assert entry["sha256"] == hashlib.sha256(b"attempt 1, node 1").hexdigest()
    assert manifest["nodes"] == 2 and result.files == len(manifest["files"])
    assert latest_step(store) == 4

    restored = CheckpointSync(store).resume(tmp_path / "fresh")
    assert (restored / "rng_state_1.pth").read_bytes() == b"attempt 1, node 1"


def test_an_interrupted_run_keeps_its_own_error_over_a_failed_upload(s3_endpoint, save_checkpoint):
    """Ctrl-C reaches the uploader's process group too: its failure is logged, and the
    KeyboardInterrupt (exit 130) or the training error stays the one that surfaces."""
    from trainyard.workloads.train import Observers

    def observers_with_a_failed_upload() -> Observers:
        observers = Observers()
        observers.sync = CheckpointSync(
            S3Store("bucket-that-does-not-exist", "x", endpoint=s3_endpoint)
        )
        observers.sync.submit(save_checkpoint(3), 3)
        return observers

    with pytest.raises(KeyboardInterrupt):
        try:
            raise KeyboardInterrupt
        finally:
            observers_with_a_failed_upload().close(interrupted=True)
    # A run that trained to the end must not look successful with an upload missing.
    with pytest.raises(CheckpointUploadError, match="NoSuchBucket"):
        observers_with_a_failed_upload().close()


def entries(*paths: str) -> list[dict]:
    return [{"path": path, "size": 1, "sha256": ""} for path in paths]


ZERO2_WORLD4 = (
    "config.json",
    "trainer_state.json",
    "global_step8/mp_rank_00_model_states.pt",
    *(f"global_step8/bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(4)),
    *(f"rng_state_{r}.pth" for r in range(4)),
)


@pytest.mark.parametrize(
    ("saved", "ranks", "world_size", "expected"),
    [
        pytest.param(
            ZERO2_WORLD4,
            range(2, 4),
            4,
            {
                "config.json",
                "trainer_state.json",
                "global_step8/mp_rank_00_model_states.pt",
                "global_step8/bf16_zero_pp_rank_2_mp_rank_00_optim_states.pt",
                "global_step8/bf16_zero_pp_rank_3_mp_rank_00_optim_states.pt",
                "rng_state_2.pth",
                "rng_state_3.pth",
            },
            id="zero2-node-of-two-ranks",
        ),
        pytest.param(
            (
                "model.safetensors",
                "global_step4/zero_pp_rank_0_mp_rank_00_model_states.pt",
                "global_step4/zero_pp_rank_1_mp_rank_00_model_states.pt",
                "global_step4/zero_pp_rank_0_mp_rank_00_optim_states.pt",
                "global_step4/zero_pp_rank_1_mp_rank_00_optim_states.pt",
                "rng_state_0.pth",
                "rng_state_1.pth",
            ),
            range(1, 2),
            2,
            {
                "model.safetensors",
                "global_step4/zero_pp_rank_1_mp_rank_00_model_states.pt",
                "global_step4/zero_pp_rank_1_mp_rank_00_optim_states.pt",
                "rng_state_1.pth",
            },
            id="zero3-parameter-shards",
        ),
        pytest.param(ZERO2_WORLD4, range(0, 1), 2, set(ZERO2_WORLD4), id="other-world-size"),
        pytest.param(ZERO2_WORLD4, range(4, 8), 8, set(ZERO2_WORLD4), id="grown-world"),
        pytest.param(ZERO2_WORLD4, None, None, set(ZERO2_WORLD4), id="no-group"),
        pytest.param(
            ("model.safetensors", "rng_state.pth", "trainer_state.json"),
            range(0, 1),
            1,
            {"model.safetensors", "rng_state.pth", "trainer_state.json"},
            id="single-process-save",
        ),
        pytest.param(
            (
                "global_step2/zero_pp_rank_0_mp_rank_00_optim_states.pt",
                "global_step2/zero_pp_rank_0_mp_rank_01_optim_states.pt",
                "rng_state_0.pth",
                "rng_state_1.pth",
            ),
            range(1, 2),
            2,
            {
                "global_step2/zero_pp_rank_0_mp_rank_00_optim_states.pt",
                "global_step2/zero_pp_rank_0_mp_rank_01_optim_states.pt",
                "rng_state_0.pth",
                "rng_state_1.pth",
            },
            id="model-parallel-shards",
        ),
    ],
)
def test_a_node_downloads_the_shared_files_and_its_own_ranks_files(
    saved, ranks, world_size, expected
):
    from trainyard.workloads.checkpoint_store import files_for_ranks

    chosen = files_for_ranks(entries(*saved), ranks, world_size)
    assert {entry["path"] for entry in chosen} == expected


class ThreadWorld:
    """Ranks as threads of this process: gather and share as torch.distributed's
    all_gather_object and broadcast_object_list do, over one barrier."""

    def __init__(self, size: int) -> None:
        import threading

        self.barrier = threading.Barrier(size, timeout=60)
        self.slots: list = [None] * size

    def group(self, rank: int, ranks: range):
        from trainyard.workloads.checkpoint import ResumeGroup

        def gather(value):
            self.slots[rank] = value
            self.barrier.wait()
            values = list(self.slots)
            self.barrier.wait()
            return values

        return ResumeGroup(
            rank=rank,
            ranks=ranks,
            world_size=len(self.slots),
            share=lambda value: gather(value)[0],
            gather=gather,
        )


def resume_in_threads(world: ThreadWorld, layout: dict[int, tuple], stores: dict) -> dict:
    """Run CheckpointSync.resume on every rank of `layout` (rank -> (ranks of its node,
    its node's directory)) at once; rank -> (the path returned, its sync) or the error."""
    import concurrent.futures

    def resume(rank: int):
        ranks, directory = layout[rank]
        sync = CheckpointSync(stores.get(rank, stores[0]))
        return sync.resume(directory, world.group(rank, ranks)), sync

    with concurrent.futures.ThreadPoolExecutor(len(layout)) as pool:
        futures = {rank: pool.submit(resume, rank) for rank in layout}
    return {rank: future.exception() or future.result() for rank, future in futures.items()}


def store_ranked_step(store, tmp_path, step: int, world_size: int) -> None:
    """A ZeRO-2 step saved by `world_size` ranks: shared files, a shard and an RNG state each."""
    from trainyard.workloads.checkpoint_store import upload_checkpoint

    directory = tmp_path / "saved" / f"checkpoint-{step}"
    (directory / f"global_step{step}").mkdir(parents=True)
    (directory / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (directory / "latest").write_text(f"global_step{step}")
    (directory / f"global_step{step}" / "mp_rank_00_model_states.pt").write_bytes(b"m" * 64)
    for rank in range(world_size):
        shard = f"global_step{step}/bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        (directory / shard).write_bytes(os.urandom(1000 + rank))
        (directory / f"rng_state_{rank}.pth").write_bytes(os.urandom(100 + rank))
    upload_checkpoint(store, directory, f"step-{step}", step)


def test_nodes_fall_back_together_when_one_nodes_shard_is_corrupt(tmp_path):
    """Two nodes: A hosts ranks 0 and 1 (rank 0 downloads for both), B hosts rank 2.
    Step 20's rank-2 shard is corrupt: only B downloads it, so only B's verification
    fails, and A must not resume from step 20 alone; all three resume from step 10,
    each node holding the shared files and its own ranks' files only."""
    store = FileStore(tmp_path / "remote")
    for step in (10, 20):
        store_ranked_step(store, tmp_path, step, world_size=3)
    shard = "step-20/global_step20/bf16_zero_pp_rank_2_mp_rank_00_optim_states.pt"
    bad = tmp_path / "bad"
    bad.write_bytes(os.urandom(store.list_objects("step-20")[shard]))
    store.upload_files({shard: bad})

    node_a, node_b = tmp_path / "node-a", tmp_path / "node-b"
    layout = {0: (range(0, 2), node_a), 1: (range(0, 2), node_a), 2: (range(2, 3), node_b)}
    results = resume_in_threads(ThreadWorld(3), layout, {0: store})

    for rank, (resumed, _) in results.items():
        assert resumed == layout[rank][1] / "checkpoint-10", rank
    a, b = results[0][1], results[2][1]
    assert [(x.step, x.ok) for x in a.resume_attempts] == [(20, False), (10, True)]
    assert [(x.step, x.ok) for x in b.resume_attempts] == [(20, False), (10, True)]
    assert "node of rank 2" in a.resume_attempts[0].reason
    assert "sha256 does not match" in a.resume_attempts[0].reason
    assert not (node_a / "checkpoint-20").exists() and not (node_b / "checkpoint-20").exists()

    def files(directory):
        return {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()}

    shared = {"trainer_state.json", "latest", "global_step10/mp_rank_00_model_states.pt"}
    own = {
        r: {f"global_step10/bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt", f"rng_state_{r}.pth"}
        for r in range(3)
    }
    assert files(node_a / "checkpoint-10") == shared | own[0] | own[1]
    assert files(node_b / "checkpoint-10") == shared | own[2]
    ok_b = b.resume_attempts[1]
    assert ok_b.selective and ok_b.files == len(shared | own[2])
    assert ok_b.bytes == sum(
        (node_b / "checkpoint-10" / rel).stat().st_size for rel in shared | own[2]
    )
    for path in files(node_b / "checkpoint-10"):
        assert (node_b / "checkpoint-10" / path).read_bytes() == (
            tmp_path / "saved" / "checkpoint-10" / path
        ).read_bytes()


def test_a_node_that_cannot_read_the_store_stops_every_rank(s3_endpoint, tmp_path):
    from trainyard.workloads.checkpoint import CheckpointResumeError

    store = FileStore(tmp_path / "remote")
    store_ranked_step(store, tmp_path, 10, world_size=2)
    unreadable = S3Store("bucket-that-does-not-exist", "x", endpoint=s3_endpoint)
    layout = {0: (range(0, 1), tmp_path / "node-0"), 1: (range(1, 2), tmp_path / "node-1")}

    results = resume_in_threads(ThreadWorld(2), layout, {0: store, 1: unreadable})

    for rank in (0, 1):
        assert isinstance(results[rank], CheckpointResumeError), results[rank]
        assert "node of rank 1" in str(results[rank]) and "NoSuchBucket" in str(results[rank])
