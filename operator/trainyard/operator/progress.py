"""Training progress from rank 0: Prometheus text or the progress JSON → `status.progress`.

The workload (`trainyard.workloads.metrics`) exports the gauges the pod contract names
(`trainyard.api.contract.Metric`); an unknown value is NaN there and left out here. Progress only changes when the step
moves, so `progress.updatedAt` says when the run last advanced (the stall clock).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from trainyard.api.contract import PROGRESS_GAUGES
from trainyard.operator.status import format_time, parse_time

# status.progress field → workload gauge (unlabelled samples only), from the pod contract.
GAUGES: dict[str, str] = PROGRESS_GAUGES
INTEGER_FIELDS = frozenset({"step", "totalSteps", "checkpointStep"})


@dataclass(frozen=True)
class MetricsSample:
    """One reading of rank 0's numbers; None where the workload does not know yet."""

    step: int | None = None
    total_steps: int | None = None
    epoch: float | None = None
    loss: float | None = None
    reward_mean: float | None = None
    kl: float | None = None
    tokens_per_second: float | None = None
    checkpoint_step: int | None = None


_FIELD_NAMES = {
    "step": "step",
    "totalSteps": "total_steps",
    "epoch": "epoch",
    "loss": "loss",
    "rewardMean": "reward_mean",
    "kl": "kl",
    "tokensPerSecond": "tokens_per_second",
    "checkpointStep": "checkpoint_step",
}


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _sample(values: dict[str, float | None]) -> MetricsSample:
    kwargs: dict[str, Any] = {}
    for key, attr in _FIELD_NAMES.items():
        value = values.get(key)
        if value is not None:
            kwargs[attr] = int(value) if key in INTEGER_FIELDS else value
    return MetricsSample(**kwargs)


def parse_metrics_text(text: str) -> MetricsSample:
    """Read the workload's gauges from Prometheus exposition text.

    >>> parse_metrics_text('trainyard_step 12.0\\ntrainyard_loss 1.5\\ntrainyard_kl NaN\\n')
    MetricsSample(step=12, total_steps=None, epoch=None, loss=1.5, reward_mean=None, kl=None, tokens_per_second=None, checkpoint_step=None)
    """
    by_name: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.labels:
                by_name[sample.name] = sample.value
    return _sample({key: _finite(by_name.get(gauge)) for key, gauge in GAUGES.items()})


def parse_progress_json(text: str) -> MetricsSample:
    """Read the workload's progress file (the same numbers, camelCase JSON)."""
    data = json.loads(text)
    values = {key: _finite(data.get(key)) for key in GAUGES if key != "checkpointStep"}
    values["checkpointStep"] = _finite((data.get("checkpoint") or {}).get("lastStep"))
    return _sample(values)


def next_progress(
    previous: dict[str, Any] | None, sample: MetricsSample | None, now: datetime
) -> dict[str, Any] | None:
    """status.progress after reading `sample`; the previous progress when the step did not move."""
    if sample is None or sample.step is None:
        return previous
    if previous is not None and previous.get("step") == sample.step:
        return previous
    progress: dict[str, Any] = {
        "step": sample.step,
        "totalSteps": sample.total_steps,
        "epoch": sample.epoch,
        "loss": sample.loss,
        "rewardMean": sample.reward_mean,
        "kl": sample.kl,
        "tokensPerSecond": sample.tokens_per_second,
        "etaSeconds": estimate_eta(previous, sample, now),
        "updatedAt": format_time(now),
    }
    return {k: v for k, v in progress.items() if v is not None}


def estimate_eta(
    previous: dict[str, Any] | None, sample: MetricsSample, now: datetime
) -> int | None:
    """Seconds left at the pace since the previous reading (steps per second)."""
    if sample.total_steps is None or sample.step is None or previous is None:
        return None
    before, since = previous.get("step"), parse_time(previous.get("updatedAt"))
    if before is None or since is None or sample.step <= before:
        return None
    seconds_per_step = (now - since).total_seconds() / (sample.step - before)
    return max(0, round((sample.total_steps - sample.step) * seconds_per_step))
