"""Group relative policy optimization: TRL `GRPOConfig` + `GRPOTrainer`.

Completions are generated with transformers `generate()`, or vLLM from `rollout.vllm`;
rewards come from the rewards library and/or a trained reward model.
"""

from __future__ import annotations

from typing import Any

from trainyard.workloads.methods.common import TrainContext
from trainyard.workloads.methods.online import build_online_config, build_online_trainer


def build_grpo_config(
    spec: Any,
    base_args: dict[str, Any],
    reward_weights: list[float] | None,
    trainer_options: dict[str, Any] | None = None,
):
    """`GRPOConfig` from the spec, with the operator's `trainer_options` applied over it."""
    from trl import GRPOConfig

    grpo = spec.grpo
    return build_online_config(
        GRPOConfig,
        spec,
        grpo,
        base_args,
        reward_weights,
        trainer_options,
        loss_type=grpo.loss_type,
        scale_rewards=grpo.scale_rewards,
    )


def build_grpo_trainer(ctx: TrainContext):
    from trl import GRPOTrainer

    config = build_grpo_config(ctx.spec, ctx.base_args, ctx.reward_weights, ctx.trainer_options)
    return build_online_trainer(GRPOTrainer, config, ctx)
