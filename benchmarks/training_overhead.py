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

Runs alternate between the sides; the ratio of the fastest runs is the headline (noise
from a shared machine only ever adds time), the ratio of medians is shown beside it.
Each process gets `--threads` intra-op threads (default 1): on a busy machine OpenMP
oversubscription otherwise swamps the difference being measured.

    python benchmarks/training_overhead.py                 # 5 repeats
    python benchmarks/training_overhead.py --repeats 1 --sft-steps 20 --grpo-steps 4

Goal: trainyard's training loop ≤ 1.03× slower than plain TRL.
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
SAVE_EVERY = 20
GRPO = {"numGenerations": 4, "maxCompletionLength": 16, "temperature": 1.0}
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}


def length_reward(completions: list[Any], **kwargs: Any) -> list[float]:
    """1.0 for completions of 5 to 40 characters, else 0.0: cheap, so it does not hide overhead.

    >>> length_reward(["hello world", "x"])
    [1.0, 0.0]
    """
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [1.0 if 5 <= len(t) <= 40 else 0.0 for t in texts]


def training_run(method: str, steps: int) -> dict[str, Any]:
    """The TrainingRun both sides train."""
    training = dict(COMMON, maxSteps=steps)
    spec: dict[str, Any] = {
        "method": method,
        "model": {"source": f"builtin://{MODEL}"},
        "training": training,
        "checkpoint": {"uri": "s3://benchmark/overhead", "everySteps": SAVE_EVERY, "keepLast": 2},
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


def timed(command: list[str], env: dict[str, str], log: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the command and every process it waited for)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    with open(log, "w") as out:
        done = subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} exited {done.returncode}; see {log}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def measure(method: str, steps: int, side: str, work: Path, env: dict[str, str]) -> dict:
    run = training_run(method, steps)
    out = work / f"{method}-{side}-{time.monotonic_ns()}"
    out.mkdir(parents=True)
    spec_file = out.with_suffix(".json")
    spec_file.write_text(json.dumps(run))
    if side == "trainyard":
        command = [
            sys.executable,
            "-m",
            "trainyard.cli.main",
            "run",
            str(spec_file),
            "--output",
            str(out),
        ]
        wall, cpu = timed(command, env, out.with_suffix(".log"))
        summary = json.loads((out / "summary.json").read_text())
        result = {"steps": summary["steps"], "trainRuntimeSeconds": summary["trainRuntimeSeconds"]}
    else:
        command = [
            sys.executable,
            __file__,
            "--plain",
            method,
            "--spec",
            str(spec_file),
            "--output",
            str(out),
        ]
        wall, cpu = timed(command, env, out.with_suffix(".log"))
        result = json.loads((out / "plain.json").read_text())
    if result["steps"] != steps:
        sys.exit(f"{side} {method} trained {result['steps']} steps, expected {steps}")
    return {**result, "wallSeconds": wall, "cpuSeconds": cpu}


def report(results: dict[str, dict[str, list[dict]]]) -> list[dict[str, Any]]:
    from rich.console import Console
    from rich.table import Table

    def stat(runs: list[dict], key: str, how) -> float:
        return how(r[key] for r in runs)

    table = Table(title="trainyard run vs plain TRL (ratio = trainyard time / plain time)")
    for column in ("method", "steps", "loop steps/s\ntrainyard", "loop steps/s\nplain",
                   "loop ratio\nfastest", "loop ratio\nmedian", "wall s\ntrainyard",
                   "wall s\nplain", "wall ratio\nfastest", "CPU s ratio\nfastest"):  # fmt: skip
        table.add_column(column, justify="right")
    rows = []
    for method, sides in results.items():
        steps = sides["plain"][0]["steps"]
        fastest = {
            key: {s: stat(rs, key, min) for s, rs in sides.items()}
            for key in ("trainRuntimeSeconds", "wallSeconds", "cpuSeconds")
        }
        median = {s: stat(rs, "trainRuntimeSeconds", statistics.median) for s, rs in sides.items()}
        loop = fastest["trainRuntimeSeconds"]
        row = {
            "method": method,
            "steps": steps,
            "repeats": len(sides["plain"]),
            "loopStepsPerSecond": {s: steps / v for s, v in loop.items()},
            "loopRatio": loop["trainyard"] / loop["plain"],
            "loopRatioMedian": median["trainyard"] / median["plain"],
            "wallSeconds": fastest["wallSeconds"],
            "wallRatio": fastest["wallSeconds"]["trainyard"] / fastest["wallSeconds"]["plain"],
            "cpuSeconds": fastest["cpuSeconds"],
            "cpuRatio": fastest["cpuSeconds"]["trainyard"] / fastest["cpuSeconds"]["plain"],
            "runs": sides,
        }
        rows.append(row)
        table.add_row(
            method, str(steps),
            f"{row['loopStepsPerSecond']['trainyard']:.2f}", f"{row['loopStepsPerSecond']['plain']:.2f}",
            f"{row['loopRatio']:.3f}×", f"{row['loopRatioMedian']:.3f}×",
            f"{row['wallSeconds']['trainyard']:.1f}", f"{row['wallSeconds']['plain']:.1f}",
            f"{row['wallRatio']:.2f}×", f"{row['cpuRatio']:.2f}×",
        )  # fmt: skip
    console = Console()
    console.print(table)
    for row in rows:
        verdict = "meets" if row["loopRatio"] <= 1.03 else "misses"
        console.print(f"{row['method']}: training loop {row['loopRatio']:.3f}× ({verdict} ≤ 1.03×)")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    parser.add_argument("--sft-steps", type=int, default=60)
    parser.add_argument("--grpo-steps", type=int, default=16)
    parser.add_argument("--methods", default="sft,grpo")
    parser.add_argument("--json", metavar="FILE", help="also write the results here")
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

    # The GRPO reward is imported by module name in both processes.
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])
    )
    steps = {"sft": args.sft_steps, "grpo": args.grpo_steps}
    results: dict[str, dict[str, list[dict]]] = {}
    with tempfile.TemporaryDirectory(prefix="trainyard-overhead-") as tmp:
        work = Path(tmp)
        for method in args.methods.split(","):
            results[method] = {"trainyard": [], "plain": []}
            # Warm-up: builds the tiny model into the cache so neither side pays for it.
            measure(method, 2, "plain", work, env)
            for repeat in range(args.repeats):
                # Alternate the order so drift in machine load hits both sides alike.
                order = ("trainyard", "plain") if repeat % 2 == 0 else ("plain", "trainyard")
                for side in order:
                    result = measure(method, steps[method], side, work, env)
                    results[method][side].append(result)
                    print(
                        f"{method} {side} #{repeat + 1}: {result['steps']} steps, loop "
                        f"{result['trainRuntimeSeconds']:.2f} s, wall {result['wallSeconds']:.1f} s, "
                        f"CPU {result['cpuSeconds']:.1f} s",
                        flush=True,
                    )
                    for difference in result.get("configDifferences", []):
                        print(f"  config differs: {difference}")
    rows = report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
