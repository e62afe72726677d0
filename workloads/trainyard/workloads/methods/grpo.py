"""Group relative policy optimization: TRL `GRPOConfig` + `GRPOTrainer`.

Completions are generated with transformers `generate()`, or vLLM from `rollout.vllm`;
rewards come from the rewards library and/or a trained reward model.
"""

from __future__ import annotations

from typing import Any

from trainyard.workloads.methods.common import TrainContext, apply_trainer_options
from trainyard.workloads.methods.online import generation_options, vllm_options


def build_grpo_config(
    spec: Any,
    base_args: dict[str, Any],
    reward_weights: list[float] | None,
    trainer_options: dict[str, Any] | None = None,
):
    """`GRPOConfig` from the spec, with the operator's `trainer_options` applied over it."""
    from trl import GRPOConfig

    grpo = spec.grpo
    options = generation_options(grpo)
    options.update(loss_type=grpo.loss_type, scale_rewards=grpo.scale_rewards)
    options.update(vllm_options(spec.rollout))
    if reward_weights:
        options["reward_weights"] = reward_weights
    return GRPOConfig(
        **apply_trainer_options(GRPOConfig, {**base_args, **options}, trainer_options or {})
    )


def build_grpo_trainer(ctx: TrainContext):
    from trl import GRPOTrainer

    config = build_grpo_config(ctx.spec, ctx.base_args, ctx.reward_weights, ctx.trainer_options)
    config.model_init_kwargs = ctx.model_init_kwargs
    return GRPOTrainer(
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
