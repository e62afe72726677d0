"""Async checkpoint saves and coalesced uploads, with real trainings and a real S3 server.

Saves go through transformers' Trainer with checkpoint_snapshot.AsyncSaves installed
(the way train.py installs it, through CheckpointSyncCallback.trainer); uploads go to
moto's S3 server over HTTP, directly or through a throttling TCP proxy that makes the
network slower than the save cadence.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import datasets
import pytest
import torch
import transformers
from safetensors.torch import load_file
from transformers import TrainerCallback, TrainerState

from trainyard.api import TrainingRun
from trainyard.api.contract import Metric
from trainyard.workloads.checkpoint import CheckpointSync, CheckpointSyncCallback
from trainyard.workloads.checkpoint_snapshot import AsyncSaves
from trainyard.workloads.methods.common import detect_environment
from trainyard.workloads.metrics import TrainingMetrics
from trainyard.workloads.storage import FileStore, S3Store
from trainyard.workloads.train import build_context, build_trainer, train

MiB = 1024 * 1024


@pytest.fixture(autouse=True)
def training_env(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("TRAINYARD_CACHE", str(tmp_path_factory.getbasetemp() / "trainyard-cache"))
    monkeypatch.setenv("TRAINYARD_METRICS_PORT", "off")
    monkeypatch.delenv("TRAINYARD_RUNS_URI", raising=False)


def sft_document(*, checkpoint: dict, lora: bool = False, steps: int = 4, **spec) -> dict:
    document = {
        "apiVersion": "trainyard.dev/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": "async-ckpt"},
        "spec": {
            "method": "sft",
            "model": {"source": "builtin://tiny-qwen2"},
            "dataset": {"source": "builtin://datasets/alpaca"},
            "training": {
                "maxSteps": steps,
                "perDeviceBatchSize": 2,
                "learningRate": 5e-3,
                "loggingSteps": 1,
            },
            "checkpoint": {"everySteps": 1, **checkpoint},
            **spec,
        },
    }
    if lora:
        document["spec"]["peft"] = {"r": 4, "alpha": 8, "dropout": 0.0}
    return document


def sft_run(**options) -> TrainingRun:
    return TrainingRun.model_validate(sft_document(**options))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class RecordWeights(TrainerCallback):
    """The trainable weights at each save, taken on the training thread (the truth)."""

    def __init__(self) -> None:
        self.trainer = None
        self.at: dict[int, dict[str, torch.Tensor]] = {}

    def on_save(self, args, state, control, **kwargs):
        model = self.trainer.model
        self.at[state.global_step] = {
            name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad
        }
        return control


def train_with_saves(run: TrainingRun, output: Path, store, *, async_saves: bool):
    """A real TRL trainer with the sync callback attached as train.py attaches it."""
    trainer = build_trainer(build_context(run, output, detect_environment()))
    # Every step uploaded (no coalescing) so that each can be compared.
    callback = CheckpointSyncCallback(
        CheckpointSync(store, coalesce=False), async_saves=async_saves
    )
    recorder = RecordWeights()
    for extra in (callback, recorder):
        trainer.add_callback(extra)
        extra.trainer = trainer
    trainer.train()
    callback.sync.close()
    return trainer, callback, recorder


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_async_checkpoints_equal_synchronous_ones_file_for_file(lora, tmp_path):
    """Same training twice, saved synchronously and asynchronously: the same files in
    transformers' layout, the same bytes (weights, optimizer, scheduler, RNG)."""
    run = sft_run(lora=lora, steps=3, checkpoint={"uri": f"file://{tmp_path}/s1"})
    _, sync_cb, _ = train_with_saves(
        run, tmp_path / "sync", FileStore(tmp_path / "s1"), async_saves=False
    )
    _, async_cb, recorder = train_with_saves(
        run, tmp_path / "async", FileStore(tmp_path / "s2"), async_saves=True
    )
    assert sync_cb.saves is None and async_cb.saves is not None
    assert async_cb.saves.writer == "process"  # the default on Linux: off this process's GIL
    assert async_cb.saves.written == [1, 2, 3] and async_cb.saves.skipped == []
    weights = "adapter_model.safetensors" if lora else "model.safetensors"
    for step in (1, 2, 3):
        # Each step as uploaded (the local checkpoint-1 is rotated away by then).
        plain = tmp_path / "s1" / f"step-{step}"
        fast = tmp_path / "s2" / f"step-{step}"
        assert sorted(p.name for p in fast.iterdir()) == sorted(p.name for p in plain.iterdir())
        for name in (weights, "optimizer.pt", "scheduler.pt", "rng_state.pth"):
            assert sha256(fast / name) == sha256(plain / name), (step, name)
        # The saved weights are those of their own step, though training went on.
        saved = load_file(str(fast / weights))
        truth = recorder.at[step]
        assert len(saved) == len(truth)
        for name, tensor in truth.items():
            key = name.replace(".default.", ".") if lora else name
            assert torch.equal(saved[key], tensor), (step, name)
    assert sorted(p.name for p in (tmp_path / "async").glob("checkpoint-*")) == [
        "checkpoint-2",
        "checkpoint-3",
    ]
    assert not list((tmp_path / "async").glob(".checkpoint-*"))  # no staging left
    manifest = json.loads((tmp_path / "s2" / "step-3" / "manifest.json").read_text())
    assert {f["path"]: f["sha256"] for f in manifest["files"]} == {
        p.name: sha256(p) for p in (tmp_path / "async" / "checkpoint-3").iterdir()
    }


def test_resume_from_an_async_checkpoint_in_s3(tmp_path, s3_endpoint, s3_bucket):
    checkpoint = {"uri": f"s3://{s3_bucket}/runs/lora", "keepLast": 2}
    storage = {"s3": {"endpoint": s3_endpoint}}
    first = train(
        sft_run(lora=True, steps=2, checkpoint=checkpoint, storage=storage), tmp_path / "a"
    )
    second = train(
        sft_run(lora=True, steps=3, checkpoint=checkpoint, storage=storage), tmp_path / "b"
    )
    assert second["resumedFrom"].endswith("checkpoint-2") and second["globalStep"] == 3
    restored = [e["loss"] for e in second["logHistory"] if "loss" in e][:2]
    assert restored == [e["loss"] for e in first["logHistory"] if "loss" in e]


def test_checkpoints_are_on_local_disk_once(tmp_path):
    """The local runner's layout: transformers' checkpoint-N/ and the file:// store's
    step-N/ under one output directory share their files (hard links), not copies."""
    output = tmp_path / "out"
    store = output / "checkpoints"
    train(sft_run(steps=2, checkpoint={"uri": f"file://{store}"}), output)
    for step in (1, 2):
        for path in (output / f"checkpoint-{step}").iterdir():
            stored = store / f"step-{step}" / path.name
            assert os.stat(stored).st_ino == os.stat(path).st_ino, stored
    final = {p.name: p for p in (output / "final").iterdir()}
    for name, path in final.items():
        assert os.stat(store / "final" / name).st_ino == os.stat(path).st_ino


# ------------------------------------------------------------------ slow network


class ThrottlingProxy:
    """A TCP proxy on 127.0.0.1 that passes requests upstream at `rate` bytes/s."""

    def __init__(self, upstream: str, rate: float) -> None:
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.rate = rate
        self.server = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.upstream)
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, throttled: bool) -> None:
        try:
            while data := source.recv(64 * 1024):
                target.sendall(data)
                if throttled:
                    time.sleep(len(data) / self.rate)
        except OSError:
            return
        finally:
            for sock in (source, target):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(
            vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, intermediate_size=32,
        )
    )  # fmt: skip


def test_slow_network_coalesces_uploads_and_still_uploads_the_last(
    s3_endpoint, s3_bucket, tiny_model, tmp_path
):
    proxy = ThrottlingProxy(s3_endpoint, rate=4 * MiB)
    try:
        store = S3Store(s3_bucket, "slow", endpoint=proxy.endpoint)
        metrics = TrainingMetrics(progress_path=tmp_path / "progress.json")
        sync = CheckpointSync(store, keep_last=2, on_upload=metrics.record_checkpoint_upload)
        futures = []
        for step in range(1, 7):
            directory = tmp_path / "out" / f"checkpoint-{step}"
            tiny_model.save_pretrained(directory)
            # ~3 MiB a checkpoint: under a second of saving, about a second of sending.
            (directory / "optimizer.pt").write_bytes(os.urandom(3 * MiB))
            TrainerState(global_step=step).save_to_json(str(directory / "trainer_state.json"))
            futures.append(sync.submit(directory, step))
            # Training never waits: submit returns while an upload is still on its way.
            assert not all(f.done() for f in futures)
        sync.close()
    finally:
        proxy.close()

    uploaded = [r.step for r in sync.results if r.error is None]
    assert sync.skipped, "the network kept up; the proxy did not throttle"
    assert sorted(uploaded + sync.skipped) == [1, 2, 3, 4, 5, 6]
    assert uploaded[-1] == 6 and sync.last_step == 6
    # Every skipped step is reported with the upload that replaced it (metrics hook).
    assert sorted(s for r in sync.results for s in r.coalesced) == sorted(sync.skipped)
    progress = json.loads((tmp_path / "progress.json").read_text())["checkpoint"]
    assert sorted(progress["skippedSteps"]) == sorted(sync.skipped)
    skipped_total = metrics.registry.get_sample_value(f"{Metric.CHECKPOINT_UPLOADS_SKIPPED}_total")
    assert skipped_total == len(sync.skipped)
    assert progress["lastStep"] == 6
    assert [f.result() is None for f in futures] == [s in sync.skipped for s in range(1, 7)]
    assert (
        json.loads(S3Store(s3_bucket, "slow", endpoint=s3_endpoint).get_bytes("latest"))["step"]
        == 6
    )
    # Local disk stays bounded: no staging snapshot outlives its upload or its skip.
    assert not list((tmp_path / "out" / ".trainyard-sync").iterdir())
    resumed = CheckpointSync(S3Store(s3_bucket, "slow", endpoint=s3_endpoint)).resume(
        tmp_path / "fresh"
    )
    assert resumed.name == "checkpoint-6"
    assert sha256(resumed / "optimizer.pt") == sha256(
        tmp_path / "out" / "checkpoint-6" / "optimizer.pt"
    )


def test_a_save_dropped_for_a_newer_one_leaves_no_directory(tmp_path):
    """Writer-level coalescing: a save sealed while an older one still waits for the
    writer replaces it; the older checkpoint-N/ is removed and reported as skipped."""
    run = sft_run(steps=6, checkpoint={"uri": f"file://{tmp_path}/store"})
    trainer = build_trainer(build_context(run, tmp_path / "out", detect_environment()))
    skipped: list[int] = []
    callback = CheckpointSyncCallback(
        CheckpointSync(FileStore(tmp_path / "store"), on_skip=skipped.append)
    )
    trainer.add_callback(callback)
    callback.trainer = trainer
    trainer.train()
    callback.sync.close()
    saves = callback.saves
    # Whether a save is dropped depends on timing; what must hold either way:
    assert sorted(saves.written + saves.skipped) == [1, 2, 3, 4, 5, 6]
    assert saves.written[-1] == 6
    # Skipped at the writer or at the uploader, each step is reported once.
    assert sorted(skipped) == sorted(callback.sync.skipped)
    assert set(saves.skipped) <= set(skipped) and len(set(skipped)) == len(skipped)
    for step in saves.skipped:
        assert not (tmp_path / "out" / f"checkpoint-{step}").exists()
    latest = json.loads((tmp_path / "store" / "latest").read_text())["step"]
    assert latest == 6


def tiny_trainer(output: Path, hidden: int = 16, vocab: int = 64) -> transformers.Trainer:
    """A plain Trainer after one AdamW step (so optimizer state exists); tied embeddings
    unless `vocab` is large."""
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(
            vocab_size=vocab, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, intermediate_size=2 * hidden, tie_word_embeddings=vocab <= 64,
        )
    )  # fmt: skip
    data = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3]] * 2, "labels": [[1, 2, 3]] * 2})
    args = transformers.TrainingArguments(
        output_dir=str(output), max_steps=1, per_device_train_batch_size=2, report_to=[],
        save_strategy="no", use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    return trainer


def test_the_writer_process_and_thread_write_the_same_bytes(tmp_path):
    """The writer process (fork, shared buffers) and the in-process thread (where fork
    or memfd are missing) write the files a synchronous save writes, tied weights too."""
    written = {}
    for writer in ("sync", "thread", "process"):
        trainer = tiny_trainer(tmp_path / writer)
        trainer.state.global_step = 7
        saves = AsyncSaves(trainer, writer=writer) if writer != "sync" else None
        assert saves is None or saves.install()
        trainer._save_checkpoint(trainer.model, None)
        if saves is not None:
            saves.close()
        directory = tmp_path / writer / "checkpoint-7"
        written[writer] = {p.name: sha256(p) for p in directory.iterdir()}
    # training_args.bin and trainer_state.json name the output directory
    same = ["model.safetensors", "optimizer.pt", "config.json", "scheduler.pt"]
    for writer in ("thread", "process"):
        assert written[writer].keys() == written["sync"].keys()
        assert [written[writer][n] for n in same] == [written["sync"][n] for n in same]


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux's")
def test_writes_and_uploads_run_only_on_cpu_time_training_leaves(tmp_path):
    """The writer process, the thread that feeds it and the uploader process run under
    SCHED_IDLE; the training thread keeps its own policy. (With nice 10 they still took
    ~10% of a core training needed: saves every 10 steps trained at 0.92-0.94x the speed
    of no saves on 2 cores, 0.99-1.02x under SCHED_IDLE: benchmarks/training_overhead.py
    --checkpoint-overhead.)"""
    trainer = tiny_trainer(tmp_path / "out")
    sync = CheckpointSync(FileStore(tmp_path / "store"))
    saves = AsyncSaves(trainer, on_written=lambda directory, step: sync.submit(directory, step))
    assert saves.install() and saves.writer == "process"
    trainer.state.global_step = 1
    trainer._save_checkpoint(trainer.model, None)
    saves.wait()
    sync.wait()
    try:
        policies = {
            "writer process": os.sched_getscheduler(saves._writer.pid),
            "writer thread": os.sched_getscheduler(saves._thread.native_id),
            "uploader process": os.sched_getscheduler(sync._uploader.process.pid),
        }
        assert policies == dict.fromkeys(policies, os.SCHED_IDLE)
        assert os.sched_getscheduler(0) == os.SCHED_OTHER  # training: untouched
    finally:
        saves.close()
        sync.close()
    assert json.loads((tmp_path / "store" / "latest").read_text())["step"] == 1


def test_the_next_optimizer_step_waits_for_the_copy_of_the_save(tmp_path):
    """The host copy runs beside the next step's forward and backward; the optimizer's
    step, the first write to the state, waits for it: the checkpoint holds the weights
    and optimizer state of its own step though the step came right after the save."""
    trainer = tiny_trainer(tmp_path / "out", hidden=256, vocab=32000)  # ~130 MB to copy
    saves = AsyncSaves(trainer)
    assert saves.install()
    optimizer = trainer.optimizer.optimizer  # the torch optimizer inside accelerate's
    seen = []
    # Registered after the save's own hook, so it runs after it: was the copy done?
    trainer.state.global_step = 1
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    moments = {i: s["exp_avg"].clone() for i, s in enumerate(optimizer.state.values())}
    trainer._save_checkpoint(trainer.model, None)
    optimizer.register_step_pre_hook(lambda *_: seen.append(saves._copying is None))
    trainer.model.lm_head.weight.grad = torch.ones_like(trainer.model.lm_head.weight)
    for group in optimizer.param_groups:
        group["lr"] = 1e-2  # the schedule of the one-step training ended at 0
    trainer.optimizer.step()  # writes the weights and the moments
    saves.close()
    assert seen == [True]
    saved = load_file(str(tmp_path / "out" / "checkpoint-1" / "model.safetensors"))
    for name, tensor in saved.items():
        assert torch.equal(tensor, before[name]), name
    assert not torch.equal(trainer.model.lm_head.weight, before["lm_head.weight"])
    state = torch.load(tmp_path / "out" / "checkpoint-1" / "optimizer.pt")["state"]
    for i, moment in moments.items():
        assert torch.equal(state[i]["exp_avg"], moment), i


def test_a_dead_writer_process_is_replaced_by_the_thread_writer(tmp_path, caplog):
    """Killed (say, by the OOM killer), the writer process costs no checkpoint: this
    save and the later ones are written in the training process, saying why."""
    trainer = tiny_trainer(tmp_path / "out")
    saves = AsyncSaves(trainer, writer="process")
    assert saves.install()
    trainer.state.global_step = 1
    trainer._save_checkpoint(trainer.model, None)
    saves.wait()
    os.kill(saves._writer.pid, signal.SIGKILL)
    for step in (2, 3):
        trainer.state.global_step = step
        trainer._save_checkpoint(trainer.model, None)
        saves.wait()
    saves.close()
    assert saves.writer == "thread" and saves.written == [1, 2, 3]
    assert "writer process died: killed by signal 9" in caplog.text
    reference = tiny_trainer(tmp_path / "sync")
    reference.state.global_step = 3
    reference._save_checkpoint(reference.model, None)
    for name in ("model.safetensors", "optimizer.pt"):
        assert sha256(tmp_path / "out" / "checkpoint-3" / name) == sha256(
            tmp_path / "sync" / "checkpoint-3" / name
        )
    assert not list((tmp_path / "out").glob(".checkpoint-*"))


# ------------------------------------------------------------------ crashes


@pytest.mark.parametrize("saves_before_kill", [1, 3], ids=["first-save", "third-save"])
def test_a_killed_trainer_never_leaves_a_latest_that_does_not_load(
    saves_before_kill, tmp_path, s3_endpoint, s3_bucket
):
    """SIGKILL the training process while it saves (host copy, background write,
    upload or manifest: whichever it is in when the kill lands); whatever `latest`
    names then loads, and a new run resumes from it."""
    import subprocess
    import sys

    checkpoint = {"uri": f"s3://{s3_bucket}/runs/killed"}
    storage = {"s3": {"endpoint": s3_endpoint}}
    run_file = tmp_path / "run.json"
    run_file.write_text(json.dumps(sft_document(steps=200, checkpoint=checkpoint, storage=storage)))
    output = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "-m", "trainyard.workloads.train", str(run_file), "--output", str(output)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and process.poll() is None:
            if (
                len(list(output.glob("checkpoint-*"))) + len(list(output.glob(".checkpoint-*")))
                >= saves_before_kill
            ):
                break
            time.sleep(0.01)
        assert process.poll() is None, "the training ended before it could be killed"
    finally:
        process.kill()
        process.wait()
    # Its writer process (forked from it, same command line) dies with it.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and processes_running(str(run_file)):
        time.sleep(0.1)
    assert not processes_running(str(run_file))

    store = S3Store(s3_bucket, "runs/killed", endpoint=s3_endpoint)
    raw = store.get_bytes("latest")
    if raw is not None:
        step = json.loads(raw)["step"]
        restored = CheckpointSync(store).resume(tmp_path / "check")
        # The newest complete step is at least the one `latest` names, and it loads.
        assert restored is not None and int(restored.name.split("-")[1]) >= step
        transformers.AutoModelForCausalLM.from_pretrained(restored)
        state = TrainerState.load_from_json(str(restored / "trainer_state.json"))
        assert state.global_step == int(restored.name.split("-")[1])
    resumed = train(
        sft_run(
            steps=1 + (json.loads(raw)["step"] if raw else 0),
            checkpoint=checkpoint,
            storage=storage,
        ),
        tmp_path / "again",
    )
    if raw is not None:
        assert resumed["resumedFrom"] is not None


def processes_running(argument: str) -> list[int]:
    """Live (not zombie) processes with `argument` on their command line."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            arguments = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if argument.encode() in arguments and state != "Z":
            found.append(int(entry.name))
    return found
