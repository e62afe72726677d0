"""`trainyard run`: the real CLI, the real workload, a built-in tiny model on CPU.

Every run here goes through `python -m trainyard.cli.main run …` in a subprocess, which
starts `python -m trainyard.workloads.train` (under torchrun for --nproc 2) exactly as a
user's shell would; nothing is patched.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainyard.workloads.local import run_command

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "examples" / "quickstart.yaml"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.slow


def trainyard(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trainyard.cli.main", *args],
        cwd=cwd,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def cli_env() -> dict[str, str]:
    # Wide enough that rich does not wrap the summary table's paths.
    return dict(os.environ, COLUMNS="200", PYTHONUNBUFFERED="1")


def assert_valid_png(path: Path) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_MAGIC
    height, width, _ = matplotlib.image.imread(path).shape
    assert width > 100 and height > 100


def test_quickstart_trains_checkpoints_plots_and_resumes(tmp_path):
    out = tmp_path / "quick"
    first = trainyard(
        "run", str(QUICKSTART), "--output", str(out),
        "--set", "training.maxSteps=3", "--set", "checkpoint.everySteps=2",
        "--set", "training.loggingSteps=1",
        cwd=tmp_path,
    )  # fmt: skip
    assert first.returncode == 0, first.stdout + first.stderr

    # The summary table, with the numbers the workload logged.
    assert "quickstart (sft): finished" in first.stdout
    assert "final loss" in first.stdout and "steps/s" in first.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["totalSteps"] == 3
    assert summary["finalLoss"] > 0
    assert summary["trainStepsPerSecond"] > 0
    assert str(out / "checkpoints" / "final") in first.stdout

    # Checkpoints under OUTPUT/checkpoints, not the spec's s3:// bucket, with manifests.
    run = json.loads((out / "run.json").read_text())
    assert run["spec"]["checkpoint"]["uri"] == f"file://{(out / 'checkpoints').resolve()}"
    assert "instead of s3://checkpoints/quickstart" in first.stdout
    assert (out / "checkpoints" / "step-2" / "manifest.json").is_file()
    assert (out / "checkpoints" / "final" / "manifest.json").is_file()
    assert (out / "checkpoints" / "final" / "adapter_config.json").is_file()  # LoRA adapter
    # The trainer also saves at its last step, so `latest` names step 3.
    assert json.loads((out / "checkpoints" / "latest").read_text())["step"] == 3

    # Metrics and the plot drawn from the logged history (one loss per step).
    progress = json.loads((out / "progress.json").read_text())
    assert progress["step"] == 3 and progress["loss"] == pytest.approx(summary["finalLoss"])
    assert summary["history"] == str(out / "result.json")
    assert_valid_png(out / "curves.png")
    assert "trainyard.train" in (out / "train.log").read_text()

    # One number for "the loss": the last logged one, in result.json, the summary, the
    # progress file and the log line alike (the run's mean is result.json's trainLoss).
    result = json.loads((out / "result.json").read_text())
    logged = [e["loss"] for e in result["logHistory"] if "loss" in e]
    assert result["lastLoss"] == summary["finalLoss"] == logged[-1]
    assert f"loss {logged[-1]:.4f}; final model" in (out / "train.log").read_text()
    assert result["stepsTrained"] == 3

    # Running again into the same directory continues from the newest checkpoint.
    second = trainyard(
        "run", str(QUICKSTART), "--output", str(out), "--set", "training.maxSteps=4",
        cwd=tmp_path,
    )  # fmt: skip
    assert second.returncode == 0, second.stdout + second.stderr
    result = json.loads((out / "result.json").read_text())
    assert result["resumedFrom"] is not None and result["resumedFrom"].endswith("checkpoint-3")
    assert result["globalStep"] == 4 and result["stepsTrained"] == 1
    assert "resumed from" in second.stdout and "(1 steps trained this time)" in second.stdout

    # Once more at the same maxSteps: the numbers are this launch's own.
    third = trainyard(
        "run", str(QUICKSTART), "--output", str(out), "--set", "training.maxSteps=4",
        cwd=tmp_path,
    )  # fmt: skip
    assert third.returncode == 0, third.stdout + third.stderr
    result = json.loads((out / "result.json").read_text())
    resumed = int(result["resumedFrom"].rsplit("-", 1)[1])
    assert result["stepsTrained"] == result["globalStep"] - resumed
    assert f"({result['stepsTrained']} steps trained this time)" in third.stdout
    if result["stepsTrained"] == 0:
        summary = json.loads((out / "summary.json").read_text())
        assert result["trainLoss"] is None and summary["trainStepsPerSecond"] is None


def test_two_local_runs_chain_through_run_sources_with_no_setting(tmp_path):
    """`run://NAME` finds the newest default output folder of run NAME beside its own
    (runs/NAME-YYYYmmdd-HHMMSS): the runner sets the runs root, the user sets nothing."""
    env = {k: v for k, v in cli_env().items() if k != "TRAINYARD_RUNS_URI"}

    def run_cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "trainyard.cli.main", "run", str(QUICKSTART), *args],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip

    first = run_cli("--set", "metadata.name=sft-base", "--set", "training.maxSteps=2")
    assert first.returncode == 0, first.stdout + first.stderr
    (sft_dir,) = (tmp_path / "runs").glob("sft-base-*")
    final = sft_dir / "checkpoints" / "final"
    assert (final / "manifest.json").is_file()

    second = run_cli(
        "--set", "metadata.name=sft-more", "--set", "model.source=run://sft-base",
        "--set", "training.maxSteps=1",
    )  # fmt: skip
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"run:// sources: under file://{(tmp_path / 'runs').resolve()}" in second.stdout
    (more_dir,) = (tmp_path / "runs").glob("sft-more-*")
    log = (more_dir / "train.log").read_text()
    assert str(final.resolve()) in log, log[-3000:]

    # A run that was never trained: the message says where it looked and what to do.
    third = run_cli(
        "--set", "metadata.name=sft-third", "--set", "model.source=run://never-trained",
        "--set", "training.maxSteps=1",
    )  # fmt: skip
    assert third.returncode == 2
    message = " ".join(third.stdout.replace("│", " ").split())  # unwrapped from the panel
    assert "nor does any output folder of `trainyard run` for run 'never-trained'" in message
    assert "`trainyard run --runs-root DIR`" in message


def test_nproc_2_runs_two_ranks_under_torchrun(tmp_path):
    out = tmp_path / "ddp"
    done = trainyard(
        "run", str(QUICKSTART), "--output", str(out), "--nproc", "2",
        "--set", "training.maxSteps=2", "--set", "training.perDeviceBatchSize=4",
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    # The workload reads WORLD_SIZE from torchrun's environment and records it.
    result = json.loads((out / "result.json").read_text())
    assert result["worldSize"] == 2
    log = (out / "train.log").read_text()
    assert "[rank1]" in log or "rank 1" in log.lower()
    assert json.loads((out / "run.json").read_text())["spec"]["distributed"]["gpusPerNode"] == 2
    assert "1 node × 2 processes" in done.stdout
    assert (out / "checkpoints" / "final" / "manifest.json").is_file()


def test_a_failing_workload_exit_code_and_log_tail_come_through(tmp_path):
    out = tmp_path / "failed"
    done = trainyard(
        "run", str(QUICKSTART), "--output", str(out), "--set", "model.source=builtin://nope",
        cwd=tmp_path,
    )  # fmt: skip
    # The workload exits 2 for a source it cannot resolve; the runner passes that on.
    assert done.returncode == 2, done.stdout + done.stderr
    assert "training exited 2: last lines of" in done.stdout
    assert "unknown built-in model 'nope'" in done.stdout
    assert "quickstart (sft): exited 2" in done.stdout
    assert json.loads((out / "summary.json").read_text())["exitCode"] == 2


@pytest.mark.parametrize(
    ("signum", "exit_code"),
    [
        # Ctrl-C in a terminal; Python dies of the forwarded SIGINT: 128 + 2.
        pytest.param(signal.SIGINT, 130, id="ctrl-c"),
        # A CI timeout or `kill`: the workload must not outlive the runner.
        pytest.param(signal.SIGTERM, 143, id="sigterm"),
        # A runner started with SIGINT ignored (`nohup`, `cmd &` in a script) still passes
        # a Ctrl-C on: the trainer gets Python's default handler back.
        pytest.param("ignored-sigint", 130, id="ctrl-c-with-sigint-ignored"),
    ],
)
def test_signals_stop_the_workload_and_return_its_exit_code(tmp_path, signum, exit_code):
    out = tmp_path / "interrupted"
    ignored = signum == "ignored-sigint"
    signum = signal.SIGINT if ignored else signum
    runner = subprocess.Popen(
        [
            sys.executable, "-m", "trainyard.cli.main", "run", str(QUICKSTART),
            "--output", str(out), "--set", "training.maxSteps=100000",
            "--set", "training.loggingSteps=1",
        ],
        cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignored else None,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and runner.poll() is None:
            try:
                if json.loads((out / "progress.json").read_text())["step"] >= 1:
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.5)
        assert runner.poll() is None, runner.stdout.read()
        runner.send_signal(signum)
        output, _ = runner.communicate(timeout=120)
    finally:
        if runner.poll() is None:
            runner.kill()
    assert runner.returncode == exit_code, output
    assert "interrupted at step" in output
    assert "Traceback" not in output
    run_json = str(out / "run.json")
    leftovers = [pid for pid in os.listdir("/proc") if pid.isdigit() and run_json in _cmdline(pid)]
    assert leftovers == []


def test_the_progress_line_keeps_steps_and_loss_in_80_columns(tmp_path):
    """At 80 columns the bar gives way; the steps, the loss and the reward stay whole."""
    import io

    from rich.console import Console

    from trainyard.workloads.local import ChildProcess, Follower, follow

    progress = tmp_path / "progress.json"
    numbers = {
        "phase": "Training",
        "step": 20,
        "totalSteps": 400,
        "loss": 6.2425,
        "rewardMean": 0.5,
    }
    # Writes the numbers, then lives on for a moment, as a workload does.
    writer = (
        f"import json, time; json.dump({numbers!r}, open({str(progress)!r}, 'w')); time.sleep(1)"
    )
    lines = {}
    for width in (80, 160):
        out = io.StringIO()
        child = ChildProcess(subprocess.Popen([sys.executable, "-c", writer]))
        follow(child, Follower(progress), Console(file=out, width=width), "helpful-ipo")
        lines[width] = out.getvalue().strip().splitlines()[-1]
    for width, line in lines.items():
        assert len(line) <= width and "…" not in line, line
        assert "20/400" in line and "loss 6.2425" in line and "reward 0.500" in line
    assert "━" in lines[160]  # a bar where there is room


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_bad_spec_exits_1_with_the_field_path(tmp_path, capsys):
    spec = tmp_path / "bad.yaml"
    spec.write_text(QUICKSTART.read_text().replace("learningRate: 3.0e-3", "learningRate: -1"))
    code = run_command(
        [str(spec), "--output", str(tmp_path / "never"), "--set", "training.maxStep=3"]
    )
    printed = capsys.readouterr().out
    assert code == 1
    assert f"{spec} (TrainingRun/quickstart): invalid" in printed
    assert "spec.training.learningRate: must be greater than 0; got -1" in printed
    assert "spec.training.maxStep: unknown field; did you mean 'maxSteps'?" in printed
    assert not (tmp_path / "never").exists()  # nothing started


def test_bad_spec_through_the_cli_prints_validate_lines(tmp_path):
    done = trainyard(
        "run", str(QUICKSTART), "--set", "method=ppo", "--set", "peft.r=0", cwd=tmp_path
    )
    validate = trainyard("validate", str(QUICKSTART), cwd=tmp_path)
    assert validate.returncode == 0
    assert done.returncode == 1
    assert "spec.method: 'ppo' is not allowed; allowed:" in done.stdout
    assert "spec.peft.r: must be greater than or equal to 1; got 0" in done.stdout
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(["--set", "training.maxSteps"], "expected key=value", id="no-equals"),
        pytest.param(["--set", "training..maxSteps=3"], "is not a field path", id="empty-part"),
        pytest.param(["--set", "method.x=1"], "spec.method is not a mapping", id="into-a-scalar"),
        pytest.param(["--nproc", "0"], "--nproc: 0 is not allowed", id="nproc-0"),
    ],
)
def test_bad_arguments_exit_1_and_say_why(tmp_path, capsys, args, message):
    assert run_command([str(QUICKSTART), "--output", str(tmp_path / "x"), *args]) == 1
    assert message in capsys.readouterr().out


def test_a_file_without_exactly_one_training_run_is_refused(tmp_path, capsys):
    spec = tmp_path / "two.yaml"
    spec.write_text(QUICKSTART.read_text() + "---\n" + QUICKSTART.read_text())
    assert run_command([str(spec)]) == 1
    assert "expected exactly one TrainingRun, found 2" in capsys.readouterr().out
