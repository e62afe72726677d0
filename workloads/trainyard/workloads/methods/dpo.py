"""Direct preference optimization and its variants (IPO, hinge, robust…): TRL `DPOConfig` + `DPOTrainer`.

The reference model is a frozen copy of the starting model; with LoRA, TRL uses the
base model with the adapter disabled, so no second copy is loaded.
"""

from __future__ import annotations

from typing import Any

from trainyard.workloads.methods.common import TrainContext, build_trainer, length_options


def build_dpo_config(spec: Any, base_args: dict[str, Any]):
    from trl import DPOConfig

    options: dict[str, Any] = {}
    dpo = spec.dpo
    if dpo is not None:
        options.update(
            beta=dpo.beta,
            loss_type=[dpo.loss_type],
            label_smoothing=dpo.label_smoothing,
            precompute_ref_log_probs=dpo.precompute_ref_log_probs,
            sync_ref_model=dpo.sync_ref_model,
            ref_model_sync_steps=dpo.ref_model_sync_steps,
            ref_model_mixup_alpha=dpo.ref_model_mixup_alpha,
        )
    options.update(length_options(spec))
    return DPOConfig(**base_args, **options)


def build_dpo_trainer(ctx: TrainContext):
    from trl import DPOTrainer

    return build_trainer(DPOTrainer, build_dpo_config(ctx.spec, ctx.base_args), ctx)
