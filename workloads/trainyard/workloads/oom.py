"""CUDA out-of-memory in the training workload: stop saying so, so the run can retry smaller.

A training process that runs out of GPU memory exits with `contract.OOM_EXIT_CODE` and
writes one line starting with `contract.OOM_REASON` to its termination log (the
kubelet's `/dev/termination-log` in a pod, `$TRAINYARD_TERMINATION_LOG` where set):
under torchrun the container's exit status is torchrun's own (1), and the kubelet hands
the line to the operator in the pod's `state.terminated.message`. The operator (and
`trainyard run`) then restarts from the latest checkpoint with a smaller batch
(`runPolicy.oomRecovery`).

CPU machines have no GPU memory to run out of, so tests set two variables, read here
only: from optimizer step `TRAINYARD_TEST_OOM_AT_STEP` on, a forward pass over more
than `TRAINYARD_TEST_OOM_ABOVE_BATCH` rows raises `torch.OutOfMemoryError`, the type
and message CUDA's caching allocator raises. A batch small enough fits, as on a
GPU, so a recovery can be seen to work; nothing else of the workload is changed.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from trainyard.api.contract import OOM_EXIT_CODE, OOM_REASON, TERMINATION_LOG, Env

logger = logging.getLogger("trainyard.train")

TEST_AT_STEP_ENV = "TRAINYARD_TEST_OOM_AT_STEP"
TEST_ABOVE_BATCH_ENV = "TRAINYARD_TEST_OOM_ABOVE_BATCH"
# What CUDA, cuBLAS, NCCL and ROCm say when an allocation fails, where the error reaches
# Python as a plain RuntimeError (older torch, DeepSpeed's and NCCL's own allocations).
OOM_TEXTS = (
    "CUDA out of memory",
    "CUDA error: out of memory",
    "CUBLAS_STATUS_ALLOC_FAILED",
    "HIP out of memory",
)
MESSAGE_LIMIT = 4000  # the kubelet keeps 4096 bytes of a termination message


def is_cuda_oom(error: BaseException) -> bool:
    """Whether an exception, or one it was raised from, is GPU out-of-memory:
    `torch.OutOfMemoryError` (also `torch.cuda.OutOfMemoryError`) or a RuntimeError
    with CUDA's words for it (DeepSpeed and accelerate re-raise some of these wrapped).

    >>> import torch
    >>> is_cuda_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    True
    >>> try:
    ...     try:
    ...         raise RuntimeError("CUDA error: out of memory")
    ...     except RuntimeError as inner:
    ...         raise ValueError("step failed") from inner
    ... except ValueError as outer:
    ...     is_cuda_oom(outer)
    True
    >>> is_cuda_oom(RuntimeError("shape mismatch")), is_cuda_oom(MemoryError())
    (False, False)
    """
    import torch

    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, torch.OutOfMemoryError):
            return True
        if isinstance(current, RuntimeError) and any(t in str(current) for t in OOM_TEXTS):
            return True
        current = current.__cause__ or current.__context__
    return False


def termination_log() -> Path | None:
    """Where this process says why it stopped: `$TRAINYARD_TERMINATION_LOG`, else the
    kubelet's file when it is there (it is in every pod), else nowhere."""
    path = os.environ.get(Env.TERMINATION_LOG)
    if path:
        return Path(path)
    default = Path(TERMINATION_LOG)
    return default if default.is_file() and os.access(default, os.W_OK) else None


class BatchTracker(TrainerCallback):
    """Remembers the step and batch in training, for the out-of-memory message."""

    step: int | None = None
    per_device: int | None = None
    accumulation: int | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        BatchTracker.per_device = args.per_device_train_batch_size
        BatchTracker.accumulation = args.gradient_accumulation_steps
        BatchTracker.step = state.global_step
        return control

    def on_step_end(self, args, state, control, **kwargs):
        BatchTracker.step = state.global_step
        return control


def report(error: BaseException) -> int:
    """Log the out-of-memory, write the termination message; the exit status to return."""
    where = f"rank {os.environ.get('RANK', '0')}"
    if BatchTracker.step is not None:
        where += f" at step {BatchTracker.step}"
    if BatchTracker.per_device is not None:
        where += (
            f" with perDeviceBatchSize {BatchTracker.per_device} × "
            f"gradientAccumulationSteps {BatchTracker.accumulation}"
        )
    detail = (str(error).strip().splitlines() or [type(error).__name__])[0]
    message = f"{OOM_REASON}: {where}: {detail}"[:MESSAGE_LIMIT]
    logger.error("out of GPU memory", exc_info=error)
    logger.error("%s", message)
    path = termination_log()
    if path is not None:
        try:
            path.write_text(message + "\n")
        except OSError as problem:
            logger.warning("cannot write the termination message to %s: %s", path, problem)
    return OOM_EXIT_CODE


class InjectedOOM(TrainerCallback):
    """Test hook (see the module's docstring): raises CUDA's out-of-memory error in the
    forward pass of a batch over `above` rows from optimizer step `at_step` on."""

    def __init__(self, at_step: int, above: int):
        self.at_step = at_step
        self.above = above

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        import torch

        def forward(module: Any, positional: tuple, named: dict) -> None:
            tensors = [v for v in (*positional, *named.values()) if isinstance(v, torch.Tensor)]
            rows = tensors[0].shape[0] if tensors and tensors[0].dim() else 0
            if state.global_step >= self.at_step and rows > self.above:
                raise torch.OutOfMemoryError(
                    f"CUDA out of memory. Tried to allocate a batch of {rows} rows "
                    f"({TEST_ABOVE_BATCH_ENV}={self.above}, {TEST_AT_STEP_ENV}={self.at_step})"
                )

        if model is not None:
            model.register_forward_pre_hook(forward, with_kwargs=True)
        return control


def callbacks() -> list[TrainerCallback]:
    """The workload's out-of-memory callbacks: the tracker, and the test hook when set."""
    found: list[TrainerCallback] = [BatchTracker()]
    at_step, above = os.environ.get(TEST_AT_STEP_ENV), os.environ.get(TEST_ABOVE_BATCH_ENV)
    if at_step and above:
        logger.warning(
            "%s=%s %s=%s: forward passes over more than %s rows raise CUDA out-of-memory from step %s (a test)",
            TEST_AT_STEP_ENV, at_step, TEST_ABOVE_BATCH_ENV, above, above, at_step,
        )  # fmt: skip
        found.append(InjectedOOM(int(at_step), int(above)))
    return found
