"""REINFORCE leave-one-out: TRL `RLOOConfig` + `RLOOTrainer`.

Same rollouts and rewards as GRPO; the baseline of each completion is the mean reward
of the other completions of its prompt.
"""

from __future__ import annotations

from typing import Any

from trainyard.workloads.methods.common import TrainContext, apply_trainer_options
from trainyard.workloads.methods.online import generation_options, vllm_options


def build_rloo_config(
    spec: Any,
    base_args: dict[str, Any],
    reward_weights: list[float] | None,
    trainer_options: dict[str, Any] | None = None,
):
    """`RLOOConfig` from the spec, with the operator's `trainer_options` applied over it."""
    from trl import RLOOConfig

    rloo = spec.rloo
    options = generation_options(rloo)
    options["normalize_advantages"] = rloo.normalize_advantages
    options.update(vllm_options(spec.rollout))
    if reward_weights:
        options["reward_weights"] = reward_weights
    return RLOOConfig(
        **apply_trainer_options(RLOOConfig, {**base_args, **options}, trainer_options or {})
    )


def build_rloo_trainer(ctx: TrainContext):
    from trl import RLOOTrainer

    config = build_rloo_config(ctx.spec, ctx.base_args, ctx.reward_weights, ctx.trainer_options)
    config.model_init_kwargs = ctx.model_init_kwargs
    return RLOOTrainer(
        model=ctx.model,
        reward_funcs=ctx.reward_funcs,
        args=config,
        train_dataset=ctx.train_dataset,
        eval_dataset=ctx.eval_dataset,
        processing_class=ctx.tokenizer,
        reward_processing_classes=ctx.reward_processing_classes,
        callbacks=ctx.callbacks,
        peft_config=ctx.peft_config,
        quantization_config=ctx.quantization_config,
    )
