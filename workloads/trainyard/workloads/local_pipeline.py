"""`trainyard run pipeline.yaml`: a TrainingPipeline on this machine, stage after stage.

Each stage is a `trainyard run` of its own (its TrainingRun and, where the stage has one,
its PromotionGate, written to `OUTPUT/STAGE/stage.yaml`), into `OUTPUT/STAGE/`; the
gate is judged with the same evaluation and verdict as on a cluster. A stage starts only
when the one before it was promoted, with `run://previous` resolved to that stage's
final model. `OUTPUT/pipeline.json` records every stage's state, so running the same
command again resumes: promoted stages are not trained again, a stage that waits for a
person is judged again (`--approve NAME` / `--reject NAME` answer it), and a failed or
rejected stage trains again.

A gate that waits for a person is answered at the terminal when stdin is one (approve,
reject, or decide later), else by `--approve NAME` / `--reject NAME`; without either the
pipeline pauses and prints the command that answers it. At the end: a table of every
stage and its gate, and OUTPUT/curves.png, every stage's curves on one step axis with
each gate's verdict marked.

Exit codes: 0 every stage promoted, 1 a stage failed or was rejected (or a bad file),
3 a gate waits for a person.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import yaml
from rich.console import Console
from rich.table import Table

from trainyard.api import InvalidResource, parse_resource
from trainyard.api.pipeline import Stage, TrainingPipeline

STATE_FILE = "pipeline.json"
STAGE_FILE = "stage.yaml"
PREVIOUS = "run://previous"
AWAITING_PERSON = 3
INTERRUPTED = 130  # Ctrl-C: the stage's runner stopped its trainer, as a shell writes 128 + SIGINT


def pipeline_file_in(argv: list[str]) -> str | None:
    """The file of a `trainyard run` command line when it holds a TrainingPipeline."""
    args, _ = _parser().parse_known_args(argv)
    if not args.file or args.file == "-":
        return None
    try:
        documents = list(yaml.safe_load_all(Path(args.file).read_text()))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None  # the runner's own reading says what is wrong with the file
    kinds = {d.get("kind") for d in documents if isinstance(d, dict)}
    return args.file if "TrainingPipeline" in kinds else None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trainyard run PIPELINE.yaml",
        description="Run a TrainingPipeline on this machine: every stage in order, each "
        "gate judged before the next stage starts; running again resumes.",
    )
    parser.add_argument("file", metavar="FILE", nargs="?")
    parser.add_argument(
        "-o", "--output", metavar="DIR", help="the pipeline's folder (default: runs/PIPELINE)"
    )
    parser.add_argument("--tiny", action="store_true", help="every stage at toy size, offline")
    parser.add_argument(
        "--approve", metavar="NAME", help="approve, as NAME, every gate that waits for a person"
    )
    parser.add_argument(
        "--reject", metavar="NAME", help="reject, as NAME, the first gate that waits for a person"
    )
    parser.add_argument("--nproc", metavar="N", help="training processes per stage")
    return parser


def stage_documents(
    pipeline: TrainingPipeline, stage: Stage, model: str | None
) -> list[dict[str, Any]]:
    """The stage's TrainingRun (and PromotionGate) as `trainyard run` reads them."""
    name = f"{pipeline.metadata.name}-{stage.name}"
    spec = stage.run.model_dump(by_alias=True, exclude_unset=True, mode="json")
    if spec["model"]["source"] == PREVIOUS:
        assert model is not None
        spec["model"]["source"] = model
    documents: list[dict[str, Any]] = [
        {
            "apiVersion": "trainyard.dev/v1alpha1",
            "kind": "TrainingRun",
            "metadata": {"name": name},
            "spec": spec,
        }
    ]
    if stage.gate is not None:
        gate = stage.gate.model_dump(by_alias=True, exclude_unset=True, mode="json")
        documents.append(
            {
                "apiVersion": "trainyard.dev/v1alpha1",
                "kind": "PromotionGate",
                "metadata": {"name": f"{name}-gate"},
                "spec": {"run": name, **gate},
            }
        )
    return documents


def final_model(stage_dir: Path) -> str:
    """Where `trainyard run` left the stage's exported model: `<checkpoint.uri>/final` of
    the run as it ran (run.json: a file:// checkpoint.uri is kept, s3:// becomes
    STAGE/checkpoints unless --keep-storage), else STAGE/final (no checkpoint.uri)."""
    run = _read_json(stage_dir / "run.json")
    uri = ((run.get("spec") or {}).get("checkpoint") or {}).get("uri") or ""
    if uri.startswith("file://"):
        return (Path(uri.removeprefix("file://")) / "final").resolve().as_uri()
    if uri.startswith("s3://"):
        return f"{uri.rstrip('/')}/final"
    return (stage_dir / "final").resolve().as_uri()


def pipeline_command(argv: list[str]) -> int:
    from trainyard.workloads import local

    args, _ = _parser().parse_known_args(argv)
    console = Console()
    try:
        documents = [d for d in yaml.safe_load_all(Path(args.file).read_text()) if d]
        (document,) = [d for d in documents if d.get("kind") == "TrainingPipeline"]
        pipeline = parse_resource(document)
    except InvalidResource as invalid:
        print(f"{args.file}: invalid TrainingPipeline")
        for problem in invalid.problems:
            print(f"  {problem}")
        return 1
    except ValueError:
        print(f"{args.file}: one TrainingPipeline per file, please")
        return 1
    assert isinstance(pipeline, TrainingPipeline)
    output = Path(args.output or Path("runs") / pipeline.metadata.name)
    output.mkdir(parents=True, exist_ok=True)
    state_path = output / STATE_FILE
    state: dict[str, dict[str, Any]] = (
        json.loads(state_path.read_text()) if state_path.is_file() else {}
    )
    model: str | None = None
    code = 0
    for stage in pipeline.spec.stages:
        stage_dir = output / stage.name
        entry = state.setdefault(stage.name, {"phase": "Pending"})
        if entry.get("phase") == "Promoted":
            model = entry["model"]
            console.print(f"[bold]{stage.name}[/]: promoted earlier, not trained again")
            continue
        stage_dir.mkdir(parents=True, exist_ok=True)
        stage_file = stage_dir / STAGE_FILE
        stage_file.write_text(yaml.safe_dump_all(stage_documents(pipeline, stage, model)))
        entry["inputModel"] = model if stage.run.model.source == PREVIOUS else None
        decision = _decision(args)
        if entry.get("phase") == "Gating":  # trained; its gate waited for a person
            decision = decision or _ask(stage, pipeline)
            code = _judge(pipeline, stage, stage_dir, model, decision)
        else:
            console.rule(f"stage {stage.name}")
            entry["startedAt"] = _now()
            run_argv = [str(stage_file), "--output", str(stage_dir)]
            if args.tiny:
                run_argv.append("--tiny")
                if stage.run.model.source == PREVIOUS:  # --tiny's own model gives way
                    run_argv += ["--set", f"model.source={model}"]
            run_argv += ["--nproc", args.nproc] if args.nproc else []
            code = local.run_command(run_argv)
            entry["finishedAt"] = _now()
            if code == AWAITING_PERSON:  # answered now: --approve/--reject, or at the terminal
                decision = decision or _ask(stage, pipeline)
                if decision is not None:
                    code = _judge(pipeline, stage, stage_dir, model, decision)
        entry["phase"] = _phase(code, stage, stage_dir)
        if entry["phase"] == "Promoted":
            model = entry["model"] = final_model(stage_dir)
            write_provenance(pipeline, stage, stage_dir, entry)
        state_path.write_text(json.dumps(state, indent=2) + "\n")
        if entry["phase"] != "Promoted":
            break
    console.print(_summary(pipeline, state, output))
    plot = plot_pipeline(pipeline, state, output, output / PLOT_FILE)
    if plot:
        console.print(f"curves of every stage: {output / PLOT_FILE}")
    if code == INTERRUPTED:  # the stage's own line names the stage file; this one resumes all
        console.print(
            f"interrupted: `trainyard run {args.file} --output {output}` resumes the pipeline "
            "(promoted stages are not trained again)",
            markup=False, highlight=False, soft_wrap=True,
        )  # fmt: skip
    if code == AWAITING_PERSON:
        console.print(
            f"a gate waits for a person: trainyard run {args.file} --output {output} "
            "--approve NAME (or --reject NAME)"
        )
    return code


def write_provenance(
    pipeline: TrainingPipeline, stage: Stage, stage_dir: Path, entry: dict[str, Any]
) -> None:
    """`provenance.json` beside the promoted model, the same record the operator's
    provenance Job writes on a cluster (input model, data and the model itself with what
    pins their contents, the stage as it ran, the gate's verdict and who approved), read
    by `trainyard lineage`."""
    from trainyard.workloads import provenance

    spec = stage.model_dump(by_alias=True, mode="json")
    run = _read_json(stage_dir / "run.json")
    run_spec = run.get("spec") or {}
    gate: dict[str, Any] | None = None
    for path in stage_dir.glob("gate-*.json"):
        status = json.loads(path.read_text())
        gate = {
            "name": path.stem.removeprefix("gate-"),
            "verdict": status.get("verdict"),
            "message": status.get("message"),
            "results": status.get("results"),
            "approval": status.get("approval"),
            "decidedAt": status.get("decidedAt"),
        }
    summary = _read_json(stage_dir / "summary.json")
    dataset = run_spec.get("dataset") or {}
    record = {
        "pipeline": pipeline.metadata.name,
        "stage": stage.name,
        "run": f"{pipeline.metadata.name}-{stage.name}",
        "method": stage.run.method,
        "model": entry["model"],
        "inputModel": (run_spec.get("model") or {}).get("source"),
        "dataset": {
            k: dataset.get(k) for k in ("source", "config", "split") if dataset.get(k) is not None
        },
        "specHash": hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16],
        "image": "local (this machine's Python environment)",
        "startedAt": entry.get("startedAt"),
        "finishedAt": entry.get("finishedAt"),
        "trainedSteps": summary.get("steps"),
        "gate": gate,
    }
    provenance.write(provenance.complete(record))


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


PLOT_FILE = "curves.png"


def _decision(args: argparse.Namespace) -> tuple[str, str] | None:
    if args.approve:
        return "--approve", args.approve
    if args.reject:
        return "--reject", args.reject
    return None


def ask_at_terminal(gate: str, stdin: TextIO, stdout: TextIO, user: str) -> tuple[str, str] | None:
    """Ask a person at the terminal to decide a gate that waits for one: ("--approve",
    NAME), ("--reject", NAME), or None (decide later: the pipeline pauses)."""
    stdout.write(
        f"gate {gate} waits for a person. approve (a), reject (r), or decide later (Enter)? "
    )
    stdout.flush()
    answer = stdin.readline().strip().lower()
    if answer not in ("a", "approve", "r", "reject"):
        return None
    stdout.write(f"your name [{user}]: ")
    stdout.flush()
    name = stdin.readline().strip() or user
    return ("--approve" if answer.startswith("a") else "--reject"), name


def _ask(stage: Stage, pipeline: TrainingPipeline) -> tuple[str, str] | None:
    """A terminal's answer when stdin is one (never in CI, pipes or cron: those pause)."""
    if not sys.stdin.isatty():
        return None
    import getpass

    gate = f"{pipeline.metadata.name}-{stage.name}-gate"
    return ask_at_terminal(gate, sys.stdin, sys.stdout, getpass.getuser())


def _judge(
    pipeline: TrainingPipeline,
    stage: Stage,
    stage_dir: Path,
    model: str | None,
    decision: tuple[str, str] | None,
) -> int:
    """Judge the stage's gate again (nothing trained), with a person's decision if any."""
    from trainyard.workloads.evaluate import local_gate

    gate_file = stage_dir / "gate.yaml"  # the gate alone
    gate_file.write_text(yaml.safe_dump_all(stage_documents(pipeline, stage, model)[1:]))
    judge = [str(gate_file), "--output", str(stage_dir)]
    return local_gate.gate_command(judge + list(decision or ()))


def plot_pipeline(
    pipeline: TrainingPipeline, state: dict[str, Any], output: Path, path: Path
) -> list[tuple[str, str, float, float]]:
    """One image of the whole pipeline: each stage's curves (loss, reward, …) on one step
    axis, stage after stage, with a line at the end of each stage naming its gate's
    verdict. Returns what was drawn, (panel, curve, first x, last x) per curve; [] (and
    no file) when no stage logged anything."""
    from trainyard.workloads.run_history import panel_keys, read_history, series

    stages: list[tuple[str, list[dict[str, Any]], str]] = []
    for stage in pipeline.spec.stages:
        stage_dir = output / stage.name
        if not (stage_dir / "result.json").is_file():
            continue
        history, _ = read_history(stage_dir)
        entry = state.get(stage.name) or {}
        verdict = f"{entry.get('phase', '')} (no gate)"
        for gate_path in stage_dir.glob("gate-*.json"):
            verdict = f"gate {json.loads(gate_path.read_text()).get('verdict')}"
        stages.append((stage.name, history, verdict))
    panels: list[str] = []
    for _, history, _ in stages:
        panels += [label for label, _ in panel_keys(history) if label not in panels]
    if not panels:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(
        len(panels), 1, figsize=(9, 3 * len(panels)), squeeze=False, sharex=True
    )
    drawn: list[tuple[str, str, float, float]] = []
    offset = 0.0
    for index, (name, history, verdict) in enumerate(stages):
        color = f"C{index}"
        keys = dict(panel_keys(history))
        last = max((float(e["step"]) for e in history if "step" in e), default=0.0)
        for ax, label in zip(axes[:, 0], panels, strict=True):
            for key, curve in keys.get(label, []):
                steps, values = series(history, key)
                ax.plot(
                    [offset + s for s in steps],
                    values,
                    color=color,
                    marker="o" if len(steps) < 30 else None,
                    markersize=3,
                    linestyle="-" if key == keys[label][0][0] else "--",
                    label=f"{name}: {curve}",
                )
                if steps:
                    drawn.append((label, f"{name}: {curve}", offset + steps[0], offset + steps[-1]))
            ax.axvline(offset + last, color=color, alpha=0.5, linestyle=":")
        axes[0, 0].annotate(
            f"{name}: {verdict}",
            xy=(offset + last, 1.0),
            xycoords=("data", "axes fraction"),
            rotation=90,
            va="top",
            ha="right",
            fontsize=8,
        )
        offset += last
    for ax, label in zip(axes[:, 0], panels, strict=True):
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize=7)
    axes[-1, 0].set_xlabel("step of the pipeline (stage after stage)")
    figure.suptitle(f"pipeline {pipeline.metadata.name}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return drawn


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _phase(code: int, stage: Stage, stage_dir: Path) -> str:
    if code == 0:
        return "Promoted"
    if code == AWAITING_PERSON:
        return "Gating"
    gate_files = list(stage_dir.glob("gate-*.json"))
    verdicts = {json.loads(p.read_text()).get("verdict") for p in gate_files}
    return "Rejected" if stage.gate is not None and "Failed" in verdicts else "Failed"


def _summary(pipeline: TrainingPipeline, state: dict[str, Any], output: Path) -> Table:
    table = Table(title=f"pipeline {pipeline.metadata.name} → {output}")
    for column in ("stage", "phase", "verdict", "model"):
        table.add_column(column)
    for stage in pipeline.spec.stages:
        entry = state.get(stage.name) or {"phase": "Pending"}
        verdict = "—"
        for path in (output / stage.name).glob("gate-*.json"):
            status = json.loads(path.read_text())
            verdict = f"{status.get('verdict')}: {status.get('message', '')}"
        table.add_row(stage.name, entry["phase"], verdict, entry.get("model") or "—")
    return table


if __name__ == "__main__":
    sys.exit(pipeline_command(sys.argv[1:]))
