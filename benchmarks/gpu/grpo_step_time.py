"""GRPO step time of a Qwen2.5-0.5B-shaped model on one GPU, by rollout backend.

Each backend runs through the workload's GRPO path (`trainyard.workloads.train`: the
spec's rewards, TRL `GRPOTrainer`) in a process of its own:

- transformers: completions from `model.generate()` in the training process;
- vllm-colocate: vLLM inside the training process (`rollout.vllm.mode: colocate`);
- vllm-server: `trl vllm-serve` in a separate process, weights synced over NCCL
  (`rollout.vllm.mode: server`). NCCL cannot put two ranks on one device, so the
  server needs a GPU of its own (TRL issue #3487): it runs on the last GPU and is
  skipped, with the reason, on a one-GPU machine.

A random model rarely samples EOS, so every completion runs to --completion-len and
steps are comparable across backends. The median step time leaves out --warmup steps.

    python benchmarks/gpu/grpo_step_time.py                   # every backend available
    python benchmarks/gpu/grpo_step_time.py --rollout transformers
    python benchmarks/gpu/grpo_step_time.py --tiny            # CPU, transformers only
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from qwen_shape import build_model_dir, shape, write_prompt_rows  # noqa: E402
from workload_timing import (  # noqa: E402
    peak_memory_gib,
    print_table,
    single_process_distributed_env,
    train_run,
    training_run,
)

ROLLOUTS = ("transformers", "vllm-colocate", "vllm-server")


def grpo_document(model_dir: Path, data: Path, args: argparse.Namespace, cuda: bool) -> dict:
    spec = {
        "method": "grpo",
        "model": {"source": f"file://{model_dir}", "dtype": "bfloat16" if cuda else "float32"},
        "dataset": {"source": f"file://{data}", "format": "prompt"},
        "training": {
            "maxSteps": args.steps,
            "perDeviceBatchSize": args.batch,
            "learningRate": 1.0e-6,
            "lrSchedulerType": "constant",
            "precision": "bf16" if cuda else "fp32",
            "loggingSteps": 1,
        },
        "grpo": {
            "numGenerations": args.generations,
            "maxCompletionLength": args.completion_len,
            "beta": 0.0,
            "logCompletionsEvery": 0,
            "rewards": [
                {"name": "length", "builtin": "length", "args": {"max": 200, "unit": "chars"}}
            ],
        },
    }
    if args.rollout != "transformers":
        vllm = {
            "mode": args.rollout.removeprefix("vllm-"),
            "maxModelLen": 128 + args.completion_len,
        }
        if args.rollout == "vllm-colocate":
            vllm["gpuMemoryUtilization"] = args.vllm_memory
        spec["rollout"] = {"vllm": vllm}
    return training_run(f"bench-grpo-{args.rollout}", spec)


def skip_reason(rollout: str) -> str | None:
    """Why a backend cannot run here, or None."""
    import torch

    if rollout == "transformers":
        return None
    if not torch.cuda.is_available():
        return "vLLM rollouts need CUDA"
    try:
        import vllm  # noqa: F401
    except ImportError:
        return "vllm is not installed (pip install 'trainyard[vllm]')"
    if rollout == "vllm-server" and torch.cuda.device_count() < 2:
        return "server mode needs a second GPU: NCCL weight sync cannot share a device (TRL #3487)"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def rollout_server(model_dir: Path, args: argparse.Namespace, log: Path):
    """`trl vllm-serve` on the last GPU; sets TRAINYARD_VLLM_URL for the workload."""
    import torch

    port = free_port()
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(torch.cuda.device_count() - 1))
    command = [
        sys.executable, "-m", "trl.scripts.vllm_serve", "--model", str(model_dir),
        "--port", str(port), "--gpu_memory_utilization", str(args.server_memory),
        "--max_model_len", str(128 + args.completion_len),
    ]  # fmt: skip
    with open(log, "w") as out:
        server = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 600
        while True:
            if server.poll() is not None:
                raise SystemExit(f"vllm-serve exited {server.returncode}; see {log}")
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit(
                        f"vllm-serve did not answer at {url} in 600 s; see {log}"
                    ) from None
                time.sleep(2)
        os.environ["TRAINYARD_VLLM_URL"] = url
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()


def run_one(args: argparse.Namespace) -> dict:
    """One backend in this process."""
    import torch

    cuda = torch.cuda.is_available()
    config = shape(args.tiny)
    with tempfile.TemporaryDirectory(prefix="trainyard-bench-grpo-") as tmp:
        work = Path(args.workdir or tmp)
        model_dir = build_model_dir(
            work / ("model-tiny" if args.tiny else "model-qwen2.5-0.5b"),
            config,
            dtype="bfloat16" if cuda else "float32",
        )
        prompts_needed = args.steps * args.batch // args.generations
        data = write_prompt_rows(work / "prompts.jsonl", max(prompts_needed, 8))
        document = grpo_document(model_dir, data, args, cuda)
        if args.rollout == "vllm-colocate":
            single_process_distributed_env()  # colocated vLLM joins torch.distributed
        if args.rollout == "vllm-server":
            with rollout_server(model_dir, args, work / "vllm-serve.log"):
                trainer, times = train_run(document, work / "out")
        else:
            trainer, times = train_run(document, work / "out")
    step = times.median(args.warmup)
    completions = args.batch  # completions generated per optimizer step (one generation batch)
    return {
        "rollout": args.rollout,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "model": "tiny" if args.tiny else "Qwen2.5-0.5B shape",
        "steps": trainer.state.global_step,
        "warmupSteps": args.warmup,
        "completionsPerStep": completions,
        "completionLength": args.completion_len,
        "stepSecondsMedian": step,
        "stepSecondsMean": times.mean(args.warmup),
        "completionTokensPerSecond": completions * args.completion_len / step,
        "peakMemoryGiB": peak_memory_gib(),
    }


def run_all(args: argparse.Namespace) -> list[dict]:
    """Every backend in a subprocess of its own (vLLM keeps GPU memory until exit)."""
    rollouts = ROLLOUTS if args.rollout == "all" else (args.rollout,)
    results = []
    for rollout in rollouts:
        reason = skip_reason(rollout)
        if reason:
            print(f"{rollout}: skipped ({reason})", flush=True)
            results.append({"rollout": rollout, "skipped": reason})
            continue
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            command = [sys.executable, __file__, "--one", "--rollout", rollout, "--json", out.name]
            command += forwarded_options(args)
            done = subprocess.run(command)
            if done.returncode != 0:
                results.append({"rollout": rollout, "failed": f"exit {done.returncode}"})
                continue
            results.append(json.loads(Path(out.name).read_text()))
    rows = []
    for r in results:
        if "stepSecondsMedian" in r:
            rows.append(
                (r["rollout"], f"{r['stepSecondsMedian']:.3f} s/step, "
                 f"{r['completionTokensPerSecond']:,.0f} completion tok/s")
            )  # fmt: skip
        else:
            rows.append((r["rollout"], r.get("skipped") or r.get("failed")))
    device = next((r["device"] for r in results if "device" in r), "—")
    print_table(
        f"GRPO step time ({'tiny' if args.tiny else 'Qwen2.5-0.5B shape'}, {device}; "
        f"{args.batch} completions × {args.completion_len} tokens per step)",
        rows,
    )
    return results


def forwarded_options(args: argparse.Namespace) -> list[str]:
    options = [
        "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
        "--generations", str(args.generations), "--completion-len", str(args.completion_len),
        "--vllm-memory", str(args.vllm_memory), "--server-memory", str(args.server_memory),
    ]  # fmt: skip
    if args.tiny:
        options.append("--tiny")
    if args.workdir:
        options += ["--workdir", args.workdir]
    return options


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rollout", choices=(*ROLLOUTS, "all"), default="all")
    parser.add_argument("--tiny", action="store_true", help="tiny model on any device (CI)")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--batch", type=int, help="completions per step (generation batch)")
    parser.add_argument("--generations", type=int, help="completions per prompt")
    parser.add_argument("--completion-len", type=int)
    parser.add_argument("--vllm-memory", type=float, default=0.3, help="colocate: vLLM's share")
    parser.add_argument("--server-memory", type=float, default=0.9, help="server: vLLM's share")
    parser.add_argument("--workdir", help="keep the model and data here (reused across runs)")
    parser.add_argument("--json", metavar="FILE", help="also write the result(s) here")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    defaults = {"steps": 3, "warmup": 1, "batch": 4, "generations": 2, "completion_len": 8} if args.tiny else {
        "steps": 10, "warmup": 2, "batch": 16, "generations": 8, "completion_len": 256,
    }  # fmt: skip
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run_one(args) if args.one else run_all(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if isinstance(result, list):
        return 1 if any("failed" in r for r in result) else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
