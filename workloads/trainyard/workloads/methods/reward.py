"""Reward-model training on preference pairs: TRL `RewardConfig` + `RewardTrainer`.

The model is loaded as a sequence classifier with one output (the score); the result
is what `grpo.rewardModel` / `rloo.rewardModel` consume.
"""

from __future__ import annotations

from typing import Any

from trainyard.workloads.methods.common import TrainContext


def build_reward_config(spec: Any, base_args: dict[str, Any]):
    from trl import RewardConfig

    options: dict[str, Any] = {}
    if spec.reward is not None and spec.reward.center_rewards_coefficient is not None:
        options["center_rewards_coefficient"] = spec.reward.center_rewards_coefficient
    if spec.training.max_length is not None:
        options["max_length"] = spec.training.max_length
    return RewardConfig(**base_args, **options)


def build_reward_trainer(ctx: TrainContext):
    from trl import RewardTrainer

    config = build_reward_config(ctx.spec, ctx.base_args)
    config.model_init_kwargs = ctx.model_init_kwargs
    return RewardTrainer(
        model=ctx.model,
        args=config,
        train_dataset=ctx.train_dataset,
        eval_dataset=ctx.eval_dataset,
        processing_class=ctx.tokenizer,
        callbacks=ctx.callbacks,
        peft_config=ctx.peft_config,
        quantization_config=ctx.quantization_config,
    )
