"""The quickstart pipeline through the real CLI, once per test session, shared by the tests
that need what it promoted (tests/workloads/test_local_pipeline.py checks the run and its
resume, tests/operator/test_inference_vllm.py serves its model with vLLM).

`trainyard run examples/quickstart-pipeline.yaml --output DIR` (SFT → DPO → GRPO on
builtin://tiny-qwen2, a gate after each) is interrupted with SIGINT, as a Ctrl-C would,
while its second stage trains, then run again with the same command on the same --output
to the end. What the first stage left before the resume (its pipeline.json entry, the
promoted weights' and log's modification times and sizes) is kept, so a test can check
that the resume did not train it again.

A test module uses it with `from tests.quickstart import quickstart  # noqa: F401`; the
pipeline runs once per process however many modules import the fixture.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "quickstart-pipeline.yaml"
STAGES = ("sft", "dpo", "grpo")
TIMEOUT_S = 600  # the whole pipeline takes 60-90 s on a 2-core machine; loaded, much more


@dataclass(frozen=True)
class Run:
    argv: list[str]
    returncode: int
    output: str  # stdout and stderr together, as a terminal shows them


@dataclass(frozen=True)
class QuickstartRun:
    directory: Path  # the --output of both runs
    interrupted: Run  # SIGINT while dpo trained
    resumed: Run  # the same command again, to the end
    dpo_step_at_interrupt: int
    before_resume: dict[str, Any]  # pipeline.json after the interrupted run
    sft_files_before_resume: dict[str, tuple[int, int]]  # name → (mtime_ns, size)

    @property
    def state(self) -> dict[str, Any]:
        return json.loads((self.directory / "pipeline.json").read_text())

    def final_model(self, stage: str = "grpo") -> Path:
        return self.directory / stage / "checkpoints" / "final"


def sft_files(directory: Path) -> dict[str, tuple[int, int]]:
    """The first stage's promoted weights, its training log and its gate's status file."""
    sft = directory / "sft"
    paths = [
        sft / "checkpoints" / "final" / "model.safetensors",
        sft / "train.log",
        *sft.glob("gate-*.json"),
    ]
    return {str(p.relative_to(directory)): (p.stat().st_mtime_ns, p.stat().st_size) for p in paths}


def trainyard_command() -> str:
    """The `trainyard` command a user runs (the package's console script)."""
    script = shutil.which("trainyard") or str(Path(sys.executable).parent / "trainyard")
    if not Path(script).exists():
        pytest.fail(
            "the trainyard command is not installed: pip install -e . (scripts/install.sh)", False
        )
    return script


def _progress_step(path: Path) -> int:
    try:
        return int(json.loads(path.read_text()).get("step") or 0)
    except (OSError, ValueError, AttributeError):
        return 0


def run_interrupted(argv: list[str], directory: Path, log: Path) -> tuple[Run, int]:
    """Start the pipeline, send SIGINT once dpo has trained a step, wait for it to stop."""
    with log.open("w") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        progress = directory / "dpo" / "progress.json"
        deadline = time.monotonic() + TIMEOUT_S
        step = 0
        try:
            while process.poll() is None and time.monotonic() < deadline:
                step = _progress_step(progress)
                if step >= 1:
                    process.send_signal(signal.SIGINT)  # Ctrl-C: the runner passes it on
                    break
                time.sleep(0.2)
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            stop(process)
    text = log.read_text()
    if step < 1:
        pytest.fail(
            f"the quickstart was not interrupted while dpo trained (exit {process.returncode}, "
            f"no step in {progress}):\n{text[-4000:]}",
            False,
        )
    return Run(argv, process.returncode, text), step


def run_to_the_end(argv: list[str], log: Path) -> Run:
    with log.open("w") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            process.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(
                f"the quickstart did not finish in {TIMEOUT_S} s:\n{log.read_text()[-4000:]}", False
            )
        finally:
            stop(process)
    return Run(argv, process.returncode, log.read_text())


def stop(process: subprocess.Popen) -> None:
    """SIGTERM first: the runner passes it to its trainer (a session of its own, which a
    SIGKILL of the runner would leave behind)."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


_RUN: QuickstartRun | BaseException | None = None


def run_quickstart(directory: Path) -> QuickstartRun:
    argv = [trainyard_command(), "run", str(EXAMPLE), "--output", str(directory)]
    interrupted, step = run_interrupted(argv, directory, directory.parent / "interrupted.log")
    state = json.loads((directory / "pipeline.json").read_text())
    files = sft_files(directory) if (directory / "sft" / "train.log").exists() else {}
    resumed = run_to_the_end(argv, directory.parent / "resumed.log")
    return QuickstartRun(directory, interrupted, resumed, step, state, files)


@pytest.fixture(scope="session")
def quickstart(tmp_path_factory) -> QuickstartRun:
    """The quickstart pipeline run, interrupted in its second stage, resumed to the end."""
    global _RUN
    if _RUN is None:
        try:
            _RUN = run_quickstart(tmp_path_factory.mktemp("quickstart") / "out")
        except BaseException as error:  # a second module fails at once, without a rerun
            _RUN = error
            raise
    if isinstance(_RUN, BaseException):
        pytest.fail(f"the quickstart pipeline failed earlier in this session: {_RUN}", False)
    return _RUN
