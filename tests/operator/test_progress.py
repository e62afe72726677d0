"""Rank 0's numbers → status.progress, read from what the workload really exports."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from trainyard.operator.progress import (
    MetricsSample,
    next_progress,
    parse_metrics_text,
    parse_progress_json,
)

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def workload_metrics(tmp_path_factory):
    """The workload's own TrainingMetrics after a few logged steps (the contract under test)."""
    metrics_module = pytest.importorskip("trainyard.workloads.metrics")
    path = tmp_path_factory.mktemp("progress") / "progress.json"
    metrics = metrics_module.TrainingMetrics(progress_path=path)
    metrics.record_log(
        {"loss": 2.0, "epoch": 0.1, "num_tokens": 1000.0}, step=10, total_steps=100, now=0.0
    )
    metrics.record_log(
        {"loss": 1.25, "reward": 0.5, "kl": 0.01, "epoch": 0.2, "num_tokens": 3000.0},
        step=20,
        total_steps=100,
        now=2.0,
    )
    return metrics, path


def test_prometheus_text_of_the_workload_parses_into_a_sample(workload_metrics):
    from prometheus_client import generate_latest

    metrics, _ = workload_metrics
    sample = parse_metrics_text(generate_latest(metrics.registry).decode())
    assert sample == MetricsSample(
        step=20,
        total_steps=100,
        epoch=0.2,
        loss=1.25,
        reward_mean=0.5,
        kl=0.01,
        tokens_per_second=1000.0,
        checkpoint_step=None,
    )


def test_progress_file_of_the_workload_parses_into_the_same_sample(workload_metrics):
    from prometheus_client import generate_latest

    metrics, path = workload_metrics
    assert parse_progress_json(path.read_text()) == parse_metrics_text(
        generate_latest(metrics.registry).decode()
    )


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        (
            "unknown values are NaN and left out",
            "trainyard_step 3\ntrainyard_loss NaN\n",
            MetricsSample(step=3),
        ),
        (
            "labelled series are not the scalar",
            'trainyard_reward_component_mean{component="a"} 1\ntrainyard_step 1\n',
            MetricsSample(step=1),
        ),
        ("nothing known yet", "", MetricsSample()),
    ],
)
def test_metrics_text_table(name, text, expected):
    assert parse_metrics_text(text) == expected, name


def test_progress_moves_with_the_step_and_estimates_the_eta():
    first = next_progress(None, MetricsSample(step=10, total_steps=110, loss=2.0), T0)
    assert first == {
        "step": 10,
        "totalSteps": 110,
        "loss": 2.0,
        "updatedAt": "2026-01-01T12:00:00Z",
    }
    second = next_progress(
        first, MetricsSample(step=20, total_steps=110, loss=1.5), T0 + timedelta(seconds=50)
    )
    assert second["etaSeconds"] == 450  # 5 s a step, 90 steps left
    assert second["updatedAt"] == "2026-01-01T12:00:50Z"


def test_same_step_keeps_the_progress_so_the_stall_clock_is_not_reset():
    first = next_progress(None, MetricsSample(step=10, loss=2.0), T0)
    assert (
        next_progress(first, MetricsSample(step=10, loss=1.9), T0 + timedelta(minutes=30)) is first
    )
    assert next_progress(first, None, T0 + timedelta(minutes=30)) is first
