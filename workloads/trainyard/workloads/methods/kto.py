"""Kahneman-Tversky optimization on unpaired good/bad completions: TRL `KTOConfig` + `KTOTrainer`."""

from __future__ import annotations

from typing import Any

from trainyard.workloads.methods.common import TrainContext, build_trainer, length_options


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
    options.update(length_options(spec))
    return KTOConfig(**base_args, **options)


def build_kto_trainer(ctx: TrainContext):
    from trl import KTOTrainer

    return build_trainer(KTOTrainer, build_kto_config(ctx.spec, ctx.base_args), ctx)
