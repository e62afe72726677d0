"""Kahneman-Tversky optimization on unpaired good/bad completions: TRL `KTOConfig` + `KTOTrainer`."""

from __future__ import annotations

from typing import Any

from trainyard.workloads.methods.common import TrainContext


def build_kto_config(spec: Any, base_args: dict[str, Any]):
    from trl import KTOConfig

    options: dict[str, Any] = {}
    kto = spec.kto
    if kto is not None:
        options.update(
            beta=kto.beta,
            desirable_weight=kto.desirable_weight,
            undesirable_weight=kto.undesirable_weight,
        )
    if spec.training.max_length is not None:
        options["max_length"] = spec.training.max_length
    return KTOConfig(**base_args, **options)


def build_kto_trainer(ctx: TrainContext):
    from trl import KTOTrainer

    config = build_kto_config(ctx.spec, ctx.base_args)
    config.model_init_kwargs = ctx.model_init_kwargs
    return KTOTrainer(
        model=ctx.model,
        args=config,
        train_dataset=ctx.train_dataset,
        eval_dataset=ctx.eval_dataset,
        processing_class=ctx.tokenizer,
        callbacks=ctx.callbacks,
        peft_config=ctx.peft_config,
        quantization_config=ctx.quantization_config,
    )
