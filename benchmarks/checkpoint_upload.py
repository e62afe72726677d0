"""Checkpoints: our upload vs `aws s3 cp --recursive`, and the training stall per save.

Everything runs side by side in one process tree, in paired rounds (both contenders
of a round see the same machine state), against one local moto S3 server
(`python -m moto.server`, a separate process on 127.0.0.1):

* upload: a checkpoint directory (safetensors shards + optimizer.pt of a real model
  shape) uploaded by CheckpointSync (submit + wait: hard-link snapshot, the uploader
  process, parallel multipart with sha256 from the same read and each part's CRC32 for
  the server to check, size check, manifest last, `latest`) vs the AWS CLI (`python -m awscli s3 cp --recursive`, PyPI's awscli)
  vs boto3's transfer manager in this process (the uploader before this change), and
  boto3's CRT transfer client where it works against the server; then the download
  for a resume (CheckpointSync.resume, sha256 checked) vs the CLI's download.
* stall: a real transformers Trainer on a Qwen2-shaped model with AdamW state;
  `Trainer._save_checkpoint` as transformers ships it (synchronous) vs the same call
  with checkpoint_snapshot.AsyncSaves installed (returns after the host copy).
* queue stall: async saves back to back, each one while the previous checkpoint is
  still being written and uploaded, vs the synchronous save of the same round.

    python benchmarks/checkpoint_upload.py [--mb 1024] [--hidden 512] [--layers 6] [--rounds 5]

The last line is `upload_vs_awscli=X.XX stall_vs_sync_save=Y.YY queue_stall_vs_sync_save=Z.ZZ`,
each the median over rounds of a paired ratio (CLI seconds / ours; async stall / sync
save; stall while busy / sync save). Goals (issue 13): >= 1.5, <= 0.25, <= 0.3.
On a shared 2-core machine the S3 server, the uploader and training all compete:
the load average is printed with the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a live process has used (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    """CPU seconds of every waited-for child so far (the CLI's runs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


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
    """A checkpoint's files: two safetensors shards (1/3 of the bytes, as fp32 weights
    are next to Adam's two moments) and optimizer.pt (2/3), plus the small json files."""
    directory.mkdir(parents=True)
    sizes = {
        "model-00001-of-00002.safetensors": total_mb * MiB // 6,
        "model-00002-of-00002.safetensors": total_mb * MiB // 6,
        "optimizer.pt": total_mb * MiB * 2 // 3,
    }
    for name, size in sizes.items():
        with open(directory / name, "wb") as handle:
            for _ in range(size // (16 * MiB)):
                handle.write(os.urandom(16 * MiB))
            handle.write(os.urandom(size % (16 * MiB)))
    for name, body in {
        "config.json": {"model_type": "qwen2", "hidden_size": 1024},
        "generation_config.json": {"do_sample": True},
        "trainer_state.json": {"global_step": 100, "log_history": [{"loss": 1.0}] * 100},
        "model.safetensors.index.json": {"weight_map": {f"w{i}": "shard" for i in range(300)}},
        "scheduler.pt": {"last_epoch": 100},
        "rng_state.pth": {"seed": 0},
    }.items():
        (directory / name).write_text(json.dumps(body))
    return sum(p.stat().st_size for p in directory.iterdir())


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


def time_transfer_manager(endpoint: str, bucket: str, directory: Path, prefix: str) -> float:
    """boto3's classic transfer manager in this process: 8 MiB parts, 10 threads."""
    import boto3
    from boto3.s3.transfer import TransferConfig, create_transfer_manager

    client = boto3.client("s3", endpoint_url=endpoint)
    config = TransferConfig(max_concurrency=10, preferred_transfer_client="classic")
    started = time.perf_counter()
    with create_transfer_manager(client, config) as manager:
        futures = [
            manager.upload(str(path), bucket, f"{prefix}/{path.name}")
            for path in directory.iterdir()
        ]
        for future in futures:
            future.result()
    return time.perf_counter() - started


def time_crt(endpoint: str, bucket: str, directory: Path, prefix: str) -> float | str:
    """boto3[crt]'s transfer client (awscrt), where it can talk to the server."""
    try:
        import botocore.session
        from s3transfer.crt import (
            BotocoreCRTRequestSerializer,
            CRTTransferManager,
            create_s3_crt_client,
        )
    except ImportError as error:
        return f"not installed ({error.name})"
    try:
        client = create_s3_crt_client(region="us-east-1")
        serializer = BotocoreCRTRequestSerializer(
            botocore.session.get_session(),
            client_kwargs={"region_name": "us-east-1", "endpoint_url": endpoint},
        )
        started = time.perf_counter()
        with CRTTransferManager(client, serializer) as manager:
            futures = [
                manager.upload(str(path), bucket, f"{prefix}/{path.name}")
                for path in directory.iterdir()
            ]
            for future in futures:
                future.result()
        return time.perf_counter() - started
    except Exception as error:  # reported beside the numbers, not a benchmark failure
        return f"failed: {type(error).__name__}: {str(error)[:80]}"


def bench_upload(endpoint: str, work: Path, total_mb: int, rounds: int, moto_pid: int) -> dict:
    import boto3

    from trainyard.workloads.checkpoint import CheckpointSync
    from trainyard.workloads.storage import S3Store

    bucket = "bench-upload"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    directory = work / "checkpoint-100"
    size = write_checkpoint(directory, total_mb)
    store = S3Store(bucket, "ours", endpoint=endpoint)
    # One sync for the run, as in training: its uploader process starts with the
    # first upload (a warm-up round here) and serves every later one. Training runs it
    # nicer than itself; here it runs at the CLI's priority, so the machine's other
    # load treats both alike.
    sync = CheckpointSync(store, upload_niceness=0)
    sync.submit(directory, 0)
    sync.wait()
    ours, cli, manager, crt = [], [], [], []
    # CPU seconds per upload: the S3 server's and the client's (the uploader process
    # for ours, the CLI process for the CLI)
    cpu = {"moto_ours": [], "moto_cli": [], "client_ours": [], "client_cli": []}

    def clear() -> None:
        # moto keeps objects in memory; drop them between uploads
        boto3.resource("s3", endpoint_url=endpoint).Bucket(bucket).objects.all().delete()

    for i in range(rounds):  # alternate who goes first so neither always gets the cold server
        order = ["ours", "cli"] if i % 2 == 0 else ["cli", "ours"]
        for who in order:
            clear()
            moto_before = cpu_seconds(moto_pid)
            if who == "ours":
                uploader = sync._uploader.process.pid
                client_before = cpu_seconds(uploader)
                started = time.perf_counter()
                sync.submit(directory, i + 1)
                sync.wait()
                ours.append(time.perf_counter() - started)
                cpu["client_ours"].append(cpu_seconds(uploader) - client_before)
            else:
                client_before = children_cpu_seconds()
                cli.append(time_cli(endpoint, bucket, directory, f"cli/step-{i}"))
                cpu["client_cli"].append(children_cpu_seconds() - client_before)
            cpu[f"moto_{who}"].append(cpu_seconds(moto_pid) - moto_before)
        clear()
        manager.append(time_transfer_manager(endpoint, bucket, directory, f"tm/{i}"))
        clear()
        crt.append(time_crt(endpoint, bucket, directory, f"crt/{i}"))
    clear()
    # Downloads on resume: CheckpointSync.resume (newest complete step, every file's
    # sha256 checked) vs `aws s3 cp --recursive` of the same step.
    sync.submit(directory, 1000)
    sync.wait()
    sync.close()
    down_ours, down_cli = [], []
    for i in range(rounds):
        target = work / f"down-{i}"
        order = ["ours", "cli"] if i % 2 == 0 else ["cli", "ours"]
        for who in order:
            started = time.perf_counter()
            if who == "ours":
                CheckpointSync(store).resume(target / "ours")
                down_ours.append(time.perf_counter() - started)
            else:
                subprocess.run(
                    [
                        sys.executable, "-m", "awscli", "s3", "cp", "--recursive",
                        "--only-show-errors", "--endpoint-url", endpoint,
                        f"s3://{bucket}/ours/step-1000/", str(target / "cli"),
                    ],
                    check=True,
                    env={**os.environ, **ENV},
                )  # fmt: skip
                down_cli.append(time.perf_counter() - started)
        shutil.rmtree(target)
    startup = time_cli_startup(endpoint)
    shutil.rmtree(directory)
    return {
        "bytes": size,
        "ours": ours,
        "cli": cli,
        "manager": manager,
        "crt": crt,
        "cli_startup": startup,
        "down_ours": down_ours,
        "down_cli": down_cli,
        "cpu": cpu,
    }


def make_trainer(output_dir: Path, hidden: int, layers: int, vocab: int):
    """A Trainer on a Qwen2-shaped model after one AdamW step (so optimizer state exists)."""
    import datasets
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(
            vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
            num_attention_heads=8, num_key_value_heads=8, intermediate_size=hidden * 4,
        )
    )  # fmt: skip
    data = datasets.Dataset.from_dict(
        {"input_ids": [[1, 2, 3, 4]] * 4, "labels": [[1, 2, 3, 4]] * 4}
    )
    args = transformers.TrainingArguments(
        output_dir=str(output_dir), max_steps=1, per_device_train_batch_size=2,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
        save_total_limit=2,
    )  # fmt: skip
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    return trainer


def bench_stall(endpoint: str, work: Path, hidden: int, layers: int, vocab: int, rounds: int):
    import boto3
    import torch

    from trainyard.workloads.checkpoint import CheckpointSync
    from trainyard.workloads.checkpoint_snapshot import AsyncSaves
    from trainyard.workloads.storage import S3Store

    bucket = "bench-stall"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    plain = make_trainer(work / "sync", hidden, layers, vocab)
    fast = make_trainer(work / "async", hidden, layers, vocab)
    sync = CheckpointSync(S3Store(bucket, "async", endpoint=endpoint), keep_last=2)
    saves = AsyncSaves(fast, on_written=lambda directory, step: sync.submit(directory, step))
    assert saves.install()

    batch = {
        "input_ids": torch.tensor([[1, 2, 3, 4]] * 2),
        "labels": torch.tensor([[1, 2, 3, 4]] * 2),
    }
    next_step_s = {"sync": [], "async": []}

    def save(trainer, step: int) -> float:
        """Seconds training is held up by the save: the save call, and for async saves
        also the time the next optimizer step waits for the host copy that runs beside
        its forward and backward passes (AsyncSaves' step hook). The next step is run
        for both (a real forward, backward and AdamW step) and timed on its own."""
        trainer.state.global_step = step
        # Start each timed save with the earlier saves' dirty pages on disk: otherwise
        # the kernel's writeback of one save lands in the next one's time.
        os.sync()
        started = time.perf_counter()
        trainer._save_checkpoint(trainer.model, None)
        held = time.perf_counter() - started
        started = time.perf_counter()
        trainer.training_step(trainer.model, batch)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()
        took = time.perf_counter() - started
        if trainer is fast:
            blocked = saves.stats[-1].blocked_seconds
            next_step_s["async"].append(took - blocked)
            return held + blocked
        next_step_s["sync"].append(took)
        return held

    save(plain, 1)  # the first save pays one-off costs (allocator, imports)
    save(fast, 1)
    saves.wait()
    sync.wait()
    sync_s, async_s, busy_s, write_s = [], [], [], []
    step = 1
    for i in range(rounds):
        step += 1
        # Idle: nothing of an earlier save is being written or uploaded.
        first = (
            [("sync", plain), ("async", fast)] if i % 2 == 0 else [("async", fast), ("sync", plain)]
        )
        for who, trainer in first:
            (sync_s if who == "sync" else async_s).append(save(trainer, step))
        saves.wait()
        sync.wait()
        write_s.append(saves.stats[-1].write_seconds)
        # Busy: the next save comes while this one is written and uploaded.
        step += 1
        save(fast, step)
        while saves.writing_step != step and step not in saves.written:
            time.sleep(0.001)  # until the writer is on it: the next save meets it busy
        step += 1
        busy_s.append(save(fast, step))
        saves.wait()
        sync.wait()
    size = sum(p.stat().st_size for p in (work / "sync" / f"checkpoint-{step - 2}").iterdir())
    skipped = list(saves.skipped) + list(sync.skipped)
    sync.close()
    saves.close()
    return {
        "bytes": size,
        "sync": sync_s,
        "async": async_s,
        "busy": busy_s,
        "write": write_s,
        "next_step": next_step_s,
        "copy": [s.copy_seconds for s in saves.stats if s.copy_seconds is not None],
        "call": [s.snapshot_seconds for s in saves.stats],
        "skipped": skipped,
        "uploads": [r.seconds for r in sync.results],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=1024, help="checkpoint size for the upload")
    parser.add_argument("--hidden", type=int, default=512, help="model width for the stall")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--rounds", type=int, default=5)
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
        upload = bench_upload(endpoint, work, options.mb, options.rounds, process.pid)
        stall = bench_stall(
            endpoint, work, options.hidden, options.layers, options.vocab, options.rounds
        )
    finally:
        process.terminate()
        process.wait()
        shutil.rmtree(work, ignore_errors=True)

    med = statistics.median

    def show(values) -> str:
        return str([round(v, 2) if isinstance(v, float) else v for v in values])

    print(
        f"\n{os.cpu_count()} CPUs; load average {load_before:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after"
    )
    mb = upload["bytes"] / MiB
    print(f"\nUpload to moto S3 on 127.0.0.1: {mb:.0f} MiB in 9 files, {options.rounds} rounds")
    print(f"  {'':34}{'median s':>10}{'MiB/s':>10}")
    rows = [
        ("ours (CheckpointSync)", upload["ours"]),
        ("aws s3 cp --recursive", upload["cli"]),
        ("boto3 transfer manager, in-proc", upload["manager"]),
    ]
    crt_times = [t for t in upload["crt"] if isinstance(t, float)]
    if crt_times:
        rows.append(("boto3[crt] transfer client", crt_times))
    for label, times in rows:
        print(f"  {label:34}{med(times):>10.2f}{mb / med(times):>10.1f}")
    if not crt_times:
        print(f"  boto3[crt] transfer client: {upload['crt'][0]}")
    startup = upload["cli_startup"]
    print(f"  aws CLI start-up alone (aws s3 ls): {startup:.2f}s")
    warm = [(c - startup) / o for o, c in zip(upload["ours"], upload["cli"], strict=True)]
    print(f"  per round (cli - its start-up)/ours: {show(warm)}; median {med(warm):.2f}")
    cpu = upload["cpu"]
    for who, times in [("ours", upload["ours"]), ("cli", upload["cli"])]:
        busy = [m / t for m, t in zip(cpu[f"moto_{who}"], times, strict=True)]
        print(
            f"  {who}: S3 server CPU {med(cpu[f'moto_{who}']):.2f}s per upload "
            f"({med(busy) * 100:.0f}% of a core while it ran), client CPU "
            f"{med(cpu[f'client_{who}']):.2f}s"
        )
    print(f"  runs (s): ours {show(upload['ours'])}, cli {show(upload['cli'])}")
    upload_ratios = [c / o for o, c in zip(upload["ours"], upload["cli"], strict=True)]
    print(f"  per round cli/ours: {show(upload_ratios)}")
    down_ratios = [c / o for o, c in zip(upload["down_ours"], upload["down_cli"], strict=True)]
    print(
        f"  download for resume: ours (with sha256 check) {med(upload['down_ours']):.2f}s, "
        f"aws s3 cp {med(upload['down_cli']):.2f}s; per round cli/ours {show(down_ratios)}"
    )

    smb = stall["bytes"] / MiB
    print(
        f"\nTraining stall per save: Trainer._save_checkpoint of {smb:.0f} MiB "
        f"(Qwen2 hidden {options.hidden}, {options.layers} layers, weights + AdamW state)"
    )
    print(f"  {'':40}{'median s':>10}{'vs sync':>10}")
    sync_median = med(stall["sync"])
    for label, key in [
        ("synchronous (transformers)", "sync"),
        ("async snapshot, idle", "async"),
        ("async snapshot, previous still busy", "busy"),
    ]:
        print(f"  {label:40}{med(stall[key]):>10.3f}{med(stall[key]) / sync_median:>9.2f}x")
    print(
        "  (async: the save call plus the next optimizer step's wait for the host copy, "
        "which runs beside that step's forward and backward)"
    )
    print(
        f"  save call alone (async): median {med(stall['call']):.3f}s; host copy "
        f"(beside the next step): median {med(stall['copy']):.3f}s"
    )
    print(
        f"  next step without its wait: after a sync save {med(stall['next_step']['sync']):.3f}s, "
        f"after an async save {med(stall['next_step']['async']):.3f}s"
    )
    print(f"  background write per save (s): {show(stall['write'])}")
    print(f"  uploads (s): {show(stall['uploads'])}; coalesced (skipped) steps: {stall['skipped']}")
    stall_ratios = [a / s for a, s in zip(stall["async"], stall["sync"], strict=True)]
    busy_ratios = [b / s for b, s in zip(stall["busy"], stall["sync"], strict=True)]
    print(f"  per round async/sync: {show(stall_ratios)}; busy/sync: {show(busy_ratios)}")
    print(
        f"upload_vs_awscli={med(upload_ratios):.2f} stall_vs_sync_save={med(stall_ratios):.2f} "
        f"queue_stall_vs_sync_save={med(busy_ratios):.2f}"
    )


if __name__ == "__main__":
    main()
