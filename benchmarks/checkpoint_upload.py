"""Checkpoint upload: our uploader vs `aws s3 cp --recursive`, and the training stall per save.

Both uploads go to the same local moto S3 server (a separate process on 127.0.0.1).
Ours is timed the way training uses it (CheckpointSync.submit + wait: hard-link
snapshot, a child upload process, sha256 of every file, size check, manifest last,
`latest`); the CLI only copies. The machine's load average is printed with the
numbers: on a shared 2-core box the S3 server, the uploader and the save compete. The stall compares a local `save_pretrained` with the same save
followed by `CheckpointSyncCallback.on_save` (which returns once the upload is queued).

    python benchmarks/checkpoint_upload.py [--mb 300] [--repeats 5] [--saves 8]

Goals (issue 3): throughput >= 1.0x the CLI's; stall <= 1.1x saving locally only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

MiB = 1024 * 1024
ENV = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
            return process, endpoint
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("moto server did not start")


def write_checkpoint(directory: Path, total_mb: int) -> int:
    """Three safetensors-sized shards of random bytes plus the small json files."""
    directory.mkdir(parents=True)
    shard = total_mb * MiB // 3
    for i in range(1, 4):
        with open(directory / f"model-0000{i}-of-00003.safetensors", "wb") as handle:
            for _ in range(shard // (16 * MiB)):
                handle.write(os.urandom(16 * MiB))
            handle.write(os.urandom(shard % (16 * MiB)))
    for name, body in {
        "config.json": {"model_type": "qwen2", "hidden_size": 1024},
        "generation_config.json": {"do_sample": True},
        "trainer_state.json": {"global_step": 100, "log_history": [{"loss": 1.0}] * 100},
        "model.safetensors.index.json": {"weight_map": {f"w{i}": "shard" for i in range(300)}},
    }.items():
        (directory / name).write_text(json.dumps(body))
    return sum(p.stat().st_size for p in directory.iterdir())


def time_ours(store, directory: Path, step: int) -> float:
    """The path training takes: snapshot, child upload process, manifest, latest."""
    from trainyard.workloads.checkpoint import CheckpointSync

    sync = CheckpointSync(store)
    started = time.perf_counter()
    sync.submit(directory, step)
    sync.wait()
    return time.perf_counter() - started


def time_cli(endpoint: str, bucket: str, directory: Path, prefix: str) -> float:
    started = time.perf_counter()
    subprocess.run(
        [
            sys.executable, "-m", "awscli", "s3", "cp", "--recursive", "--only-show-errors",
            "--endpoint-url", endpoint, str(directory), f"s3://{bucket}/{prefix}/",
        ],
        check=True,
        env={**os.environ, **ENV},
    )  # fmt: skip
    return time.perf_counter() - started


def time_cli_startup(endpoint: str) -> float:
    # What the CLI pays before its first byte: interpreter + botocore load + a request.
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "awscli", "s3", "ls", "--endpoint-url", endpoint],
        check=True,
        env={**os.environ, **ENV},
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - started


def bench_throughput(endpoint: str, work: Path, total_mb: int, repeats: int) -> dict:
    import boto3

    from trainyard.workloads.storage import S3Store

    bucket = "bench-upload"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    directory = work / "checkpoint-100"
    size = write_checkpoint(directory, total_mb)
    store = S3Store(bucket, "ours", endpoint=endpoint)
    ours, cli = [], []
    for i in range(repeats):  # alternate so both see the same server state
        ours.append(time_ours(store, directory, i))
        cli.append(time_cli(endpoint, bucket, directory, f"cli/step-{i}"))
        # moto keeps objects in memory; drop them between rounds
        store.delete(store.list_objects().keys())
        boto3.resource("s3", endpoint_url=endpoint).Bucket(bucket).objects.all().delete()
    startup = time_cli_startup(endpoint)
    shutil.rmtree(directory)
    return {"bytes": size, "ours": ours, "cli": cli, "cli_startup": startup}


def bench_stall(endpoint: str, work: Path, saves: int) -> dict:
    import boto3
    import torch
    import transformers
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from trainyard.workloads.checkpoint import CheckpointSync, CheckpointSyncCallback
    from trainyard.workloads.storage import S3Store

    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(
            vocab_size=32000, hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
            num_key_value_heads=8, intermediate_size=2048,
        )
    )  # fmt: skip
    bucket = "bench-stall"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)

    def save(output_dir: Path, step: int) -> Path:
        directory = output_dir / f"checkpoint-{step}"
        model.save_pretrained(directory)
        TrainerState(global_step=step).save_to_json(str(directory / "trainer_state.json"))
        return directory

    save(work / "warmup", 0)  # the first save pays one-off allocation costs
    local: list[float] = []

    def local_save(step: int) -> None:
        started = time.perf_counter()
        save(work / "local", step)
        local.append(time.perf_counter() - started)
        shutil.rmtree(work / "local" / f"checkpoint-{step}")  # as save_total_limit would

    def synced_saves(output_dir: Path, drain_between: bool) -> dict:
        sync = CheckpointSync(S3Store(bucket, output_dir.name, endpoint=endpoint), keep_last=2)
        callback = CheckpointSyncCallback(sync)
        args = TrainingArguments(output_dir=str(output_dir), report_to=[])
        stalls, on_save = [], []
        for step in range(1, saves + 1):
            if drain_between:
                # Local-only saves interleaved with synced ones see the same machine.
                local_save(step)
            started = time.perf_counter()
            save(output_dir, step)
            saved = time.perf_counter()
            callback.on_save(args, TrainerState(global_step=step), TrainerControl())
            done = time.perf_counter()
            stalls.append(done - started)
            on_save.append(done - saved)
            shutil.rmtree(output_dir / f"checkpoint-{step}")  # rotation; the upload has a snapshot
            if drain_between:
                sync.wait()
        drain_started = time.perf_counter()
        callback.on_train_end(args, TrainerState(global_step=saves), TrainerControl())
        return {
            "stalls": stalls,
            "on_save": on_save,
            "drain": time.perf_counter() - drain_started,
            "uploads": [r.seconds for r in sync.results],
        }

    # Spaced: the previous upload finished before the next save (saves further apart
    # than an upload takes, the usual case). Back-to-back: each save runs while the
    # previous upload still does, with the S3 server on the same 2 cores.
    spaced = synced_saves(work / "spaced", drain_between=True)
    busy = synced_saves(work / "busy", drain_between=False)
    size = sum(p.stat().st_size for p in (work / "warmup" / "checkpoint-0").iterdir())
    return {"bytes": size, "local": local, "spaced": spaced, "busy": busy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=300, help="checkpoint size for throughput")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--saves", type=int, default=8)
    options = parser.parse_args()
    if subprocess.run(
        [sys.executable, "-m", "awscli", "--version"], capture_output=True
    ).returncode:
        sys.exit("the comparison needs the AWS CLI in this python: pip install awscli")
    os.environ.update(ENV)
    load_before = os.getloadavg()[0]
    process, endpoint = start_moto()
    work = Path(tempfile.mkdtemp(prefix="ckpt-bench-"))
    try:
        upload = bench_throughput(endpoint, work, options.mb, options.repeats)
        stall = bench_stall(endpoint, work, options.saves)
    finally:
        process.terminate()
        process.wait()
        shutil.rmtree(work, ignore_errors=True)

    med = statistics.median
    print(
        f"\n{os.cpu_count()} CPUs; load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
    )
    mb = upload["bytes"] / MiB
    ours_rate, cli_rate = mb / med(upload["ours"]), mb / med(upload["cli"])
    print(
        f"\nCheckpoint upload to moto S3 on 127.0.0.1: {mb:.0f} MiB, 7 files, median of {options.repeats}"
    )
    print(f"  {'':34}{'ours':>12}{'aws s3 cp':>12}{'ratio':>10}")
    print(
        f"  {'seconds':34}{med(upload['ours']):>12.2f}{med(upload['cli']):>12.2f}"
        f"{med(upload['cli']) / med(upload['ours']):>9.2f}x"
    )
    print(
        f"  {'throughput MiB/s':34}{ours_rate:>12.1f}{cli_rate:>12.1f}{ours_rate / cli_rate:>9.2f}x"
    )
    print(
        f"  ours: snapshot, upload process, sha256, manifest, latest; "
        f"aws CLI start-up alone: {upload['cli_startup']:.2f}s"
    )
    print(
        f"  runs (s): ours {[round(x, 2) for x in upload['ours']]}, cli {[round(x, 2) for x in upload['cli']]}"
    )
    # Each round runs both back to back, so a round's ratio sees one machine state.
    paired = [c / o for o, c in zip(upload["ours"], upload["cli"], strict=True)]
    print(
        f"  per round cli/ours: {[round(x, 2) for x in paired]}; geometric mean "
        f"{statistics.geometric_mean(paired):.2f}x; ours faster in "
        f"{sum(x > 1 for x in paired)}/{len(paired)} rounds"
    )

    smb = stall["bytes"] / MiB
    local = med(stall["local"])
    print(f"\nTraining stall per save: save_pretrained of {smb:.0f} MiB, median of {options.saves}")
    print(f"  {'':34}{'seconds':>12}{'vs local':>10}{'on_save ms':>12}")
    print(f"  {'local save only':34}{local:>12.3f}{1:>9.2f}x{'-':>12}")
    for label, key in [
        ("+ sync, upload done before save", "spaced"),
        ("+ sync, previous upload running", "busy"),
    ]:
        run = stall[key]
        print(
            f"  {label:34}{med(run['stalls']):>12.3f}{med(run['stalls']) / local:>9.2f}x"
            f"{med(run['on_save']) * 1000:>12.1f}"
        )
    print(f"  runs (s): local {[round(x, 3) for x in stall['local']]}")
    for key in ("spaced", "busy"):
        run = stall[key]
        print(
            f"            {key} {[round(x, 3) for x in run['stalls']]}; uploads "
            f"{[round(x, 2) for x in run['uploads']]}; drain at train end {run['drain']:.2f}s"
        )


if __name__ == "__main__":
    main()
