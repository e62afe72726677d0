"""`trainyard run FILE`: train a TrainingRun on this machine with the pods' own workload code.

The runner checks the spec (the same problem lines as `trainyard validate`), rewrites it
for this machine (`local_spec.localize`: file:// checkpoints under the output directory,
one node, a free metrics port), writes OUTPUT/run.json and starts

    python -m trainyard.workloads.train OUTPUT/run.json --output OUTPUT

as a child process — under `torchrun --standalone --nproc-per-node N` when N > 1 — in a
process group of its own, with its output in OUTPUT/train.log. While it trains, the
progress file the workload writes drives a progress bar; at the end a summary table is
printed, OUTPUT/summary.json and OUTPUT/curves.png are written, and the exit code is the
child's. Ctrl-C is forwarded to the child's process group (twice: SIGTERM, three times:
SIGKILL), and the runner waits for it, so checkpoints are left consistent.

Out of GPU memory: the workload exits 75 and says so in OUTPUT/termination.log
(`trainyard.workloads.oom`); with `runPolicy.oomRecovery` the runner starts it again,
resuming from the newest checkpoint with the per-device batch halved and gradient
accumulation doubled (`oom_retry`, as the operator does), and summary.json records it.

Chaining runs: the runner sets TRAINYARD_RUNS_URI (the pod contract's runs root) to
`--runs-root DIR`, else to the folder that holds the output folder, so a spec whose model
is `run://sft-run` trains from the newest output folder of run `sft-run` next to its own:

    trainyard run sft.yaml          # → runs/sft-run-20260101-120000/checkpoints/final
    trainyard run dpo.yaml          # model: run://sft-run → that final/ checkpoint
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.panel import Panel
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from trainyard.api import InvalidResource, TrainingRun, contract, manifests, parse_resource
from trainyard.workloads.evaluate import local_gate
from trainyard.workloads.local_spec import (
    RUN_FILE,
    TINY_DATA_DIR,
    LocalOptions,
    OverrideError,
    TinyData,
    apply_overrides,
    local_runs_root,
    localize,
    tiny,
)
from trainyard.workloads.run_history import RESULT_FILE, final_value, plot_curves, read_history

RUN_JSON = RUN_FILE
TRAIN_LOG = "train.log"
PROGRESS_FILE = "progress.json"
SUMMARY_FILE = "summary.json"
TERMINATION_LOG = "termination.log"
CURVES_FILE = "curves.png"
POLL_SECONDS = 0.25
TAIL_LINES = 40


class SpecProblem(Exception):
    """The file cannot be run; `lines` are printed as they are, then the runner exits 1."""

    def __init__(self, lines: list[str]):
        super().__init__("\n".join(lines))
        self.lines = lines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trainyard run",
        description=(
            "Train a TrainingRun on this machine with the same workload code the pods run: "
            "file:// checkpoints under the output directory, a progress bar, a summary and "
            "a plot of the loss/reward curves."
        ),
    )
    parser.add_argument("file", metavar="FILE", help="YAML file with one TrainingRun")
    parser.add_argument(
        "--nproc",
        type=int,
        default=1,
        metavar="N",
        help="training processes; N > 1 runs under torchrun --standalone (gloo on CPU)",
    )
    parser.add_argument(
        "-o",
        "--output",
        metavar="DIR",
        help="output directory (default: runs/NAME-YYYYmmdd-HHMMSS); "
        "running again into the same DIR resumes from its newest checkpoint",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a spec field as written in YAML, e.g. --set training.maxSteps=5, "
        "list items by index: --set grpo.rewards[1].args.max=80, a whole value as YAML: "
        "--set 'distributed.deepspeed={zeroStage: 2}' or =null to drop it (repeatable)",
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="the spec at toy size, offline: the built-in tiny model, a built-in data set of "
        "the shape the method needs (under the spec's field names), 2 steps of small batches; "
        "rewards, LoRA, DeepSpeed, packing, evaluation and checkpoints kept",
    )
    parser.add_argument(
        "--runs-root",
        metavar="DIR",
        help="where run://RUN sources look for earlier runs' output folders (default: the "
        "folder holding the output directory, e.g. runs/)",
    )
    parser.add_argument(
        "--keep-storage",
        action="store_true",
        help="keep an s3:// checkpoint.uri instead of writing checkpoints under DIR",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=0,
        metavar="PORT",
        help="port of the workload's Prometheus /metrics (default: a free one)",
    )
    return parser


def load_training_run(
    path: str, overrides: list[str], before: Any = None
) -> tuple[dict[str, Any], TrainingRun]:
    """The TrainingRun document of a file with overrides applied, checked; SpecProblem if not.
    `before(document)` changes the document first (`--tiny`), so overrides win over it."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as error:
        raise SpecProblem([f"{path}: cannot read: {error.strerror}"]) from None
    except UnicodeDecodeError as error:
        from trainyard.cli.documents import not_utf8

        raise SpecProblem([not_utf8(path, error)]) from None
    try:
        documents = [d for d in manifests.load_all(text) if d is not None]
    except yaml.YAMLError as error:
        raise SpecProblem([f"{path}: not valid YAML: {error}"]) from None
    runs = [d for d in documents if isinstance(d, dict) and d.get("kind") == "TrainingRun"]
    if len(runs) != 1:
        kinds = ", ".join(str(d.get("kind")) if isinstance(d, dict) else "?" for d in documents)
        raise SpecProblem(
            [
                f"{path}: expected exactly one TrainingRun, found {len(runs)} (documents: {kinds or 'none'})"
            ]
        )
    try:
        document = apply_overrides(before(runs[0]) if before else runs[0], overrides)
    except OverrideError as error:
        raise SpecProblem([str(error)]) from None
    try:
        run = parse_resource(document)
    except InvalidResource as invalid:
        name = (document.get("metadata") or {}).get("name")
        raise SpecProblem(
            [f"{path} (TrainingRun/{name}): invalid"] + [f"  {p}" for p in invalid.problems]
        ) from None
    return document, run


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def needs_gpu(run: TrainingRun) -> bool:
    """Whether the spec uses something only a CUDA machine runs (vLLM, bitsandbytes)."""
    spec = run.spec
    return spec.model.quantization is not None or (
        spec.rollout is not None and spec.rollout.vllm is not None
    )


TRAINING_PACKAGES = ("torch", "transformers", "trl", "peft", "datasets", "accelerate")


def missing_training_packages() -> list[str]:
    """The packages the training workload imports that this Python lacks (found without
    importing them: torch alone takes seconds)."""
    import importlib.util

    missing = []
    for name in TRAINING_PACKAGES:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    return missing


def check_local_data(run: TrainingRun, cuda: bool = False) -> list[str]:
    """Problems found before the workload starts (which takes 15-20 s to get there): a
    package the spec needs and this machine lacks, and the run's local data files (a
    missing file, an unknown suffix, the columns the format needs, read from the first
    rows and checked by the workload's own `prepare_dataset`, the GRPO batch rule)."""
    from trainyard.workloads import sources
    from trainyard.workloads.dataset_formats import DatasetFormatError, prepare_dataset
    from trainyard.workloads.methods.common import (
        Environment,
        SpecError,
        check_dataset_size,
        check_environment,
    )

    data = run.spec.dataset
    problems: list[str] = []
    try:  # packages the spec needs (DeepSpeed, bitsandbytes), as the workload checks them
        check_environment(run.spec, Environment(cuda=cuda))
    except SpecError as error:
        problems.append(str(error))
    for field_name, uri in (
        ("dataset.source", data.source),
        ("dataset.evalSource", data.eval_source),
    ):
        if not uri or not uri.startswith("file://"):
            continue
        path = Path(uri.removeprefix("file://"))
        if not path.exists():
            problems.append(f"{field_name}: {path} does not exist")
            continue
        if not path.is_file():
            continue
        try:
            sources.data_file_kind(path, field_name)
            rows = sources.first_rows(path)
            if rows:
                from datasets import Dataset

                prepare_dataset(Dataset.from_list(rows), data, run.spec.method)
            if field_name == "dataset.source" and path.suffix == ".jsonl":
                with open(path, "rb") as handle:
                    count = sum(1 for line in handle if line.strip())
                if data.max_samples is not None:
                    count = min(count, data.max_samples)
                check_dataset_size(run.spec, count, run.spec.world_size)
        except (sources.SourceError, DatasetFormatError, SpecError) as error:
            problems.append(str(error))
    return problems


def uses_run_sources(run: TrainingRun) -> bool:
    """Whether a source of the spec (model, tokenizer, reward model…) names an earlier run."""
    return '"run://' in json.dumps(run.to_yaml_dict())


def default_output_dir(name: str) -> Path:
    return Path("runs") / f"{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def workload_command(
    run_json: Path, output_dir: Path, nproc: int, torchrun: bool = False
) -> list[str]:
    """The command line of the training workload, under torchrun for several processes
    (or when `torchrun`: DeepSpeed wants torchrun's environment even for one process, else
    it looks for MPI)."""
    entry = ["-m", "trainyard.workloads.train", str(run_json), "--output", str(output_dir)]
    if nproc <= 1 and not torchrun:
        return [sys.executable, *entry]
    # `python -m torch.distributed.run` is torchrun, with this interpreter for sure.
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--standalone", "--nproc-per-node", str(nproc), *entry,
    ]  # fmt: skip


@dataclass
class ChildProcess:
    """The workload process group, and signal forwarding to it.

    The group is a session of its own, so a terminal's Ctrl-C reaches only the runner;
    the runner passes it on and waits, which leaves checkpoints consistent.
    """

    process: subprocess.Popen
    interrupts: int = 0

    def forward_interrupt(self, signum: int, frame: Any) -> None:
        # First Ctrl-C: SIGINT, so the trainer stops cleanly; then SIGTERM, then SIGKILL.
        self.interrupts += 1
        sig = {1: signal.SIGINT, 2: signal.SIGTERM}.get(self.interrupts, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, sig)

    def forward_termination(self, signum: int, frame: Any) -> None:
        # SIGTERM/SIGHUP (a CI timeout, a closed terminal): the child must not outlive us.
        self.interrupts += 1
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signum)

    def handle_signals(self) -> dict[int, Any]:
        """Install the forwarding handlers; returns the previous ones."""
        handlers = {
            signal.SIGINT: self.forward_interrupt,
            signal.SIGTERM: self.forward_termination,
            signal.SIGHUP: self.forward_termination,
        }
        return {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}

    @property
    def exit_code(self) -> int | None:
        code = self.process.poll()
        if code is None:
            return None
        # A child killed by a signal reads as a negative code; the shell writes 128 + signal.
        return 128 - code if code < 0 else code


def start_workload(
    command: list[str], output_dir: Path, env: dict[str, str] | None = None
) -> tuple[ChildProcess, Any]:
    log = open(output_dir / TRAIN_LOG, "ab")  # noqa: SIM115 - closed by the caller
    log.write(
        f"==> {datetime.now().isoformat(timespec='seconds')} {shlex.join(command)}\n".encode()
    )
    log.flush()
    env = dict(os.environ, **(env or {}), PYTHONUNBUFFERED="1")
    process = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,  # its own process group: Ctrl-C reaches it only through us
        # A runner started with SIGINT ignored (`nohup`, `cmd &` in a script) would hand
        # that on, and the trainer would never see the Ctrl-C the runner forwards.
        preexec_fn=_default_interrupt,
    )
    return ChildProcess(process), log


def _default_interrupt() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def read_progress(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


@dataclass
class Follower:
    """Samples the progress file into a history, for curves when the workload leaves none."""

    path: Path
    latest: dict[str, Any] | None = None
    samples: list[dict[str, Any]] = field(default_factory=list)

    def poll(self) -> dict[str, Any] | None:
        progress = read_progress(self.path)
        if progress is None:
            return self.latest
        self.latest = progress
        step = progress.get("step")
        sample = {"step": step}
        for key, name in (("loss", "loss"), ("rewardMean", "reward"), ("evalLoss", "eval_loss")):
            if progress.get(key) is not None:
                sample[name] = progress[key]
        if step and len(sample) > 1 and (not self.samples or self.samples[-1]["step"] != step):
            self.samples.append(sample)
        return progress


def describe_progress(progress: dict[str, Any] | None) -> tuple[str, str]:
    """(phase, stats) for the progress bar."""
    if progress is None:
        return "starting", ""
    stats = []
    if progress.get("loss") is not None:
        stats.append(f"loss {progress['loss']:.4f}")
    if progress.get("rewardMean") is not None:
        stats.append(f"reward {progress['rewardMean']:.3f}")
    if progress.get("evalLoss") is not None:
        stats.append(f"eval_loss {progress['evalLoss']:.4f}")
    return str(progress.get("phase") or "training").lower(), "  ".join(stats)


# Widest text besides the bar: spinner, phase, "123/456", two stats, two clocks, gaps.
PROGRESS_TEXT_WIDTH = 2 + 12 + 9 + 30 + 16 + 7
PROGRESS_BAR_WIDTH = (10, 40)


def progress_columns(width: int, name: str) -> list[Any]:
    """The progress bar's columns for a terminal `width` wide: the bar takes what the text
    leaves (up to 40), and goes, with the time-left estimate, when under 10 would be left,
    so the steps and the loss are never cut (a bare 80-column terminal)."""
    room = width - PROGRESS_TEXT_WIDTH - len(name)
    columns: list[Any] = [
        SpinnerColumn(),
        TextColumn("[bold]{task.fields[name]}[/] {task.fields[phase]}"),
    ]
    if room >= PROGRESS_BAR_WIDTH[0]:
        columns.append(BarColumn(bar_width=min(room, PROGRESS_BAR_WIDTH[1])))
    columns += [MofNCompleteColumn(), TextColumn("{task.fields[stats]}"), TimeElapsedColumn()]
    if room >= PROGRESS_BAR_WIDTH[0]:
        columns.append(TimeRemainingColumn())
    return columns


def follow(child: ChildProcess, follower: Follower, console: Console, name: str) -> None:
    """Drive the progress bar until the child exits."""
    with Progress(*progress_columns(console.width, name), console=console, transient=False) as bar:
        task = bar.add_task("train", total=None, name=name, phase="starting", stats="")
        while child.exit_code is None:
            progress = follower.poll()
            phase, stats = describe_progress(progress)
            total = (progress or {}).get("totalSteps")
            bar.update(
                task,
                completed=(progress or {}).get("step") or 0,
                total=total or None,
                phase=phase if not child.interrupts else "stopping",
                stats=stats,
            )
            time.sleep(POLL_SECONDS)
        progress = follower.poll()
        phase, stats = describe_progress(progress)
        bar.update(
            task,
            completed=(progress or {}).get("step") or 0,
            total=(progress or {}).get("totalSteps") or None,
            phase=phase,
            stats=stats,
        )


def tail(path: Path, lines: int = TAIL_LINES) -> str:
    try:
        with open(path, errors="replace") as handle:
            return "".join(deque(handle, maxlen=lines))
    except OSError:
        return ""


def local_path(uri: str) -> Path | None:
    return Path(uri.removeprefix("file://")) if uri.startswith("file://") else None


def checkpoint_location(uri: str) -> str:
    """Where the newest complete checkpoint of the run lies (its final export first)."""
    root = local_path(uri)
    if root is None:
        return uri
    if (root / "final" / "manifest.json").is_file():
        return str(root / "final")
    steps = sorted(
        (int(p.name.removeprefix("step-")), p)
        for p in root.glob("step-*")
        if p.name.removeprefix("step-").isdigit() and (p / "manifest.json").is_file()
    )
    return str(steps[-1][1]) if steps else f"{root} (no complete checkpoint)"


def summarize(
    run: TrainingRun,
    output_dir: Path,
    follower: Follower,
    exit_code: int,
    wall_seconds: float,
) -> dict[str, Any]:
    """The numbers the summary table shows, also written to OUTPUT/summary.json."""
    checkpoint_uri = run.spec.checkpoint.uri if run.spec.checkpoint else None
    history, history_source = read_history(
        output_dir,
        local_path(checkpoint_uri) if checkpoint_uri else None,
        follower.samples,
    )
    progress = follower.latest or {}
    result = read_result(output_dir)
    end = next((e for e in reversed(history) if "train_runtime" in e), {})
    if result.get("stepsTrained") == 0:
        end = {}  # a launch that resumed at its last step: no rate, no runtime of its own
    steps = progress.get("step") or max((e.get("step", 0) for e in history), default=0)
    train_runtime = end.get("train_runtime")
    curves = output_dir / CURVES_FILE
    plotted = plot_curves(history, curves, f"{run.metadata.name} ({run.spec.method})")
    return {
        "name": run.metadata.name,
        "method": run.spec.method,
        "exitCode": exit_code,
        "steps": steps,
        "totalSteps": progress.get("totalSteps"),
        "finalLoss": result.get("lastLoss", final_value(history, "loss") or progress.get("loss")),
        "finalLossStep": last_step_of(history, "loss"),
        "finalReward": final_value(history, "reward") or progress.get("rewardMean"),
        "finalEvalLoss": final_value(history, "eval_loss") or progress.get("evalLoss"),
        "trainRuntimeSeconds": train_runtime,
        "trainStepsPerSecond": end.get("train_steps_per_second"),
        "wallSeconds": wall_seconds,
        "wallStepsPerSecond": steps / wall_seconds if wall_seconds > 0 else None,
        "checkpoint": checkpoint_location(checkpoint_uri) if checkpoint_uri else None,
        "resumedFrom": result.get("resumedFrom"),
        "stepsTrained": result.get("stepsTrained"),
        "curves": str(curves) if plotted else None,
        "history": history_source,
        "log": str(output_dir / TRAIN_LOG),
        "progress": str(output_dir / PROGRESS_FILE)
        if (output_dir / PROGRESS_FILE).exists()
        else None,
    }


def read_result(output_dir: Path) -> dict[str, Any]:
    """The workload's result.json, {} when it wrote none (a run that stopped early)."""
    try:
        result = json.loads((output_dir / RESULT_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return result if isinstance(result, dict) else {}


def last_step_of(history: list[dict], key: str) -> int | None:
    """The step of the last finite value logged under key."""
    for entry in reversed(history):
        if final_value([entry], key) is not None:
            step = entry.get("step")
            return int(step) if isinstance(step, int | float) else None
    return None


def summary_table(summary: dict[str, Any]) -> Table:
    def number(value: Any, fmt: str) -> str:
        return "—" if value is None else format(value, fmt)

    ok = summary["exitCode"] == 0
    table = Table(
        title=f"{summary['name']} ({summary['method']}): "
        + ("[green]finished[/]" if ok else f"[red]exited {summary['exitCode']}[/]"),
        show_header=False,
    )
    table.add_column(style="bold")
    table.add_column()
    total = summary["totalSteps"]
    table.add_row("steps", f"{summary['steps']}" + (f" / {total}" if total else ""))
    loss = number(summary["finalLoss"], ".4f")
    loss_step = summary.get("finalLossStep")
    if summary["finalLoss"] is not None and loss_step is not None and loss_step != summary["steps"]:
        loss += f" (logged at step {loss_step})"
    table.add_row("final loss", loss)
    if summary["finalReward"] is not None:
        table.add_row("final reward", number(summary["finalReward"], ".4f"))
    if summary["finalEvalLoss"] is not None:
        table.add_row("final eval loss", number(summary["finalEvalLoss"], ".4f"))
    table.add_row(
        "runtime",
        f"{summary['wallSeconds']:.1f} s wall"
        + (
            f", {summary['trainRuntimeSeconds']:.1f} s training"
            if summary["trainRuntimeSeconds"]
            else ""
        ),
    )
    rate = summary["trainStepsPerSecond"] or summary["wallStepsPerSecond"]
    trained = summary.get("stepsTrained")
    table.add_row("steps/s", number(rate if summary["steps"] and trained != 0 else None, ".2f"))
    if summary.get("resumedFrom"):
        table.add_row(
            "resumed from", f"{summary['resumedFrom']} ({trained} steps trained this time)"
        )
    if summary.get("oomRecovery"):
        oom = summary["oomRecovery"]
        table.add_row(
            "OOM recovery",
            f"{oom['recoveries']}× out of GPU memory; now perDeviceBatchSize "
            f"{oom['perDeviceBatchSize']} × gradientAccumulationSteps "
            f"{oom['gradientAccumulationSteps']}",
        )
    table.add_row("checkpoint", summary["checkpoint"] or "—")
    table.add_row("curves", summary["curves"] or "— (nothing logged)")
    table.add_row("log", summary["log"])
    return table


def read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


@dataclass(frozen=True)
class OOMRetry:
    """What the runner does after the workload ran out of GPU memory: train `run` (the
    smaller batch) next, or stop when `run` is None; `message` says which and why."""

    run: TrainingRun | None
    message: str
    status: dict[str, int] | None = None


def oom_retry(
    run: TrainingRun, termination: str | None, exit_code: int, recovered: dict[str, int] | None
) -> OOMRetry | None:
    """The operator's `runPolicy.oomRecovery` on this machine: after CUDA out-of-memory
    (the workload's exit status or termination message) the run goes on from its newest
    checkpoint with the per-device batch halved and gradient accumulation doubled, each
    retry counted against runPolicy.maxRestarts, down to minPerDeviceBatchSize. None when
    the workload failed for another reason."""
    if not contract.is_oom_termination((termination or "").strip(), exit_code):
        return None
    training, policy = run.spec.training, run.spec.run_policy
    at = (
        f"CUDA out of memory at perDeviceBatchSize {training.per_device_batch_size} × "
        f"gradientAccumulationSteps {training.gradient_accumulation_steps}"
    )
    settings = policy.oom_recovery
    if settings is None or not settings.enabled:
        return OOMRetry(None, f"{at}; runPolicy.oomRecovery retries with a smaller batch")
    smaller = settings.next_batch(
        training.per_device_batch_size, training.gradient_accumulation_steps, run.spec
    )
    if smaller is None:
        return OOMRetry(
            None,
            f"{at}, and runPolicy.oomRecovery.minPerDeviceBatchSize="
            f"{settings.min_per_device_batch_size} allows no smaller batch: lower "
            "training.maxLength, set training.gradientCheckpointing or use a GPU with more memory",
        )
    recoveries = (recovered or {}).get("recoveries", 0)
    if recoveries >= policy.max_restarts:
        return OOMRetry(
            None,
            f"{at}; the restart budget is used up ({recoveries} of runPolicy.maxRestarts="
            f"{policy.max_restarts})",
        )
    per_device, accumulation = smaller
    smaller_training = training.model_copy(
        update={"per_device_batch_size": per_device, "gradient_accumulation_steps": accumulation}
    )
    return OOMRetry(
        run.model_copy(update={"spec": run.spec.model_copy(update={"training": smaller_training})}),
        f"{at}: OOM recovery {recoveries + 1} (restart {recoveries + 1} of "
        f"{policy.max_restarts}), resuming from the newest checkpoint with perDeviceBatchSize "
        f"{per_device} × gradientAccumulationSteps {accumulation}, the same effective batch",
        {
            "recoveries": recoveries + 1,
            "perDeviceBatchSize": per_device,
            "gradientAccumulationSteps": accumulation,
        },
    )


def run_command(argv: list[str]) -> int:
    """`trainyard run`; returns the training process's exit code (1 for a bad spec), or the
    verdict of the file's PromotionGates on the run (`evaluate.local_gate`); a file with a
    TrainingPipeline runs its stages (`local_pipeline`)."""
    from trainyard.workloads import local_pipeline

    if not {"-h", "--help"} & set(argv) and local_pipeline.pipeline_file_in(argv):
        return local_pipeline.pipeline_command(argv)
    try:
        # `--help` is the runner's own, not the gate judge's.
        gates_only = not {"-h", "--help"} & set(argv) and local_gate.gate_file_in(argv)
    except UnicodeDecodeError:
        gates_only = None  # load_training_run below says what is wrong with the file
    if gates_only:  # only gates in the file: judge, do not train
        return local_gate.gate_command(argv)
    args = build_parser().parse_args(argv)
    missing = missing_training_packages()
    if missing:
        print(
            f"trainyard run: {', '.join(missing)} not installed; training needs the train extra: "
            "pip install 'trainyard[train]'",
            file=sys.stderr,
        )
        return 1
    console = Console()
    if args.nproc < 1:
        print(f"--nproc: {args.nproc} is not allowed; allowed: 1 or more")
        return 1
    try:
        document, run = load_training_run(args.file, args.overrides)
        gates = local_gate.gates_for_run(args.file, run.metadata.name)
    except (SpecProblem, local_gate.GateProblem) as problem:
        for line in problem.lines:
            print(line)  # plain, unwrapped: the same lines as `trainyard validate`
        return 1

    output_dir = Path(args.output) if args.output else default_output_dir(run.metadata.name)
    tiny_notes: list[str] = []
    tiny_data = TinyData()
    if args.tiny:

        def shrink(document: dict[str, Any]) -> dict[str, Any]:
            nonlocal tiny_notes, tiny_data
            shrunk, tiny_data = tiny(document, output_dir)
            tiny_notes = shrunk.notes
            return shrunk.document

        try:
            document, run = load_training_run(args.file, args.overrides, before=shrink)
        except SpecProblem as problem:
            for line in problem.lines:
                print(line)
            return 1
    options = LocalOptions(
        output_dir=output_dir,
        nproc=args.nproc,
        metrics_port=args.metrics_port or free_port(),
        # Importing torch costs the runner seconds; only these two fields depend on CUDA.
        cuda=needs_gpu(run) and cuda_available(),
        keep_storage=args.keep_storage,
    )
    local = localize(run.to_yaml_dict(), options)
    local.notes[:0] = tiny_notes
    try:
        # Checked again: --nproc changes the world size that the batch rules depend on.
        run = parse_resource(local.document)
    except InvalidResource as invalid:
        print(f"{args.file} (TrainingRun/{run.metadata.name}): invalid on this machine")
        for problem in invalid.problems:
            print(f"  {problem}")
        return 1
    output_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in tiny_data.files.items():
        (output_dir / TINY_DATA_DIR).mkdir(exist_ok=True)
        with open(output_dir / TINY_DATA_DIR / name, "w") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)
    problems = check_local_data(run, cuda=options.cuda)
    if problems:
        print(f"{args.file} (TrainingRun/{run.metadata.name}): cannot be trained here")
        for problem in problems:
            print(f"  {problem}")
        return 1
    # Files of an earlier attempt in the same directory would pass for this one's
    # (a failed start would show the old loss); checkpoints stay, for resuming.
    for stale in (PROGRESS_FILE, RESULT_FILE, SUMMARY_FILE, CURVES_FILE):
        (output_dir / stale).unlink(missing_ok=True)
    run_json = output_dir / RUN_JSON
    run_json.write_text(json.dumps(run.to_yaml_dict(), indent=2) + "\n")

    console.print(f"[bold]trainyard run[/] {run.metadata.name} ({run.spec.method}) → {output_dir}")
    for note in local.notes:
        console.print(f"  [dim]{note}[/]", highlight=False, soft_wrap=True)
    console.print(f"  [dim]metrics: http://127.0.0.1:{options.metrics_port}/metrics[/]")

    runs_root = (
        local_runs_root(output_dir, Path(args.runs_root))
        if args.runs_root
        else os.environ.get(contract.Env.RUNS_URI) or local_runs_root(output_dir)
    )
    if uses_run_sources(run):
        console.print(f"  [dim]run:// sources: under {runs_root}[/]", highlight=False)

    command = workload_command(
        run_json, output_dir, args.nproc, torchrun=run.spec.distributed.deepspeed is not None
    )
    started = time.monotonic()
    follower = Follower(output_dir / PROGRESS_FILE)
    termination = output_dir / TERMINATION_LOG
    recovered: dict[str, int] | None = None
    while True:
        termination.unlink(missing_ok=True)
        child, log = start_workload(
            command,
            output_dir,
            {contract.Env.RUNS_URI: runs_root, contract.Env.TERMINATION_LOG: str(termination)},
        )
        # Python delivers signals to the main thread only (run_command may run in another).
        in_main_thread = threading.current_thread() is threading.main_thread()
        previous = child.handle_signals() if in_main_thread else {}
        try:
            follow(child, follower, console, run.metadata.name)
            child.process.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            log.close()
        exit_code = child.exit_code or 0
        if exit_code == 0 or child.interrupts:
            break
        retry = oom_retry(run, read_text(termination), exit_code, recovered)
        if retry is None:
            break
        console.print(retry.message, style="yellow", markup=False, highlight=False, soft_wrap=True)
        if retry.run is None:
            break
        run, recovered = retry.run, retry.status
        run_json.write_text(json.dumps(run.to_yaml_dict(), indent=2) + "\n")
    wall = time.monotonic() - started

    summary = summarize(run, output_dir, follower, exit_code, wall)
    if recovered is not None:
        summary["oomRecovery"] = recovered
    (output_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    if child.interrupts:
        # The traceback of a KeyboardInterrupt says nothing the user does not know.
        console.print(
            f"interrupted at step {summary['steps']}; `trainyard run {args.file} --output "
            f"{output_dir}` resumes from the newest complete checkpoint",
            markup=False, highlight=False, soft_wrap=True,
        )  # fmt: skip
    elif exit_code != 0:
        console.print(
            Panel(
                Text(tail(output_dir / TRAIN_LOG)),
                title=Text(f"training exited {exit_code}: last lines of {summary['log']}"),
                border_style="red",
            )
        )
    console.print(summary_table(summary))
    if exit_code == 0 and not child.interrupts:
        return local_gate.judge_after_run(gates, run, output_dir, console)
    return exit_code


def main() -> int:
    return run_command(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
