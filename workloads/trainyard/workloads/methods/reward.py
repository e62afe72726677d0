"""Reward-model training on preference pairs: TRL `RewardConfig` + `RewardTrainer`.

The model is loaded as a sequence classifier with one output (the score); the result
is what `grpo.rewardModel` / `rloo.rewardModel` consume.
"""

from __future__ import annotations

from typing import Any

from trainyard.workloads.methods.common import TrainContext, build_trainer, length_options


def build_reward_config(spec: Any, base_args: dict[str, Any]):
    from trl import RewardConfig

    options: dict[str, Any] = {}
    if spec.reward is not None and spec.reward.center_rewards_coefficient is not None:
        options["center_rewards_coefficient"] = spec.reward.center_rewards_coefficient
    options.update(length_options(spec))
    return RewardConfig(**base_args, **options)


def build_reward_trainer(ctx: TrainContext):
    from trl import RewardTrainer

    return build_trainer(RewardTrainer, build_reward_config(ctx.spec, ctx.base_args), ctx)
