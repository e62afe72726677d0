"""Where a local run's history is read from, and the curves drawn from it."""

from __future__ import annotations

import json

import matplotlib.image
import pytest

from trainyard.workloads.run_history import final_value, plot_curves, read_history, series

SFT_HISTORY = [
    {"loss": 2.5, "grad_norm": 1.0, "step": 1},
    {"loss": 2.1, "step": 2},
    {"eval_loss": 2.3, "step": 2},
    {"loss": 1.9, "step": 3},
    {"train_runtime": 1.5, "train_steps_per_second": 2.0, "train_loss": 2.2, "step": 3},
]
GRPO_HISTORY = [
    {"loss": 0.01, "reward": 0.2, "reward_std": 0.1, "step": 1},
    {"loss": 0.02, "reward": 0.5, "step": 2},
    {"loss": float("nan"), "reward": 0.7, "step": 3},
]


def write_state(directory, step, history):
    directory.mkdir(parents=True)
    (directory / "trainer_state.json").write_text(
        json.dumps({"global_step": step, "log_history": history})
    )


def test_result_json_is_preferred(tmp_path):
    (tmp_path / "result.json").write_text(json.dumps({"logHistory": SFT_HISTORY}))
    write_state(tmp_path / "checkpoint-9", 9, [{"loss": 9.0, "step": 9}])
    history, source = read_history(tmp_path, samples=[{"step": 4, "loss": 1.7}])
    assert source == str(tmp_path / "result.json")
    assert history == SFT_HISTORY + [{"step": 4, "loss": 1.7}]  # later samples appended


def test_newest_trainer_state_when_the_run_stopped_early(tmp_path):
    checkpoints = tmp_path / "ckpt"
    write_state(tmp_path / "checkpoint-2", 2, SFT_HISTORY[:2])
    write_state(checkpoints / "step-3", 3, SFT_HISTORY[:4])
    (tmp_path / "checkpoint-bad").mkdir()
    (tmp_path / "checkpoint-bad" / "trainer_state.json").write_text("{torn")
    history, source = read_history(
        tmp_path, checkpoints, samples=[{"step": 3, "loss": 5.0}, {"step": 5, "loss": 1.5}]
    )
    assert source == str(checkpoints / "step-3" / "trainer_state.json")
    assert history == SFT_HISTORY[:4] + [{"step": 5, "loss": 1.5}]


def test_progress_samples_when_nothing_else_exists(tmp_path):
    samples = [{"step": 1, "loss": 3.0}]
    assert read_history(tmp_path, None, samples) == (samples, "progress samples")


def test_final_values_and_series_skip_missing_and_nan():
    assert final_value(SFT_HISTORY, "loss") == 1.9
    assert final_value(GRPO_HISTORY, "loss") == 0.02
    assert final_value(SFT_HISTORY, "reward") is None
    assert series(GRPO_HISTORY, "reward") == ([1.0, 2.0, 3.0], [0.2, 0.5, 0.7])


GRPO_COMPONENTS = [
    {"loss": 0.01, "reward": 0.2, "rewards/format/mean": 0.1, "rewards/correct/mean": 0.4,
     "kl": 0.001, "completions/mean_length": 40.0, "learning_rate": 1e-6, "step": 1},
    {"loss": 0.02, "reward": 0.5, "rewards/format/mean": 0.6, "rewards/correct/mean": 0.45,
     "kl": 0.003, "completions/mean_length": 36.0, "learning_rate": 1e-6, "step": 2},
]  # fmt: skip


@pytest.mark.parametrize(
    ("history", "panels"),
    [
        pytest.param(SFT_HISTORY, [("loss", ["train loss", "eval loss"])], id="loss"),
        pytest.param(
            GRPO_HISTORY, [("loss", ["train loss"]), ("reward", ["reward (mean)"])], id="reward"
        ),
        pytest.param(
            GRPO_COMPONENTS,
            [
                ("loss", ["train loss"]),
                ("reward", ["reward (mean)", "correct", "format"]),
                ("KL", ["KL to the reference"]),
                ("completion length", ["mean completion length"]),
                ("learning rate", ["learning rate"]),
            ],
            id="grpo-components",
        ),
    ],
)
def test_plot_curves_writes_a_png_with_one_panel_per_quantity(tmp_path, history, panels):
    path = tmp_path / "curves.png"
    assert plot_curves(history, path, "run") == panels
    height, width, _ = matplotlib.image.imread(path).shape
    assert width == 700
    assert height == pytest.approx(320 * len(panels), abs=2)


def test_nothing_logged_draws_nothing(tmp_path):
    assert plot_curves([{"train_runtime": 1.0, "step": 0}], tmp_path / "c.png", "run") == []
    assert not (tmp_path / "c.png").exists()
