"""Supervised fine-tuning: TRL `SFTConfig` + `SFTTrainer`.

Chat data trains on the rendered conversation (only the assistant turns with
`assistant_only_loss`); prompt/completion and alpaca data train on the completion
only (`completion_only_loss`), so the prompt tokens get label -100.
"""

from __future__ import annotations

from typing import Any

from trainyard.workloads.methods.common import TrainContext


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
    if spec.training.max_length is not None:
        options["max_length"] = spec.training.max_length
    return SFTConfig(**base_args, **options)


def build_sft_trainer(ctx: TrainContext):
    from trl import SFTTrainer

    config = build_sft_config(ctx.spec, ctx.base_args)
    config.model_init_kwargs = ctx.model_init_kwargs
    return SFTTrainer(
        model=ctx.model,
        args=config,
        train_dataset=ctx.train_dataset,
        eval_dataset=ctx.eval_dataset,
        processing_class=ctx.tokenizer,
        callbacks=ctx.callbacks,
        peft_config=ctx.peft_config,
        quantization_config=ctx.quantization_config,
    )
