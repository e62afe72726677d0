"""The pod contract: what the operator and the training workload agree on, written once.

Both sides import this module (the operator's builders and progress reader, the
workload's sources, train entrypoint and metrics); neither spells these strings itself.

* **Source URIs** — where a model, tokenizer or dataset comes from, and how
  `run://RUN[/step-N|final|latest]` names a checkpoint of an earlier run.
* **Environment variables** (`Env`) — what the operator sets in a worker pod (and the
  local runner sets for a local run) and the workload reads.
* **Metric names** (`Metric`) — the gauges rank 0 exports and the operator scrapes into
  `status.progress`; `PROGRESS_GAUGES` maps one to the other.

Run references, one rule for everybody: a run's checkpoints live under its
`checkpoint.uri` (`ROOT/RUN`, holding `step-N/` and `final/`), and the runs of one
team or pipeline share ROOT, the *runs root*. The runs root is `$TRAINYARD_RUNS_URI`
where set (the operator sets it in every worker pod, the local runner for every local
run), otherwise the parent of this run's own `checkpoint.uri`.

>>> parse_source("hf://Qwen/Qwen2.5-0.5B@main")
SourceURI(scheme='hf', path='Qwen/Qwen2.5-0.5B', revision='main')
>>> run_checkpoint_uri("run://sft/step-200", runs_root("s3://ckpt/runs/dpo"))
's3://ckpt/runs/sft/step-200'
>>> run_checkpoint_uri("run://sft", "file:///home/me/runs")
'file:///home/me/runs/sft/final'
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

# --------------------------------------------------------------------------- sources

SOURCE_SCHEMES = ("hf", "s3", "file", "builtin", "run")
SOURCE_FORMS = (
    "hf://org/name[@revision], s3://bucket/key, file://path, builtin://NAME, "
    "run://RUN[/step-N|final|latest]"
)
"""The source URI forms, as error messages list them."""
USERINFO_PATTERN = r"^[a-z0-9]+://[^/@]*@"
"""`scheme://user:password@…`: credentials in a URI, refused everywhere."""
RUN_NAME_PATTERN = r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?"
CHECKPOINT_FINAL = "final"
"""The exported model of a finished run (`ROOT/RUN/final`), what `run://RUN` means."""
CHECKPOINT_LATEST = "latest"
"""The newest complete checkpoint, only known by looking at storage (at run time)."""
STEP_PREFIX = "step-"
RUN_REFERENCE = re.compile(
    rf"^run://(?P<run>{RUN_NAME_PATTERN})"
    rf"(/(?P<checkpoint>{STEP_PREFIX}\d+|{CHECKPOINT_FINAL}|{CHECKPOINT_LATEST}))?/?$"
)
RUN_REFERENCE_FORMS = "run://RUN, run://RUN/step-N, run://RUN/final or run://RUN/latest"


class SourceURIError(ValueError):
    """A source URI that breaks the grammar; the message says what is allowed."""


@dataclass(frozen=True)
class SourceURI:
    """A parsed source URI; `revision` only for `hf://org/name@revision`."""

    scheme: str
    path: str
    revision: str | None = None


def source_pattern(schemes: tuple[str, ...] = SOURCE_SCHEMES) -> str:
    """The URI pattern the CRD enforces: a known scheme, no user info before the path."""
    return rf"^({'|'.join(schemes)})://[^\s/@]*(/\S*)?$"


def parse_source(uri: str, schemes: tuple[str, ...] = SOURCE_SCHEMES) -> SourceURI:
    """Split a source URI into scheme, path and (for `hf://`) revision.

    >>> parse_source("s3://bucket/models/m")
    SourceURI(scheme='s3', path='bucket/models/m', revision=None)
    >>> parse_source("ftp://x")
    Traceback (most recent call last):
    ...
    trainyard.api.contract.SourceURIError: 'ftp://x' is not a source URI; allowed: hf://org/name[@revision], s3://bucket/key, file://path, builtin://NAME, run://RUN[/step-N|final|latest]
    """
    if re.match(USERINFO_PATTERN, uri):
        raise SourceURIError(
            "credentials must not be written in a source URI; "
            "put them in a Secret and reference it from storage.s3.credentialsSecret"
        )
    scheme, sep, rest = uri.partition("://")
    if not sep or scheme not in schemes or not rest.strip():
        allowed = (
            SOURCE_FORMS if schemes == SOURCE_SCHEMES else ", ".join(f"{s}://…" for s in schemes)
        )
        raise SourceURIError(f"{uri!r} is not a source URI; allowed: {allowed}")
    revision = None
    if scheme == "hf" and "@" in rest:
        rest, revision = rest.rsplit("@", 1)
    return SourceURI(scheme, rest, revision)


# --------------------------------------------------------------------------- run://


@dataclass(frozen=True)
class RunReference:
    """`run://RUN[/CHECKPOINT]`: a run's name and which of its checkpoints."""

    run: str
    checkpoint: str = CHECKPOINT_FINAL
    """`step-N`, `final` (the default) or `latest`."""

    @property
    def is_latest(self) -> bool:
        return self.checkpoint == CHECKPOINT_LATEST


def parse_run_reference(uri: str) -> RunReference:
    """The run and checkpoint a `run://` source names.

    >>> parse_run_reference("run://sft-stage")
    RunReference(run='sft-stage', checkpoint='final')
    >>> parse_run_reference("run://sft-stage/step-40").checkpoint
    'step-40'
    """
    match = RUN_REFERENCE.match(uri)
    if not match:
        raise SourceURIError(f"{uri!r} is not a run reference; expected {RUN_REFERENCE_FORMS}")
    return RunReference(match["run"], match["checkpoint"] or CHECKPOINT_FINAL)


def runs_root(checkpoint_uri: str | None, environ: Mapping[str, str] | None = None) -> str | None:
    """Where the runs' checkpoints live: `$TRAINYARD_RUNS_URI` in `environ` when set, else
    the parent of this run's `checkpoint.uri`; None when neither is known.

    >>> runs_root("s3://ckpt/runs/dpo/")
    's3://ckpt/runs'
    >>> runs_root("s3://ckpt/runs/dpo", {"TRAINYARD_RUNS_URI": "file:///runs/"})
    'file:///runs'
    """
    root = (environ or {}).get(Env.RUNS_URI)
    if not root and checkpoint_uri:
        root = checkpoint_uri.rstrip("/").rsplit("/", 1)[0]
    return root.rstrip("/") if root else None


def run_uri(run: str, root: str) -> str:
    """Where run `run` keeps its checkpoints under the runs root (its `checkpoint.uri`)."""
    return f"{root.rstrip('/')}/{run}"


def run_checkpoint_uri(reference: str | RunReference, root: str) -> str:
    """The storage URI of the checkpoint a `run://` reference names, under the runs root.

    `latest` stays `ROOT/RUN/latest`: the reader replaces it with the newest complete
    `step-N` it finds there.
    """
    if isinstance(reference, str):
        reference = parse_run_reference(reference)
    return f"{run_uri(reference.run, root)}/{reference.checkpoint}"


# --------------------------------------------------------------------------- environment


class Env:
    """Environment variables of the pod contract (operator or local runner → workload)."""

    RUN_CONFIG = "TRAINYARD_RUN_CONFIG"
    """Path of the run (TrainingRun JSON) the workload trains."""
    TRAINER_OPTIONS = "TRAINYARD_TRAINER_OPTIONS"
    """Path of a JSON object of TRL config options only the operator decides
    (`trainer.json`: vLLM connection, colocate settings), applied over the derived ones."""
    RUN_NAME = "TRAINYARD_RUN_NAME"
    RUN_NAMESPACE = "TRAINYARD_RUN_NAMESPACE"
    RESTART_ATTEMPT = "TRAINYARD_RESTART_ATTEMPT"
    """The operator's restart attempt of the gang (ties the nodes' checkpoint parts)."""
    OUTPUT_DIR = "TRAINYARD_OUTPUT_DIR"
    """Output directory when `--output` is not given."""
    CACHE = "TRAINYARD_CACHE"
    """Where built-in models and S3 downloads are cached."""
    RUNS_URI = "TRAINYARD_RUNS_URI"
    """The runs root `run://RUN` sources resolve under (see `runs_root`)."""
    METRICS_PORT = "TRAINYARD_METRICS_PORT"
    """Overrides spec.metrics.port; 0 picks a free port, "off" serves none."""
    VLLM_URL = "TRAINYARD_VLLM_URL"
    """Base URL of the vLLM rollout server (server mode)."""
    VLLM_HOST = "TRAINYARD_VLLM_HOST"
    VLLM_PORT = "TRAINYARD_VLLM_PORT"
    TERMINATION_LOG = "TRAINYARD_TERMINATION_LOG"
    """Where a worker writes why it stopped (`trainyard run`: OUTPUT/termination.log);
    in a pod, the kubelet's `TERMINATION_LOG` file when the variable is unset."""


# --------------------------------------------------------------------------- exits

OOM_EXIT_CODE = 75
"""Exit status of a training process stopped by CUDA out-of-memory (sysexits' EX_TEMPFAIL:
try again, here with a smaller batch). Under torchrun the container exits with torchrun's
own status (1), so the worker also says it in the termination message."""
OOM_REASON = "CudaOutOfMemory"
"""First word of a worker's termination message after CUDA out-of-memory:
`CudaOutOfMemory: rank 0 at step 12 with perDeviceBatchSize 8: CUDA out of memory. …`."""
TERMINATION_LOG = "/dev/termination-log"
"""The container's terminationMessagePath (Kubernetes' default): the kubelet copies the
file into `status.containerStatuses[].state.terminated.message` (4 KiB at most)."""


def is_oom_termination(message: str | None, exit_code: int | None = None) -> bool:
    """Whether a worker's termination message or exit status says CUDA out-of-memory.

    >>> is_oom_termination("CudaOutOfMemory: rank 1 at step 3 ..."), is_oom_termination(None, 75)
    (True, True)
    >>> is_oom_termination("Error: CudaOutOfMemory", 1)
    False
    """
    return exit_code == OOM_EXIT_CODE or (message or "").startswith(f"{OOM_REASON}:")


# --------------------------------------------------------------------------- metrics

METRIC_PREFIX = "trainyard_"


class Metric:
    """Prometheus names rank 0 exports (`trainyard.workloads.metrics`) and the operator reads."""

    STEP = "trainyard_step"
    TOTAL_STEPS = "trainyard_total_steps"
    EPOCH = "trainyard_epoch"
    LOSS = "trainyard_loss"
    LEARNING_RATE = "trainyard_learning_rate"
    GRAD_NORM = "trainyard_grad_norm"
    REWARD_MEAN = "trainyard_reward_mean"
    REWARD_STD = "trainyard_reward_std"
    KL = "trainyard_kl"
    COMPLETION_LENGTH = "trainyard_completion_length"
    EVAL_LOSS = "trainyard_eval_loss"
    TOKENS_PER_SECOND = "trainyard_tokens_per_second"
    REWARD_COMPONENT_MEAN = "trainyard_reward_component_mean"
    """Labelled `component` (the reward function's name)."""
    REWARD_COMPONENT_STD = "trainyard_reward_component_std"
    TRAIN_LOG = "trainyard_train_log"
    """Every numeric value of the last trainer log, labelled `key` (the log key)."""
    CHECKPOINT_LAST_STEP = "trainyard_checkpoint_last_step"
    CHECKPOINT_UPLOAD_SECONDS = "trainyard_checkpoint_upload_seconds"
    CHECKPOINT_UPLOAD_BYTES = "trainyard_checkpoint_upload_bytes"
    CHECKPOINT_UPLOAD_FAILURES = "trainyard_checkpoint_upload_failures"
    CHECKPOINT_UPLOADS_SKIPPED = "trainyard_checkpoint_uploads_skipped"
    """Checkpoints not uploaded because a newer one came first (coalesced, newest wins)."""


COMPONENT_LABEL = "component"
LOG_KEY_LABEL = "key"

PROGRESS_GAUGES: dict[str, str] = {
    "step": Metric.STEP,
    "totalSteps": Metric.TOTAL_STEPS,
    "epoch": Metric.EPOCH,
    "loss": Metric.LOSS,
    "rewardMean": Metric.REWARD_MEAN,
    "kl": Metric.KL,
    "tokensPerSecond": Metric.TOKENS_PER_SECOND,
    "checkpointStep": Metric.CHECKPOINT_LAST_STEP,
}
"""`status.progress` field → the unlabelled gauge it is read from. The workload's
progress file uses the same field names (`checkpointStep` is `checkpoint.lastStep` there)."""
