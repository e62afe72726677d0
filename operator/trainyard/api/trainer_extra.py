"""`training.extra`: TRL config options Trainyard does not model, checked by their names.

Each method trains with one TRL config class (a `TrainingArguments` subclass). An
option Trainyard derives from a spec field is refused in `extra` with the field to set
instead, so one value is never written in two places; any other key must be an option
of the installed TRL config class, checked wherever TRL is importable (`trainyard
validate` and the trainer pod; the operator's image has no TRL and leaves it to the pod).

>>> [message for _, message in extra_problems("grpo", {"learning_rate": 1e-5}, trl=False)]
['Trainyard sets learning_rate from training.learningRate; set that field instead']
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.util
import types
import typing
from typing import Any

METHOD_CONFIG: dict[str, str] = {
    "sft": "SFTConfig",
    "pretrain": "SFTConfig",
    "dpo": "DPOConfig",
    "kto": "KTOConfig",
    "reward": "RewardConfig",
    "grpo": "GRPOConfig",
    "rloo": "RLOOConfig",
}
"""The TRL config class each method's options go to."""

_VLLM = "rollout.vllm (the operator and the rollout settings decide the vLLM options)"

MODELLED: dict[str, str] = {
    "output_dir": "the output directory (the pod's, or trainyard run --output)",
    "learning_rate": "training.learningRate",
    "num_train_epochs": "training.epochs",
    "max_steps": "training.maxSteps",
    "per_device_train_batch_size": "training.perDeviceBatchSize",
    "gradient_accumulation_steps": "training.gradientAccumulationSteps",
    "lr_scheduler_type": "training.lrSchedulerType",
    "warmup_ratio": "training.warmupRatio",
    "warmup_steps": "training.warmupSteps",
    "weight_decay": "training.weightDecay",
    "max_grad_norm": "training.maxGradNorm",
    "optim": "training.optim",
    "gradient_checkpointing": "training.gradientCheckpointing",
    "activation_checkpointing": "training.gradientCheckpointing",
    "seed": "training.seed",
    "logging_steps": "training.loggingSteps",
    "eval_steps": "training.evalSteps",
    "eval_strategy": "training.evalSteps",
    "max_length": "training.maxLength (pretrain.blockSize for pretraining)",
    "bf16": "training.precision",
    "fp16": "training.precision",
    "use_cpu": "training.precision (CPU runs train in fp32)",
    "report_to": "training.reportTo",
    "run_name": "metadata.name (the run's name in the trackers)",
    "save_strategy": "checkpoint.everySteps",
    "save_steps": "checkpoint.everySteps",
    "save_total_limit": "checkpoint.keepLast",
    "resume_from_checkpoint": "checkpoint.resume",
    "load_best_model_at_end": "training.earlyStopping",
    "metric_for_best_model": "training.earlyStopping.metric",
    "greater_is_better": "training.earlyStopping.greaterIsBetter",
    "deepspeed": "distributed.deepspeed",
    "model_init_kwargs": "model (dtype, trustRemoteCode, attnImplementation, quantization)",
    "packing": "sft.packing (pretrain.packing for pretraining)",
    "completion_only_loss": "sft.completionOnlyLoss",
    "assistant_only_loss": "sft.assistantOnlyLoss",
    "dataset_text_field": "dataset.textField",
    "beta": "the method's beta (dpo.beta, kto.beta, grpo.beta, rloo.beta)",
    "loss_type": "dpo.lossType or grpo.lossType",
    "label_smoothing": "dpo.labelSmoothing",
    "precompute_ref_log_probs": "dpo.precomputeRefLogProbs",
    "sync_ref_model": "the method's syncRefModel",
    "ref_model_sync_steps": "the method's refModelSyncSteps",
    "ref_model_mixup_alpha": "the method's refModelMixupAlpha",
    "desirable_weight": "kto.desirableWeight",
    "undesirable_weight": "kto.undesirableWeight",
    "center_rewards_coefficient": "reward.centerRewardsCoefficient",
    "num_generations": "the method's numGenerations",
    "max_completion_length": "the method's maxCompletionLength",
    "temperature": "the method's temperature",
    "top_p": "the method's topP",
    "epsilon": "the method's epsilon",
    "num_iterations": "the method's numIterations",
    "mask_truncated_completions": "the method's maskTruncatedCompletions",
    "reward_weights": "the weights of the method's rewards",
    "scale_rewards": "grpo.scaleRewards",
    "normalize_advantages": "rloo.normalizeAdvantages",
    "remove_unused_columns": "the rewards (reward functions read the dataset's columns)",
    "use_vllm": _VLLM,
    "vllm_mode": _VLLM,
    "vllm_server_base_url": _VLLM,
    "vllm_server_host": _VLLM,
    "vllm_server_port": _VLLM,
    "vllm_group_port": _VLLM,
    "vllm_server_timeout": _VLLM,
    "vllm_gpu_memory_utilization": _VLLM,
    "vllm_tensor_parallel_size": _VLLM,
    "vllm_max_model_length": _VLLM,
}
"""TRL option name → the Trainyard field (or part) that sets it."""


def trl_installed() -> bool:
    return importlib.util.find_spec("trl") is not None


def config_options(method: str) -> dict[str, Any]:
    """The options of the installed TRL config class of `method`: name → type annotation."""
    config_class = getattr(importlib.import_module("trl"), METHOD_CONFIG[method])
    try:
        hints = typing.get_type_hints(config_class)
    except Exception:  # an annotation that does not resolve: check names only
        hints = {}
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(config_class) if f.init}


_SIMPLE = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}


def type_problem(value: Any, annotation: Any) -> str | None:
    """What is wrong with `value` for an option typed `annotation`, or None when it fits
    (or the type is not one a YAML value can be checked against here).

    >>> type_problem("yes", bool), type_problem(3, float), type_problem(None, int | None)
    ('must be a boolean', None, None)
    """
    wanted = _accepted(annotation)
    if wanted is None or any(_fits(value, kind) for kind in wanted):
        return None
    names = [_SIMPLE.get(k, "null" if k is type(None) else f"a {k.__name__}") for k in wanted]
    return "must be " + " or ".join(dict.fromkeys(names))


def _accepted(annotation: Any) -> list[type] | None:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        kinds: list[type] = []
        for arm in typing.get_args(annotation):
            found = _accepted(arm)
            if found is None:
                return None
            kinds += found
        return kinds
    if origin in (dict, list):
        return [origin]
    if annotation in (bool, int, float, str, dict, list, type(None)):
        return [annotation]
    return None


def _fits(value: Any, kind: type) -> bool:
    if kind is type(None):
        return value is None
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def extra_problems(
    method: str, extra: dict[str, Any], *, trl: bool | None = None
) -> list[tuple[str, str]]:
    """(key, message) for each `training.extra` key that cannot be applied; `trl` says
    whether to check the names against the installed TRL (default: when it is installed)."""
    problems: list[tuple[str, str]] = []
    rest = []
    for key in extra:
        if key in MODELLED:
            problems.append(
                (key, f"Trainyard sets {key} from {MODELLED[key]}; set that field instead")
            )
        elif key.startswith("gradient_checkpointing") or key.startswith("activation_checkpointing"):
            problems.append(
                (key, f"Trainyard sets {key} from training.gradientCheckpointing; set that instead")
            )
        else:
            rest.append(key)
    if trl is None:
        trl = trl_installed()
    if trl and rest:
        known = config_options(method)
        for key in rest:
            if key in known:
                problem = type_problem(extra[key], known[key])
                if problem:
                    problems.append(
                        (
                            key,
                            f"{problem} (the type of {key} in TRL {METHOD_CONFIG[method]}); "
                            f"got {extra[key]!r}",
                        )
                    )
                continue
            close = difflib.get_close_matches(
                key, sorted(set(known) - set(MODELLED)), n=3, cutoff=0.6
            )
            hint = (
                f"did you mean {', '.join(map(repr, close))}?"
                if close
                else "see the options of TRL's " + METHOD_CONFIG[method] + " and TrainingArguments"
            )
            problems.append(
                (key, f"not an option of TRL {METHOD_CONFIG[method]} (method {method}); {hint}")
            )
    return problems
