"""Promotion gates on this machine: `trainyard run` judges them with the same evaluation
workload and the same verdict function the operator uses.

Two ways in:

- a file with a TrainingRun and a PromotionGate whose `run` names it: after the run
  trains, the gate is judged on its final checkpoint;
- `trainyard run gate.yaml [--output RUN-DIR]` with only gates: each gate judges a run
  directory of an earlier `trainyard run` (by default the newest `runs/RUN-*`), or its
  `model`. `--approve NAME` / `--reject NAME` stand for the annotations a person sets on
  a cluster; an approval counts only once the gate has shown that it awaits one.

The gate's status (what `kubectl get promotiongate -o yaml` would show) is written to
RUN-DIR/gate-NAME.json; the exit code is 0 when every gate passed, 1 when one failed,
3 when one awaits a person (approval, or an inconclusive confidence bound).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from trainyard.api import InvalidResource, manifests, parse_resource
from trainyard.api.common import ModelSource
from trainyard.api.gate import PromotionGate, PromotionGateStatus, evaluation_task
from trainyard.api.verdict import (
    EVAL_RESULTS_FILE,
    Decision,
    EvalResults,
    GateVerdict,
    eval_output_uri,
    judge,
    with_run_metrics,
)
from trainyard.workloads.local_spec import RUN_FILE

AWAITING_EXIT = 3
SUMMARY_KEYS = {
    "finalLoss": "loss",
    "finalReward": "reward_mean",
    "finalEvalLoss": "eval_loss",
    "steps": "step",
}


class GateProblem(Exception):
    """A gate that cannot be judged here; `lines` say why."""

    def __init__(self, lines: list[str]):
        super().__init__("\n".join(lines))
        self.lines = lines


def read_gates(path: str) -> list[PromotionGate]:
    """The PromotionGates of a YAML file, checked (every problem with its field path)."""
    try:
        text = Path(path).read_text()
        documents = [d for d in manifests.load_all(text) if isinstance(d, dict)]
    except (OSError, yaml.YAMLError) as error:
        raise GateProblem([f"{path}: cannot read: {error}"]) from None
    gates, problems = [], []
    for document in documents:
        if document.get("kind") != "PromotionGate":
            continue
        try:
            gates.append(parse_resource(document))
        except InvalidResource as invalid:
            name = (document.get("metadata") or {}).get("name")
            problems += [f"{path} (PromotionGate/{name}): invalid"]
            problems += [f"  {p}" for p in invalid.problems]
    if problems:
        raise GateProblem(problems)
    return gates


def only_gates(path: str) -> bool:
    """Whether a file holds PromotionGates and no TrainingRun (so `run` judges, not trains)."""
    try:
        documents = [d for d in manifests.load_all(Path(path).read_text()) if isinstance(d, dict)]
    except (OSError, yaml.YAMLError):
        return False
    kinds = {d.get("kind") for d in documents}
    return "PromotionGate" in kinds and "TrainingRun" not in kinds


def gates_for_run(path: str, run_name: str) -> list[PromotionGate]:
    """The gates in the file that judge this run (checked before it trains)."""
    if path == "-":  # the spec came on stdin, already read
        return []
    return [g for g in read_gates(path) if g.spec.run == run_name]


def checkpoint_of(run_dir: Path) -> Path | None:
    """The run's final export, else its newest complete checkpoint."""
    root = run_dir / "checkpoints"
    if (root / "final" / "manifest.json").is_file():
        return root / "final"
    steps = sorted(
        (int(p.name.removeprefix("step-")), p)
        for p in root.glob("step-*")
        if p.name.removeprefix("step-").isdigit() and (p / "manifest.json").is_file()
    )
    return steps[-1][1] if steps else None


def run_metrics(run_dir: Path) -> dict[str, float]:
    """A run's final metrics, as a gate without an evaluation judges them: the last value
    of every numeric key the trainer logged, and the summary's final loss/reward."""
    from trainyard.workloads.run_history import read_history

    metrics: dict[str, float] = {}
    history, _ = read_history(run_dir, checkpoint_of(run_dir))
    for entry in history:
        for key, value in entry.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                metrics[key] = float(value)
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        summary = {}
    for key, name in SUMMARY_KEYS.items():
        if isinstance(summary.get(key), int | float):
            metrics.setdefault(name, float(summary[key]))
    if "reward" in metrics:
        metrics.setdefault("reward_mean", metrics["reward"])
    return metrics


@dataclass
class LocalJudgement:
    gate: PromotionGate
    verdict: GateVerdict
    status: PromotionGateStatus
    path: Path


def _status_file(run_dir: Path, gate: PromotionGate) -> Path:
    return run_dir / f"gate-{gate.metadata.name}.json"


def _parse_time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


def judge_gate(
    gate: PromotionGate,
    run_dir: Path | None,
    *,
    run_spec: Any = None,
    approve: str | None = None,
    reject: str | None = None,
    log=print,
) -> LocalJudgement:
    """Evaluate (when the gate asks) and judge one gate; writes its status file."""
    from trainyard.workloads.evaluate.runner import TaskError, run_task

    spec = gate.spec
    if spec.model is not None:
        model_uri = spec.model.source
        state_dir = run_dir or Path("runs") / f"gate-{gate.metadata.name}"
    else:
        if run_dir is None or not run_dir.is_dir():
            raise GateProblem(
                [f"PromotionGate/{gate.metadata.name}: no run directory for run {spec.run!r}"]
            )
        checkpoint = checkpoint_of(run_dir)
        model_uri = f"file://{checkpoint.resolve()}" if checkpoint else None
        state_dir = run_dir
    state_dir.mkdir(parents=True, exist_ok=True)
    status_path = _status_file(state_dir, gate)
    try:
        previous = PromotionGateStatus.model_validate(json.loads(status_path.read_text()))
    except (OSError, ValueError):
        previous = PromotionGateStatus()

    now = datetime.now(UTC)
    attempts = 0

    def evaluate(evaluation: Any) -> tuple[EvalResults, str]:
        nonlocal attempts
        attempts += 1
        task = evaluation_task(
            evaluation,
            model=spec.model or ModelSource(source=model_uri),
            output=eval_output_uri(
                model_uri if spec.model is None else f"file://{state_dir.resolve()}",
                gate.metadata.name,
            ),
            run=run_spec,
        )
        try:
            evaluated = run_task(task, log=log)
        except (TaskError, ValueError) as error:
            raise GateProblem(
                [f"PromotionGate/{gate.metadata.name}: evaluation failed: {error}"]
            ) from None
        found = evaluated.results
        if run_dir is not None and spec.run is not None:
            found = with_run_metrics(found, run_metrics(run_dir))
        return found, f"{evaluated.output_uri}/{EVAL_RESULTS_FILE}"

    def decide(found: EvalResults | dict[str, float]) -> GateVerdict:
        # Only a judgement of the same model carries its waiting time over.
        awaiting = _parse_time(previous.awaiting_since) if previous.model == model_uri else None
        return judge(
            spec,
            found,
            now=now,
            approval=Decision(approve, now) if approve else None,
            rejection=Decision(reject, now) if reject else None,
            awaiting_since=awaiting,
            seed=spec.evaluation.seed if spec.evaluation else 0,
        )

    results: EvalResults | dict[str, float]
    eval_uri = None
    evaluation = spec.evaluation
    if evaluation is not None:
        if model_uri is None:
            raise GateProblem(
                [
                    f"PromotionGate/{gate.metadata.name}: run {spec.run!r} left no complete checkpoint"
                ]
            )
        results, eval_uri = evaluate(evaluation)
    else:
        if run_dir is None:
            raise GateProblem(
                [f"PromotionGate/{gate.metadata.name}: judging a model needs an evaluation"]
            )
        results = run_metrics(run_dir)
    verdict = decide(results)
    more = evaluation.more_samples if evaluation is not None else None
    if (
        verdict.criteria_outcome == "Inconclusive"
        and not verdict.decided
        and more is not None
        and evaluation.max_samples is not None
        and more > evaluation.max_samples
    ):
        log(f"inconclusive on {evaluation.max_samples} records: evaluating again on up to {more}")
        results, eval_uri = evaluate(evaluation.model_copy(update={"max_samples": more}))
        verdict = decide(results)
    status = verdict.apply(PromotionGateStatus()).model_copy(
        update={
            "model": model_uri,
            "promoted_model": model_uri if verdict.verdict == "Passed" else None,
            "eval_results": eval_uri,
            "evaluation_attempts": attempts or None,
            "report": eval_uri.rsplit("/", 1)[0] + "/eval-report.md" if eval_uri else None,
            "baseline_model": results.baseline.model
            if isinstance(results, EvalResults) and results.baseline
            else None,
        }
    )
    status_path.write_text(json.dumps(status.to_yaml_dict(), indent=2) + "\n")
    return LocalJudgement(gate, verdict, status, status_path)


def _cell(value: float | None) -> str:
    return "—" if value is None or math.isnan(value) else f"{value:.4g}"


def verdict_table(judgement: LocalJudgement) -> Table:
    verdict = judgement.verdict
    color = {"Passed": "green", "Failed": "red"}.get(verdict.verdict, "yellow")
    table = Table(
        title=f"PromotionGate/{judgement.gate.metadata.name}: [{color}]{verdict.verdict}[/] "
        f"({verdict.reason})"
    )
    for column in ("criterion", "observed", "threshold", "margin", "bounds", "result"):
        table.add_column(column, justify="right" if column != "criterion" else "left")
    for result in verdict.results:
        bounds = (
            f"[{_cell(result.margin_lower)}, {_cell(result.margin_upper)}]"
            if result.margin_lower is not None
            else ""
        )
        style = {"Passed": "green", "Failed": "red"}.get(result.result, "yellow")
        table.add_row(
            result.criterion,
            _cell(result.observed),
            _cell(result.threshold),
            _cell(result.margin),
            bounds,
            f"[{style}]{result.result}[/]",
        )
    return table


def exit_code(judgements: list[LocalJudgement]) -> int:
    verdicts = {j.verdict.verdict for j in judgements}
    if "Failed" in verdicts:
        return 1
    if verdicts - {"Passed"}:
        return AWAITING_EXIT
    return 0


def report(judgements: list[LocalJudgement], console: Console) -> int:
    for judgement in judgements:
        console.print(verdict_table(judgement))
        console.print(judgement.verdict.message, markup=False, highlight=False, soft_wrap=True)
        console.print(f"  status: {judgement.path}", markup=False, highlight=False)
        if judgement.status.report:
            console.print(f"  report: {judgement.status.report}", markup=False, highlight=False)
        if not judgement.verdict.decided:
            console.print(
                "  on this machine: trainyard run GATE.yaml --approve NAME (or --reject NAME)",
                markup=False,
                highlight=False,
            )
    return exit_code(judgements)


def judge_after_run(
    gates: list[PromotionGate], run: Any, output_dir: Path, console: Console
) -> int:
    """`trainyard run` calls this after a successful training: judge the file's gates on it."""
    if not gates:
        return 0
    judgements = []
    for gate in gates:
        try:
            judgements.append(
                judge_gate(
                    gate,
                    output_dir,
                    run_spec=run.spec,
                    log=lambda m: console.print(f"  [dim]{m}[/]"),
                )
            )
        except GateProblem as problem:
            for line in problem.lines:
                console.print(line, markup=False, highlight=False)
            return 1
    return report(judgements, console)


def newest_run_dir(run: str) -> Path | None:
    candidates = sorted(Path("runs").glob(f"{run}-*"), key=lambda p: p.stat().st_mtime)
    return candidates[-1] if candidates else None


def gate_file_in(argv: list[str]) -> str | None:
    """The file of a `trainyard run` command line when it holds only gates."""
    args, _ = _gate_parser().parse_known_args(argv)
    return args.file if args.file and only_gates(args.file) else None


def _gate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trainyard run GATE.yaml",
        description="Judge PromotionGates on this machine: a run directory of an earlier "
        "`trainyard run`, or the gate's model.",
    )
    parser.add_argument("file", metavar="FILE", nargs="?")
    parser.add_argument(
        "-o", "--output", metavar="RUN-DIR", help="the run directory (default: newest runs/RUN-*)"
    )
    parser.add_argument(
        "--approve", metavar="NAME", help="approve as NAME (trainyard.dev/approved-by)"
    )
    parser.add_argument(
        "--reject", metavar="NAME", help="reject as NAME (trainyard.dev/rejected-by)"
    )
    # `trainyard run` options that take a value, so their values are not taken for FILE.
    for option in ("--set", "--nproc", "--metrics-port", "--runs-root"):
        parser.add_argument(option, help=argparse.SUPPRESS)
    return parser


def gate_command(argv: list[str]) -> int:
    """`trainyard run gate.yaml`: judge the gates of a file (no TrainingRun in it)."""
    parser = _gate_parser()
    args, _ = parser.parse_known_args(argv)
    console = Console()
    try:
        gates = read_gates(args.file)
        judgements = []
        for gate in gates:
            run_dir = Path(args.output) if args.output else None
            if run_dir is None and gate.spec.run is not None:
                run_dir = newest_run_dir(gate.spec.run)
                if run_dir is None:
                    raise GateProblem(
                        [
                            f"PromotionGate/{gate.metadata.name}: no runs/{gate.spec.run}-* "
                            "directory; pass the run's directory with --output"
                        ]
                    )
            run_spec = _run_spec(run_dir)
            judgements.append(
                judge_gate(
                    gate, run_dir, run_spec=run_spec, approve=args.approve, reject=args.reject
                )
            )
    except GateProblem as problem:
        for line in problem.lines:
            print(line)
        return 1
    return report(judgements, console)


def _run_spec(run_dir: Path | None) -> Any:
    """The spec the run directory was trained from (its run.json), for rewards and storage."""
    if run_dir is None:
        return None
    try:
        document = json.loads((run_dir / RUN_FILE).read_text())
        return parse_resource(document).spec
    except (OSError, ValueError, InvalidResource):
        return None
