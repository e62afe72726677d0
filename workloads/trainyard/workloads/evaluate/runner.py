"""`python -m trainyard.workloads.evaluate TASK.json`: evaluate a model (and its baseline)
and write eval.json beside its checkpoint.

The task (`trainyard.api.gate.EvaluationTask`) names the model, the data, the suites
and where results go. Output, in this order:

    eval-examples.jsonl   one record per example and model (prompt, completion, answer,
                          correct, refused, loss, rewards…), for seeing what regressed
    eval-report.md        the metrics side by side with the baseline's, regressions
    eval-metrics.png      the plot the report shows
    eval.json             metrics, per-example values, seed and generation settings:
                          written last, so a reader that finds it finds the rest complete
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from trainyard.api.gate import EvaluationTask
from trainyard.api.validation import describe_errors
from trainyard.api.verdict import (
    EVAL_RESULTS_FILE,
    EXAMPLES_FILE,
    REPORT_FILE,
    EvalResults,
    eval_output_uri,
)
from trainyard.workloads import sources
from trainyard.workloads.evaluate import report as reports
from trainyard.workloads.evaluate import scoring
from trainyard.workloads.evaluate.suites import SuiteOutput, evaluate_rows, needs_generation


class TaskError(ValueError):
    """A task that cannot run; the message names the field and what is allowed."""


@dataclass
class Evaluated:
    """What `run_task` produced: the results and where they went."""

    results: EvalResults
    output_uri: str
    examples: list[dict[str, Any]]
    baseline_examples: list[dict[str, Any]] | None


def load_task(path: str | Path) -> EvaluationTask:
    """The task file (JSON or YAML, camelCase as the API writes it), checked."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as error:
        raise TaskError(f"{path}: cannot read the evaluation task: {error}") from None
    try:
        return EvaluationTask.model_validate(data)
    except ValidationError as error:
        problems = describe_errors(EvaluationTask, error.errors())
        lines = [f"{field}: {message}" for field, message in problems]
        raise TaskError(f"{path}: invalid evaluation task\n  " + "\n  ".join(lines)) from None


def output_location(task: EvaluationTask) -> str:
    """Where results go: the task's output, else beside the model's checkpoint."""
    if task.output:
        return task.output
    source = task.model.source
    if source.startswith(("s3://", "file://")):
        return eval_output_uri(source)
    if source.startswith("run://"):
        location = sources.run_checkpoint_uri(source, task.checkpoint_uri, "model.source")
        if location.endswith("/latest"):
            from trainyard.workloads import checkpoint

            run_root = location.rsplit("/", 1)[0]
            found = checkpoint.find_latest_complete(
                run_root, sources.S3Settings.from_spec(task.storage)
            )
            if found is None:
                raise TaskError(f"model.source: {run_root} holds no complete checkpoint")
            location = found
        return eval_output_uri(location)
    raise TaskError(
        f"output: {source} is not a checkpoint, so there is nothing to write beside; "
        "set output (s3://… or file://…, --output on the command line)"
    )


def load_rows(task: EvaluationTask) -> list[dict[str, Any]]:
    """The evaluation records, the first maxSamples of them (the same for every model)."""
    evaluation = task.evaluation
    try:
        dataset = sources.load_dataset_source(
            evaluation.dataset, storage=task.storage, field="evaluation.dataset"
        )
    except sources.SourceError as error:
        raise TaskError(str(error)) from None
    rows = dataset.to_list()
    if evaluation.max_samples is not None:
        rows = rows[: evaluation.max_samples]
    if not rows:
        raise TaskError(f"evaluation.dataset: {evaluation.dataset} holds no records")
    return rows


def evaluate_model(
    uri: str, model_spec: Any, task: EvaluationTask, rows: list[dict[str, Any]], extras: dict
) -> tuple[SuiteOutput, str]:
    """Every suite on one model; returns its output and the generation backend."""
    from trainyard.workloads.evaluate import model as models

    evaluation = task.evaluation
    try:
        loaded = models.load_model(
            uri,
            revision=getattr(model_spec, "revision", None),
            dtype=getattr(model_spec, "dtype", "auto"),
            trust_remote_code=getattr(model_spec, "trust_remote_code", False),
            storage=task.storage,
            checkpoint_uri=task.checkpoint_uri,
        )
    except sources.SourceError as error:
        raise TaskError(str(error)) from None
    backend = "none"

    def complete(prompts: list[Any]) -> list[str]:
        nonlocal backend
        rendered = [models.render_prompt(loaded, p) for p in prompts]
        completions, backend = models.generate(
            loaded, rendered, evaluation.generation, evaluation.seed
        )
        return completions

    def losses(segments: list[tuple[str, str]]) -> list[tuple[float, int]]:
        return models.token_losses(loaded, segments, evaluation.generation.batch_size)

    output = evaluate_rows(
        rows,
        evaluation,
        complete=complete,
        losses=losses,
        render=loaded.render if loaded.chat else None,
        rewards=extras.get("rewards"),
        user_metrics=extras.get("metrics"),
    )
    return output, backend


def prepare_extras(task: EvaluationTask) -> dict[str, Any]:
    """Reward functions and user metrics, loaded (and checked) before any model is."""
    extras: dict[str, Any] = {}
    if "reward" in task.evaluation.suite:
        if not task.rewards:
            raise TaskError(
                "evaluation.suite: reward needs the judged run's rewards (grpo/rloo rewards; "
                "--rewards RUN.yaml on the command line)"
            )
        from trainyard.workloads.rewards import build_reward_functions

        try:
            extras["rewards"] = build_reward_functions(task.rewards, task.strip_thinking)
        except ValueError as error:
            raise TaskError(f"rewards: {error}") from None
    metrics = {}
    for spec in task.evaluation.metrics:
        try:
            metrics[spec.name] = scoring.load_metric_function(spec.python, spec.name)
        except ValueError as error:
            raise TaskError(str(error)) from None
    extras["metrics"] = metrics
    return extras


def _results(
    uri: str, output: SuiteOutput, task: EvaluationTask, backend: str, n: int
) -> EvalResults:
    evaluation = task.evaluation
    return EvalResults.model_validate(
        {
            "model": uri,
            "metrics": output.metrics,
            "samples": output.samples,
            "dataset": evaluation.dataset,
            "examples": n,
            "suite": list(evaluation.suite),
            "seed": evaluation.seed,
            "generation": evaluation.generation.to_yaml_dict()
            if needs_generation(evaluation)
            else None,
            "backend": backend,
        }
    )


def run_task(task: EvaluationTask, log=print) -> Evaluated:
    """Evaluate the task's model (and baseline) and write the results."""
    started = time.monotonic()
    output_uri = output_location(task)
    # An earlier result must not stand for this evaluation while it runs, nor after it
    # fails, nor vouch for the files it replaces: it goes first, the new one comes last.
    _store(output_uri, task).delete([EVAL_RESULTS_FILE])
    rows = load_rows(task)
    extras = prepare_extras(task)
    log(f"evaluating {task.model.source} on {len(rows)} records of {task.evaluation.dataset}")
    candidate, backend = evaluate_model(task.model.source, task.model, task, rows, extras)
    results = _results(task.model.source, candidate, task, backend, len(rows))
    baseline_examples = None
    if task.evaluation.baseline is not None:
        base = task.evaluation.baseline
        log(f"evaluating the baseline {base.source}")
        baseline, base_backend = evaluate_model(base.source, base, task, rows, extras)
        results.baseline = _results(base.source, baseline, task, base_backend, len(rows))
        baseline_examples = baseline.examples
    results.created_at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    results.seconds = round(time.monotonic() - started, 3)
    results.examples_file = EXAMPLES_FILE
    results.report_file = REPORT_FILE
    write_results(output_uri, results, candidate.examples, baseline_examples, task)
    log(f"wrote {output_uri.rstrip('/')}/{EVAL_RESULTS_FILE}")
    return Evaluated(results, output_uri, candidate.examples, baseline_examples)


def write_results(
    output_uri: str,
    results: EvalResults,
    examples: list[dict[str, Any]],
    baseline_examples: list[dict[str, Any]] | None,
    task: EvaluationTask,
) -> None:
    """Examples, report and plot first; eval.json last (its presence means complete)."""
    store = _store(output_uri, task)
    with tempfile.TemporaryDirectory(prefix="trainyard-eval-") as scratch:
        directory = Path(scratch)
        with open(directory / EXAMPLES_FILE, "w") as handle:
            for label, records in (("candidate", examples), ("baseline", baseline_examples or [])):
                for record in records:
                    handle.write(json.dumps({"model": label, **record}, default=str) + "\n")
        files = {EXAMPLES_FILE: directory / EXAMPLES_FILE}
        plotted = reports.plot_metrics(results, directory / reports.PLOT_FILE)
        if plotted:
            files[reports.PLOT_FILE] = directory / reports.PLOT_FILE
        text = reports.render_report(
            results, examples, baseline_examples, reports.PLOT_FILE if plotted else None
        )
        (directory / REPORT_FILE).write_text(text)
        files[REPORT_FILE] = directory / REPORT_FILE
        store.upload_files(files)
        store.put_bytes(EVAL_RESULTS_FILE, results_json(results).encode())


def _store(output_uri: str, task: EvaluationTask):
    from trainyard.workloads.storage import open_store

    return open_store(output_uri, **sources.S3Settings.from_spec(task.storage).store_options())


def results_json(results: EvalResults) -> str:
    """eval.json's text: camelCase, NaN kept (Python's json reads it back)."""
    return json.dumps(results.model_dump(by_alias=True, exclude_none=True, mode="python"))


def read_results(output_uri: str, storage: Any = None) -> EvalResults | None:
    """eval.json at an output location, or None while it is not (completely) written."""
    from trainyard.workloads.storage import open_store

    store = open_store(output_uri, **sources.S3Settings.from_spec(storage).store_options())
    raw = store.get_bytes(EVAL_RESULTS_FILE)
    return None if raw is None else EvalResults.model_validate(json.loads(raw))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m trainyard.workloads.evaluate",
        description="Evaluate a model for a promotion gate and write eval.json beside it.",
    )
    parser.add_argument("task", help="evaluation task file (JSON or YAML, EvaluationTask)")
    parser.add_argument(
        "--output", help="where results go (s3://… or file://…); overrides the task"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        task = load_task(args.task)
        if args.output:
            task = task.model_copy(update={"output": args.output})
        run_task(task)
    except (TaskError, scoring.RowError, ValueError) as error:
        print(f"evaluation failed: {error}", file=sys.stderr)
        return 1
    return 0
