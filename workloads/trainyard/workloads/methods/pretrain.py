"""Continued pretraining: causal LM on raw text, TRL `SFTTrainer` on the `text` column.

With packing, texts are concatenated and cut into `blockSize` blocks, and the loss
covers every token (there is no prompt to mask).
"""

from __future__ import annotations

from typing import Any

from trainyard.workloads.methods.common import TrainContext, build_trainer


def build_pretrain_config(spec: Any, base_args: dict[str, Any]):
    from trl import SFTConfig

    pretrain = spec.pretrain
    packing = True if pretrain is None else pretrain.packing
    block_size = 1024 if pretrain is None else pretrain.block_size
    if spec.training.max_length is not None and pretrain is None:
        block_size = spec.training.max_length
    options = {
        "dataset_text_field": "text",
        "packing": packing,
        # Wrapped packing cuts the token stream into full blocks, as pretraining does;
        # bfd would keep documents whole and pad.
        "packing_strategy": "wrapped",
        "max_length": block_size,
        "completion_only_loss": False,
    }
    # base_args last: training.extra (in them) may choose another packing_strategy.
    return SFTConfig(**{**options, **base_args})


def build_pretrain_trainer(ctx: TrainContext):
    from trl import SFTTrainer

    return build_trainer(SFTTrainer, build_pretrain_config(ctx.spec, ctx.base_args), ctx)
