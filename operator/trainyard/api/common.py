"""Parts shared by several resources: sources, storage, pod settings, object metadata."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, field_validator

from trainyard.api.base import ApiModel
from trainyard.api.contract import (
    SOURCE_SCHEMES,
    USERINFO_PATTERN,
    SourceURIError,
    parse_source,
    source_pattern,
)
from trainyard.api.rules import Rule

# A source URI names where a model, tokenizer or dataset comes from; its grammar is the
# pod contract's (`trainyard.api.contract`). Credentials never go in it:
# `scheme://user:password@host` is refused (the CRD refuses it too).
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# Env names that hold secrets: such a variable must come from a Secret, never a literal.
SECRET_ENV_PATTERN = (
    r"(?i)(^|[_.-])(SECRET|PASSWORD|PASSWD|TOKEN|ACCESS_KEY|PRIVATE_KEY|API_KEY|CREDENTIALS?)"
    r"([_.-]|$)"
)
"""Variable names that hold a credential: one of these words between `_`, `.`, `-` or the
ends of the name (HF_TOKEN, AWS_SECRET_ACCESS_KEY, WANDB_API_KEY; not
TOKENIZERS_PARALLELISM)."""

Quantity = Annotated[
    int | str,
    Field(json_schema_extra={"x-kubernetes-int-or-string": True}),
]


def source_uri(*schemes: str) -> Any:
    """A str field holding a source URI of these schemes, checked here and in the CRD."""
    return Annotated[
        str,
        AfterValidator(lambda value: check_source(value, schemes)),
        Field(json_schema_extra={"pattern": source_pattern(schemes)}),
    ]


def check_source(value: str, allowed: tuple[str, ...] = SOURCE_SCHEMES) -> str:
    """Refuse sources with an unknown scheme or embedded credentials."""
    try:
        parse_source(value, allowed)
    except SourceURIError as error:
        raise ValueError(str(error)) from None
    return value


class ObjectMeta(ApiModel):
    """Kubernetes object metadata: what an author writes, and what the API server adds
    (kept as it is, so `kubectl get -o yaml` output validates too). Any other key is a
    typo (`lables`) that kubectl's strict field validation would refuse as well."""

    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", max_length=253)
    """Name of the resource: lowercase letters, digits, '-' and '.'."""
    namespace: str | None = None
    """Namespace of the resource; the current namespace when left out."""
    labels: dict[str, str] | None = None
    """Labels, copied onto every child object."""
    annotations: dict[str, str] | None = None
    """Annotations of the resource."""
    generate_name: str | None = None
    """Prefix of a name the API server makes unique (set by the API server's clients)."""
    uid: str | None = None
    """Set by the API server."""
    resource_version: str | None = None
    """Set by the API server."""
    generation: int | None = None
    """Set by the API server."""
    creation_timestamp: Any = None
    """Set by the API server."""
    deletion_timestamp: Any = None
    """Set by the API server."""
    deletion_grace_period_seconds: int | None = None
    """Set by the API server."""
    owner_references: list[dict[str, Any]] | None = None
    """Owners of the resource (a pipeline owns its stages' runs)."""
    finalizers: list[str] | None = None
    """Finalizers of the resource."""
    managed_fields: list[dict[str, Any]] | None = None
    """Set by the API server (server-side apply)."""
    self_link: str | None = None
    """Set by old API servers."""


class ModelSource(ApiModel):
    """Where a model comes from."""

    source: source_uri(*SOURCE_SCHEMES)
    """hf://org/name[@revision], s3://bucket/prefix, file://path, builtin://NAME, or run://RUN[/step-N] (a checkpoint of an earlier TrainingRun)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit); overrides an @revision in the source."""
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """Dtype the weights are loaded in (transformers `dtype`)."""
    trust_remote_code: bool = False
    """Allow code shipped with a hub model to run (transformers `trust_remote_code`)."""
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = None
    """Attention kernel (transformers `attn_implementation`); the library's choice when left out."""
    quantization: Quantization | None = None
    """Load the base model quantized with bitsandbytes (QLoRA); needs a CUDA GPU."""


class Quantization(ApiModel):
    """bitsandbytes quantization of the base model (transformers `BitsAndBytesConfig`)."""

    bits: Literal[4, 8]
    """4-bit (`load_in_4bit`) or 8-bit (`load_in_8bit`) weights."""
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type (`bnb_4bit_quant_type`)."""
    double_quant: bool = True
    """Quantize the quantization constants too (`bnb_4bit_use_double_quant`)."""
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """Dtype matrix multiplications run in (`bnb_4bit_compute_dtype`)."""


class TokenizerSource(ApiModel):
    """Where the tokenizer comes from, when not from the model's source."""

    source: source_uri(*SOURCE_SCHEMES)
    """Same URI forms as model.source."""


class S3Storage(ApiModel):
    """An S3-compatible object store (AWS S3, MinIO, Ceph…)."""

    endpoint: str | None = Field(
        default=None, json_schema_extra={"pattern": r"^https?://[^\s/@]+(/\S*)?$"}
    )
    """Endpoint URL, e.g. http://minio.storage.svc:9000; AWS when left out."""
    region: str | None = None
    """Region name passed to boto3."""
    credentials_secret: str | None = Field(default=None, pattern=DNS_LABEL_PATTERN)
    """Name of a Secret with keys AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY; boto3's default chain (IRSA, workload identity) when left out."""
    addressing_style: Literal["auto", "path", "virtual"] = "auto"
    """S3 addressing style; MinIO usually wants path."""

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if re.match(USERINFO_PATTERN, value):
            raise ValueError(
                "credentials must not be written in the endpoint; use credentialsSecret"
            )
        if not re.match(r"^https?://[^\s/]+", value):
            raise ValueError(f"{value!r} is not an http(s) URL")
        return value


class Storage(ApiModel):
    """Object storage for datasets, models and checkpoints."""

    s3: S3Storage | None = None
    """S3-compatible storage settings."""


class SecretKeySelector(ApiModel):
    """A key of a Secret."""

    name: str = Field(pattern=DNS_LABEL_PATTERN)
    """Name of the Secret."""
    key: str
    """Key within the Secret."""


class EnvVarSource(ApiModel):
    """Where an environment variable's value comes from."""

    secret_key_ref: SecretKeySelector
    """A key of a Secret in the run's namespace."""


class EnvVar(ApiModel):
    """An environment variable for the training containers."""

    name: str = Field(pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$", max_length=256)
    """Variable name."""
    value: str | None = None
    """Literal value; not allowed for names that look like credentials (use valueFrom)."""
    value_from: EnvVarSource | None = None
    """Take the value from a Secret."""


class Toleration(ApiModel):
    """A Kubernetes toleration."""

    key: str | None = None
    """Taint key; all keys when left out with operator Exists."""
    operator: Literal["Exists", "Equal"] = "Equal"
    """How key and value are compared."""
    value: str | None = None
    """Taint value to match."""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """Taint effect to match; all effects when left out."""
    toleration_seconds: int | None = None
    """How long a NoExecute taint is tolerated."""


class Resources(ApiModel):
    """Compute resources of one training pod (one node). GPUs come from distributed.gpusPerNode."""

    requests: dict[str, Quantity] | None = None
    """Resource requests, e.g. {cpu: 8, memory: 64Gi}."""
    limits: dict[str, Quantity] | None = None
    """Resource limits."""
    shm_size: str = "16Gi"
    """Size of the memory-backed /dev/shm (NCCL and data loaders need more than the 64Mi default)."""


class Scheduling(ApiModel):
    """Where and with what priority the pods run."""

    queue: str | None = None
    """Kueue LocalQueue name; the run is admitted by Kueue (label kueue.x-k8s.io/queue-name)."""
    priority_class_name: str | None = None
    """PriorityClass of the pods."""
    node_selector: dict[str, str] | None = None
    """Node labels the pods require."""
    tolerations: list[Toleration] | None = None
    """Taints the pods tolerate."""
    affinity: dict[str, Any] | None = Field(
        default=None, json_schema_extra={"x-kubernetes-preserve-unknown-fields": True}
    )
    """Kubernetes affinity, passed through as written."""
    service_account_name: str | None = None
    """ServiceAccount of the pods (workload identity for S3); the namespace default when left out."""


ENV_RULES: tuple[Rule, ...] = (
    Rule(
        name="no-literal-credentials",
        cel=(
            "!has(self.env) || self.env.all(e, !has(e.value) || "
            f"!e.name.matches('{SECRET_ENV_PATTERN}'))"
        ),
        message=(
            "credentials must not be written in a spec: take variables named like "
            "secrets from a Secret with valueFrom.secretKeyRef"
        ),
        field="env",
        check=lambda s: all(
            e.value is None or not re.search(SECRET_ENV_PATTERN, e.name) for e in s.env or []
        ),
    ),
    Rule(
        name="env-value-or-value-from",
        cel="!has(self.env) || self.env.all(e, !(has(e.value) && has(e.valueFrom)))",
        message="an env variable takes value or valueFrom, not both",
        field="env",
        check=lambda s: all(e.value is None or e.value_from is None for e in s.env or []),
    ),
)
"""Rules of every spec with an `env` list."""
