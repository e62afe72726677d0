"""The pure option builders: spec in, transformers/TRL/PEFT/DeepSpeed options out.

These cover what only a GPU machine runs (bf16, QLoRA, vLLM) at the level of the
options handed to the libraries; the CPU training tests run the rest end to end.
"""

from __future__ import annotations

import pytest

from trainyard.api import TrainingRun
from trainyard.workloads.methods.common import (
    Environment,
    SpecError,
    check_environment,
    deepspeed_config,
    lora_config,
    precision_arguments,
    quantization_config,
    save_and_eval_arguments,
    training_arguments,
)
from trainyard.workloads.methods.online import vllm_options

GPU = Environment(cuda=True)
CPU = Environment(cuda=False)


def spec(**fields):
    document = {
        "apiVersion": "trainyard.dev/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": "options"},
        "spec": {
            "method": "sft",
            "model": {"source": "builtin://tiny-qwen2"},
            "dataset": {"source": "builtin://datasets/chat"},
            **fields,
        },
    }
    return TrainingRun.model_validate(document).spec


@pytest.mark.parametrize(
    ("precision", "env", "expected"),
    [
        ("bf16", GPU, {"bf16": True, "fp16": False}),
        ("fp16", GPU, {"bf16": False, "fp16": True}),
        ("fp32", GPU, {"bf16": False, "fp16": False}),
        ("bf16", CPU, {"bf16": False, "fp16": False, "use_cpu": True}),
    ],
)
def test_precision(precision, env, expected):
    assert precision_arguments(precision, env) == expected


DEEPSPEED_CASES = [
    ("stage 0", {"zeroStage": 0}, {"stage": 0, "overlap_comm": False}, False),
    ("stage 2", {"zeroStage": 2}, {"stage": 2, "overlap_comm": True}, False),
    (
        "stage 2 offload optimizer",
        {"zeroStage": 2, "offloadOptimizer": "cpu"},
        {"offload_optimizer": {"device": "cpu", "pin_memory": True}},
        True,
    ),
    (
        "stage 3 offload both",
        {"zeroStage": 3, "offloadOptimizer": "nvme", "offloadParam": "cpu"},
        {
            "offload_param": {"device": "cpu", "pin_memory": True},
            "stage3_gather_16bit_weights_on_model_save": True,
        },
        True,
    ),
]


@pytest.mark.parametrize(
    ("fields", "zero", "ds_cpu_adam"),
    [c[1:] for c in DEEPSPEED_CASES],
    ids=[c[0] for c in DEEPSPEED_CASES],
)
def test_deepspeed_config(fields, zero, ds_cpu_adam):
    run = spec(distributed={"gpusPerNode": 2, "deepspeed": fields})
    config = deepspeed_config(run.distributed.deepspeed)
    assert zero.items() <= config["zero_optimization"].items()
    # Batch sizes and precision are "auto": transformers fills them from TrainingArguments.
    assert config["train_micro_batch_size_per_gpu"] == "auto"
    assert config["bf16"] == {"enabled": "auto"}
    assert ("zero_force_ds_cpu_optimizer" not in config) == ds_cpu_adam
    assert training_arguments(run, "/out", GPU)["deepspeed"] == config


def test_deepspeed_extra_config_is_merged_over_the_generated_one():
    run = spec(
        distributed={
            "deepspeed": {
                "zeroStage": 2,
                "config": {"zero_optimization": {"reduce_bucket_size": 1000}, "steps_per_print": 5},
            }
        }
    )
    config = deepspeed_config(run.distributed.deepspeed)
    assert config["zero_optimization"]["reduce_bucket_size"] == 1000
    assert config["zero_optimization"]["stage"] == 2
    assert config["steps_per_print"] == 5


def test_qlora_options_reach_bitsandbytes():
    import torch

    run = spec(
        model={
            "source": "builtin://tiny-qwen2",
            "quantization": {"bits": 4, "quantType": "nf4", "computeDtype": "bfloat16"},
        },
        peft={},
    )
    config = quantization_config(run.model)
    assert config.load_in_4bit and not config.load_in_8bit
    assert config.bnb_4bit_quant_type == "nf4"
    assert config.bnb_4bit_use_double_quant
    assert config.bnb_4bit_compute_dtype == torch.bfloat16
    eight = spec(model={"source": "hf://org/m", "quantization": {"bits": 8}}, peft={})
    assert quantization_config(eight.model).load_in_8bit
    with pytest.raises(SpecError, match="quantization needs a CUDA GPU"):
        check_environment(run, CPU)


def test_lora_all_linear_and_reward_head():
    run = spec(peft={"r": 8, "alpha": 16, "useDora": True, "bias": "lora_only"})
    config = lora_config(run.peft, "sft")
    assert config.target_modules == "all-linear"
    assert (config.r, config.lora_alpha, config.use_dora, config.bias) == (8, 16, True, "lora_only")
    assert config.task_type == "CAUSAL_LM"
    reward = lora_config(run.peft, "reward")
    assert reward.task_type == "SEQ_CLS" and reward.modules_to_save == ["score"]


@pytest.mark.parametrize(
    ("training", "checkpoint", "expected"),
    [
        ({}, None, {"save_strategy": "no"}),
        (
            {},
            {"uri": "file:///c", "everySteps": 50},
            {"save_strategy": "steps", "save_steps": 50},
        ),
        (
            {"evalSteps": 10, "earlyStopping": {"patience": 2}},
            {"uri": "file:///c", "everySteps": 50},
            {"eval_strategy": "steps", "save_steps": 50, "load_best_model_at_end": True},
        ),
        (
            # 25 is no multiple of 10: saves follow the evaluations, as load_best needs.
            {
                "evalSteps": 10,
                "earlyStopping": {"metric": "eval_accuracy", "greaterIsBetter": True},
            },
            {"uri": "file:///c", "everySteps": 25},
            {"save_steps": 10, "metric_for_best_model": "eval_accuracy", "greater_is_better": True},
        ),
        (
            {"earlyStopping": {}},
            None,
            {"eval_strategy": "epoch", "save_strategy": "epoch"},
        ),
    ],
    ids=["no-checkpoint", "checkpoint", "aligned", "misaligned", "per-epoch"],
)
def test_save_and_eval_schedule(training, checkpoint, expected):
    fields = {
        "training": training,
        "dataset": {"source": "builtin://datasets/chat", "evalSplit": 0.1},
    }
    if checkpoint:
        fields["checkpoint"] = checkpoint
    assert expected.items() <= save_and_eval_arguments(spec(**fields)).items()


def online(rollout):
    return spec(
        method="grpo",
        dataset={"source": "builtin://datasets/prompts"},
        grpo={
            "numGenerations": 2,
            "rewards": [{"name": "n", "builtin": "length", "args": {"max": 5}}],
        },
        training={"perDeviceBatchSize": 2},
        rollout=rollout,
    )


def test_vllm_server_mode_reads_the_rollout_server_address(monkeypatch):
    run = online({"vllm": {"mode": "server"}})
    monkeypatch.setenv("TRAINYARD_VLLM_URL", "http://run-vllm.ns.svc:8000")
    assert vllm_options(run.rollout) == {
        "use_vllm": True,
        "vllm_mode": "server",
        "vllm_server_base_url": "http://run-vllm.ns.svc:8000",
    }
    monkeypatch.delenv("TRAINYARD_VLLM_URL")
    monkeypatch.setenv("TRAINYARD_VLLM_HOST", "10.0.0.7")
    monkeypatch.setenv("TRAINYARD_VLLM_PORT", "8100")
    options = vllm_options(run.rollout)
    assert (options["vllm_server_host"], options["vllm_server_port"]) == ("10.0.0.7", 8100)
    monkeypatch.delenv("TRAINYARD_VLLM_HOST")
    with pytest.raises(SpecError, match="TRAINYARD_VLLM_URL"):
        vllm_options(run.rollout)


def test_vllm_colocate_options_and_the_cpu_refusal():
    run = online(
        {
            "vllm": {
                "mode": "colocate",
                "gpuMemoryUtilization": 0.4,
                "tensorParallelSize": 2,
                "maxModelLen": 2048,
            }
        }
    )
    assert vllm_options(run.rollout) == {
        "use_vllm": True,
        "vllm_mode": "colocate",
        "vllm_gpu_memory_utilization": 0.4,
        "vllm_tensor_parallel_size": 2,
        "vllm_max_model_length": 2048,
    }
    assert vllm_options(online(None).rollout) == {"use_vllm": False}
    with pytest.raises(SpecError, match="rollout.vllm: vLLM rollouts need a CUDA GPU"):
        check_environment(run, CPU)


def test_grpo_config_takes_the_options_by_their_trl_names(monkeypatch):
    from trainyard.workloads.methods.grpo import build_grpo_config

    monkeypatch.setenv("TRAINYARD_VLLM_URL", "http://vllm:8000")
    run = spec(
        method="grpo",
        dataset={"source": "builtin://datasets/prompts"},
        grpo={
            "numGenerations": 4,
            "maxCompletionLength": 64,
            "temperature": 0.7,
            "beta": 0.04,
            "lossType": "dr_grpo",
            "scaleRewards": "batch",
            "syncRefModel": True,
            "refModelSyncSteps": 16,
            "rewards": [{"name": "n", "builtin": "length", "args": {"max": 5}}],
        },
        training={"perDeviceBatchSize": 4},
        rollout={"vllm": {"mode": "server"}},
    )
    config = build_grpo_config(run, training_arguments(run, "/tmp/out", CPU), [2.0])
    assert (config.num_generations, config.max_completion_length) == (4, 64)
    assert (config.temperature, config.beta, config.loss_type) == (0.7, 0.04, "dr_grpo")
    assert config.scale_rewards == "batch"
    assert (config.sync_ref_model, config.ref_model_sync_steps) == (True, 16)
    assert config.reward_weights == [2.0]
    assert config.use_vllm and config.vllm_server_base_url == "http://vllm:8000"
    assert config.remove_unused_columns is False


def test_operator_trainer_options_are_laid_over_the_derived_ones(monkeypatch, tmp_path):
    from trainyard.workloads.methods.common import apply_trainer_options, read_trainer_options
    from trainyard.workloads.methods.grpo import build_grpo_config

    monkeypatch.setenv("TRAINYARD_VLLM_URL", "http://from-env:8000")
    run = online({"vllm": {"mode": "server"}})
    options_file = tmp_path / "trainer.json"
    options_file.write_text(
        '{"vllm_server_base_url": "http://run-vllm.ns.svc:8000", "vllm_server_timeout": 900}'
    )
    monkeypatch.setenv("TRAINYARD_TRAINER_OPTIONS", str(options_file))
    trainer_options = read_trainer_options()
    config = build_grpo_config(
        run, training_arguments(run, str(tmp_path), CPU), None, trainer_options
    )
    # The operator's file wins over the environment; the rest of the spec still applies.
    assert config.vllm_server_base_url == "http://run-vllm.ns.svc:8000"
    assert config.vllm_server_timeout == 900
    assert config.num_generations == 2

    from trl import GRPOConfig

    with pytest.raises(SpecError, match=r"'vllm_sever_timeout' is not an option of TRL GRPOConfig"):
        apply_trainer_options(GRPOConfig, {}, {"vllm_sever_timeout": 1})
    options_file.write_text("[1, 2]")
    with pytest.raises(SpecError, match="must be a JSON object of TRL config options, got list"):
        read_trainer_options()
    monkeypatch.setenv("TRAINYARD_TRAINER_OPTIONS", str(tmp_path / "absent.json"))
    assert read_trainer_options() == {}
