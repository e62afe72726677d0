"""TrainingRun: one post-training job (SFT, DPO, KTO, reward model, GRPO, RLOO, pretraining).

TRL, PEFT, DeepSpeed and vLLM options keep their library's names (camelCased), so the
library's own documentation explains them. Options left out take the library's default.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from trainyard.api.base import API_VERSION, ApiModel, add_rules_to_schema
from trainyard.api.common import (
    ENV_RULES,
    EnvVar,
    ModelSource,
    ObjectMeta,
    Quantization,  # noqa: F401  (resolves ModelSource's forward reference in TrainedModel)
    Resources,
    Scheduling,
    Storage,
    source_uri,
)
from trainyard.api.rules import Rule, nested_error
from trainyard.api.status import Condition

Method = Literal["sft", "dpo", "kto", "reward", "grpo", "rloo", "pretrain"]
METHODS: tuple[str, ...] = ("sft", "dpo", "kto", "reward", "grpo", "rloo", "pretrain")
BUILTIN_REWARDS: tuple[str, ...] = (
    "regex",
    "clause_presence",
    "length",
    "reference_similarity",
    "count_match",
    "redundancy_penalty",
    "extraneous_content_penalty",
    "code_execution",
)
Phase = Literal["Pending", "Running", "Restarting", "Suspended", "Succeeded", "Failed", "Invalid"]


class RunPhase(StrEnum):
    """`status.phase` of a TrainingRun, for humans (`kubectl get`); conditions say the rest."""

    PENDING = "Pending"
    RUNNING = "Running"
    RESTARTING = "Restarting"
    SUSPENDED = "Suspended"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    INVALID = "Invalid"


TERMINAL_PHASES = frozenset({RunPhase.SUCCEEDED, RunPhase.FAILED})


class RunCondition(StrEnum):
    """The condition types the operator sets on a TrainingRun (the CRD lists exactly these)."""

    VALID = "Valid"
    RUNNING = "Running"
    STALLED = "Stalled"
    SUSPENDED = "Suspended"
    SPEC_APPLIED = "SpecApplied"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    CLEANED_UP = "CleanedUp"


RUN_CONDITION_MEANINGS: dict[RunCondition, str] = {
    RunCondition.VALID: "the spec passed validation (False: status.message says what to fix)",
    RunCondition.RUNNING: "every worker of the current attempt runs",
    RunCondition.STALLED: "the step has not moved for runPolicy.stallTimeoutSeconds",
    RunCondition.SUSPENDED: "spec.suspend stopped the workers",
    RunCondition.SPEC_APPLIED: "the pods run the spec as it is now (False: an edit waits for the next attempt)",
    RunCondition.SUCCEEDED: "the workers finished",
    RunCondition.FAILED: "the run stopped for good (restart budget, deadline)",
    RunCondition.CLEANED_UP: "the children were deleted after runPolicy.ttlSecondsAfterFinished",
}


class TrainedModel(ModelSource):
    """The model a run trains: a checkpoint, or (init random) an architecture with random weights."""

    init: Literal["pretrained", "random"] = "pretrained"
    """pretrained: load the source's weights. random: build the architecture (the source's config.json with config over it) with random weights seeded by training.seed, e.g. to pretrain from scratch; only the source's config.json and tokenizer are read."""
    config: dict[str, Any] | None = Field(
        default=None, json_schema_extra={"x-kubernetes-preserve-unknown-fields": True}
    )
    """transformers config options under config.json's names, laid over the source's config.json (e.g. {num_hidden_layers: 4, hidden_size: 256}); with model_type the whole architecture is written here and the source only gives the tokenizer (vocab_size defaults to the tokenizer's size). Needs init random."""

    rules = (
        Rule(
            name="model-config-needs-random-init",
            cel="!has(self.config) || (has(self.init) && self.init == 'random')",
            message="config builds a new architecture: it needs init random",
            field="config",
            check=lambda m: m.config is None or m.init == "random",
        ),
    )


class DatasetSpec(ApiModel):
    """The training data and how its columns map onto the method's inputs."""

    source: source_uri("hf", "s3", "file", "builtin")
    """hf://org/name[@revision] (a hub dataset id), s3://bucket/key.jsonl|.parquet, file://path, or builtin://datasets/NAME."""
    config: str | None = None
    """Configuration (subset) of a hub dataset, e.g. main for gsm8k (`datasets.load_dataset` name)."""
    format: Literal[
        "auto", "chat", "alpaca", "preference", "unpaired_preference", "prompt", "text"
    ] = "auto"
    """Layout of the records; auto picks from the columns present."""
    split: str = "train"
    """Split of a hub dataset."""
    prompt_field: str = "prompt"
    """Column with the prompt (prompt-only, preference and GRPO/RLOO data)."""
    completion_field: str = "completion"
    """Column with the completion (prompt/completion SFT data)."""
    messages_field: str = "messages"
    """Column with chat messages ([{role, content}, …])."""
    chosen_field: str = "chosen"
    """Column with the preferred answer (preference data)."""
    rejected_field: str = "rejected"
    """Column with the rejected answer (preference data)."""
    label_field: str = "label"
    """Column with the desirable (true) / undesirable (false) label (KTO data)."""
    text_field: str = "text"
    """Column with raw text (pretraining)."""
    instruction_field: str = "instruction"
    """Alpaca instruction column."""
    input_field: str = "input"
    """Alpaca input column (may be empty)."""
    output_field: str = "output"
    """Alpaca output column: the completion; instruction and input tokens are masked from the loss."""
    eval_source: source_uri("hf", "s3", "file", "builtin") | None = None
    """Separate evaluation data (same URI forms as source)."""
    eval_split: float | None = Field(default=None, gt=0, lt=1)
    """Fraction of the training data held out for evaluation when evalSource is left out."""
    max_samples: int | None = Field(default=None, ge=1)
    """Use at most this many training records."""

    rules = (
        Rule(
            name="config-needs-hub-dataset",
            cel="!has(self.config) || self.source.startsWith('hf://')",
            message="config names a subset of a hub dataset: it applies to hf:// sources only",
            field="config",
            check=lambda d: d.config is None or d.source.startswith("hf://"),
        ),
    )


class LoraSpec(ApiModel):
    """PEFT adapter (peft `LoraConfig`)."""

    type: Literal["lora"] = "lora"
    """Adapter type."""
    r: int = Field(default=16, ge=1, le=1024)
    """Rank of the update matrices (`r`)."""
    alpha: int = Field(default=32, ge=1)
    """Scaling numerator (`lora_alpha`)."""
    dropout: float = Field(default=0.05, ge=0, lt=1)
    """Dropout on the adapter input (`lora_dropout`)."""
    target_modules: list[str] = Field(default_factory=lambda: ["all-linear"])
    """Modules that get adapters (`target_modules`); [all-linear] for every linear layer but the output head. Each entry names a module by its full dotted name or its last parts (q_proj matches model.layers.0.self_attn.q_proj); an entry that matches no module of the model is refused when training starts, with the names that exist."""
    target_parameters: list[str] | None = Field(default=None, min_length=1)
    """Parameters (not modules) that get adapters (`target_parameters`), e.g. the fused expert weights of a mixture-of-experts model (mlp.experts.gate_up_proj, mlp.experts.down_proj), which are not linear layers; an entry that matches no parameter is refused when training starts."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Which biases are trained (`bias`)."""
    modules_to_save: list[str] | None = None
    """Modules trained fully and saved beside the adapter (`modules_to_save`)."""
    use_rslora: bool = False
    """Rank-stabilized scaling alpha/sqrt(r) (`use_rslora`)."""
    use_dora: bool = False
    """Weight-decomposed adapters (`use_dora`)."""

    rules = (
        Rule(
            name="lora-targets-something",
            cel="!has(self.targetModules) || size(self.targetModules) > 0 || has(self.targetParameters)",
            message="targetModules may only be empty when targetParameters names what to adapt",
            field="targetModules",
            check=lambda p: bool(p.target_modules) or p.target_parameters is not None,
        ),
        Rule(
            name="lora-target-parameters-without-dropout",
            cel="!has(self.targetParameters) || (has(self.dropout) && self.dropout == 0.0)",
            message=(
                "PEFT's adapters on parameters (targetParameters) do not work with dropout "
                "(lora_dropout applies to the whole adapter); set dropout: 0"
            ),
            field="dropout",
            check=lambda p: p.target_parameters is None or p.dropout == 0,
        ),
    )

    @field_validator("target_modules", mode="before")
    @classmethod
    def _one_module_string(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class EarlyStopping(ApiModel):
    """Stop when the evaluation metric stops improving (transformers `EarlyStoppingCallback`)."""

    patience: int = Field(default=3, ge=1)
    """Evaluations without improvement before stopping (`early_stopping_patience`)."""
    threshold: float = Field(default=0.0, ge=0)
    """Smallest change that counts as improvement (`early_stopping_threshold`)."""
    metric: str = "eval_loss"
    """Metric compared (`metric_for_best_model`)."""
    greater_is_better: bool = False
    """Whether a larger metric is better (`greater_is_better`)."""


class TrainingSpec(ApiModel):
    """Optimization settings shared by every method (transformers `TrainingArguments`)."""

    learning_rate: float = Field(default=2.0e-5, gt=0)
    """Peak learning rate (`learning_rate`)."""
    epochs: float = Field(default=1, gt=0)
    """Passes over the data (`num_train_epochs`)."""
    max_steps: int | None = Field(default=None, ge=1)
    """Stop after this many optimizer steps; overrides epochs (`max_steps`)."""
    per_device_batch_size: int = Field(default=8, ge=1)
    """Batch size per GPU (`per_device_train_batch_size`)."""
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    """Micro-batches per optimizer step (`gradient_accumulation_steps`)."""
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    """Mixed precision; CPU runs use fp32 whatever is set."""
    lr_scheduler_type: Literal[
        "linear",
        "cosine",
        "cosine_with_restarts",
        "polynomial",
        "constant",
        "constant_with_warmup",
        "inverse_sqrt",
        "cosine_with_min_lr",
        "warmup_stable_decay",
    ] = "linear"
    """Learning-rate schedule (`lr_scheduler_type`)."""
    warmup_ratio: float | None = Field(default=None, ge=0, lt=1)
    """Fraction of steps spent warming up (`warmup_ratio`)."""
    warmup_steps: int | None = Field(default=None, ge=0)
    """Warm-up steps; overrides warmupRatio (`warmup_steps`)."""
    weight_decay: float = Field(default=0.0, ge=0)
    """AdamW weight decay (`weight_decay`)."""
    max_grad_norm: float = Field(default=1.0, ge=0)
    """Gradient clipping norm (`max_grad_norm`)."""
    optim: str = "adamw_torch"
    """Optimizer name as transformers spells it (`optim`), e.g. adamw_torch, paged_adamw_8bit."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory (`gradient_checkpointing`)."""
    max_length: int | None = Field(default=None, ge=8)
    """Longest tokenized sequence (`max_length`); the trainer's default when left out."""
    seed: int = 42
    """Random seed (`seed`)."""
    logging_steps: int = Field(default=10, ge=1)
    """Log metrics every this many steps (`logging_steps`)."""
    eval_steps: int | None = Field(default=None, ge=1)
    """Evaluate every this many steps (`eval_steps`); once per epoch when left out."""
    early_stopping: EarlyStopping | None = None
    """Stop early on a plateau of the evaluation metric; needs evaluation data."""
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=list, max_length=3
    )
    """Experiment trackers that get the trainer's logs (`report_to`, transformers' names); TensorBoard event files are written to runs/ in the output directory (transformers' place) and uploaded beside the checkpoints, to checkpoint.uri/tensorboard/, at each save and at the end. Credentials come from env (valueFrom.secretKeyRef), e.g. WANDB_API_KEY, MLFLOW_TRACKING_URI; Prometheus metrics are exported either way."""
    extra: dict[str, Any] = Field(
        default_factory=dict, json_schema_extra={"x-kubernetes-preserve-unknown-fields": True}
    )
    """Options of the method's TRL config (TrainingArguments and TRL's own) that Trainyard does not model, under their library names, e.g. {use_liger_kernel: true, torch_compile: true}; checked against the installed TRL config class (a typo is refused with the close names) and applied over the options Trainyard derives. Options Trainyard models are refused with the field to set instead."""


class SFTSpec(ApiModel):
    """Supervised fine-tuning (TRL `SFTConfig`)."""

    packing: bool = False
    """Pack several examples into each sequence (`packing`)."""
    completion_only_loss: bool = True
    """Mask prompt tokens from the loss for prompt/completion and alpaca data (`completion_only_loss`)."""
    assistant_only_loss: bool = False
    """For chat data, train only on assistant turns (`assistant_only_loss`)."""


class DPOSpec(ApiModel):
    """Direct preference optimization and its variants (TRL `DPOConfig`)."""

    beta: float = Field(default=0.1, gt=0)
    """Strength of the KL penalty to the reference model (`beta`)."""
    loss_type: Literal[
        "sigmoid",
        "hinge",
        "ipo",
        "exo_pair",
        "nca_pair",
        "robust",
        "bco_pair",
        "sppo_hard",
        "aot",
        "aot_unpaired",
        "apo_zero",
        "apo_down",
        "discopop",
        "sigmoid_norm",
    ] = "sigmoid"
    """Preference loss (`loss_type`): sigmoid is DPO, ipo is IPO."""
    label_smoothing: float = Field(default=0.0, ge=0, le=0.5)
    """Assumed label noise, conservative DPO (`label_smoothing`)."""
    precompute_ref_log_probs: bool = False
    """Compute reference log-probs once up front (`precompute_ref_log_probs`)."""
    sync_ref_model: bool = False
    """Move the reference model toward the policy periodically (`sync_ref_model`)."""
    ref_model_sync_steps: int = Field(default=512, ge=1)
    """Steps between reference-model syncs (`ref_model_sync_steps`)."""
    ref_model_mixup_alpha: float = Field(default=0.6, ge=0, le=1)
    """Weight of the policy in the synced reference (`ref_model_mixup_alpha`)."""


class KTOSpec(ApiModel):
    """Kahneman-Tversky optimization on unpaired preference data (TRL `KTOConfig`)."""

    beta: float = Field(default=0.1, gt=0)
    """Strength of the KL penalty (`beta`)."""
    desirable_weight: float = Field(default=1.0, gt=0)
    """Loss weight of desirable examples (`desirable_weight`)."""
    undesirable_weight: float = Field(default=1.0, gt=0)
    """Loss weight of undesirable examples (`undesirable_weight`)."""


class RewardModelSpec(ApiModel):
    """Training a reward model on preference data (TRL `RewardConfig`)."""

    center_rewards_coefficient: float | None = Field(default=None, ge=0)
    """Pushes rewards toward zero mean (`center_rewards_coefficient`)."""


class PretrainSpec(ApiModel):
    """Continued pretraining on raw text."""

    packing: bool = True
    """Pack texts into full-length blocks (`packing`)."""
    block_size: int = Field(default=1024, ge=8)
    """Length of each packed block (`max_length`)."""


class RewardSpec(ApiModel):
    """One weighted component of the reward."""

    name: str = Field(pattern=r"^[a-zA-Z0-9_.-]+$", max_length=63)
    """Component name, used in logs and metrics (rewards/NAME/mean)."""
    builtin: Literal[BUILTIN_REWARDS] | None = None  # type: ignore[valid-type]
    """A built-in reward."""
    python: str | None = Field(default=None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
    """A user reward function as module:function, with TRL's reward signature."""
    weight: float = 1.0
    """Weight in the sum of components (TRL `reward_weights`)."""
    args: dict[str, Any] = Field(
        default_factory=dict, json_schema_extra={"x-kubernetes-preserve-unknown-fields": True}
    )
    """Arguments of the reward (checked against the built-in's arguments)."""

    rules = (
        Rule(
            name="builtin-or-python",
            cel="has(self.builtin) != has(self.python)",
            message="set exactly one of builtin or python",
            field="builtin",
            check=lambda r: (r.builtin is None) != (r.python is None),
        ),
    )

    @model_validator(mode="after")
    def _args_match_builtin(self) -> RewardSpec:
        if self.builtin is not None:
            from trainyard.api.rewards import BUILTIN_REWARD_ARGS
            from trainyard.api.validation import describe_errors

            args_model = BUILTIN_REWARD_ARGS[self.builtin]
            try:
                args_model.model_validate(self.args)
            except ValidationError as error:
                problems = describe_errors(args_model, error.errors(), prefix="args")
                raise nested_error(problems) from None
        return self


class PromptSpec(ApiModel):
    """How each dataset row becomes the text the policy completes: an optional system prompt and a template over the row's columns, rendered through the tokenizer's chat template, then an optional start of the assistant's turn."""

    system: str | None = Field(default=None, min_length=1)
    """System message put before the user turn (it replaces a system message of chat data)."""
    template: str | None = Field(default=None, min_length=1)
    """The user turn as a template over dataset columns in Python format syntax, e.g. "Sprint goal: {sprint_goal}\\nTeam: {team_context}" ({{ and }} for literal braces); dataset.promptField's column (or the chat data's messages) when left out. A column the data lacks is refused when training starts, with the columns it has."""
    assistant_prefix: str | None = Field(default=None, min_length=1)
    """Text the assistant's turn starts with, e.g. "<think>" for chain-of-thought; the policy continues it, and rewards score it as part of the completion."""
    chat_template: bool = True
    """Render through the tokenizer's chat template (apply_chat_template with the generation prompt); false joins system, user turn and prefix with blank lines, for base models without one."""

    @field_validator("template")
    @classmethod
    def _template_names_columns(cls, value: str | None) -> str | None:
        if value is not None:
            template_fields(value)
        return value


def template_fields(template: str) -> list[str]:
    """The column names a prompt template reads, in order; a ValueError for a template
    that names anything but plain column names.

    >>> template_fields("Sprint goal: {sprint_goal}\\nTeam: {team_context} {{literal}}")
    ['sprint_goal', 'team_context']
    """
    import string

    names: list[str] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as error:
        raise ValueError(
            f"{template!r} is not a valid template ({error}); name columns as {{column}} "
            "and write literal braces as {{ and }}"
        ) from None
    for _text, name, _spec, _conversion in parsed:
        if name is None:
            continue
        if not name.isidentifier():
            raise ValueError(
                f"{{{name}}} is not a column name; a template names dataset columns as "
                "{column} (letters, digits, _), and literal braces are written {{ and }}"
            )
        if name not in names:
            names.append(name)
    return names


class OnlineRLSpec(ApiModel):
    """Options GRPO and RLOO share: generation, rewards, reference model."""

    num_generations: int = Field(default=8, ge=2)
    """Completions sampled per prompt (`num_generations`)."""
    max_completion_length: int = Field(default=512, ge=1)
    """Longest completion generated (`max_completion_length`)."""
    temperature: float = Field(default=1.0, gt=0)
    """Sampling temperature (`temperature`)."""
    top_p: float = Field(default=1.0, gt=0, le=1)
    """Nucleus sampling (`top_p`)."""
    beta: float | None = Field(default=None, ge=0)
    """KL coefficient (`beta`); 0 loads no reference model."""
    epsilon: float = Field(default=0.2, gt=0)
    """Clipping range (`epsilon`)."""
    num_iterations: int = Field(default=1, ge=1)
    """Optimization passes per generation batch (`num_iterations`)."""
    strip_thinking: bool = False
    """Remove <think>…</think> from completions before scoring."""
    rewards: list[RewardSpec] = Field(default_factory=list, max_length=32)
    """Weighted reward components."""
    reward_model: ModelSource | None = None
    """A trained reward model (sequence classifier) scored alongside the rewards."""
    reward_model_weight: float = 1.0
    """Weight of the reward model's score."""
    reward_workers: int = Field(default=1, ge=1, le=256)
    """Worker processes computing rewards (code execution)."""
    sync_ref_model: bool = False
    """Move the reference model toward the policy periodically (`sync_ref_model`)."""
    ref_model_sync_steps: int = Field(default=512, ge=1)
    """Steps between reference-model syncs (`ref_model_sync_steps`)."""
    ref_model_mixup_alpha: float = Field(default=0.6, ge=0, le=1)
    """Weight of the policy in the synced reference (`ref_model_mixup_alpha`)."""
    mask_truncated_completions: bool = False
    """Leave truncated completions out of the loss (`mask_truncated_completions`)."""
    log_completions_every: int = Field(default=10, ge=0)
    """Write every N-th step's completions and rewards to completions.jsonl; 0 never."""
    prompt: PromptSpec | None = None
    """System prompt, prompt template and assistant prefix; the dataset's prompts as they are when left out."""

    @model_validator(mode="after")
    def _unique_reward_names(self) -> OnlineRLSpec:
        names = [r.name for r in self.rewards]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise nested_error(
                [("rewards", f"reward names must be unique; repeated: {', '.join(duplicates)}")]
            )
        return self


class GRPOSpec(OnlineRLSpec):
    """Group relative policy optimization (TRL `GRPOConfig`)."""

    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo"] = (
        "dapo"
    )
    """Loss aggregation (`loss_type`)."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """How advantages are scaled (`scale_rewards`)."""


class RLOOSpec(OnlineRLSpec):
    """REINFORCE leave-one-out (TRL `RLOOConfig`)."""

    num_generations: int = Field(default=2, ge=2)
    """Completions sampled per prompt (`num_generations`)."""
    normalize_advantages: bool = False
    """Normalize advantages (`normalize_advantages`)."""


class VLLMRollout(ApiModel):
    """vLLM generation for GRPO/RLOO."""

    mode: Literal["server", "colocate"] = "server"
    """server: a separate vLLM Deployment the trainer calls; colocate: vLLM inside each training process (`vllm_mode`)."""
    tensor_parallel_size: int = Field(default=1, ge=1, le=64)
    """GPUs one model replica is split over (`--tensor-parallel-size`)."""
    data_parallel_size: int = Field(default=1, ge=1, le=64)
    """Model replicas in the server (`--data-parallel-size`)."""
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    """Fraction of GPU memory vLLM may take (`--gpu-memory-utilization`)."""
    max_model_len: int | None = Field(default=None, ge=16)
    """Longest prompt + completion (`--max-model-len`)."""
    enable_prefix_caching: bool = True
    """Reuse the KV cache of shared prompt prefixes (`--enable-prefix-caching`)."""
    image: str | None = None
    """vLLM image; the operator's default when left out."""
    resources: Resources | None = None
    """Resources of the vLLM pod besides its GPUs."""


class RolloutSpec(ApiModel):
    """How completions are generated."""

    vllm: VLLMRollout | None = None
    """Generate with vLLM; transformers generate() when left out."""


class DeepSpeedSpec(ApiModel):
    """DeepSpeed ZeRO (the `zero_optimization` section of a DeepSpeed config)."""

    zero_stage: Literal[0, 1, 2, 3] = 2
    """ZeRO stage (`zero_optimization.stage`)."""
    offload_optimizer: Literal["none", "cpu", "nvme"] = "none"
    """Where optimizer state lives (`offload_optimizer.device`)."""
    offload_param: Literal["none", "cpu", "nvme"] = "none"
    """Where parameters live, stage 3 only (`offload_param.device`)."""
    config: dict[str, Any] | None = Field(
        default=None, json_schema_extra={"x-kubernetes-preserve-unknown-fields": True}
    )
    """Extra DeepSpeed config merged over the generated one."""


class DistributedSpec(ApiModel):
    """How many machines and GPUs, and how the model is sharded."""

    nodes: int = Field(default=1, ge=1, le=1024)
    """Pods (machines), one torchrun node each."""
    gpus_per_node: int = Field(default=1, ge=0, le=16)
    """GPUs per pod; torchrun starts one process per GPU (one process on CPU when 0)."""
    deepspeed: DeepSpeedSpec | None = None
    """Shard with DeepSpeed ZeRO."""


class CheckpointSpec(ApiModel):
    """Where and how often checkpoints are kept."""

    uri: source_uri("s3", "file")
    """s3://bucket/prefix or file://path; each save lands in URI/step-N/ with a manifest written last."""
    every_steps: int = Field(default=500, ge=1)
    """Save every this many optimizer steps (`save_steps`)."""
    keep_last: int = Field(default=3, ge=1, le=1000)
    """Complete checkpoints kept; older ones are deleted."""
    resume: Literal["auto", "never"] = "auto"
    """auto: continue from the newest checkpoint whose manifest verifies."""
    export_merged: bool = False
    """Also export the LoRA adapter merged into the base model to URI/final/merged/."""


class MetricsSpec(ApiModel):
    """The Prometheus endpoint of rank 0."""

    port: int = Field(default=9400, ge=1024, le=65535)
    """Port of /metrics in the training pod."""


class OOMRecovery(ApiModel):
    """Retry a run that ran out of GPU memory with a smaller per-device batch and more
    gradient accumulation (the same effective batch), from its latest checkpoint."""

    enabled: bool = True
    """Recover from CUDA out-of-memory; false keeps the settings and turns recovery off."""
    min_per_device_batch_size: int = Field(default=1, ge=1)
    """Smallest per-device batch tried; out of memory at this size fails the run."""

    def next_batch(
        self, per_device: int, accumulation: int, spec: TrainingRunSpec | None = None
    ) -> tuple[int, int] | None:
        """(perDeviceBatchSize, gradientAccumulationSteps) of the next try: the batch halved
        (for an odd batch its largest divisor up to half, so the effective batch stays the
        same), or None when that would go below the floor. For a grpo/rloo `spec` that
        evaluates, the batch over all processes stays a multiple of numGenerations (TRL's
        evaluation batch is the per-device batch and must hold whole prompt groups).

        >>> OOMRecovery().next_batch(8, 1), OOMRecovery().next_batch(6, 2), OOMRecovery().next_batch(3, 1)
        ((4, 2), (3, 4), (1, 3))
        >>> OOMRecovery(min_per_device_batch_size=4).next_batch(4, 2) is None
        True
        """
        group = 1
        if (
            spec is not None
            and spec.online_rl is not None
            and (spec.dataset.eval_source is not None or spec.dataset.eval_split is not None)
        ):
            group = spec.online_rl.num_generations
        world = spec.world_size if spec is not None else 1
        smaller = next(
            (
                d
                for d in range(per_device // 2, self.min_per_device_batch_size - 1, -1)
                if d >= 1 and per_device % d == 0 and (d * world) % group == 0
            ),
            None,
        )
        if smaller is None:
            return None
        return smaller, accumulation * (per_device // smaller)


class RunPolicy(ApiModel):
    """Restarts, stalls and clean-up."""

    max_restarts: int = Field(default=3, ge=0, le=100)
    """Gang restarts after failures (preemptions are counted apart and do not use the budget)."""
    stall_timeout_seconds: int | None = Field(default=None, ge=60)
    """Mark the run Stalled when its step has not moved for this long."""
    restart_on_stall: bool = False
    """Restart a stalled run from its latest checkpoint (counts against maxRestarts)."""
    ttl_seconds_after_finished: int | None = Field(default=None, ge=0)
    """Delete the run's pods and services this long after it finished; the run and its checkpoints stay."""
    active_deadline_seconds: int | None = Field(default=None, ge=1)
    """Fail the run (and stop its workers) once it has been active this long: counted from when all workers first ran, restarted on resume after a suspend."""
    oom_recovery: OOMRecovery | None = None
    """On CUDA out-of-memory, restart from the latest checkpoint with perDeviceBatchSize halved and gradientAccumulationSteps doubled, down to minPerDeviceBatchSize (each retry counts against maxRestarts)."""


_METHOD_BLOCKS = ("sft", "dpo", "kto", "reward", "grpo", "rloo", "pretrain")

SPEC_RULES: tuple[Rule, ...] = (
    *(
        Rule(
            name=f"{block}-block-needs-method",
            cel=f"!has(self.{block}) || self.method == '{block}'",
            message=f"{block} options only apply to method {block}",
            field=block,
            check=lambda s, block=block: getattr(s, block) is None or s.method == block,
        )
        for block in _METHOD_BLOCKS
    ),
    Rule(
        name="online-rl-needs-rewards",
        cel=(
            "!(self.method in ['grpo', 'rloo']) || "
            "(self.method == 'grpo' && has(self.grpo) && "
            "((has(self.grpo.rewards) && size(self.grpo.rewards) > 0) || has(self.grpo.rewardModel))) || "
            "(self.method == 'rloo' && has(self.rloo) && "
            "((has(self.rloo.rewards) && size(self.rloo.rewards) > 0) || has(self.rloo.rewardModel)))"
        ),
        message="grpo and rloo need at least one reward or a rewardModel",
        field="method",
        check=lambda s: (
            s.method not in ("grpo", "rloo")
            or (
                (rl := s.online_rl) is not None
                and (bool(rl.rewards) or rl.reward_model is not None)
            )
        ),
    ),
    *(
        Rule(
            name=f"{method}-generation-batch-divisible",
            cel=(
                f"!(self.method == '{method}' && has(self.{method})) || "
                "(self.training.perDeviceBatchSize * self.training.gradientAccumulationSteps * "
                "self.distributed.nodes * (self.distributed.gpusPerNode > 0 ? self.distributed.gpusPerNode : 1)) "
                f"% self.{method}.numGenerations == 0"
            ),
            message=(
                "the generation batch (perDeviceBatchSize × gradientAccumulationSteps × nodes × "
                f"gpusPerNode) must be a multiple of {method}.numGenerations"
            ),
            field=f"{method}.numGenerations",
            check=lambda s, method=method: (
                s.method != method
                or getattr(s, method) is None
                or s.generation_batch_size % getattr(s, method).num_generations == 0
            ),
        )
        # TRL refuses both configs otherwise (`generation_batch_size (6) must be divisible
        # by num_generations (4)`), but only in the pod, after the GPUs were scheduled.
        for method in ("grpo", "rloo")
    ),
    *(
        Rule(
            name=f"{method}-sync-ref-model-not-with-peft",
            cel=(
                f"!(self.method == '{method}' && has(self.{method}) && "
                f"self.{method}.syncRefModel && has(self.peft))"
            ),
            message=(
                "syncRefModel cannot be used with peft: with a LoRA adapter TRL keeps no separate "
                "reference model (it disables the adapter to get the reference's log-probs), so "
                "there is nothing to sync; set syncRefModel false, or train all weights (no peft)"
            ),
            field=f"{method}.syncRefModel",
            check=lambda s, method=method: (
                s.method != method
                or getattr(s, method) is None
                or not getattr(s, method).sync_ref_model
                or s.peft is None
            ),
        )
        # TRL raises NotImplementedError for this in the trainer, in the pod.
        for method in ("grpo", "rloo", "dpo")
    ),
    *(
        Rule(
            name=f"{method}-sync-ref-model-needs-beta",
            cel=(
                f"!(self.method == '{method}' && has(self.{method}) && "
                f"self.{method}.syncRefModel) || "
                f"(has(self.{method}.beta) && self.{method}.beta > 0.0)"
                + (" || !has(self.rloo.beta)" if method == "rloo" else "")
            ),
            message=(
                f"syncRefModel needs {method}.beta above 0: with beta 0"
                + (" (GRPO's default)" if method == "grpo" else "")
                + " TRL loads no reference model, so there is nothing to sync"
            ),
            field=f"{method}.syncRefModel",
            check=lambda s, method=method: (
                s.method != method
                or getattr(s, method) is None
                or not getattr(s, method).sync_ref_model
                or (getattr(s, method).beta is None and method == "rloo")
                or (getattr(s, method).beta or 0) > 0
            ),
        )
        # TRL's defaults: GRPOConfig beta 0.0, RLOOConfig beta 0.05.
        for method in ("grpo", "rloo")
    ),
    Rule(
        name="dpo-sync-ref-model-not-precomputed",
        cel=(
            "!(self.method == 'dpo' && has(self.dpo) && self.dpo.syncRefModel && "
            "self.dpo.precomputeRefLogProbs)"
        ),
        message=(
            "syncRefModel cannot be used with precomputeRefLogProbs: precomputed reference "
            "log-probs assume a fixed reference model; set one of them false"
        ),
        field="dpo.syncRefModel",
        check=lambda s: (
            s.method != "dpo"
            or s.dpo is None
            or not (s.dpo.sync_ref_model and s.dpo.precompute_ref_log_probs)
        ),
    ),
    Rule(
        name="rollout-needs-online-rl",
        cel="!has(self.rollout) || self.method in ['grpo', 'rloo']",
        message="rollout only applies to methods grpo and rloo",
        field="rollout",
        check=lambda s: s.rollout is None or s.method in ("grpo", "rloo"),
    ),
    Rule(
        name="early-stopping-needs-eval",
        cel=(
            "!has(self.training.earlyStopping) || has(self.dataset.evalSource) || "
            "has(self.dataset.evalSplit)"
        ),
        message="earlyStopping needs evaluation data: set dataset.evalSource or dataset.evalSplit",
        field="training.earlyStopping",
        check=lambda s: (
            s.training.early_stopping is None
            or s.dataset.eval_source is not None
            or s.dataset.eval_split is not None
        ),
    ),
    Rule(
        name="quantized-base-not-zero3",
        cel=(
            "!(has(self.model.quantization) && has(self.distributed.deepspeed) && "
            "self.distributed.deepspeed.zeroStage == 3)"
        ),
        message="a quantized base model cannot be sharded with ZeRO-3; use zeroStage 2 or less",
        field="distributed.deepspeed.zeroStage",
        check=lambda s: (
            not (
                s.model.quantization is not None
                and s.distributed.deepspeed is not None
                and s.distributed.deepspeed.zero_stage == 3
            )
        ),
    ),
    Rule(
        name="quantization-needs-lora",
        cel="!has(self.model.quantization) || has(self.peft)",
        message="a quantized base model can only be trained through an adapter: set peft (QLoRA)",
        field="model.quantization",
        check=lambda s: s.model.quantization is None or s.peft is not None,
    ),
    Rule(
        name="param-offload-needs-zero3",
        cel=(
            "!has(self.distributed.deepspeed) || self.distributed.deepspeed.offloadParam == 'none' || "
            "self.distributed.deepspeed.zeroStage == 3"
        ),
        message="offloadParam needs zeroStage 3",
        field="distributed.deepspeed.offloadParam",
        check=lambda s: (
            s.distributed.deepspeed is None
            or s.distributed.deepspeed.offload_param == "none"
            or s.distributed.deepspeed.zero_stage == 3
        ),
    ),
    Rule(
        name="oom-floor-within-batch",
        cel=(
            "!has(self.runPolicy.oomRecovery) || "
            "self.runPolicy.oomRecovery.minPerDeviceBatchSize <= self.training.perDeviceBatchSize"
        ),
        message="minPerDeviceBatchSize must not exceed training.perDeviceBatchSize",
        field="runPolicy.oomRecovery.minPerDeviceBatchSize",
        check=lambda s: (
            s.run_policy.oom_recovery is None
            or s.run_policy.oom_recovery.min_per_device_batch_size
            <= s.training.per_device_batch_size
        ),
    ),
    *ENV_RULES,
)


def _spec_schema_extras(schema: dict[str, Any], model: type[ApiModel]) -> None:
    add_rules_to_schema(schema, model)
    # Objects with defaults inside are defaulted whole, so CEL rules can read
    # spec.training.perDeviceBatchSize even when the user wrote no training block.
    for block in ("training", "distributed", "metrics", "runPolicy"):
        schema["properties"][block]["default"] = {}


class TrainingRunSpec(ApiModel):
    """Desired state of a TrainingRun."""

    model_config = ApiModel.model_config | {"json_schema_extra": _spec_schema_extras}
    rules = SPEC_RULES

    method: Method
    """Training method: sft, dpo (and IPO via dpo.lossType), kto, reward (a reward model), grpo, rloo, pretrain."""
    model: TrainedModel
    """The model trained (the policy): a checkpoint, or a configuration initialised at random (init random)."""
    tokenizer: ModelSource | None = None
    """Tokenizer, when it is not the model's own."""
    dataset: DatasetSpec
    """Training data."""
    peft: LoraSpec | None = None
    """Train a LoRA adapter instead of all weights (QLoRA with model.quantization)."""
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    """Optimization settings."""
    sft: SFTSpec | None = None
    """Options of method sft."""
    dpo: DPOSpec | None = None
    """Options of method dpo."""
    kto: KTOSpec | None = None
    """Options of method kto."""
    reward: RewardModelSpec | None = None
    """Options of method reward."""
    grpo: GRPOSpec | None = None
    """Options of method grpo."""
    rloo: RLOOSpec | None = None
    """Options of method rloo."""
    pretrain: PretrainSpec | None = None
    """Options of method pretrain."""
    rollout: RolloutSpec | None = None
    """Generation backend for grpo/rloo."""
    distributed: DistributedSpec = Field(default_factory=DistributedSpec)
    """Nodes, GPUs and sharding."""
    checkpoint: CheckpointSpec | None = None
    """Checkpoint storage; checkpoints stay inside the pod only when left out."""
    storage: Storage | None = None
    """Object storage settings (endpoint, credentials Secret)."""
    metrics: MetricsSpec = Field(default_factory=MetricsSpec)
    """Prometheus endpoint of rank 0."""
    resources: Resources | None = None
    """CPU, memory and /dev/shm of each pod."""
    scheduling: Scheduling | None = None
    """Queue, priority, node selection."""
    image: str | None = None
    """Trainer image; the operator's default (pinned) when left out."""
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    """When the kubelet pulls the image."""
    env: list[EnvVar] | None = Field(default=None, max_length=128)
    """Extra environment variables for the trainer."""
    run_policy: RunPolicy = Field(default_factory=RunPolicy)
    """Restarts, stall detection, clean-up."""
    suspend: bool = False
    """Stop the pods and keep the checkpoints; set back to false to resume from the latest checkpoint."""

    @model_validator(mode="after")
    def _check_rules(self) -> TrainingRunSpec:
        # The cross-field rules and the training.extra names, reported together.
        problems = [(rule.field, rule.message) for rule in self.rules if not rule.check(self)]
        if self.training.extra:
            from trainyard.api.trainer_extra import extra_problems

            problems += [
                (f"training.extra.{key}", message)
                for key, message in extra_problems(self.method, self.training.extra)
            ]
        if problems:
            raise nested_error(problems)
        return self

    @property
    def online_rl(self) -> OnlineRLSpec | None:
        """The GRPO or RLOO options, whichever method this is."""
        return self.grpo if self.method == "grpo" else self.rloo if self.method == "rloo" else None

    @property
    def world_size(self) -> int:
        """Training processes over all nodes."""
        return self.distributed.nodes * max(self.distributed.gpus_per_node, 1)

    @property
    def generation_batch_size(self) -> int:
        """Completions generated per optimizer step, as TRL computes it by default."""
        return (
            self.training.per_device_batch_size
            * self.training.gradient_accumulation_steps
            * self.world_size
        )


class Progress(ApiModel):
    """Training progress, read from rank 0's metrics."""

    step: int | None = None
    """Optimizer steps done."""
    total_steps: int | None = None
    """Optimizer steps planned."""
    epoch: float | None = None
    """Epochs done (fractional)."""
    loss: float | None = None
    """Latest training loss."""
    reward_mean: float | None = None
    """Latest mean reward (grpo/rloo)."""
    kl: float | None = None
    """Latest KL to the reference model."""
    tokens_per_second: float | None = None
    """Training throughput."""
    eta_seconds: int | None = None
    """Estimated seconds to the end."""
    updated_at: str | None = None
    """When the metrics were read (RFC 3339)."""


class CheckpointStatus(ApiModel):
    """The newest complete checkpoint."""

    latest_step: int | None = None
    """Step of the newest checkpoint whose manifest was written."""
    latest_uri: str | None = None
    """Where it lies."""


class OOMRecoveryStatus(ApiModel):
    """The batch the run trains with after recovering from CUDA out-of-memory."""

    recoveries: int | None = None
    """Restarts with a smaller batch after CUDA out-of-memory."""
    per_device_batch_size: int | None = None
    """Per-device batch of the current attempt (training.perDeviceBatchSize before any recovery)."""
    gradient_accumulation_steps: int | None = None
    """Gradient accumulation of the current attempt (the effective batch stays the spec's)."""


class TrainingRunStatus(ApiModel):
    """Observed state of a TrainingRun."""

    model_config = ApiModel.model_config | {"extra": "allow"}

    phase: Phase | None = None
    """Pending, Running, Restarting, Suspended, Succeeded, Failed or Invalid."""
    conditions: list[Condition] | None = Field(
        default=None,
        description="; ".join(
            f"{type_}: {meaning}" for type_, meaning in RUN_CONDITION_MEANINGS.items()
        )
        + ".",
    )
    observed_generation: int | None = None
    """metadata.generation this status describes."""
    progress: Progress | None = None
    """Step, loss, reward and throughput."""
    checkpoints: CheckpointStatus | None = None
    """The newest complete checkpoint."""
    restarts: int | None = None
    """Gang restarts after failures (counted against runPolicy.maxRestarts)."""
    preemptions: int | None = None
    """Gang restarts after preemptions or node loss (not counted against the budget)."""
    restart_attempt: int | None = None
    """Current attempt number (names the attempt's Job)."""
    start_time: str | None = None
    """When the first pod started."""
    completion_time: str | None = None
    """When the run finished."""
    message: str | None = None
    """Why the run is in its phase."""
    applied_spec: dict[str, str] | None = None
    """A hash of each spec field as the current attempt's config was rendered from it (suspend and runPolicy apply at once and are left out); the SpecApplied condition names fields changed since."""
    oom_recovery: OOMRecoveryStatus | None = None
    """The smaller batch the run trains with after CUDA out-of-memory (runPolicy.oomRecovery)."""


class TrainingRun(ApiModel):
    """One post-training job."""

    api_version: Literal["trainyard.dev/v1alpha1"] = API_VERSION
    """trainyard.dev/v1alpha1."""
    kind: Literal["TrainingRun"] = "TrainingRun"
    """TrainingRun."""
    metadata: ObjectMeta
    """Standard object metadata."""
    spec: TrainingRunSpec
    """Desired state."""
    status: TrainingRunStatus | None = None
    """Observed state, written by the operator."""
