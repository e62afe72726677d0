"""What CUDA out-of-memory means for a run: try again with a smaller batch, or give up.

A worker that runs out of GPU memory says so in its termination message (and exit
status, `trainyard.api.contract.OOM_REASON`), and `failure_policy` names the disruption
`CudaOutOfMemory`. With `runPolicy.oomRecovery` the gang restarts from the latest
checkpoint with the per-device batch halved and gradient accumulation doubled
(`OOMRecovery.next_batch`: the effective batch stays the spec's), counted against
`maxRestarts` like any failure; out of memory at `minPerDeviceBatchSize` fails the run.

The batch the run trains with is kept in `status.oomRecovery`, so every later attempt's
config is rendered with it (`effective_run`) and neither deleting children nor
restarting the operator forgets it. The spec keeps what its author wrote.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trainyard.api.training_run import OOMRecovery, TrainingRun, TrainingRunSpec
from trainyard.operator import failure_policy, reasons
from trainyard.operator.outcome import Outcome


@dataclass(frozen=True)
class Batch:
    """Per-device batch and gradient accumulation of an attempt."""

    per_device: int
    accumulation: int

    def __str__(self) -> str:
        return (
            f"perDeviceBatchSize {self.per_device} × gradientAccumulationSteps {self.accumulation}"
        )


def current_batch(spec: TrainingRunSpec, recorded: dict[str, Any] | None) -> Batch:
    """The batch the current attempt trains with: the recovered one in `status.oomRecovery`
    while it is smaller than the spec's (an author who lowers the spec's batch below it
    takes over), else the spec's."""
    training = spec.training
    per_device = (recorded or {}).get("perDeviceBatchSize")
    accumulation = (recorded or {}).get("gradientAccumulationSteps")
    if per_device and accumulation and per_device < training.per_device_batch_size:
        return Batch(int(per_device), int(accumulation))
    return Batch(training.per_device_batch_size, training.gradient_accumulation_steps)


def effective_run(run: TrainingRun, recorded: dict[str, Any] | None) -> TrainingRun:
    """The run as its next config is rendered: the spec with the recovered batch."""
    batch = current_batch(run.spec, recorded)
    training = run.spec.training
    if (batch.per_device, batch.accumulation) == (
        training.per_device_batch_size,
        training.gradient_accumulation_steps,
    ):
        return run
    smaller = training.model_copy(
        update={
            "per_device_batch_size": batch.per_device,
            "gradient_accumulation_steps": batch.accumulation,
        }
    )
    return run.model_copy(update={"spec": run.spec.model_copy(update={"training": smaller})})


@dataclass(frozen=True)
class Recovery:
    """The fate of a gang that ran out of GPU memory, and the new `status.oomRecovery`
    when it retries with a smaller batch."""

    outcome: Outcome
    status: dict[str, Any] | None = None


def recover(
    disruption: failure_policy.Disruption | None,
    *,
    settings: OOMRecovery | None,
    spec: TrainingRunSpec,
    recorded: dict[str, Any] | None,
    restarts: int,
    preemptions: int,
    max_restarts: int,
) -> Recovery | None:
    """A restart with a smaller batch within the budget, a failure at the floor, or a plain
    restart when recovery is off; None when the disruption is not CUDA out-of-memory."""
    if disruption is None or disruption.reason != reasons.CUDA_OUT_OF_MEMORY:
        return None
    batch = current_batch(spec, recorded)
    counters = {"restarts": restarts, "preemptions": preemptions, "max_restarts": max_restarts}
    if settings is None or not settings.enabled:
        plain = failure_policy.Disruption(
            disruption.kind,
            disruption.reason,
            f"{disruption.message} at {batch}; runPolicy.oomRecovery restarts it with a smaller batch",
        )
        return Recovery(_fate(plain, **counters))
    at_batch = failure_policy.Disruption(
        disruption.kind, disruption.reason, f"{disruption.message} at {batch}"
    )
    smaller = settings.next_batch(batch.per_device, batch.accumulation, spec)
    if smaller is None:
        return Recovery(
            Outcome(
                "fail",
                reasons.OUT_OF_MEMORY_AT_MINIMUM_BATCH,
                f"{at_batch.message}, and runPolicy.oomRecovery.minPerDeviceBatchSize="
                f"{settings.min_per_device_batch_size} allows no smaller batch: lower "
                "training.maxLength, set training.gradientCheckpointing, shard with "
                "distributed.deepspeed or use GPUs with more memory",
                counters=(restarts, preemptions),
            )
        )
    if restarts >= max_restarts:
        return Recovery(_fate(at_batch, **counters))
    recoveries = int((recorded or {}).get("recoveries") or 0) + 1
    retry = Batch(*smaller)
    retried = failure_policy.Disruption(
        disruption.kind,
        disruption.reason,
        f"{at_batch.message}; OOM recovery {recoveries}: {retry}, the same effective batch",
    )
    return Recovery(
        _fate(retried, **counters),
        {
            "recoveries": recoveries,
            "perDeviceBatchSize": retry.per_device,
            "gradientAccumulationSteps": retry.accumulation,
        },
    )


def _fate(
    disruption: failure_policy.Disruption, *, restarts: int, preemptions: int, max_restarts: int
) -> Outcome:
    fate = failure_policy.outcome(
        disruption, restarts=restarts, preemptions=preemptions, max_restarts=max_restarts
    )
    assert fate is not None
    return fate
