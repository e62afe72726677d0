"""Training metrics for Prometheus, a progress file, and a sampled completions log.

Rank 0 serves the metrics; the operator reads them (pods get no Kubernetes API
access). The numbers come from the log dicts transformers and TRL hand to
`TrainerCallback.on_log`, under the names those libraries give them:

- transformers `Trainer`: loss, grad_norm, learning_rate, epoch, num_input_tokens_seen,
  and train_runtime / train_tokens_per_second at the end;
- TRL SFT/DPO: num_tokens (cumulative), mean_token_accuracy, entropy, rewards/margins…;
- TRL GRPO/RLOO: reward, reward_std, rewards/<func>/mean, rewards/<func>/std, kl,
  completions/mean_length, num_tokens.

Every numeric key is also exported as `trainyard_train_log{key=...}` so promotion
gates can use any of them. The metric names are the pod contract's
(`trainyard.api.contract.Metric`), which the operator reads too.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from transformers import TrainerCallback

from trainyard.api.contract import COMPONENT_LABEL, LOG_KEY_LABEL, Metric

COMPONENT_KEY = re.compile(r"rewards/(?P<name>.+)/(?P<stat>mean|std)")
# Log key → progress-file field, for the scalar gauges.
SCALARS = {
    "loss": "loss",
    "learning_rate": "learningRate",
    "grad_norm": "gradNorm",
    "reward": "rewardMean",
    "reward_std": "rewardStd",
    "kl": "kl",
    "completions/mean_length": "completionLength",
    "eval_loss": "evalLoss",
}
UPLOAD_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, float("inf"))


class TrainingMetrics:
    """Gauges in a private registry, mirrored to a JSON progress file."""

    def __init__(self, progress_path: str | os.PathLike[str] | None = None) -> None:
        self.registry = CollectorRegistry()
        self.progress_path = Path(progress_path) if progress_path else None
        self.port: int | None = None
        self._server = None
        self._lock = threading.Lock()
        self._last_tokens: tuple[float, float] | None = None  # (tokens seen, time)

        def gauge(name: str, doc: str, labels: Sequence[str] = ()) -> Gauge:
            return Gauge(name, doc, labels, registry=self.registry)

        self.step = gauge(Metric.STEP, "Optimizer steps done (TrainerState.global_step).")
        self.total_steps = gauge(
            Metric.TOTAL_STEPS, "Steps the run will take (TrainerState.max_steps)."
        )
        self.epoch = gauge(Metric.EPOCH, "Fractional epoch.")
        self.tokens_per_second = gauge(
            Metric.TOKENS_PER_SECOND, "Training tokens per second since the previous log."
        )
        self.scalars = {
            "loss": gauge(Metric.LOSS, "Training loss of the last logging window."),
            "learning_rate": gauge(Metric.LEARNING_RATE, "Current learning rate."),
            "grad_norm": gauge(Metric.GRAD_NORM, "Gradient norm before clipping."),
            "reward": gauge(Metric.REWARD_MEAN, "Mean total reward (GRPO/RLOO)."),
            "reward_std": gauge(Metric.REWARD_STD, "Standard deviation of the total reward."),
            "kl": gauge(Metric.KL, "KL divergence to the reference model."),
            "completions/mean_length": gauge(
                Metric.COMPLETION_LENGTH, "Mean completion length in tokens."
            ),
            "eval_loss": gauge(Metric.EVAL_LOSS, "Loss on the evaluation set."),
        }
        self.component_mean = gauge(
            Metric.REWARD_COMPONENT_MEAN, "Mean reward per reward function.", [COMPONENT_LABEL]
        )
        self.component_std = gauge(
            Metric.REWARD_COMPONENT_STD, "Reward std per reward function.", [COMPONENT_LABEL]
        )
        self.train_log = gauge(
            Metric.TRAIN_LOG, "Every numeric value of the last trainer log.", [LOG_KEY_LABEL]
        )
        self.checkpoint_last_step = gauge(
            Metric.CHECKPOINT_LAST_STEP,
            "Newest step whose checkpoint upload completed (manifest written).",
        )
        self.checkpoint_upload_seconds = Histogram(
            Metric.CHECKPOINT_UPLOAD_SECONDS,
            "Seconds one checkpoint upload took.",
            buckets=UPLOAD_BUCKETS,
            registry=self.registry,
        )
        self.checkpoint_upload_bytes = Counter(
            Metric.CHECKPOINT_UPLOAD_BYTES,
            "Bytes of checkpoints uploaded.",
            registry=self.registry,
        )
        self.checkpoint_upload_failures = Counter(
            Metric.CHECKPOINT_UPLOAD_FAILURES,
            "Checkpoint uploads that failed.",
            registry=self.registry,
        )
        self.checkpoint_uploads_skipped = Counter(
            Metric.CHECKPOINT_UPLOADS_SKIPPED,
            "Checkpoints not uploaded because a newer one came first (newest wins).",
            registry=self.registry,
        )
        # Unknown until the trainer reports it; NaN says so, 0 would be a lie.
        for metric in [
            self.total_steps,
            self.epoch,
            self.tokens_per_second,
            self.checkpoint_last_step,
            *self.scalars.values(),
        ]:
            metric.set(math.nan)
        self.summary: dict[str, Any] = {
            "phase": "Initializing",
            "step": 0,
            "totalSteps": None,
            "epoch": None,
            "tokensPerSecond": None,
            **dict.fromkeys(SCALARS.values()),
            "rewards": {},
            "checkpoint": {
                "lastStep": None,
                "uploads": 0,
                "uploadSeconds": None,
                "uploadBytes": 0,
                "failures": 0,
                # Steps saved but not uploaded: a newer save replaced them while the
                # network was behind (checkpoint.CheckpointSync coalescing).
                "skippedSteps": [],
            },
            "metricsPort": None,
            "updatedAt": None,
        }

    def serve(self, port: int = 0, addr: str = "0.0.0.0") -> int:
        """Serve /metrics on port (0 picks a free one); returns the port used."""
        self._server, _ = start_http_server(port, addr=addr, registry=self.registry)
        self.port = self._server.server_port
        with self._lock:
            self.summary["metricsPort"] = self.port
            self._write_progress()
        return self.port

    def shutdown(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def set_phase(self, phase: str) -> None:
        with self._lock:
            self.summary["phase"] = phase
            self._write_progress()

    def record_log(
        self,
        logs: Mapping[str, Any],
        *,
        step: int,
        total_steps: int | None = None,
        epoch: float | None = None,
        now: float | None = None,
    ) -> None:
        """Take one trainer log dict into the gauges and the progress file."""
        now = time.monotonic() if now is None else now
        with self._lock:
            summary = self.summary
            summary["step"] = step
            self.step.set(step)
            if total_steps:
                summary["totalSteps"] = total_steps
                self.total_steps.set(total_steps)
            epoch = logs.get("epoch", epoch)
            if _number(epoch):
                summary["epoch"] = float(epoch)
                self.epoch.set(epoch)
            for key, value in logs.items():
                if not _number(value):
                    continue
                self.train_log.labels(**{LOG_KEY_LABEL: key}).set(value)
                if key in SCALARS:
                    summary[SCALARS[key]] = float(value)
                    self.scalars[key].set(value)
                elif match := COMPONENT_KEY.fullmatch(key):
                    name, stat = match["name"], match["stat"]
                    summary["rewards"].setdefault(name, {})[stat] = float(value)
                    gauge = self.component_mean if stat == "mean" else self.component_std
                    gauge.labels(**{COMPONENT_LABEL: name}).set(value)
            rate = self._tokens_per_second(logs, now)
            if rate is not None:
                summary["tokensPerSecond"] = rate
                self.tokens_per_second.set(rate)
            self._write_progress()

    def _tokens_per_second(self, logs: Mapping[str, Any], now: float) -> float | None:
        if _number(logs.get("train_tokens_per_second")):
            return float(logs["train_tokens_per_second"])
        # TRL logs a cumulative `num_tokens`; transformers `num_input_tokens_seen`
        # when include_num_input_tokens_seen is on. The rate is their slope.
        seen = next(
            (logs[k] for k in ("num_tokens", "num_input_tokens_seen") if _number(logs.get(k))), None
        )
        if seen is None:
            return None
        previous, self._last_tokens = self._last_tokens, (float(seen), now)
        if previous is None or now <= previous[1] or seen < previous[0]:
            return None
        return (seen - previous[0]) / (now - previous[1])

    def record_checkpoint_upload(self, result: Any) -> None:
        """Hook for CheckpointSync(on_upload=...): takes a checkpoint.UploadResult."""
        with self._lock:
            checkpoint = self.summary["checkpoint"]
            skipped = tuple(getattr(result, "coalesced", ()))
            checkpoint["skippedSteps"].extend(skipped)
            self.checkpoint_uploads_skipped.inc(len(skipped))
            if result.error is not None:
                self.checkpoint_upload_failures.inc()
                checkpoint["failures"] += 1
            else:
                self.checkpoint_upload_seconds.observe(result.seconds)
                self.checkpoint_upload_bytes.inc(result.bytes)
                checkpoint["uploads"] += 1
                checkpoint["uploadSeconds"] = result.seconds
                checkpoint["uploadBytes"] += result.bytes
                if result.step is not None and result.name.startswith("step-"):
                    last = checkpoint["lastStep"]
                    checkpoint["lastStep"] = result.step if last is None else max(last, result.step)
                    self.checkpoint_last_step.set(checkpoint["lastStep"])
            self._write_progress()

    def _write_progress(self) -> None:
        self.summary["updatedAt"] = datetime.now(UTC).isoformat()
        if self.progress_path is None:
            return
        self.progress_path.parent.mkdir(parents=True, exist_ok=True)
        # Write aside and rename: a reader never sees half a file.
        fd, tmp = tempfile.mkstemp(dir=self.progress_path.parent, prefix=".progress.")
        with os.fdopen(fd, "w") as handle:
            json.dump(self.summary, handle, indent=1)
        os.replace(tmp, self.progress_path)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class MetricsCallback(TrainerCallback):
    """Feeds TrainingMetrics from the Trainer on the world's rank 0."""

    def __init__(self, metrics: TrainingMetrics) -> None:
        self.metrics = metrics

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.metrics.record_log({}, step=state.global_step, total_steps=state.max_steps)
            self.metrics.set_phase("Training")
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            self.metrics.record_log(
                logs, step=state.global_step, total_steps=state.max_steps, epoch=state.epoch
            )
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.metrics.record_log({}, step=state.global_step, total_steps=state.max_steps)
            self.metrics.set_phase("Trained")
        return control


class CompletionLog:
    """Appends sampled GRPO completions with their rewards to a JSONL file.

    Every `sample_every`-th step is written, at most `max_rows` completions of it.
    """

    def __init__(
        self, path: str | os.PathLike[str], sample_every: int = 10, max_rows: int = 8
    ) -> None:
        if sample_every < 1:
            raise ValueError(f"completion log sampleEvery must be at least 1, got {sample_every}")
        self.path = Path(path)
        self.sample_every = sample_every
        self.max_rows = max_rows
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def record(
        self,
        step: int,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        rewards: Mapping[str, Sequence[float]],
        extra: Mapping[str, Sequence[Any]] | None = None,
    ) -> int:
        """Write one line per completion when step is sampled; returns lines written.

        rewards maps a reward function's name to one score per completion; extra the
        columns rewards logged per completion through TRL's log_extra (a code-execution
        reward's `NAME/stages`: what each stage did to that completion).
        """
        if step % self.sample_every:
            return 0
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        lines = []
        for row, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
            if row >= self.max_rows:
                break
            scores = {name: _plain(values[row]) for name, values in rewards.items()}
            line = {"step": step, "prompt": prompt, "completion": completion, "rewards": scores}
            columns = {
                name: values[row] for name, values in (extra or {}).items() if row < len(values)
            }
            if columns:
                line["extra"] = columns
            lines.append(json.dumps(line, default=str))
        with self._lock, open(self.path, "a") as handle:
            handle.write("".join(line + "\n" for line in lines))
        return len(lines)


def _plain(value: Any) -> float | None:
    # Rewards may be None (TRL allows it for "not applicable") or NaN; JSON has neither NaN.
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


TENSORBOARD_PREFIX = "tensorboard"
"""Where TensorBoard event files go in the checkpoint store: checkpoint.uri/tensorboard/."""


class TensorBoardUpload(TrainerCallback):
    """Uploads the TensorBoard event files (transformers writes them under OUTPUT/runs/)
    to the checkpoint store's tensorboard/ at each save and at the end of training, so
    `tensorboard --logdir s3://…/tensorboard` (or a copy) shows the run beside its
    checkpoints. Only files that changed since the last upload are sent; a failed upload
    is logged and tried again at the next save, never stopping training.
    """

    def __init__(self, store: Any, runs_dir: str | os.PathLike[str]) -> None:
        self.store = store
        self.runs_dir = Path(runs_dir)
        self.sent: dict[str, tuple[int, int]] = {}
        self.uploads = 0
        self.trainer = None
        """Set by the training entrypoint: its TensorBoard writer is flushed before a save's upload."""

    def _flush_writers(self) -> None:
        handler = getattr(self.trainer, "callback_handler", None)
        for callback in getattr(handler, "callbacks", []):
            writer = getattr(callback, "tb_writer", None)
            if writer is not None:
                writer.flush()

    def upload(self) -> int:
        """Send the new or grown event files; returns how many were sent."""
        changed: dict[str, Path] = {}
        if self.runs_dir.is_dir():
            for path in sorted(self.runs_dir.rglob("*")):
                if not path.is_file():
                    continue
                stat = path.stat()
                key = f"{TENSORBOARD_PREFIX}/{path.relative_to(self.runs_dir).as_posix()}"
                if self.sent.get(key) != (stat.st_size, stat.st_mtime_ns):
                    changed[key] = path
                    self.sent[key] = (stat.st_size, stat.st_mtime_ns)
        if changed:
            self.store.upload_files(changed)
            self.uploads += 1
        return len(changed)

    def _safe_upload(self, state: Any) -> None:
        if not state.is_world_process_zero:
            return
        try:
            self.upload()
        except Exception as error:  # the event files stay on disk for the next try
            import logging

            self.sent.clear()
            logging.getLogger("trainyard.metrics").warning(
                "TensorBoard event files not uploaded: %s", error
            )

    def on_save(self, args, state, control, **kwargs):
        self._flush_writers()
        self._safe_upload(state)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        # transformers' TensorBoardCallback (a default callback, so called before this one)
        # has closed its writer, which flushed it.
        self._safe_upload(state)
        return control
