"""InferenceServer: a vLLM OpenAI-compatible server for a model, checkpoint or adapter."""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import Field

from trainyard.api.base import API_VERSION, ApiModel
from trainyard.api.common import (
    ENV_RULES,
    EnvVar,
    ModelSource,
    ObjectMeta,
    Resources,
    Scheduling,
    Storage,
    source_uri,
)
from trainyard.api.status import Condition


class ServedAdapter(ApiModel):
    """A LoRA adapter served on top of the base model."""

    name: str = Field(pattern=r"^[a-zA-Z0-9_.-]+$")
    """Model name clients ask for."""
    source: source_uri("hf", "s3", "file", "run")
    """Where the adapter lies."""


class VLLMServing(ApiModel):
    """vLLM engine options (`vllm serve` flags)."""

    tensor_parallel_size: int = Field(default=1, ge=1, le=64)
    """GPUs one replica is split over (`--tensor-parallel-size`)."""
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    """Fraction of GPU memory vLLM may take (`--gpu-memory-utilization`)."""
    max_model_len: int | None = Field(default=None, ge=16)
    """Longest prompt + completion (`--max-model-len`)."""
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """Weights dtype (`--dtype`)."""
    max_lora_rank: int = Field(default=16, ge=1)
    """Largest adapter rank served (`--max-lora-rank`)."""
    extra_args: list[str] | None = None
    """More `vllm serve` flags, passed as written."""


class InferenceServerSpec(ApiModel):
    """Desired state of an InferenceServer."""

    model: ModelSource
    """Base model or merged checkpoint."""
    adapters: list[ServedAdapter] | None = None
    """LoRA adapters served beside the base model."""
    served_model_name: str | None = None
    """Name clients use for the base model; the resource name when left out."""
    replicas: int = Field(default=1, ge=0, le=100)
    """Server pods."""
    vllm: VLLMServing = Field(default_factory=VLLMServing)
    """Engine options."""
    port: int = Field(default=8000, ge=1024, le=65535)
    """HTTP port of the OpenAI API."""
    image: str | None = None
    """vLLM image; the operator's default when left out."""
    resources: Resources | None = None
    """Resources besides GPUs."""
    gpus: int = Field(default=1, ge=0, le=16)
    """GPUs per replica."""
    storage: Storage | None = None
    """Object storage settings for s3:// sources."""
    scheduling: Scheduling | None = None
    """Priority and node selection."""
    env: list[EnvVar] | None = Field(default=None, max_length=128)
    """Extra environment variables."""

    rules = ENV_RULES


class ServerPhase(StrEnum):
    """`status.phase` of an InferenceServer, for humans (`kubectl get`); conditions say the rest."""

    PENDING = "Pending"
    """Waiting for the model (a run:// model whose run has not finished)."""
    PROGRESSING = "Progressing"
    """The Deployment rolls out the current spec; older replicas serve meanwhile."""
    READY = "Ready"
    """Every replica runs the current spec and is available."""
    FAILED = "Failed"
    """The model cannot be had (its run failed) or the rollout exceeded its deadline."""
    INVALID = "Invalid"
    """The spec cannot be served; status.message says what to fix."""


ServerPhaseName = Literal["Pending", "Progressing", "Ready", "Failed", "Invalid"]


class ServerCondition(StrEnum):
    """The condition types the operator sets on an InferenceServer (the CRD lists exactly these)."""

    VALID = "Valid"
    READY = "Ready"


SERVER_CONDITION_MEANINGS: dict[ServerCondition, str] = {
    ServerCondition.VALID: "the spec passed validation (False: status.message says what to fix)",
    ServerCondition.READY: (
        "at least one replica serves the OpenAI API (status.model names the model it serves)"
    ),
}


class ServerReason:
    """Condition reasons of an InferenceServer: one CamelCase word each, spelled only here."""

    SPEC_VALID = "SpecValid"
    INVALID_SPEC = "InvalidSpec"
    WAITING_FOR_MODEL = "WaitingForModel"
    MODEL_UNAVAILABLE = "ModelUnavailable"
    ROLLING_OUT = "RollingOut"
    REPLICAS_AVAILABLE = "ReplicasAvailable"
    NO_REPLICA_AVAILABLE = "NoReplicaAvailable"
    SCALED_TO_ZERO = "ScaledToZero"
    PROGRESS_DEADLINE_EXCEEDED = "ProgressDeadlineExceeded"


class ServerRollout(ApiModel):
    """The Deployment template the operator last wrote, until it has rolled out."""

    template_hash: str
    """Hash of the rendered Deployment (its `trainyard.dev/spec-hash` annotation)."""
    model: str
    """The model source that template serves."""
    since_generation: int | None = None
    """The Deployment's observedGeneration when the template was written (the rollout counts once past it)."""


class InferenceServerStatus(ApiModel):
    """Observed state of an InferenceServer."""

    model_config = ApiModel.model_config | {"extra": "allow"}

    phase: ServerPhaseName | None = None
    """Pending, Progressing, Ready, Failed or Invalid."""
    message: str | None = None
    """Why the server is in its phase."""
    ready: bool | None = None
    """Whether at least one replica serves."""
    replicas: int | None = None
    """Replicas asked for (spec.replicas)."""
    ready_replicas: int | None = None
    """Replicas passing readiness."""
    updated_replicas: int | None = None
    """Replicas running the current spec."""
    url: str | None = None
    """In-cluster URL of the OpenAI API (append /v1)."""
    model: str | None = None
    """The model source the available replicas serve (as spec.model.source said when it rolled out)."""
    served_model_name: str | None = None
    """Name clients ask for the base model."""
    adapters: list[str] | None = None
    """Names of the LoRA adapters served beside the base model."""
    rollout: ServerRollout | None = None
    """The template being rolled out, while it is."""
    conditions: list[Condition] | None = Field(
        default=None,
        description="; ".join(
            f"{type_}: {meaning}" for type_, meaning in SERVER_CONDITION_MEANINGS.items()
        )
        + ".",
    )
    observed_generation: int | None = None
    """metadata.generation this status describes."""


class InferenceServer(ApiModel):
    """A vLLM server for a model, checkpoint or adapter."""

    api_version: Literal["trainyard.dev/v1alpha1"] = API_VERSION
    """trainyard.dev/v1alpha1."""
    kind: Literal["InferenceServer"] = "InferenceServer"
    """InferenceServer."""
    metadata: ObjectMeta
    """Standard object metadata."""
    spec: InferenceServerSpec
    """Desired state."""
    status: InferenceServerStatus | None = None
    """Observed state, written by the operator."""
