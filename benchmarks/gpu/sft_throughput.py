"""SFT throughput of a Qwen2.5-0.5B-shaped model on one GPU: tokens/s and MFU.

Full fine-tuning in bf16 through the workload's SFT path (`trainyard.workloads.train`):
text rows longer than max_length, so every sequence is exactly --seq-len tokens and a
step trains batch × seq-len tokens (checked against TRL's `num_tokens` log).
MFU = tokens/s × model FLOPs per token / the GPU's dense bf16 peak.

    python benchmarks/gpu/sft_throughput.py                       # one H100
    python benchmarks/gpu/sft_throughput.py --attn flash_attention_2 --batch 16
    python benchmarks/gpu/sft_throughput.py --tiny                # CPU, seconds
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from qwen_shape import (  # noqa: E402
    build_model_dir,
    matmul_params,
    padded_tokenizer,
    peak_flops,
    shape,
    training_flops_per_token,
    write_text_rows,
)
from workload_timing import (  # noqa: E402
    peak_memory_gib,
    print_table,
    single_process_distributed_env,
    train_run,
    training_run,
)


def sft_document(
    model_dir: Path, data: Path, args: argparse.Namespace, cuda: bool, deepspeed: dict | None = None
) -> dict:
    model = {"source": f"file://{model_dir}", "dtype": "bfloat16" if cuda else "float32"}
    if args.attn:
        model["attnImplementation"] = args.attn
    spec = {
        "method": "sft",
        "model": model,
        "dataset": {"source": f"file://{data}", "format": "text"},
        "training": {
            "maxSteps": args.steps,
            "perDeviceBatchSize": args.batch,
            "maxLength": args.seq_len,
            "learningRate": 1.0e-5,
            "lrSchedulerType": "constant",
            "precision": "bf16" if cuda else "fp32",
            "gradientCheckpointing": args.gradient_checkpointing,
            "loggingSteps": 1,
        },
        "sft": {"packing": False},
    }
    if deepspeed is not None:
        spec["distributed"] = {"deepspeed": deepspeed}
    return training_run("bench-sft", spec)


def run(
    args: argparse.Namespace, deepspeed: dict | None = None, title: str = "SFT throughput"
) -> dict:
    """Train and measure; with `deepspeed` (a `distributed.deepspeed` block) under DeepSpeed."""
    import torch

    cuda = torch.cuda.is_available()
    config = shape(args.tiny)
    with tempfile.TemporaryDirectory(prefix="trainyard-bench-sft-") as tmp:
        work = Path(args.workdir or tmp)
        model_dir = build_model_dir(
            work / ("model-tiny" if args.tiny else "model-qwen2.5-0.5b"),
            config,
            dtype="bfloat16" if cuda else "float32",
        )
        rows = args.steps * args.batch
        data = write_text_rows(
            work / f"text-{rows}x{args.seq_len}.jsonl", rows, args.seq_len + 1,
            padded_tokenizer(config["vocab_size"]),
        )  # fmt: skip
        if deepspeed is not None:
            single_process_distributed_env()  # DeepSpeed initialises torch.distributed
        document = sft_document(model_dir, data, args, cuda, deepspeed)
        trainer, times = train_run(document, work / "out")

    tokens_per_step = args.batch * args.seq_len
    logged = [e["num_tokens"] for e in times.logs if "num_tokens" in e]
    step_seconds = times.median(args.warmup)
    tokens_per_second = tokens_per_step / step_seconds
    flops_per_token = training_flops_per_token(config, args.seq_len)
    peak, device = peak_flops(args.peak_tflops)
    achieved = tokens_per_second * flops_per_token
    result = {
        "device": device,
        "model": "tiny" if args.tiny else "Qwen2.5-0.5B shape",
        "deepspeed": deepspeed,
        "deepspeedEngine": bool(getattr(trainer, "is_deepspeed_enabled", False)),
        "parameters": sum(p.numel() for p in trainer.model.parameters()),
        "matmulParameters": matmul_params(config),
        "batch": args.batch,
        "seqLen": args.seq_len,
        "steps": trainer.state.global_step,
        "warmupSteps": args.warmup,
        "tokensPerStep": tokens_per_step,
        "tokensLogged": logged[-1] if logged else None,
        "stepSecondsMedian": step_seconds,
        "tokensPerSecond": tokens_per_second,
        "modelTflopsPerSecond": achieved / 1e12,
        "mfu": achieved / peak if peak else None,
        "peakTflops": peak / 1e12 if peak else None,
        "peakMemoryGiB": peak_memory_gib(),
    }
    if logged and logged[-1] != tokens_per_step * trainer.state.global_step:
        # Sequences shorter than seq-len would inflate tokens/s; say so rather than report it.
        raise SystemExit(
            f"TRL counted {logged[-1]} tokens, expected {tokens_per_step * trainer.state.global_step}"
        )
    print_table(
        f"{title} ({result['model']}, {device})",
        [
            ("parameters", f"{result['parameters'] / 1e6:.1f} M"),
            ("batch × seq", f"{args.batch} × {args.seq_len}"),
            ("step time (median)", f"{step_seconds * 1000:.1f} ms"),
            ("tokens/s", f"{tokens_per_second:,.0f}"),
            ("model TFLOP/s", f"{result['modelTflopsPerSecond']:.1f}"),
            ("MFU", f"{result['mfu']:.1%}" if result["mfu"] is not None else "— (no known peak)"),
            ("peak memory", f"{result['peakMemoryGiB']:.1f} GiB" if cuda else "—"),
        ],
    )
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model on any device (CI)")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--warmup", type=int, help="steps left out of the timing")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--attn", choices=("eager", "sdpa", "flash_attention_2"))
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--peak-tflops", type=float, help="override the GPU's dense bf16 peak")
    parser.add_argument("--workdir", help="keep the model and data here (reused across runs)")
    parser.add_argument("--json", metavar="FILE", help="also write the result here")
    args = parser.parse_args(argv)
    defaults = {"steps": 4, "warmup": 1, "batch": 2, "seq_len": 64} if args.tiny else {
        "steps": 30, "warmup": 5, "batch": 8, "seq_len": 2048,
    }  # fmt: skip
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
