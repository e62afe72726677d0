"""The real set-ups of issue 12 as tiny runs: prompt templates for GRPO/RLOO, trainer options
passed through (`training.extra`), LoRA on mixture-of-experts weights, random
initialisation from a model configuration, TensorBoard reporting.

Each trains a built-in tiny model for a step or two on CPU through `train()`, the code
the pod runs.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from trainyard.api import TrainingRun
from trainyard.workloads import builtin
from trainyard.workloads.dataset_formats import DatasetFormatError
from trainyard.workloads.methods.common import detect_environment
from trainyard.workloads.train import build_context, train

SPRINTS = [
    {"sprint_goal": "fix the payment timeout", "team_context": "two backend devs", "n": "1"},
    {"sprint_goal": "ship dark mode", "team_context": "one designer", "n": "2"},
    {"sprint_goal": "add rate limits", "team_context": "the platform team", "n": "3"},
    {"sprint_goal": "index product titles", "team_context": "search team", "n": "4"},
]
SYSTEM = "You plan sprints. Think first."
TEMPLATE = "Sprint goal: {sprint_goal}\nTeam: {team_context}"


@pytest.fixture(autouse=True)
def training_env(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("TRAINYARD_CACHE", str(tmp_path_factory.getbasetemp() / "trainyard-cache"))
    monkeypatch.setenv("TRAINYARD_METRICS_PORT", "off")
    monkeypatch.delenv("TRAINYARD_RUNS_URI", raising=False)


def sprint_data(tmp_path: Path) -> str:
    path = tmp_path / "sprints.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in SPRINTS))
    return f"file://{path}"


def run(spec: dict, name: str = "recipe") -> TrainingRun:
    base = {
        "model": {"source": "builtin://tiny-qwen2"},
        "training": {"maxSteps": 1, "perDeviceBatchSize": 2, "loggingSteps": 1},
    }
    return TrainingRun.model_validate(
        {
            "apiVersion": "trainyard.dev/v1alpha1",
            "kind": "TrainingRun",
            "metadata": {"name": name},
            "spec": {**base, **spec},
        }
    )


def online(method: str, data: str, prompt: dict, **extra) -> TrainingRun:
    return run(
        {
            "method": method,
            "dataset": {"source": data},
            method: {
                "numGenerations": 2,
                "maxCompletionLength": 6,
                "logCompletionsEvery": 1,
                "prompt": prompt,
                "rewards": [
                    # Scores the whole assistant turn: the prefix the policy continued is in it.
                    {"name": "thinks", "builtin": "regex", "args": {"pattern": "^<think>"}},
                    {"name": "short", "builtin": "length", "args": {"max": 20, "unit": "chars"}},
                ],
            },
            **extra,
        }
    )


# ----------------------------------------------------------------- prompt templates


def test_grpo_completes_the_chat_templated_prompt_with_its_prefix(tmp_path):
    prompt = {"system": SYSTEM, "template": TEMPLATE, "assistantPrefix": "<think>"}
    result = train(online("grpo", sprint_data(tmp_path), prompt), tmp_path / "out")

    assert result["globalStep"] == 1
    tokenizer = AutoTokenizer.from_pretrained(builtin.model_path("tiny-qwen2"))
    expected = {
        tokenizer.apply_chat_template(
            [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": TEMPLATE.format(**row)},
            ],
            tokenize=False,
            add_generation_prompt=True,
        )
        + "<think>"
        for row in SPRINTS
    }
    logged = [
        json.loads(x) for x in (tmp_path / "out" / "completions.jsonl").read_text().splitlines()
    ]
    assert logged
    # The prompts TRL generated from are the rendered strings, exactly.
    assert {line["prompt"] for line in logged} <= expected
    assert all(line["prompt"].startswith("<|im_start|>system\n" + SYSTEM) for line in logged)
    # The policy's text does not start with <think>; the reward saw the prefix before it.
    assert all(line["rewards"]["thinks"] == 1.0 for line in logged)


def test_rloo_prompt_without_chat_template_joins_the_parts(tmp_path):
    prompt = {"template": TEMPLATE, "assistantPrefix": "<think>", "chatTemplate": False}
    rloo = online("rloo", sprint_data(tmp_path), prompt)
    ctx = build_context(rloo, tmp_path / "out", detect_environment())
    from trainyard.workloads.methods.rloo import build_rloo_trainer

    trainer = build_rloo_trainer(ctx)
    first = trainer.train_dataset[0]
    assert first["prompt"] == TEMPLATE.format(**SPRINTS[0]) + "\n\n<think>"
    # Every column stays for the rewards.
    assert first["sprint_goal"] == SPRINTS[0]["sprint_goal"] and first["n"] == "1"


def test_chat_data_gets_the_system_prompt_in_place_of_its_own(tmp_path):
    spec = online("grpo", "builtin://datasets/chat", {"system": SYSTEM})
    ctx = build_context(spec, tmp_path / "out", detect_environment())
    from trainyard.workloads.methods.grpo import build_grpo_trainer

    trainer = build_grpo_trainer(ctx)
    first = builtin.build_dataset_rows("chat")[0]["messages"]
    assert first[0]["role"] == "system" and first[0]["content"] != SYSTEM
    tokenizer = AutoTokenizer.from_pretrained(builtin.model_path("tiny-qwen2"))
    assert trainer.train_dataset[0]["prompt"] == tokenizer.apply_chat_template(
        [{"role": "system", "content": SYSTEM}, first[1]],
        tokenize=False,
        add_generation_prompt=True,
    )
    # The assistant's answer stays a column for the rewards.
    assert trainer.train_dataset[0]["reference"] == first[2]["content"]


def test_template_naming_a_missing_column_is_refused_with_the_columns(tmp_path):
    prompt = {"template": "Sprint goal: {goal}\nTeam: {team_context}"}
    spec = online("grpo", sprint_data(tmp_path), prompt)
    with pytest.raises(DatasetFormatError) as error:
        build_context(spec, tmp_path / "out", detect_environment())
    assert str(error.value) == (
        "grpo.prompt.template: names the column 'goal', which the data lacks; its columns "
        "are sprint_goal, team_context, n"
    )


# ----------------------------------------------------------------- training.extra


@pytest.mark.parametrize(
    ("method", "data", "extra"),
    [
        ("sft", "alpaca", {"dataloader_drop_last": True, "logging_nan_inf_filter": False}),
        # Laid over what Trainyard derives for pretraining (wrapped packing).
        ("pretrain", "text", {"packing_strategy": "bfd", "dataloader_drop_last": True}),
        ("grpo", "prompts", {"torch_compile": False, "shuffle_dataset": False}),
    ],
)
def test_training_extra_reaches_the_trl_config(method, data, extra, tmp_path):
    spec = {"method": method, "dataset": {"source": f"builtin://datasets/{data}"}}
    spec["training"] = {"maxSteps": 1, "perDeviceBatchSize": 2, "extra": extra}
    if method == "grpo":
        spec["grpo"] = {
            "numGenerations": 2,
            "rewards": [{"name": "short", "builtin": "length", "args": {"max": 20}}],
        }
    ctx = build_context(run(spec), tmp_path, detect_environment())
    from trainyard.workloads.train import build_trainer

    args = build_trainer(ctx).args
    assert {key: getattr(args, key) for key in extra} == extra
    assert args.run_name == "recipe"  # the TrainingRun's name, for the trackers


# ----------------------------------------------------------------- LoRA on experts

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def test_lora_on_the_expert_weights_of_a_mixture_of_experts_model(tmp_path):
    from safetensors.torch import load_file

    spec = {
        "method": "sft",
        "model": {"source": "builtin://tiny-qwen3-moe"},
        "dataset": {"source": "builtin://datasets/chat"},
        "peft": {
            "r": 2,
            "alpha": 4,
            "dropout": 0.0,
            "targetModules": [],
            "targetParameters": EXPERTS,
        },
        "training": {
            "maxSteps": 2,
            "perDeviceBatchSize": 2,
            "learningRate": 1e-2,
            "loggingSteps": 1,
        },
    }
    result = train(run(spec), tmp_path)

    assert result["globalStep"] == 2
    config = json.loads((tmp_path / "final" / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == sorted(EXPERTS)
    adapter = load_file(str(tmp_path / "final" / "adapter_model.safetensors"))
    # Both layers' experts got adapters, nothing else did, and training moved them.
    assert {k.split(".layers.")[1].split(".")[0] for k in adapter} == {"0", "1"}
    assert all(".mlp.experts." in k for k in adapter)
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)


@pytest.mark.parametrize(
    ("peft", "problem"),
    [
        (
            {"targetModules": ["q_proj", "qproj"]},
            "peft.targetModules: 'qproj' matches no module of the model; did you mean 'q_proj'? "
            "Its modules: ",
        ),
        (
            {"targetModules": [], "targetParameters": ["mlp.experts.up_proj"], "dropout": 0.0},
            "peft.targetParameters: 'mlp.experts.up_proj' matches no parameter of the model (an "
            "entry is a parameter's dotted name or its last parts); its parameters: ",
        ),
    ],
    ids=["module", "parameter"],
)
def test_a_lora_target_that_matches_nothing_is_refused_with_the_names(peft, problem, tmp_path):
    from trainyard.workloads.methods.common import SpecError
    from trainyard.workloads.train import build_trainer

    spec = {
        "method": "sft",
        "model": {"source": "builtin://tiny-qwen3-moe"},
        "dataset": {"source": "builtin://datasets/chat"},
        "peft": peft,
    }
    ctx = build_context(run(spec), tmp_path, detect_environment())
    with pytest.raises(SpecError) as error:
        build_trainer(ctx)
    message = str(error.value)
    assert message.startswith(problem)
    assert "model.layers.*.mlp.experts.gate_up_proj" in message or "q_proj, " in message


def test_lora_targets_are_read_from_the_whole_model_under_zero3(tmp_path):
    """With a ZeRO-3 config alive, transformers would build models inside deepspeed.zero.Init
    (which wants a process group); the names are read from a plain meta-device model."""
    from trainyard.workloads.methods.common import SpecError
    from trainyard.workloads.train import build_trainer

    spec = {
        "method": "sft",
        "dataset": {"source": "builtin://datasets/chat"},
        "peft": {"targetModules": ["q_proj", "v_projj"]},
        "distributed": {"deepspeed": {"zeroStage": 3}},
    }
    ctx = build_context(run(spec), tmp_path, detect_environment())
    with pytest.raises(
        SpecError, match="'v_projj' matches no module of the model; did you mean 'v_proj'"
    ):
        build_trainer(ctx)


# ----------------------------------------------------------------- random initialisation

LLAMA = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
}


def test_pretraining_from_an_inline_configuration(tmp_path):
    spec = {
        "method": "pretrain",
        # The source gives the tokenizer only: config names the whole architecture.
        "model": {"source": "builtin://tiny-qwen2", "init": "random", "config": LLAMA},
        "dataset": {"source": "builtin://datasets/text"},
        "pretrain": {"blockSize": 32},
        "training": {"maxSteps": 2, "perDeviceBatchSize": 2, "loggingSteps": 1},
    }
    result = train(run(spec), tmp_path)

    assert result["globalStep"] == 2
    config = json.loads((tmp_path / "final" / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "final")
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"]) == (
        "llama",
        1,
        32,
    )
    assert config["vocab_size"] == len(tokenizer)


def test_random_init_from_the_sources_configuration_is_seeded(tmp_path):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from trainyard.workloads.methods.common import random_init_model

    spec = run(
        {
            "method": "pretrain",
            "model": {
                "source": "builtin://tiny-qwen2",
                "init": "random",
                "config": {"num_hidden_layers": 1},
            },
            "dataset": {"source": "builtin://datasets/text"},
        }
    ).spec
    source = builtin.model_path("tiny-qwen2")
    tokenizer = AutoTokenizer.from_pretrained(source)
    path = random_init_model(spec.model, str(source), {}, tokenizer, seed=7)

    assert random_init_model(spec.model, str(source), {}, tokenizer, seed=7) == path  # cached
    built = AutoModelForCausalLM.from_pretrained(path)
    config = AutoConfig.from_pretrained(source)
    assert (built.config.model_type, built.config.num_hidden_layers) == ("qwen2", 1)
    assert built.config.hidden_size == config.hidden_size
    config.num_hidden_layers = 1
    torch.manual_seed(7)
    expected = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    pretrained = AutoModelForCausalLM.from_pretrained(source)
    name = "model.layers.0.self_attn.q_proj.weight"
    weights = dict(built.named_parameters())[name]
    assert weights.equal(dict(expected.named_parameters())[name])
    assert not weights.equal(dict(pretrained.named_parameters())[name])


def test_a_configuration_that_cannot_be_built_is_refused(tmp_path):
    from trainyard.workloads.methods.common import SpecError

    spec = {
        "method": "pretrain",
        "model": {
            "source": "builtin://tiny-qwen2",
            "init": "random",
            "config": {"model_type": "lama"},
        },
        "dataset": {"source": "builtin://datasets/text"},
    }
    with pytest.raises(
        SpecError, match="^model.config: cannot build a model configuration: .*lama"
    ):
        build_context(run(spec), tmp_path, detect_environment())


# ----------------------------------------------------------------- reporting


def test_tensorboard_events_are_uploaded_beside_the_checkpoints(tmp_path, s3_endpoint, s3_bucket):
    import boto3
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    spec = {
        "method": "sft",
        "dataset": {"source": "builtin://datasets/alpaca"},
        "training": {
            "maxSteps": 2,
            "perDeviceBatchSize": 2,
            "loggingSteps": 1,
            "reportTo": ["tensorboard"],
        },
        "checkpoint": {"uri": f"s3://{s3_bucket}/runs/tb", "everySteps": 1},
        "storage": {"s3": {"endpoint": s3_endpoint}},
    }
    result = train(run(spec), tmp_path / "out")

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    keys = [
        o["Key"]
        for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="runs/tb/").get("Contents", [])
    ]
    events = [k for k in keys if k.startswith("runs/tb/tensorboard/") and "tfevents" in k]
    assert events and "runs/tb/step-2/manifest.json" in keys
    # The uploaded file is the whole log: both steps' losses, as the trainer logged them.
    local = tmp_path / "copy" / events[0].rsplit("/", 1)[1]
    local.parent.mkdir()
    s3.download_file(s3_bucket, events[0], str(local))
    accumulator = EventAccumulator(str(local))
    accumulator.Reload()
    losses = [(e.step, e.value) for e in accumulator.Scalars("train/loss")]
    logged = [(e["step"], e["loss"]) for e in result["logHistory"] if "loss" in e]
    assert [step for step, _ in losses] == [1, 2]
    assert [value for _, value in losses] == pytest.approx([value for _, value in logged])


def test_a_tracker_whose_package_is_missing_is_refused_before_loading():
    from trainyard.workloads.methods.common import Environment, SpecError, check_environment

    spec = run(
        {
            "method": "sft",
            "dataset": {"source": "builtin://datasets/alpaca"},
            "training": {"reportTo": ["tensorboard", "wandb"]},
        }
    ).spec
    if importlib.util.find_spec("wandb") is not None:
        check_environment(spec, Environment(cuda=False))  # this machine has it: accepted
        return
    with pytest.raises(SpecError) as error:
        check_environment(spec, Environment(cuda=False))
    assert str(error.value) == (
        "training.reportTo: wandb needs the wandb package, which is not installed in this "
        "image; install it (pip install wandb) or leave wandb out"
    )


# ----------------------------------------------------------------- reward models from anywhere


def test_embedding_reward_model_from_s3(tmp_path, s3_endpoint, s3_bucket):
    import boto3

    encoder = builtin.model_path("tiny-qwen2")
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    for path in encoder.iterdir():
        s3.upload_file(str(path), s3_bucket, f"encoders/tiny/{path.name}")
    spec = {
        "method": "grpo",
        "dataset": {"source": "builtin://datasets/prompts"},
        "storage": {"s3": {"endpoint": s3_endpoint}},
        "grpo": {
            "numGenerations": 2,
            "rewards": [
                {
                    "name": "semantic",
                    "builtin": "reference_similarity",
                    "args": {
                        "referenceField": "reference",
                        "separator": "\n",
                        "method": "embedding",
                        "model": f"s3://{s3_bucket}/encoders/tiny",
                    },
                }
            ],
        },
    }
    ctx = build_context(run(spec), tmp_path, detect_environment())

    (semantic,) = ctx.reward_funcs
    reference = "fix the payment timeout\nadd address validation"
    same, other = semantic(completions=[reference, "banana"], reference=[reference, reference])
    assert same == pytest.approx(1.0, abs=1e-3) and 0.0 <= other < same


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (
            {"model": "gs://models/minilm"},
            "model: 'gs://models/minilm' is not a source URI; allowed: hf://org/name[@revision], "
            "s3://bucket/key, file://path, builtin://NAME, run://RUN[/step-N|final|latest]",
        ),
        (
            {"model": "hf://sentence-transformers/all-MiniLM-L6-v2", "modelPath": "/models/m"},
            "method embedding needs exactly one of model (a model source: hf://, s3://, file://, "
            "builtin://, run://) or modelPath (a local directory); got model and modelPath",
        ),
    ],
    ids=["scheme", "both"],
)
def test_embedding_reward_model_sources_are_checked_at_validation(args, problem):
    from trainyard.api import validate_resource

    reward = {
        "name": "semantic",
        "builtin": "reference_similarity",
        "args": {"referenceField": "reference", "method": "embedding", **args},
    }
    document = {
        "apiVersion": "trainyard.dev/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": "similarity"},
        "spec": {
            "method": "grpo",
            "model": {"source": "builtin://tiny-qwen2"},
            "dataset": {"source": "builtin://datasets/prompts"},
            "training": {"perDeviceBatchSize": 8},
            "grpo": {"rewards": [reward]},
        },
    }
    (line,) = validate_resource(document)
    assert line.startswith("spec.grpo.rewards[0].args") and problem in line
