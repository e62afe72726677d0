"""What every method shares: TrainingArguments options, LoRA, QLoRA, DeepSpeed, model loading options.

The builders are pure: a spec goes in, library options come out under the library's
own names, so a user can look each one up in the transformers/TRL/PEFT/DeepSpeed docs.

>>> deepspeed_config(DeepSpeedSpecLike(zero_stage=2))["zero_optimization"]["stage"]
2
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Any

from trainyard.api.contract import Env


def _checkpointing_option() -> str:
    """transformers 5.x renamed `gradient_checkpointing` to `activation_checkpointing`;
    TRL configs still default the old name to True, so the new name is set explicitly."""
    from dataclasses import fields

    from transformers import TrainingArguments

    names = {f.name for f in fields(TrainingArguments)}
    return (
        "activation_checkpointing"
        if "activation_checkpointing" in names
        else "gradient_checkpointing"
    )


CHECKPOINTING = _checkpointing_option()


class SpecError(ValueError):
    """A spec that cannot run in this environment; the message names the field and the fix."""


@dataclass
class Environment:
    """What the machine offers, detected once at start-up (see `detect_environment`)."""

    cuda: bool
    world_size: int = 1
    rank: int = 0


def detect_environment() -> Environment:
    import os

    import torch

    return Environment(
        cuda=torch.cuda.is_available(),
        world_size=int(os.environ.get("WORLD_SIZE", "1")),
        rank=int(os.environ.get("RANK", "0")),
    )


@dataclass
class TrainContext:
    """Everything a method's trainer builder needs, resolved and loaded."""

    spec: Any
    """The TrainingRunSpec."""
    model: str
    """Local path or hub id of the model; TRL loads it with `model_init_kwargs`."""
    model_init_kwargs: dict[str, Any]
    tokenizer: Any
    train_dataset: Any
    eval_dataset: Any = None
    peft_config: Any = None
    quantization_config: Any = None
    callbacks: list[Any] = field(default_factory=list)
    base_args: dict[str, Any] = field(default_factory=dict)
    """TrainingArguments options shared by every method (see `training_arguments`)."""
    reward_funcs: list[Any] = field(default_factory=list)
    reward_weights: list[float] | None = None
    reward_processing_classes: list[Any] | None = None
    trainer_options: dict[str, Any] = field(default_factory=dict)
    """TRL config options from the operator (see `read_trainer_options`), applied last."""


TRAINER_OPTIONS_ENV = Env.TRAINER_OPTIONS
"""Path of a JSON object of TRL config options only the operator decides (its
`trainer.json`: the vLLM server address, timeout, group port, colocate memory share)."""


def read_trainer_options() -> dict[str, Any]:
    """The operator's TRL options, or {} when TRAINYARD_TRAINER_OPTIONS is unset or its
    file is absent (a local run has none)."""
    import json
    import os

    path = os.environ.get(TRAINER_OPTIONS_ENV)
    if not path or not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        try:
            options = json.load(f)
        except json.JSONDecodeError as e:
            raise SpecError(f"{TRAINER_OPTIONS_ENV} ({path}): not valid JSON: {e}") from None
    if not isinstance(options, dict):
        raise SpecError(
            f"{TRAINER_OPTIONS_ENV} ({path}): must be a JSON object of TRL config options, "
            f"got {type(options).__name__}"
        )
    return options


def apply_trainer_options(
    config_class: type, options: dict[str, Any], trainer_options: dict[str, Any]
) -> dict[str, Any]:
    """`options` with the operator's `trainer_options` laid over them.

    The operator's values win: it knows what the spec cannot (the rollout Service's
    address, the colocate memory share beside training). A key `config_class` does not
    take is refused by name rather than left to a bare TypeError deep in TRL.
    """
    from dataclasses import fields

    known = {f.name for f in fields(config_class)}
    unknown = sorted(set(trainer_options) - known)
    if unknown:
        raise SpecError(
            f"{TRAINER_OPTIONS_ENV}: {', '.join(map(repr, unknown))} "
            f"{'is not an option' if len(unknown) == 1 else 'are not options'} of TRL "
            f"{config_class.__name__}; only its own option names are allowed"
        )
    return {**options, **trainer_options}


REPORT_TO_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
"""The package each training.reportTo tracker needs in the trainer image."""

BITSANDBYTES_OPTIMIZERS = ("8bit", "paged_")
"""Parts of transformers `optim` names whose optimizers need bitsandbytes."""


def installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def check_dataset_size(spec: Any, rows: int, world_size: int) -> None:
    """Refuse a GRPO/RLOO data set smaller than one generation batch's unique prompts
    (TRL's RepeatSampler then yields nothing, and training stops with `args.max_steps
    must be set to a positive value`).

    >>> from types import SimpleNamespace as S
    >>> spec = S(online_rl=S(num_generations=2), dataset=S(max_samples=None),
    ...          training=S(per_device_batch_size=8, gradient_accumulation_steps=2))
    >>> check_dataset_size(spec, 8, 1)
    >>> check_dataset_size(spec, 7, 1)
    Traceback (most recent call last):
    ...
    trainyard.workloads.methods.common.SpecError: dataset: 7 rows are fewer than the 8 prompts one generation batch takes (training.perDeviceBatchSize 8 × 1 processes × training.gradientAccumulationSteps 2 / grpo.numGenerations 2); use more rows or a smaller batch
    """
    rl = spec.online_rl
    if rl is None:
        return
    training = spec.training
    # TRL: generation_batch_size = per_device × processes × steps_per_generation (= the
    # accumulation steps), and each batch holds generation_batch_size / num_generations prompts.
    prompts = (
        training.per_device_batch_size * world_size * training.gradient_accumulation_steps
    ) // rl.num_generations
    if rows < prompts:
        method = "rloo" if getattr(spec, "method", "grpo") == "rloo" else "grpo"
        raise SpecError(
            f"dataset: {rows} rows are fewer than the {prompts} prompts one generation batch "
            f"takes (training.perDeviceBatchSize {training.per_device_batch_size} × {world_size} "
            f"processes × training.gradientAccumulationSteps "
            f"{training.gradient_accumulation_steps} / {method}.numGenerations "
            f"{rl.num_generations}); use more rows or a smaller batch"
        )


def check_environment(spec: Any, env: Environment) -> None:
    """Refuse, before loading anything, what this machine cannot run."""
    if spec.distributed.deepspeed is not None and not installed("deepspeed"):
        raise SpecError(
            "distributed.deepspeed: DeepSpeed is not installed here; install it with "
            "`pip install 'trainyard[deepspeed]'`, or train without it "
            "(`--set distributed.deepspeed=null`)"
        )
    optim = spec.training.optim
    if any(part in optim for part in BITSANDBYTES_OPTIMIZERS) and not installed("bitsandbytes"):
        raise SpecError(
            f"training.optim: {optim} needs bitsandbytes, which is not installed here "
            "(and needs a CUDA GPU); use adamw_torch (`--set training.optim=adamw_torch`)"
        )
    for tracker in spec.training.report_to:
        module = REPORT_TO_MODULES[tracker]
        if not installed(module):
            raise SpecError(
                f"training.reportTo: {tracker} needs the {module} package, which is not installed "
                f"in this image; install it (pip install {module}) or leave {tracker} out"
            )
    if spec.model.quantization is not None and not env.cuda:
        raise SpecError(
            "model.quantization: quantization needs a CUDA GPU (bitsandbytes); this machine has "
            "none. Remove model.quantization to train the full-precision model with LoRA on CPU."
        )
    if spec.rollout is not None and spec.rollout.vllm is not None and not env.cuda:
        raise SpecError(
            "rollout.vllm: vLLM rollouts need a CUDA GPU (TRL syncs weights into vLLM over NCCL); "
            "this machine has none. Remove rollout.vllm to generate with transformers on CPU."
        )
    if spec.training.precision != "fp32" and env.cuda:
        import torch

        if spec.training.precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise SpecError(
                "training.precision: bf16 is not supported by this GPU; use fp16 or fp32"
            )


def training_arguments(
    spec: Any, output_dir: str, env: Environment, run_name: str | None = None
) -> dict[str, Any]:
    """`TrainingArguments` options common to every TRL config; `run_name` (the
    TrainingRun's name) names the run in the trackers of training.reportTo."""
    training = spec.training
    args: dict[str, Any] = {
        "output_dir": output_dir,
        "learning_rate": training.learning_rate,
        "num_train_epochs": training.epochs,
        "max_steps": training.max_steps if training.max_steps is not None else -1,
        "per_device_train_batch_size": training.per_device_batch_size,
        "per_device_eval_batch_size": training.per_device_batch_size,
        "gradient_accumulation_steps": training.gradient_accumulation_steps,
        "lr_scheduler_type": training.lr_scheduler_type,
        "weight_decay": training.weight_decay,
        "max_grad_norm": training.max_grad_norm,
        "optim": training.optim,
        CHECKPOINTING: training.gradient_checkpointing,
        "seed": training.seed,
        "data_seed": training.seed,
        "logging_steps": training.logging_steps,
        "logging_first_step": True,
        # Metrics go to Prometheus through Trainyard's own callback, and to the trackers
        # training.reportTo names (TensorBoard writes OUTPUT/runs/, uploaded beside the
        # checkpoints by `trainyard.workloads.metrics.TensorBoardUpload`).
        "report_to": list(training.report_to) or "none",
        "save_only_model": False,
    }
    if run_name is not None:
        args["run_name"] = run_name  # else transformers names it after the output directory
    if training.warmup_steps is not None:
        args["warmup_steps"] = training.warmup_steps
    elif training.warmup_ratio is not None:
        # transformers 5 folded warmup_ratio into warmup_steps: a float below 1 is a ratio.
        args["warmup_steps"] = training.warmup_ratio
    if training.gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen base weights (LoRA) and DeepSpeed.
        args[f"{CHECKPOINTING}_kwargs"] = {"use_reentrant": False}
    args.update(precision_arguments(training.precision, env))
    args.update(save_and_eval_arguments(spec))
    if spec.distributed.deepspeed is not None:
        args["deepspeed"] = deepspeed_config(spec.distributed.deepspeed)
    # training.extra: options Trainyard does not model, under TRL's names, applied last;
    # the API refused the ones it derives itself and (where TRL is installed) unknown names.
    args.update(training.extra)
    return args


def precision_arguments(precision: str, env: Environment) -> dict[str, Any]:
    """bf16/fp16 flags; CPU runs train in fp32 whatever is asked.

    TRL configs turn bf16 on when it is left unset, so both flags are always given.
    """
    if not env.cuda:
        return {"bf16": False, "fp16": False, "use_cpu": True}
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def save_and_eval_arguments(spec: Any) -> dict[str, Any]:
    """Checkpoint cadence, evaluation cadence and early stopping's best-model tracking.

    `load_best_model_at_end` needs saves on the evaluation schedule, so with early
    stopping the save interval is the checkpoint interval when it is a multiple of the
    evaluation interval, else the evaluation interval.
    """
    training, checkpoint = spec.training, spec.checkpoint
    has_eval = spec.dataset.eval_source is not None or spec.dataset.eval_split is not None
    args: dict[str, Any] = {}
    if checkpoint is not None:
        args.update(save_strategy="steps", save_steps=checkpoint.every_steps, save_total_limit=2)
    else:
        args.update(save_strategy="no")
    if has_eval:
        if training.eval_steps is not None:
            args.update(eval_strategy="steps", eval_steps=training.eval_steps)
        else:
            args.update(eval_strategy="epoch")
    stopping = training.early_stopping
    if stopping is not None:
        args.update(
            load_best_model_at_end=True,
            metric_for_best_model=stopping.metric,
            greater_is_better=stopping.greater_is_better,
            save_strategy=args["eval_strategy"],
            # Keep the best checkpoint besides the newest one.
            save_total_limit=max(args.get("save_total_limit") or 0, 2),
        )
        if args["eval_strategy"] == "steps":
            every = checkpoint.every_steps if checkpoint is not None else None
            eval_steps = training.eval_steps
            args["save_steps"] = every if every and every % eval_steps == 0 else eval_steps
    return args


def early_stopping_callbacks(spec: Any) -> list[Any]:
    stopping = spec.training.early_stopping
    if stopping is None:
        return []
    from transformers import EarlyStoppingCallback

    return [
        EarlyStoppingCallback(
            early_stopping_patience=stopping.patience,
            early_stopping_threshold=stopping.threshold,
        )
    ]


@dataclass
class DeepSpeedSpecLike:
    """The fields of `DeepSpeedSpec` the builder reads (for doctests and callers without the API)."""

    zero_stage: int = 2
    offload_optimizer: str = "none"
    offload_param: str = "none"
    config: dict[str, Any] | None = None


def deepspeed_config(ds: Any) -> dict[str, Any]:
    """A DeepSpeed config dict from `distributed.deepspeed`; "auto" values are filled by
    transformers from the TrainingArguments, so batch sizes and precision never disagree."""
    zero: dict[str, Any] = {
        "stage": ds.zero_stage,
        "overlap_comm": ds.zero_stage > 0,
        "contiguous_gradients": True,
        "reduce_bucket_size": "auto",
    }
    if ds.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": ds.offload_optimizer, "pin_memory": True}
    if ds.offload_param != "none":
        zero["offload_param"] = {"device": ds.offload_param, "pin_memory": True}
    if ds.zero_stage == 3:
        zero.update(
            stage3_prefetch_bucket_size="auto",
            stage3_param_persistence_threshold="auto",
            # Saves a whole model instead of shards, so checkpoints load without DeepSpeed.
            stage3_gather_16bit_weights_on_model_save=True,
        )
    config: dict[str, Any] = {
        "zero_optimization": zero,
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if ds.offload_optimizer == "none":
        # Let transformers' optimizer (adamw_torch…) run on the device; DeepSpeed's CPU Adam only
        # where the optimizer state really lives on the CPU.
        config["zero_force_ds_cpu_optimizer"] = False
    return _merge(config, ds.config or {})


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def lora_config(peft: Any, method: str):
    """PEFT `LoraConfig` from `spec.peft`.

    A reward model's classification head is new, so it is trained and saved with the
    adapter (`modules_to_save=["score"]`), as TRL recommends.
    """
    if peft is None:
        return None
    from peft import LoraConfig

    modules_to_save = list(peft.modules_to_save or [])
    if method == "reward" and "score" not in modules_to_save:
        modules_to_save.append("score")
    target = peft.target_modules
    return LoraConfig(
        r=peft.r,
        lora_alpha=peft.alpha,
        lora_dropout=peft.dropout,
        target_modules=target[0] if target == ["all-linear"] else target,
        target_parameters=peft.target_parameters,
        bias=peft.bias,
        use_rslora=peft.use_rslora,
        use_dora=peft.use_dora,
        modules_to_save=modules_to_save or None,
        task_type="SEQ_CLS" if method == "reward" else "CAUSAL_LM",
    )


def unmatched_lora_targets(
    peft: Any, module_names: list[str], parameter_names: list[str]
) -> list[str]:
    """A problem line for each `peft.targetModules` / `peft.targetParameters` entry that
    matches nothing, as PEFT matches them: the whole dotted name, or its last parts.
    PEFT itself ignores an entry that matches nothing as long as another one matches.

    >>> from types import SimpleNamespace as S
    >>> names = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.experts"]
    >>> unmatched_lora_targets(S(target_modules=["q_proj", "qproj"], target_parameters=None),
    ...                        names, ["model.layers.0.mlp.experts.down_proj"])
    ["peft.targetModules: 'qproj' matches no module of the model; did you mean 'q_proj'? Its modules: experts, q_proj"]
    """
    import difflib
    import re

    def matches(entry: str, names: list[str]) -> bool:
        return any(name == entry or name.endswith("." + entry) for name in names)

    def layer_pattern(name: str) -> str:
        return re.sub(r"\.\d+(?=\.|$)", ".*", name)

    problems = []
    modules = [name for name in module_names if name]
    leaves = sorted({name.rsplit(".", 1)[-1] for name in modules if not name[-1].isdigit()})
    for entry in peft.target_modules:
        if entry == "all-linear" or matches(entry, modules):
            continue
        close = difflib.get_close_matches(entry.rsplit(".", 1)[-1], leaves, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}? " if close else ""
        problems.append(
            f"peft.targetModules: {entry!r} matches no module of the model; {hint}"
            f"Its modules: {', '.join(leaves)}"
        )
    parameters = sorted({layer_pattern(name) for name in parameter_names})
    for entry in peft.target_parameters or []:
        if matches(entry, parameter_names):
            continue
        problems.append(
            f"peft.targetParameters: {entry!r} matches no parameter of the model (an entry "
            f"is a parameter's dotted name or its last parts); its parameters: "
            f"{', '.join(parameters)}"
        )
    return problems


@contextlib.contextmanager
def whole_model_init():
    """Build models whole in this block, not partitioned by DeepSpeed ZeRO-3.

    Once a TrainingArguments with a ZeRO-3 config exists, transformers builds every
    `from_config` model inside `deepspeed.zero.Init` (a process-wide setting), which needs
    the process group and scatters the weights; reading a model's names or saving a
    random initialisation wants the plain model.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def check_lora_targets(ctx: TrainContext) -> None:
    """Refuse `peft` targets that match nothing in the model, before any weight is loaded:
    the model is built from its config on the meta device to read its names."""
    peft = ctx.spec.peft
    if peft is None or (peft.target_modules == ["all-linear"] and not peft.target_parameters):
        return
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    trust = bool(ctx.model_init_kwargs.get("trust_remote_code"))
    config = AutoConfig.from_pretrained(
        ctx.model, trust_remote_code=trust, revision=ctx.model_init_kwargs.get("revision")
    )
    auto = (
        AutoModelForSequenceClassification if ctx.spec.method == "reward" else AutoModelForCausalLM
    )
    with whole_model_init(), init_empty_weights():
        model = auto.from_config(config, trust_remote_code=trust)
    problems = unmatched_lora_targets(
        peft,
        [name for name, _ in model.named_modules()],
        [name for name, _ in model.named_parameters()],
    )
    if problems:
        raise SpecError("\n".join(problems))


def random_init_model(
    model: Any, path: str, kwargs: dict[str, Any], tokenizer: Any, seed: int
) -> str:
    """A directory with the architecture `model` describes and random weights (`init:
    random`): `path`'s config.json with `model.config` laid over it, or `model.config`
    alone when it names a model_type. The weights are seeded with `seed`, so every rank
    and node builds the same ones; the directory is cached by config and seed.
    """
    import hashlib

    from transformers import AutoConfig

    from trainyard.workloads.sources import cache_dir, node_locked

    overrides = dict(model.config or {})
    trust = bool(model.trust_remote_code)
    try:
        if "model_type" in overrides:
            model_type = overrides.pop("model_type")
            overrides.setdefault("vocab_size", len(tokenizer))
            overrides.setdefault("pad_token_id", tokenizer.pad_token_id)
            overrides.setdefault("eos_token_id", tokenizer.eos_token_id)
            config = AutoConfig.for_model(model_type, **overrides)
        else:
            base = AutoConfig.from_pretrained(path, trust_remote_code=trust, **kwargs)
            values = {**base.to_dict(), **overrides}
            if "num_hidden_layers" in overrides and "layer_types" not in overrides:
                values.pop("layer_types", None)  # derived from the number of layers
            config = type(base).from_dict(values)
    except Exception as error:  # transformers' and huggingface_hub's config checks
        raise SpecError(f"model.config: cannot build a model configuration: {error}") from None
    vocab = getattr(config, "vocab_size", None)
    if isinstance(vocab, int) and vocab < len(tokenizer):
        raise SpecError(
            f"model.config: vocab_size {vocab} is smaller than the tokenizer's {len(tokenizer)} "
            "tokens; leave vocab_size out or make it at least that"
        )
    key = hashlib.sha256(f"{config.to_json_string()}\n{seed}".encode()).hexdigest()[:16]
    target = cache_dir("random-init") / key
    # One rank of the node builds it; the others wait and load the same directory.
    with node_locked(target):
        if not (target / "config.json").exists():
            _build_random_model(config, trust, tokenizer, seed, target)
    return str(target)


def _build_random_model(config: Any, trust: bool, tokenizer: Any, seed: int, target: Any) -> None:
    import shutil
    import tempfile
    from pathlib import Path

    import torch
    from transformers import AutoModelForCausalLM

    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        torch.manual_seed(seed)
        try:
            with whole_model_init():
                built = AutoModelForCausalLM.from_config(
                    config, dtype=torch.float32, trust_remote_code=trust
                )
        except (ValueError, TypeError, RuntimeError) as error:
            raise SpecError(f"model.config: the architecture cannot be built: {error}") from None
        built.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def quantization_config(model: Any):
    """transformers `BitsAndBytesConfig` from `model.quantization` (QLoRA)."""
    quant = model.quantization
    if quant is None:
        return None
    import torch
    from transformers import BitsAndBytesConfig

    if quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, quant.compute_dtype),
        bnb_4bit_quant_storage=getattr(torch, quant.compute_dtype),
    )


def model_init_kwargs(model: Any, env: Environment, extra: dict[str, Any]) -> dict[str, Any]:
    """`from_pretrained` options for the model (TRL `model_init_kwargs`)."""
    kwargs: dict[str, Any] = dict(extra)
    # CPU kernels are fp32; a bf16 checkpoint would otherwise train in bf16 arithmetic.
    kwargs["dtype"] = "float32" if not env.cuda else model.dtype
    if model.trust_remote_code:
        kwargs["trust_remote_code"] = True
    if model.attn_implementation is not None:
        kwargs["attn_implementation"] = model.attn_implementation
    return kwargs


def length_options(spec: Any) -> dict[str, Any]:
    """`max_length` when `training.maxLength` is set; TRL's default otherwise."""
    if spec.training.max_length is None:
        return {}
    return {"max_length": spec.training.max_length}


def build_trainer(trainer_class: type, config: Any, ctx: TrainContext, **extra: Any):
    """A TRL trainer with what every method passes the same way (model, data, tokenizer,
    callbacks, PEFT, quantization); `extra` holds the method's own arguments."""
    check_lora_targets(ctx)
    config.model_init_kwargs = ctx.model_init_kwargs
    return trainer_class(
        model=ctx.model,
        args=config,
        train_dataset=ctx.train_dataset,
        eval_dataset=ctx.eval_dataset,
        processing_class=ctx.tokenizer,
        callbacks=ctx.callbacks,
        peft_config=ctx.peft_config,
        quantization_config=ctx.quantization_config,
        **extra,
    )
