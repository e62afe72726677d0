"""Training overhead: `trainyard run` vs a plain TRL script with identical settings.

The same tiny-model SFT (LoRA, chat data) and GRPO (full fine-tune, prompts, one length
reward) run twice each: through `trainyard run` (runner, workload process, metrics
endpoint, progress file, checkpoint sync to file://) and through a plain TRL script that
builds the same `SFTConfig`/`GRPOConfig` by hand. Same model files (the built-in
`tiny-qwen2`), same rows, same steps, batch, seed, save cadence, same reward function.
Before training, the plain script builds Trainyard's config for the same spec with the
workload's own builders and prints every option that differs (none, or the benchmark
is not fair).

Three numbers per side:
- training loop: steps / `train_runtime` as the Trainer measures it (includes the saves
  inside the loop, excludes start-up and the final export);
- wall clock: the whole command, process start to exit, start-up included;
- CPU seconds of the whole command and its children (robust to other load on the machine).

The two sides run side by side, at the same time, in pairs: whatever else loads the
machine slows both alike, so the ratio within a pair holds where sequential timings on a
shared machine swing by 3×. The headline is the median of the pairs' ratios. Each
process gets `--threads` intra-op threads (default 1), so the pair fits two cores.

    python benchmarks/training_overhead.py                 # 5 pairs per method
    python benchmarks/training_overhead.py --repeats 1 --sft-steps 20 --grpo-steps 4

Goal: trainyard's training loop ≤ 1.03× slower than plain TRL.

`--checkpoint-overhead` measures something else (issue 13): the same `trainyard run`
(full-parameter SFT of a bigger random Qwen2 built from the built-in tokenizer, so a
checkpoint is hundreds of MB with AdamW state) saving every N steps with async saves
(the default) vs never saving. One run after the other, alternating which goes first
(the async side's writer and uploader must not slow a "never" run beside it). Goal: a
run that saves every N steps trains at ≥ 0.97× the speed of one that never saves.

    python benchmarks/training_overhead.py --checkpoint-overhead [--repeats 3] \
        [--ckpt-steps 40] [--ckpt-every 10] [--ckpt-hidden 384] [--ckpt-layers 6]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
MODEL = "tiny-qwen2"

# One table of settings; both sides are built from it.
COMMON = {
    "learningRate": 3.0e-3,
    "perDeviceBatchSize": 8,
    "gradientAccumulationSteps": 1,
    "lrSchedulerType": "cosine",
    "warmupSteps": 2,
    "loggingSteps": 5,
    "precision": "fp32",
    "seed": 42,
}
SAVE_EVERY = 50
GRPO = {"numGenerations": 4, "maxCompletionLength": 16, "temperature": 1.0}
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}


def length_reward(completions: list[Any], **kwargs: Any) -> list[float]:
    """1.0 for completions of 5 to 40 characters, else 0.0: cheap, so it does not hide overhead.

    >>> length_reward(["hello world", "x"])
    [1.0, 0.0]
    """
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [1.0 if 5 <= len(t) <= 40 else 0.0 for t in texts]


def training_run(method: str, steps: int, save_every: int = SAVE_EVERY) -> dict[str, Any]:
    """The TrainingRun both sides train."""
    training = dict(COMMON, maxSteps=steps)
    spec: dict[str, Any] = {
        "method": method,
        "model": {"source": f"builtin://{MODEL}"},
        "training": training,
        "checkpoint": {"uri": "s3://benchmark/overhead", "everySteps": save_every, "keepLast": 2},
    }
    if method == "sft":
        spec["dataset"] = {"source": "builtin://datasets/chat", "format": "chat"}
        spec["peft"] = {"type": "lora", **LORA}
        spec["sft"] = {"assistantOnlyLoss": True}
    else:
        training["perDeviceBatchSize"] = GRPO["numGenerations"]
        spec["dataset"] = {"source": "builtin://datasets/prompts", "format": "prompt"}
        spec["grpo"] = {
            **GRPO,
            "logCompletionsEvery": 0,
            "rewards": [{"name": "length", "python": "training_overhead:length_reward"}],
        }
    return {
        "apiVersion": "trainyard.dev/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": f"overhead-{method}"},
        "spec": spec,
    }


# --------------------------------------------------------------------------- plain TRL


def plain_config(method: str, run: dict[str, Any], output_dir: str):
    """The TRL config a user would write by hand for this run."""
    spec, t = run["spec"], run["spec"]["training"]
    args: dict[str, Any] = dict(
        output_dir=output_dir,
        learning_rate=t["learningRate"],
        num_train_epochs=1,
        max_steps=t["maxSteps"],
        per_device_train_batch_size=t["perDeviceBatchSize"],
        per_device_eval_batch_size=t["perDeviceBatchSize"],
        gradient_accumulation_steps=t["gradientAccumulationSteps"],
        lr_scheduler_type=t["lrSchedulerType"],
        warmup_steps=t["warmupSteps"],
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        gradient_checkpointing=False,
        seed=t["seed"],
        data_seed=t["seed"],
        logging_steps=t["loggingSteps"],
        logging_first_step=True,
        report_to="none",
        save_only_model=False,
        save_strategy="steps",
        save_steps=spec["checkpoint"]["everySteps"],
        save_total_limit=2,
        bf16=False,
        fp16=False,
        use_cpu=True,
    )
    if method == "sft":
        from trl import SFTConfig

        return SFTConfig(**args, packing=False, completion_only_loss=True, assistant_only_loss=True)
    from trl import GRPOConfig

    g = spec["grpo"]
    return GRPOConfig(
        **args,
        num_generations=g["numGenerations"],
        max_completion_length=g["maxCompletionLength"],
        temperature=g["temperature"],
        top_p=1.0,
        epsilon=0.2,
        num_iterations=1,
        mask_truncated_completions=False,
        sync_ref_model=False,
        ref_model_sync_steps=512,
        ref_model_mixup_alpha=0.6,
        remove_unused_columns=False,
        loss_type="dapo",
        scale_rewards="group",
        use_vllm=False,
        reward_weights=[1.0],
    )


def trainyard_config(method: str, run: dict[str, Any], output_dir: str):
    """The config the Trainyard workload builds for the same run (its own builders)."""
    from trainyard.api import parse_resource
    from trainyard.workloads.methods.common import detect_environment, training_arguments

    spec = parse_resource(run).spec
    base = training_arguments(spec, output_dir, detect_environment())
    if method == "sft":
        from trainyard.workloads.methods.sft import build_sft_config

        return build_sft_config(spec, base)
    from trainyard.workloads.methods.grpo import build_grpo_config

    return build_grpo_config(spec, base, [1.0])


def config_differences(ours, theirs) -> list[str]:
    mine, other = ours.to_dict(), theirs.to_dict()
    return [
        f"{key}: plain {mine.get(key)!r} vs trainyard {other.get(key)!r}"
        for key in sorted(set(mine) | set(other))
        if mine.get(key) != other.get(key)
    ]


def train_plain(method: str, run: dict[str, Any], output_dir: str) -> dict[str, Any]:
    """Train with TRL directly; the result the benchmark reads."""
    from datasets import Dataset

    from trainyard.workloads.builtin import build_dataset_rows, model_path

    config = plain_config(method, run, output_dir)
    differences = config_differences(config, trainyard_config(method, run, output_dir))
    model = str(model_path(MODEL))  # the files `builtin://tiny-qwen2` resolves to
    config.model_init_kwargs = {"dtype": "float32"}
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    if method == "sft":
        from peft import LoraConfig
        from trl import SFTTrainer

        trainer = SFTTrainer(
            model=model,
            args=config,
            train_dataset=Dataset.from_list(build_dataset_rows("chat")),
            processing_class=tokenizer,
            peft_config=LoraConfig(
                r=LORA["r"],
                lora_alpha=LORA["alpha"],
                lora_dropout=LORA["dropout"],
                target_modules="all-linear",
                task_type="CAUSAL_LM",
            ),
        )
    else:
        from trl import GRPOTrainer

        trainer = GRPOTrainer(
            model=model,
            reward_funcs=[length_reward],
            args=config,
            train_dataset=Dataset.from_list(build_dataset_rows("prompts")),
            processing_class=tokenizer,
        )
    trainer.train()
    trainer.save_model(str(Path(output_dir) / "final"))
    end = next(e for e in reversed(trainer.state.log_history) if "train_runtime" in e)
    return {
        "steps": trainer.state.global_step,
        "trainRuntimeSeconds": end["train_runtime"],
        "configDifferences": differences,
    }


# --------------------------------------------------------------------------- driver


@dataclass
class Launch:
    """One side's command, started."""

    side: str
    method: str
    steps: int
    out: Path
    process: subprocess.Popen
    started: float


def launch(
    method: str,
    steps: int,
    side: str,
    work: Path,
    env: dict[str, str],
    save_every: int = SAVE_EVERY,
) -> Launch:
    out = work / f"{method}-{side}-{time.monotonic_ns()}"
    out.mkdir(parents=True)
    spec_file = out.with_suffix(".json")
    spec_file.write_text(json.dumps(training_run(method, steps, save_every)))
    if side == "trainyard":
        command = [sys.executable, "-m", "trainyard.cli.main", "run", str(spec_file)]
    else:
        command = [sys.executable, __file__, "--plain", method, "--spec", str(spec_file)]
    with open(out.with_suffix(".log"), "w") as log:
        process = subprocess.Popen(
            [*command, "--output", str(out)], env=env, stdout=log, stderr=subprocess.STDOUT
        )
    return Launch(side, method, steps, out, process, time.monotonic())


def collect(launches: list[Launch]) -> dict[str, dict[str, Any]]:
    """Wait for every launch; each side's result with its wall and CPU seconds.

    `os.wait4` reaps whichever finishes first, so each wall time ends when its own
    process does, and its rusage covers that process and the children it waited for.
    """
    pending = {launch.process.pid: launch for launch in launches}
    results = {}
    while pending:
        pid, status, usage = os.wait4(-1, 0)
        launch = pending.pop(pid, None)
        if launch is None:
            continue
        wall = time.monotonic() - launch.started
        launch.process.returncode = os.waitstatus_to_exitcode(status)
        if launch.process.returncode != 0:
            sys.exit(
                f"{launch.side} {launch.method} exited {launch.process.returncode}; see {launch.out}.log"
            )
        if launch.side == "trainyard":
            summary = json.loads((launch.out / "summary.json").read_text())
            result = {
                "steps": summary["steps"],
                "trainRuntimeSeconds": summary["trainRuntimeSeconds"],
            }
        else:
            result = json.loads((launch.out / "plain.json").read_text())
        if result["steps"] != launch.steps:
            sys.exit(
                f"{launch.side} {launch.method} trained {result['steps']} steps, expected {launch.steps}"
            )
        results[launch.side] = {
            **result, "wallSeconds": wall, "cpuSeconds": usage.ru_utime + usage.ru_stime,
        }  # fmt: skip
    return results


def report(pairs: dict[str, list[dict[str, dict]]]) -> list[dict[str, Any]]:
    from rich.console import Console
    from rich.table import Table

    def median_of(runs: list[dict], side: str, key: str) -> float:
        return statistics.median(run[side][key] for run in runs)

    def median_ratio(runs: list[dict], key: str) -> float:
        return statistics.median(run["trainyard"][key] / run["plain"][key] for run in runs)

    table = Table(
        title="trainyard run vs plain TRL (medians of pairs; ratio = trainyard / plain time)"
    )
    for column in ("method", "steps", "pairs", "loop steps/s\ntrainyard", "loop steps/s\nplain",
                   "loop ratio", "wall s\ntrainyard", "wall s\nplain", "wall ratio",
                   "CPU s\ntrainyard", "CPU s\nplain", "CPU ratio"):  # fmt: skip
        table.add_column(column, justify="right")
    rows = []
    for method, runs in pairs.items():
        steps = runs[0]["plain"]["steps"]
        row = {
            "method": method,
            "steps": steps,
            "pairs": len(runs),
            "loopStepsPerSecond": {
                side: steps / median_of(runs, side, "trainRuntimeSeconds")
                for side in ("trainyard", "plain")
            },
            "loopRatio": median_ratio(runs, "trainRuntimeSeconds"),
            "loopRatios": [
                r["trainyard"]["trainRuntimeSeconds"] / r["plain"]["trainRuntimeSeconds"]
                for r in runs
            ],
            "wallSeconds": {
                side: median_of(runs, side, "wallSeconds") for side in ("trainyard", "plain")
            },
            "wallRatio": median_ratio(runs, "wallSeconds"),
            "cpuSeconds": {
                side: median_of(runs, side, "cpuSeconds") for side in ("trainyard", "plain")
            },
            "cpuRatio": median_ratio(runs, "cpuSeconds"),
            "runs": runs,
        }
        rows.append(row)
        table.add_row(
            method, str(steps), str(len(runs)),
            f"{row['loopStepsPerSecond']['trainyard']:.2f}", f"{row['loopStepsPerSecond']['plain']:.2f}",
            f"{row['loopRatio']:.3f}×",
            f"{row['wallSeconds']['trainyard']:.1f}", f"{row['wallSeconds']['plain']:.1f}",
            f"{row['wallRatio']:.2f}×",
            f"{row['cpuSeconds']['trainyard']:.1f}", f"{row['cpuSeconds']['plain']:.1f}",
            f"{row['cpuRatio']:.2f}×",
        )  # fmt: skip
    console = Console(width=200)
    console.print(table)
    for row in rows:
        verdict = "meets" if row["loopRatio"] <= 1.03 else "misses"
        ratios = ", ".join(f"{r:.3f}" for r in row["loopRatios"])
        console.print(
            f"{row['method']}: training loop {row['loopRatio']:.3f}× ({verdict} ≤ 1.03×); per pair: {ratios}"
        )
    return rows


# --------------------------------------------------------------------------- saves vs none


def build_bigger_model(target: Path, hidden: int, layers: int) -> int:
    """A random Qwen2 with the built-in tokenizer (vocab 1024); returns its parameters."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from trainyard.workloads.builtin import build_tokenizer

    tokenizer = build_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
        num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return sum(p.numel() for p in model.parameters())


def checkpoint_run(model: Path, steps: int, every: int | None, out: Path) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "method": "sft",
        "model": {"source": f"file://{model}"},
        "dataset": {"source": "builtin://datasets/alpaca"},
        "training": {
            "maxSteps": steps, "perDeviceBatchSize": 4, "learningRate": 1e-4,
            "loggingSteps": every or 10, "precision": "fp32", "seed": 42,
        },
    }  # fmt: skip
    if every is not None:
        spec["checkpoint"] = {"uri": f"file://{out}/store", "everySteps": every, "keepLast": 2}
    return {
        "apiVersion": "trainyard.dev/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": "ckpt-overhead"},
        "spec": spec,
    }


def checkpoint_overhead(args: argparse.Namespace, env: dict[str, str]) -> int:
    loads = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="trainyard-ckpt-overhead-") as tmp:
        work = Path(tmp)
        params = build_bigger_model(work / "model", args.ckpt_hidden, args.ckpt_layers)
        results: dict[str, list[dict[str, Any]]] = {"never": [], "async": []}

        def run(side: str, steps: int) -> dict[str, Any]:
            out = work / f"{side}-{time.monotonic_ns()}"
            out.mkdir()
            every = args.ckpt_every if side == "async" else None
            spec_file = out.with_suffix(".json")
            spec_file.write_text(json.dumps(checkpoint_run(work / "model", steps, every, out)))
            started = time.monotonic()
            usage = resource.getrusage(resource.RUSAGE_CHILDREN)
            with open(out.with_suffix(".log"), "w") as log:
                done = subprocess.run(
                    [sys.executable, "-m", "trainyard.cli.main", "run", str(spec_file),
                     "--output", str(out)],
                    env=env, stdout=log, stderr=subprocess.STDOUT,
                )  # fmt: skip
            if done.returncode != 0:
                sys.exit(f"{side} run exited {done.returncode}; see {out}.log")
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime
            summary = json.loads((out / "summary.json").read_text())
            saved = sorted(p.name for p in (out / "store").glob("step-*")) if every else []
            paid = [
                line.split("async checkpoint saves: ", 1)[1]
                for line in (out / "train.log").read_text().splitlines()
                if "async checkpoint saves: " in line
            ]
            return {
                "paid": paid,
                "loop": summary["trainRuntimeSeconds"],
                "wall": time.monotonic() - started,
                "cpu": cpu,
                "steps": summary["steps"],
                "uploaded": saved,
                "size": sum(f.stat().st_size for f in (out / "final").iterdir()),
            }

        run("never", 2)  # warm-up: imports and data into the page cache
        for repeat in range(args.repeats):
            order = ("never", "async") if repeat % 2 == 0 else ("async", "never")
            for side in order:
                r = run(side, args.ckpt_steps)
                results[side].append(r)
                loads.append(os.getloadavg()[0])
                print(
                    f"#{repeat + 1} {side:6}: loop {r['loop']:7.2f} s, wall {r['wall']:6.1f} s, "
                    f"CPU {r['cpu']:6.1f} s, load {loads[-1]:.1f}"
                    + (f", uploaded {r['uploaded']}" if r["uploaded"] else ""),
                    flush=True,
                )
                for line in r["paid"]:
                    print(f"    {line}", flush=True)
    med = statistics.median
    speed = [n["loop"] / a["loop"] for n, a in zip(results["never"], results["async"], strict=True)]
    wall = [n["wall"] / a["wall"] for n, a in zip(results["never"], results["async"], strict=True)]
    weights = results["never"][0]["size"]
    print(
        f"\nfull SFT of a random Qwen2 (hidden {args.ckpt_hidden}, {args.ckpt_layers} layers, "
        f"{params / 1e6:.0f}M parameters; weights {weights / 2**20:.0f} MiB, a checkpoint with "
        f"AdamW ~{3 * weights / 2**20:.0f} MiB), {args.ckpt_steps} steps, "
        f"{args.threads} thread(s); load average {min(loads):.1f}-{max(loads):.1f}"
    )
    print(f"  loop s: never {[round(r['loop'], 1) for r in results['never']]}, "
          f"async saves every {args.ckpt_every} {[round(r['loop'], 1) for r in results['async']]}")  # fmt: skip
    print(f"  speed with saves / without, per pair: {[round(x, 3) for x in speed]}")
    print(f"  wall (incl. start-up and the final upload) per pair: {[round(x, 3) for x in wall]}")
    cpu = [a["cpu"] / n["cpu"] for n, a in zip(results["never"], results["async"], strict=True)]
    print(
        f"  CPU seconds of the whole run (trainer, writer, uploader), with saves / without, "
        f"per pair: {[round(x, 3) for x in cpu]}; median {med(cpu):.3f} (robust to other "
        "load; what the saves cost where no core is spare)"
    )
    verdict = "meets" if med(speed) >= 0.97 else "misses"
    print(f"saves_every_{args.ckpt_every}_vs_never={med(speed):.3f} ({verdict} >= 0.97)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="pairs of runs per method")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    parser.add_argument("--sft-steps", type=int, default=200)
    parser.add_argument("--grpo-steps", type=int, default=60)
    parser.add_argument("--methods", default="sft,grpo")
    parser.add_argument("--save-every", type=int, default=SAVE_EVERY, help="checkpoint cadence")
    parser.add_argument(
        "--mode",
        choices=("paired", "sequential"),
        default="paired",
        help="paired: both sides at once (robust to outside load; each side's start-up "
        "overlaps the other's loop); sequential: one after the other, alternating (for a "
        "quiet machine)",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the results here")
    parser.add_argument(
        "--checkpoint-overhead",
        action="store_true",
        help="async saves every N steps vs never saving (issue 13), instead of vs plain TRL",
    )
    parser.add_argument("--ckpt-steps", type=int, default=40)
    parser.add_argument("--ckpt-every", type=int, default=10)
    parser.add_argument("--ckpt-hidden", type=int, default=384)
    parser.add_argument("--ckpt-layers", type=int, default=6)
    parser.add_argument("--plain", choices=("sft", "grpo"), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.plain:  # the plain-TRL side, in a process of its own like the trainyard side
        result = train_plain(args.plain, json.loads(Path(args.spec).read_text()), args.output)
        (Path(args.output) / "plain.json").write_text(json.dumps(result))
        for difference in result["configDifferences"]:
            print(f"config differs: {difference}", file=sys.stderr)
        return 0

    env = dict(
        os.environ,
        # The GRPO reward is imported by module name in both processes.
        PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
        OMP_NUM_THREADS=str(args.threads),
        MKL_NUM_THREADS=str(args.threads),
    )
    if args.checkpoint_overhead:
        return checkpoint_overhead(args, env)
    steps = {"sft": args.sft_steps, "grpo": args.grpo_steps}
    pairs: dict[str, list[dict[str, dict]]] = {}
    with tempfile.TemporaryDirectory(prefix="trainyard-overhead-") as tmp:
        work = Path(tmp)
        for method in args.methods.split(","):
            pairs[method] = []
            # Warm-up: builds the tiny model into the cache so neither side pays for it.
            collect([launch(method, 2, "plain", work, env)])
            for repeat in range(args.repeats):
                # Both sides at once: load from elsewhere on the machine hits them alike.
                order = ("trainyard", "plain") if repeat % 2 == 0 else ("plain", "trainyard")
                if args.mode == "paired":
                    pair = collect(
                        [
                            launch(method, steps[method], s, work, env, args.save_every)
                            for s in order
                        ]
                    )
                else:
                    pair = {}
                    for side in order:
                        pair.update(
                            collect(
                                [launch(method, steps[method], side, work, env, args.save_every)]
                            )
                        )
                pairs[method].append(pair)
                for side in ("trainyard", "plain"):
                    r = pair[side]
                    print(
                        f"{method} #{repeat + 1} {side:9}: loop {r['trainRuntimeSeconds']:7.2f} s, "
                        f"wall {r['wallSeconds']:6.1f} s, CPU {r['cpuSeconds']:6.1f} s",
                        flush=True,
                    )
                    for difference in r.get("configDifferences", []):
                        print(f"  config differs: {difference}", flush=True)
    rows = report(pairs)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
