"""REINFORCE leave-one-out: TRL `RLOOConfig` + `RLOOTrainer`.

Same rollouts and rewards as GRPO; the baseline of each completion is the mean reward
of the other completions of its prompt.
"""

from __future__ import annotations

from typing import Any

from trainyard.workloads.methods.common import TrainContext
from trainyard.workloads.methods.online import build_online_config, build_online_trainer


def build_rloo_config(
    spec: Any,
    base_args: dict[str, Any],
    reward_weights: list[float] | None,
    trainer_options: dict[str, Any] | None = None,
):
    """`RLOOConfig` from the spec, with the operator's `trainer_options` applied over it."""
    from trl import RLOOConfig

    rloo = spec.rloo
    return build_online_config(
        RLOOConfig,
        spec,
        rloo,
        base_args,
        reward_weights,
        trainer_options,
        normalize_advantages=rloo.normalize_advantages,
    )


def build_rloo_trainer(ctx: TrainContext):
    from trl import RLOOTrainer

    config = build_rloo_config(ctx.spec, ctx.base_args, ctx.reward_weights, ctx.trainer_options)
    return build_online_trainer(RLOOTrainer, config, ctx)
