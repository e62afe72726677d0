"""`trainyard run pipeline.yaml`: a TrainingPipeline on this machine, stage after stage.

Each stage is a `trainyard run` of its own (its TrainingRun and, where the stage has one,
its PromotionGate, written to `OUTPUT/STAGE/stage.yaml`), into `OUTPUT/STAGE/`; the
gate is judged with the same evaluation and verdict as on a cluster. A stage starts only
when the one before it was promoted, with `run://previous` resolved to that stage's
final model. `OUTPUT/pipeline.json` records every stage's state, so running the same
command again resumes: promoted stages are not trained again, a stage that waits for a
person is judged again (`--approve NAME` / `--reject NAME` answer it), and a failed or
rejected stage trains again.

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
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from trainyard.api import InvalidResource, parse_resource
from trainyard.api.pipeline import Stage, TrainingPipeline

STATE_FILE = "pipeline.json"
STAGE_FILE = "stage.yaml"
PREVIOUS = "run://previous"
AWAITING_PERSON = 3


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
    parser.add_argument("--approve", metavar="NAME", help="approve a waiting gate as NAME")
    parser.add_argument("--reject", metavar="NAME", help="reject a waiting gate as NAME")
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
    """Where `trainyard run` leaves a run's exported model."""
    return (stage_dir / "checkpoints" / "final").resolve().as_uri()


def pipeline_command(argv: list[str]) -> int:
    from trainyard.workloads import local
    from trainyard.workloads.evaluate import local_gate

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
        if entry.get("phase") == "Gating":  # trained; its gate waited for a person
            gate_file = stage_dir / "gate.yaml"  # the gate alone: judged, nothing trained
            gate_file.write_text(yaml.safe_dump_all(stage_documents(pipeline, stage, model)[1:]))
            judge = [str(gate_file), "--output", str(stage_dir)]
            judge += ["--approve", args.approve] if args.approve else []
            judge += ["--reject", args.reject] if args.reject else []
            code = local_gate.gate_command(judge)
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
        entry["phase"] = _phase(code, stage, stage_dir)
        if entry["phase"] == "Promoted":
            model = entry["model"] = final_model(stage_dir)
            write_provenance(pipeline, stage, stage_dir, entry)
        state_path.write_text(json.dumps(state, indent=2) + "\n")
        if entry["phase"] != "Promoted":
            break
    console.print(_summary(pipeline, state, output))
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
    if (stage_dir / "checkpoints" / "final").is_dir():
        provenance.write(provenance.complete(record))


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


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
