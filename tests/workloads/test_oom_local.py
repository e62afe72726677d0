"""`trainyard run` recovers from CUDA out-of-memory as the operator does.

CPU has no GPU memory to run out of: the workload's test hook (TRAINYARD_TEST_OOM_AT_STEP,
TRAINYARD_TEST_OOM_ABOVE_BATCH, `trainyard.workloads.oom`) raises the real
torch.OutOfMemoryError in the forward pass of a batch too large from a step on, the way
CUDA's allocator does, and nothing else is changed: the real CLI, workload, checkpoints
and resume run in subprocesses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainyard.api import parse_resource
from trainyard.api.contract import OOM_EXIT_CODE
from trainyard.workloads.local import oom_retry
from trainyard.workloads.oom import TEST_ABOVE_BATCH_ENV, TEST_AT_STEP_ENV

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "examples" / "quickstart.yaml"
OOM_LINE = (
    "CudaOutOfMemory: rank 0 at step 2 with perDeviceBatchSize 8 × gradientAccumulationSteps 1"
)


@pytest.mark.slow
def test_out_of_memory_resumes_from_the_checkpoint_with_half_the_batch(tmp_path):
    out = tmp_path / "quick"
    env = dict(
        os.environ, COLUMNS="200", PYTHONUNBUFFERED="1",
        **{TEST_AT_STEP_ENV: "2", TEST_ABOVE_BATCH_ENV: "4"},
    )  # fmt: skip
    result = subprocess.run(
        [
            sys.executable, "-m", "trainyard.cli.main", "run", str(QUICKSTART),
            "--output", str(out), "--set", "training.maxSteps=4",
            "--set", "checkpoint.everySteps=2", "--set", "training.loggingSteps=1",
            "--set", "runPolicy.oomRecovery={minPerDeviceBatchSize: 2}",
        ],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert (
        "CUDA out of memory at perDeviceBatchSize 8 × gradientAccumulationSteps 1: OOM recovery 1"
        in result.stdout
    )
    assert OOM_LINE in (out / "train.log").read_text()  # the first launch said why it stopped

    # The second launch trained the rest from step 2 with 4 × 2 instead of 8 × 1.
    training = json.loads((out / "run.json").read_text())["spec"]["training"]
    assert (training["perDeviceBatchSize"], training["gradientAccumulationSteps"]) == (4, 2)
    trained = json.loads((out / "result.json").read_text())
    assert trained["resumedFrom"].endswith("checkpoint-2")
    assert (trained["globalStep"], trained["stepsTrained"]) == (4, 2)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["oomRecovery"] == {
        "recoveries": 1,
        "perDeviceBatchSize": 4,
        "gradientAccumulationSteps": 2,
    }
    assert summary["exitCode"] == 0 and "OOM recovery" in result.stdout


def quickstart(**policy) -> object:
    import yaml

    document = yaml.safe_load(QUICKSTART.read_text())
    document["spec"]["runPolicy"] = {"maxRestarts": 2, **policy}
    return parse_resource(document)


@pytest.mark.parametrize(
    ("case", "policy", "termination", "exit_code", "recovered", "retries", "says"),
    [
        ("halves", {"oomRecovery": {}}, None, OOM_EXIT_CODE, None, True,
         "perDeviceBatchSize 4 × gradientAccumulationSteps 2"),
        ("torchrun exits 1, the message tells", {"oomRecovery": {}}, OOM_LINE, 1, None, True,
         "OOM recovery 1"),
        ("at the floor", {"oomRecovery": {"minPerDeviceBatchSize": 8}}, None, OOM_EXIT_CODE,
         None, False, "minPerDeviceBatchSize=8 allows no smaller batch"),
        ("budget used up", {"oomRecovery": {}}, None, OOM_EXIT_CODE,
         {"recoveries": 2}, False, "restart budget is used up (2 of runPolicy.maxRestarts=2)"),
        ("recovery off", {}, None, OOM_EXIT_CODE, None, False,
         "runPolicy.oomRecovery retries with a smaller batch"),
    ],
)  # fmt: skip
def test_the_runner_retries_like_the_operator(
    case, policy, termination, exit_code, recovered, retries, says
):
    retry = oom_retry(quickstart(**policy), termination, exit_code, recovered)
    assert (retry.run is not None) == retries, case
    assert says in retry.message, retry.message


def test_another_failure_is_not_retried():
    run = quickstart(oomRecovery={})
    assert oom_retry(run, "Traceback …\nValueError: bad", 1, None) is None
    assert oom_retry(run, None, 2, None) is None
