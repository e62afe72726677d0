"""InferenceServer: a vLLM OpenAI-compatible server for a model, checkpoint or adapter."""

from __future__ import annotations

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


class InferenceServerStatus(ApiModel):
    """Observed state of an InferenceServer."""

    model_config = ApiModel.model_config | {"extra": "allow"}

    ready: bool | None = None
    """Whether at least one replica serves."""
    ready_replicas: int | None = None
    """Replicas passing readiness."""
    url: str | None = None
    """In-cluster URL of the OpenAI API."""
    conditions: list[Condition] | None = None
    """Valid, Ready."""
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
