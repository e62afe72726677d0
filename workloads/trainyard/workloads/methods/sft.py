"""Supervised fine-tuning: TRL `SFTConfig` + `SFTTrainer`.

Chat data trains on the rendered conversation (only the assistant turns with
`assistant_only_loss`); prompt/completion and alpaca data train on the completion
only (`completion_only_loss`), so the prompt tokens get label -100.
"""

from __future__ import annotations

from typing import Any

from trainyard.workloads.methods.common import TrainContext, build_trainer, length_options


def build_sft_config(spec: Any, base_args: dict[str, Any]):
    from trl import SFTConfig

    sft = spec.sft
    options: dict[str, Any] = {}
    if sft is not None:
        options.update(
            packing=sft.packing,
            completion_only_loss=sft.completion_only_loss,
            assistant_only_loss=sft.assistant_only_loss,
        )
    options.update(length_options(spec))
    return SFTConfig(**base_args, **options)


def build_sft_trainer(ctx: TrainContext):
    from trl import SFTTrainer

    return build_trainer(SFTTrainer, build_sft_config(ctx.spec, ctx.base_args), ctx)
