"""The training workload: every method trains a built-in tiny model for a few steps on CPU.

Runs go through `train()` in this process (the same code the entrypoint runs); the
entrypoint itself, torchrun and DeepSpeed are in test_train_distributed.py.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
from safetensors.torch import load_file

from trainyard.api import TrainingRun
from trainyard.workloads import builtin
from trainyard.workloads.methods.common import detect_environment
from trainyard.workloads.train import build_context, build_trainer, main, train

DATASET_OF = {
    "sft": "alpaca",
    "pretrain": "text",
    "dpo": "preference",
    "kto": "unpaired-preference",
    "reward": "preference",
    "grpo": "prompts",
    "rloo": "prompts",
}
COUNT_REWARD = {
    "name": "count",
    "builtin": "count_match",
    "args": {"referenceField": "reference", "separator": "\n"},
}
# Random completions all count one item; their lengths in characters differ, so the
# group's rewards differ and the policy gets a gradient.
LENGTH_REWARD = {
    "name": "length",
    "builtin": "length",
    "args": {"min": 40, "max": 60, "unit": "chars"},
}


@pytest.fixture(autouse=True)
def training_env(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("TRAINYARD_CACHE", str(tmp_path_factory.getbasetemp() / "trainyard-cache"))
    # Several runs in one process (and other test sessions) must not fight over a port.
    monkeypatch.setenv("TRAINYARD_METRICS_PORT", "off")
    monkeypatch.delenv("TRAINYARD_RUNS_URI", raising=False)


def deep_merge(base: dict, extra: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def run_document(method: str, *, lora: bool = False, **spec) -> dict:
    """A TrainingRun document for a tiny run of `method`; keyword args merge into spec."""
    base = {
        "method": method,
        "model": {"source": "builtin://tiny-qwen2"},
        "dataset": {"source": f"builtin://datasets/{DATASET_OF[method]}"},
        "training": {
            "maxSteps": 2,
            "perDeviceBatchSize": 2,
            "learningRate": 5e-3,
            "loggingSteps": 1,
        },
    }
    if lora:
        base["peft"] = {"r": 4, "alpha": 8, "dropout": 0.0}
    if method in ("grpo", "rloo"):
        base[method] = {
            "numGenerations": 2,
            "maxCompletionLength": 8,
            "logCompletionsEvery": 1,
            "rewards": [COUNT_REWARD, LENGTH_REWARD],
        }
    if method == "pretrain":
        base["pretrain"] = {"blockSize": 32}
    return {
        "apiVersion": "trainyard.dev/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": f"{method}-test"},
        "spec": deep_merge(base, spec),
    }


def make_run(method: str, **kwargs) -> TrainingRun:
    return TrainingRun.model_validate(run_document(method, **kwargs))


def trainer_for(run: TrainingRun, output: Path):
    return build_trainer(build_context(run, output, detect_environment()))


# ----------------------------------------------------------------- every method


def tensors(path: Path) -> dict:
    return load_file(str(path))


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("method", list(DATASET_OF))
def test_method_trains(method, lora, tmp_path):
    result = train(make_run(method, lora=lora), tmp_path)

    assert result["globalStep"] == 2
    losses = [e["loss"] for e in result["logHistory"] if "loss" in e]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    final = tmp_path / "final"
    assert json.loads((tmp_path / "result.json").read_text())["globalStep"] == 2
    assert (final / "tokenizer.json").is_file()
    start = tensors(builtin.model_path("tiny-qwen2") / "model.safetensors")
    if lora:
        # Only the adapter is saved, and training moved it away from its zero init.
        assert not (final / "model.safetensors").exists()
        adapter = tensors(final / "adapter_model.safetensors")
        assert adapter and all("lora_" in k or "score" in k for k in adapter)
        lora_b = [v for k, v in adapter.items() if "lora_B" in k]
        assert lora_b and any(v.abs().sum() > 0 for v in lora_b)
        config = json.loads((final / "adapter_config.json").read_text())
        assert config["r"] == 4 and config["lora_alpha"] == 8
        if method == "reward":
            assert "score" in config["modules_to_save"]
    else:
        assert not (final / "adapter_config.json").exists()
        trained = tensors(final / "model.safetensors")
        name = next(k for k in start if k.endswith("layers.0.self_attn.q_proj.weight"))
        assert not trained[name].equal(start[name])
        config = json.loads((final / "config.json").read_text())
        if method == "reward":
            assert config["architectures"] == ["Qwen2ForSequenceClassification"]
            assert len(config["id2label"]) == 1
    keys = set().union(*result["logHistory"])
    expected_key = {
        "dpo": "rewards/margins",
        "kto": "kl",
        "reward": "accuracy",
        "grpo": "rewards/count/mean",
        "rloo": "rewards/count/mean",
    }.get(method)
    if expected_key:
        assert expected_key in keys


# ----------------------------------------------------------------- method details


def test_sft_masks_prompt_tokens_from_the_loss(tmp_path):
    trainer = trainer_for(make_run("sft"), tmp_path)
    tokenizer = trainer.processing_class
    batch = next(iter(trainer.get_train_dataloader()))
    rows = builtin.build_dataset_rows("alpaca")
    from trainyard.workloads.dataset_formats import alpaca_prompt

    prompt_lengths = {
        len(tokenizer(alpaca_prompt(r["instruction"], r["input"]))["input_ids"]) for r in rows
    }
    for ids, labels in zip(batch["input_ids"], batch["labels"], strict=True):
        trained = [
            (i, t) for i, (t, lab) in enumerate(zip(ids, labels, strict=True)) if lab != -100
        ]
        assert trained, "every example trains on its completion"
        first = trained[0][0]
        assert first in prompt_lengths  # everything before the completion is masked
        completion = tokenizer.decode([t for _, t in trained])
        assert completion.endswith(tokenizer.eos_token)
        assert "### Instruction" not in completion


def test_sft_assistant_only_loss_trains_on_assistant_turns(tmp_path):
    run = make_run(
        "sft", dataset={"source": "builtin://datasets/chat"}, sft={"assistantOnlyLoss": True}
    )
    trainer = trainer_for(run, tmp_path)
    tokenizer = trainer.processing_class
    batch = next(iter(trainer.get_train_dataloader()))
    answers = {m["messages"][-1]["content"] for m in builtin.build_dataset_rows("chat")}
    for ids, labels in zip(batch["input_ids"], batch["labels"], strict=True):
        trained = tokenizer.decode([t for t, lab in zip(ids, labels, strict=True) if lab != -100])
        assert trained.removesuffix("<|im_end|>") in answers


def test_pretrain_packs_text_into_full_blocks(tmp_path):
    trainer = trainer_for(make_run("pretrain"), tmp_path)
    lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
    assert lengths[:-1] and all(n == 32 for n in lengths[:-1])
    assert trainer.args.packing and trainer.args.completion_only_loss is False


def test_ipo_reaches_the_dpo_config(tmp_path):
    run = make_run("dpo", dpo={"lossType": "ipo", "beta": 0.3, "labelSmoothing": 0.0})
    trainer = trainer_for(run, tmp_path)
    assert trainer.args.loss_type == ["ipo"]
    assert trainer.args.beta == 0.3
    trainer.train()
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])


def test_lora_options_reach_peft(tmp_path):
    run = make_run(
        "sft",
        peft={"r": 2, "alpha": 4, "targetModules": ["q_proj", "v_proj"], "useRslora": True},
    )
    trainer = trainer_for(run, tmp_path)
    config = trainer.model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.use_rslora) == (2, 4, True)
    assert set(config.target_modules) == {"q_proj", "v_proj"}
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and ("q_proj" in n or "v_proj" in n) for n in trainable)


def test_training_options_keep_their_transformers_names(tmp_path):
    run = make_run(
        "sft",
        training={
            "lrSchedulerType": "cosine",
            "warmupRatio": 0.1,
            "weightDecay": 0.01,
            "gradientCheckpointing": True,
            "gradientAccumulationSteps": 2,
            "precision": "bf16",
        },
    )
    args = trainer_for(run, tmp_path).args
    assert args.lr_scheduler_type == "cosine"
    assert args.warmup_steps == 0.1 and args.weight_decay == 0.01
    assert args.gradient_checkpointing and args.gradient_accumulation_steps == 2
    # No GPU here: bf16 is asked for, the CPU trains in fp32.
    assert (args.bf16, args.fp16, args.use_cpu) == (False, False, True)


def test_grpo_rewards_read_the_dataset_columns(tmp_path):
    """Each logged reward equals the reward function applied to the prompt's own reference."""
    from trainyard.workloads.rewards import build_reward_functions

    run = make_run("grpo")
    train(run, tmp_path)
    lines = [json.loads(x) for x in (tmp_path / "completions.jsonl").read_text().splitlines()]
    assert lines
    reference_of = {r["prompt"]: r["reference"] for r in builtin.build_dataset_rows("prompts")}
    (count, _length), _ = build_reward_functions(run.spec.grpo.rewards)
    for line in lines:
        expected = count(completions=[line["completion"]], reference=[reference_of[line["prompt"]]])
        assert line["rewards"]["count"] == pytest.approx(expected[0], abs=1e-6)


def test_grpo_with_a_trained_reward_model(tmp_path):
    reward_dir = tmp_path / "reward"
    train(make_run("reward", lora=True), reward_dir)
    run = make_run(
        "rloo",
        rloo={"rewards": [], "rewardModel": {"source": f"file://{reward_dir / 'final'}"}},
    )
    result = train(run, tmp_path / "rloo")
    keys = set().union(*result["logHistory"])
    assert any(k.startswith("rewards/") and k.endswith("/mean") for k in keys)
    assert "rewards/count/mean" not in keys


def test_early_stopping_stops_on_a_plateau(tmp_path):
    run = make_run(
        "sft",
        dataset={"evalSplit": 0.25},
        training={
            "maxSteps": 30,
            "evalSteps": 1,
            # No change of eval_loss counts as an improvement, so patience runs out at once.
            "earlyStopping": {"patience": 1, "threshold": 100.0},
        },
    )
    result = train(run, tmp_path)
    assert result["globalStep"] == 2
    evals = [e["eval_loss"] for e in result["logHistory"] if "eval_loss" in e]
    assert len(evals) == 2 and all(math.isfinite(x) for x in evals)
    state = json.loads((tmp_path / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["best_metric"] == min(evals)
    assert Path(state["best_model_checkpoint"]).is_dir()


def test_resume_from_the_latest_checkpoint_in_s3(tmp_path, s3_endpoint, s3_bucket):
    checkpoint = {"uri": f"s3://{s3_bucket}/runs/sft", "everySteps": 1, "keepLast": 2}
    storage = {"s3": {"endpoint": s3_endpoint}}
    first = train(make_run("sft", checkpoint=checkpoint, storage=storage), tmp_path / "a")
    assert first["resumedFrom"] is None

    # A restarted pod: a fresh output directory, the same checkpoint URI, a longer run.
    second = train(
        make_run("sft", checkpoint=checkpoint, storage=storage, training={"maxSteps": 3}),
        tmp_path / "b",
    )
    assert second["resumedFrom"].endswith("checkpoint-2")
    assert second["globalStep"] == 3
    # Steps 1 and 2 come from the checkpoint, not from training them again.
    assert sorted(p.name for p in (tmp_path / "b").glob("checkpoint-*")) == [
        "checkpoint-2",
        "checkpoint-3",
    ]
    restored = [e["loss"] for e in second["logHistory"] if "loss" in e][:2]
    assert restored == [e["loss"] for e in first["logHistory"] if "loss" in e]

    import boto3

    keys = {
        o["Key"]
        for o in boto3.client("s3", endpoint_url=s3_endpoint)
        .list_objects_v2(Bucket=s3_bucket, Prefix="runs/sft/")
        .get("Contents", [])
    }
    assert "runs/sft/final/manifest.json" in keys
    assert "runs/sft/step-3/manifest.json" in keys
    assert not any(k.startswith("runs/sft/step-1/") for k in keys)  # keepLast 2
    progress = json.loads((tmp_path / "b" / "progress.json").read_text())
    assert progress["checkpoint"]["lastStep"] == 3


def test_next_stage_trains_from_a_lora_run(tmp_path):
    """run://RUN takes an earlier run's exported adapter, merged into its base."""
    runs = tmp_path / "runs"
    train(
        make_run(
            "sft", lora=True, checkpoint={"uri": f"file://{runs}/sft-stage", "exportMerged": True}
        ),
        tmp_path / "sft",
    )
    assert (runs / "sft-stage" / "final" / "adapter_config.json").is_file()
    merged = runs / "sft-stage" / "final" / "merged"
    assert (merged / "model.safetensors").is_file() and (merged / "manifest.json").is_file()
    assert not (merged / "adapter_config.json").exists()
    result = train(
        make_run(
            "dpo",
            model={"source": "run://sft-stage"},
            checkpoint={"uri": f"file://{runs}/dpo-stage"},
        ),
        tmp_path / "dpo",
    )
    assert result["globalStep"] == 2
    assert (runs / "dpo-stage" / "final" / "model.safetensors").is_file()


# ----------------------------------------------------------------- errors and the CLI


def write_run(path: Path, document: dict) -> str:
    path.write_text(json.dumps(document))
    return str(path)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {"model": {"source": "builtin://tiny-qwen2", "quantization": {"bits": 4}}, "peft": {}},
            "model.quantization: quantization needs a CUDA GPU (bitsandbytes)",
        ),
        (
            {"rollout": {"vllm": {"mode": "colocate"}}},
            "rollout.vllm: vLLM rollouts need a CUDA GPU",
        ),
        ({"dataset": {"source": "builtin://datasets/text"}}, "method grpo cannot train on text"),
        ({"model": {"source": "builtin://tiny-gpt"}}, "unknown built-in model 'tiny-gpt'"),
    ],
    ids=["qlora-on-cpu", "vllm-on-cpu", "wrong-data", "unknown-model"],
)
def test_bad_specs_exit_2_with_the_field_and_the_fix(spec, message, tmp_path, capsys):
    path = write_run(tmp_path / "run.json", run_document("grpo", **spec))
    assert main([path, "--output", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "final").exists()


def test_invalid_run_file_lists_the_problems(tmp_path, capsys):
    document = run_document("sft", training={"learningRate": -1})
    path = write_run(tmp_path / "run.json", document)
    assert main([path]) == 2
    assert "spec.training.learningRate" in capsys.readouterr().err


def test_entrypoint_reads_yaml_and_takes_the_output_dir_from_the_environment(tmp_path, monkeypatch):
    import yaml

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run_document("sft", lora=True)))
    monkeypatch.setenv("TRAINYARD_OUTPUT_DIR", str(tmp_path / "out"))
    assert main([str(path)]) == 0
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["method"] == "sft" and result["globalStep"] == 2
    assert (tmp_path / "out" / "final" / "adapter_model.safetensors").is_file()


def test_tiny_llama_trains_too(tmp_path):
    result = train(make_run("dpo", lora=True, model={"source": "builtin://tiny-llama"}), tmp_path)
    assert result["globalStep"] == 2
    config = json.loads((tmp_path / "final" / "adapter_config.json").read_text())
    assert "tiny-llama" in config["base_model_name_or_path"]
