"""What GRPO and RLOO share: generation options, vLLM options and the reward sources.

Rewards are the functions of `trainyard.workloads.rewards` (weighted, TRL's
`reward_weights`) and/or a trained reward model (a sequence classifier with one
output), which TRL scores with its own tokenizer.
"""

from __future__ import annotations

import os
from typing import Any

from trainyard.api.contract import Env
from trainyard.workloads.methods.common import (
    SpecError,
    TrainContext,
    apply_trainer_options,
    build_trainer,
)

# Set by the operator (the rollout Service) or the local runner in server mode.
VLLM_HOST_ENV = Env.VLLM_HOST
VLLM_PORT_ENV = Env.VLLM_PORT
VLLM_URL_ENV = Env.VLLM_URL


def generation_options(rl: Any) -> dict[str, Any]:
    """`GRPOConfig`/`RLOOConfig` options both methods spell the same way."""
    options: dict[str, Any] = {
        "num_generations": rl.num_generations,
        "max_completion_length": rl.max_completion_length,
        "temperature": rl.temperature,
        "top_p": rl.top_p,
        "epsilon": rl.epsilon,
        "num_iterations": rl.num_iterations,
        "mask_truncated_completions": rl.mask_truncated_completions,
        "sync_ref_model": rl.sync_ref_model,
        "ref_model_sync_steps": rl.ref_model_sync_steps,
        "ref_model_mixup_alpha": rl.ref_model_mixup_alpha,
        # Reward functions read the dataset's extra columns (references, answers).
        "remove_unused_columns": False,
    }
    if rl.beta is not None:
        options["beta"] = rl.beta
    return options


def build_online_config(
    config_class: type,
    spec: Any,
    rl: Any,
    base_args: dict[str, Any],
    reward_weights: list[float] | None,
    trainer_options: dict[str, Any] | None,
    **method_options: Any,
):
    """A `GRPOConfig`/`RLOOConfig`: the shared generation and vLLM options, the method's
    own (`method_options`), reward weights, then the operator's `trainer_options` over all."""
    options = {**generation_options(rl), **method_options, **vllm_options(spec.rollout)}
    if reward_weights:
        options["reward_weights"] = reward_weights
    return config_class(
        **apply_trainer_options(config_class, {**base_args, **options}, trainer_options or {})
    )


def build_online_trainer(trainer_class: type, config: Any, ctx: TrainContext):
    """A `GRPOTrainer`/`RLOOTrainer` with the run's reward functions and their tokenizers.

    With `prompt` (system prompt, template, assistant prefix), the prompts are rendered to
    the exact text the policy completes before TRL sees them.
    """
    rl = ctx.spec.online_rl
    if rl.prompt is not None:
        from trainyard.workloads.dataset_formats import render_prompts

        field = f"{ctx.spec.method}.prompt"
        ctx.train_dataset = render_prompts(ctx.train_dataset, rl.prompt, ctx.tokenizer, field)
        if ctx.eval_dataset is not None:
            ctx.eval_dataset = render_prompts(ctx.eval_dataset, rl.prompt, ctx.tokenizer, field)
    return build_trainer(
        trainer_class,
        config,
        ctx,
        reward_funcs=ctx.reward_funcs,
        reward_processing_classes=ctx.reward_processing_classes,
    )


def vllm_options(rollout: Any, max_length: int | None = None) -> dict[str, Any]:
    """`use_vllm` and the vLLM options of TRL's online trainers from `spec.rollout.vllm`.

    Server mode talks to the rollout server the operator starts (`trl vllm-serve`,
    reached through TRAINYARD_VLLM_URL or TRAINYARD_VLLM_HOST/PORT); colocate mode runs
    vLLM inside every training process.
    """
    vllm = rollout.vllm if rollout is not None else None
    if vllm is None:
        return {"use_vllm": False}
    options: dict[str, Any] = {"use_vllm": True, "vllm_mode": vllm.mode}
    if vllm.mode == "server":
        url = os.environ.get(VLLM_URL_ENV)
        host = os.environ.get(VLLM_HOST_ENV)
        if url:
            options["vllm_server_base_url"] = url
        elif host:
            options["vllm_server_host"] = host
            options["vllm_server_port"] = int(os.environ.get(VLLM_PORT_ENV, "8000"))
        else:
            raise SpecError(
                "rollout.vllm.mode: server mode needs the rollout server's address in "
                f"{VLLM_URL_ENV} or {VLLM_HOST_ENV}/{VLLM_PORT_ENV} (the operator sets them; "
                "locally start `trl vllm-serve` and export them), or use mode colocate"
            )
    else:
        options.update(
            vllm_gpu_memory_utilization=vllm.gpu_memory_utilization,
            vllm_tensor_parallel_size=vllm.tensor_parallel_size,
        )
        if vllm.max_model_len is not None:
            options["vllm_max_model_length"] = vllm.max_model_len
    return options


def check_vllm_installed(rollout: Any) -> None:
    if rollout is None or rollout.vllm is None:
        return
    try:
        import vllm  # noqa: F401
    except ImportError:
        if rollout.vllm.mode == "colocate":
            raise SpecError(
                "rollout.vllm.mode: colocate runs vLLM inside the trainer, but vllm is not "
                "installed in this image; install trainyard[vllm] or use mode server"
            ) from None


def fetch_reward_models(rl: Any, spec: Any) -> list[Any]:
    """`rl.rewards` with each embedding reward's `args.model` (a model source) fetched
    like any model (hub, S3 with the run's storage settings, a run's checkpoint) and
    handed to the reward as `modelPath`, a local directory."""
    from trainyard.workloads import sources

    fetched = []
    for index, reward in enumerate(rl.rewards):
        model = (
            (reward.args or {}).get("model") if reward.builtin == "reference_similarity" else None
        )
        if isinstance(model, str):
            field = f"{spec.method}.rewards[{index}].args.model"
            path = sources.local_model_dir(
                model,
                storage=spec.storage,
                checkpoint_uri=spec.checkpoint.uri if spec.checkpoint else None,
                field=field,
            )
            args = {k: v for k, v in reward.args.items() if k != "model"}
            reward = reward.model_copy(update={"args": {**args, "modelPath": path}})
        fetched.append(reward)
    return fetched


def build_reward_sources(rl: Any, spec: Any = None) -> tuple[list[Any], list[float]]:
    """Reward functions and their weights from `rewards` (the rewards library); with the
    run's `spec`, reward models named by source are fetched first."""
    if not rl.rewards:
        return [], []
    from trainyard.workloads.rewards import build_reward_functions

    rewards = fetch_reward_models(rl, spec) if spec is not None else rl.rewards
    funcs, weights = build_reward_functions(rewards, rl.strip_thinking, workers=rl.reward_workers)
    prefix = rl.prompt.assistant_prefix if rl.prompt is not None else None
    if prefix:
        funcs = [prefixed_reward(f, prefix) for f in funcs]
    return list(funcs), list(weights)


class PrefixedReward:
    """A reward that scores the whole assistant turn: the prompt's assistant prefix (e.g.
    `<think>`, which the policy continued) put back before each completion.

    >>> starts = PrefixedReward(lambda completions, **_: [float(c.startswith("<think>")) for c in completions], "<think>")
    >>> starts(completions=["step one</think>5"])
    [1.0]
    """

    def __init__(self, function: Any, prefix: str):
        self.function = function
        self.prefix = prefix
        self.__name__ = getattr(function, "__name__", "reward")

    def _whole(self, completions: list[Any]) -> list[Any]:
        return [self.prefix + c if isinstance(c, str) else c for c in completions]

    def __call__(self, completions: list[Any], **columns: Any) -> Any:
        return self.function(self._whole(completions), **columns)


class AsyncPrefixedReward(PrefixedReward):
    """`PrefixedReward` of an async reward; TRL awaits it with the other async rewards."""

    async def __call__(self, completions: list[Any], **columns: Any) -> Any:  # type: ignore[override]
        return await self.function(self._whole(completions), **columns)


def prefixed_reward(function: Any, prefix: str) -> PrefixedReward:
    from trl.trainer.utils import is_async_callable

    if is_async_callable(function):
        return AsyncPrefixedReward(function, prefix)
    return PrefixedReward(function, prefix)


def load_reward_model(path: str, init_kwargs: dict[str, Any]):
    """A trained reward model (one-output sequence classifier) and its tokenizer.

    A LoRA reward model (an adapter directory) is merged into its base first, so TRL
    scores with a plain classifier.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from trainyard.workloads.sources import adapter_base

    kwargs = {
        k: v for k, v in init_kwargs.items() if k in ("dtype", "trust_remote_code", "revision")
    }
    if adapter_base(path) is not None:
        from peft import AutoPeftModelForSequenceClassification

        model = AutoPeftModelForSequenceClassification.from_pretrained(path, num_labels=1, **kwargs)
        model = model.merge_and_unload()
    else:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path, revision=kwargs.get("revision"))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, tokenizer
