"""`trainyard evaluate MODEL --suite … --dataset …`: the gate's evaluation on this machine."""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

from pydantic import ValidationError

from trainyard.api.gate import EVALUATION_SUITES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trainyard evaluate",
        description=(
            "Evaluate a model or checkpoint as a PromotionGate's evaluation Job does, and "
            "write eval.json, per-example records and a Markdown report."
        ),
    )
    parser.add_argument(
        "model",
        metavar="MODEL",
        help="hf://…, s3://…, file://…, builtin://NAME or run://RUN[/final|latest|step-N]",
    )
    parser.add_argument(
        "--suite",
        required=True,
        metavar="LIST",
        help=f"comma-separated, of: {', '.join(EVALUATION_SUITES)}",
    )
    parser.add_argument("--dataset", required=True, metavar="URI", help="evaluation data")
    parser.add_argument("--baseline", metavar="URI", help="a model to evaluate beside it")
    parser.add_argument("--max-samples", type=int, metavar="N")
    parser.add_argument(
        "-o",
        "--output",
        metavar="DIR|URI",
        help="where results go (default: beside the checkpoint, else evals/MODEL)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--match", default="auto", help="accuracy: auto, exact, choice, regex or final-answer"
    )
    parser.add_argument("--pattern", help="accuracy: the regular expression for --match regex")
    parser.add_argument(
        "--rewards",
        metavar="RUN.yaml",
        help="a TrainingRun whose grpo/rloo rewards score the reward suite",
    )
    parser.add_argument(
        "--metric",
        action="append",
        default=[],
        metavar="NAME=module:function",
        help="a metric of your own (repeatable)",
    )
    return parser


def _output(args: argparse.Namespace) -> str | None:
    if args.output:
        if "://" in args.output:
            return args.output
        return f"file://{Path(args.output).resolve()}"
    if args.model.startswith(("s3://", "file://", "run://")):
        return None  # beside the checkpoint
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", args.model.split("://", 1)[-1]).strip("-")
    return f"file://{(Path('evals') / name).resolve()}"


def _rewards(path: str | None) -> tuple[list, bool]:
    if path is None:
        return [], False
    from trainyard.api import InvalidResource, TrainingRun, manifests, parse_resource

    documents = manifests.load_all(Path(path).read_text())
    runs = [d for d in documents if isinstance(d, dict) and d.get("kind") == "TrainingRun"]
    if len(runs) != 1:
        raise ValueError(f"--rewards {path}: expected one TrainingRun, found {len(runs)}")
    try:
        run = parse_resource(runs[0])
    except InvalidResource as invalid:
        raise ValueError(f"--rewards {path}: invalid: " + "; ".join(invalid.problems)) from None
    assert isinstance(run, TrainingRun)
    online = run.spec.grpo or run.spec.rloo
    if online is None or not online.rewards:
        raise ValueError(f"--rewards {path}: the run has no grpo or rloo rewards")
    return list(online.rewards), online.strip_thinking


def evaluate_command(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from trainyard.api.gate import EvaluationTask
    from trainyard.api.validation import describe_errors

    metrics = []
    for text in args.metric:
        name, sep, reference = text.partition("=")
        if not sep:
            print(f"--metric {text!r}: expected NAME=module:function")
            return 1
        metrics.append({"name": name, "python": reference})
    try:
        rewards, strip_thinking = _rewards(args.rewards)
    except (OSError, ValueError) as error:
        print(error)
        return 1
    evaluation = {
        "suite": [s.strip() for s in args.suite.split(",") if s.strip()],
        "dataset": args.dataset,
        "seed": args.seed,
        "generation": {
            "maxNewTokens": args.max_new_tokens,
            "temperature": args.temperature,
            "batchSize": args.batch_size,
        },
        "accuracy": {"match": args.match, **({"pattern": args.pattern} if args.pattern else {})},
        "metrics": metrics,
    }
    if args.max_samples is not None:
        evaluation["maxSamples"] = args.max_samples
    if args.baseline:
        evaluation["baseline"] = {"source": args.baseline}
    document = {"model": {"source": args.model}, "evaluation": evaluation}
    output = _output(args)
    if output:
        document["output"] = output
    try:
        task = EvaluationTask.model_validate(document)
    except ValidationError as error:
        for path, message in describe_errors(EvaluationTask, error.errors()):
            print(f"{path}: {message}")
        return 1
    task = task.model_copy(update={"rewards": rewards, "strip_thinking": strip_thinking})

    from rich.console import Console
    from rich.table import Table

    from trainyard.workloads.evaluate.runner import TaskError, run_task
    from trainyard.workloads.evaluate.scoring import RowError

    console = Console()
    try:
        evaluated = run_task(task, log=lambda m: console.print(f"[dim]{m}[/]", highlight=False))
    except (TaskError, RowError, ValueError) as error:
        print(f"evaluation failed: {error}")
        return 1
    results = evaluated.results
    table = Table(title=f"{results.model}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    if results.baseline is not None:
        table.add_column("baseline", justify="right")
    for name, value in results.metrics.items():
        row = [name, "—" if math.isnan(value) else f"{value:.4g}"]
        if results.baseline is not None:
            base = results.baseline.metrics.get(name)
            row.append("—" if base is None or math.isnan(base) else f"{base:.4g}")
        table.add_row(*row)
    console.print(table)
    console.print(f"results: {evaluated.output_uri}", markup=False, highlight=False)
    return 0
