"""Built-in tiny models, tokenizer and datasets: built offline, deterministic, cached."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from trainyard.workloads import builtin


@pytest.fixture(autouse=True)
def trainyard_cache(tmp_path_factory, monkeypatch):
    # One cache per test session, shared by every test file that builds models.
    monkeypatch.setenv("TRAINYARD_CACHE", str(tmp_path_factory.getbasetemp() / "trainyard-cache"))


def test_tokenizer_round_trips_and_knows_its_special_tokens():
    tokenizer = builtin.build_tokenizer()
    text = "List the sprint goals for the checkout page, one per line. 3 + 4 = 7."
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    # Trained on the corpus: common words are single tokens, not bytes.
    assert len(tokenizer(" sprint goals")["input_ids"]) <= 3


def test_chat_template_marks_the_assistant_turn_including_its_end_token():
    tokenizer = builtin.build_tokenizer()
    messages = builtin.build_dataset_rows("chat")[0]["messages"]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered.startswith("<|im_start|>system\n")
    assert rendered.endswith("<|im_end|>\n")
    encoded = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = encoded["input_ids"], encoded["assistant_masks"]
    trained = tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert trained == messages[-1]["content"] + "<|im_end|>"
    prompt = tokenizer.apply_chat_template(
        messages[:-1], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("name", sorted(builtin.MODELS))
def test_model_is_built_once_then_loaded_from_the_cache(name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = builtin.model_path(name)
    weights = path / "model.safetensors"
    built_at = weights.stat().st_mtime_ns
    assert builtin.model_path(name) == path
    assert weights.stat().st_mtime_ns == built_at  # not rebuilt
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == builtin.MODELS[name]["model_type"]
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert sum(p.numel() for p in model.parameters()) < 500_000
    assert tokenizer.chat_template == builtin.CHAT_TEMPLATE


def test_ranks_building_into_an_empty_cache_get_one_whole_model(tmp_path, monkeypatch):
    """Two processes (two ranks of a torchrun launch on a fresh node) ask for the same
    built-in model at once: both get the whole model and no staging directory is left.
    An entry a killed build left incomplete (no config.json) is rebuilt, not trusted:
    before, the rename onto it failed and every later run with that cache failed too."""
    import subprocess
    import sys

    script = (
        "import sys; from trainyard.workloads import builtin; "
        "print('path:', builtin.model_path('tiny-qwen2'))"
    )
    env = {**os.environ, "TRAINYARD_CACHE": str(tmp_path)}
    ranks = [
        subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [process.communicate(timeout=120)[0] for process in ranks]
    paths = {
        line.split(": ", 1)[1]
        for out in outputs
        for line in out.splitlines()
        if line.startswith("path: ")
    }
    assert [process.returncode for process in ranks] == [0, 0]
    (path,) = paths
    built = Path(path)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in built.iterdir()
    }
    assert [
        p.name for p in built.parent.iterdir() if p.is_dir() and p.name.startswith(".tiny-qwen2-")
    ] == []

    (built / "config.json").unlink()  # as if the build was killed mid-way
    monkeypatch.setenv("TRAINYARD_CACHE", str(tmp_path))
    assert builtin.model_path("tiny-qwen2") == built
    assert (built / "config.json").exists() and (built / "model.safetensors").exists()


def test_random_init_is_seeded(tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM

    first = AutoModelForCausalLM.from_pretrained(builtin.model_path("tiny-qwen2"))
    monkeypatch.setenv("TRAINYARD_CACHE", str(tmp_path))
    second = AutoModelForCausalLM.from_pretrained(builtin.model_path("tiny-qwen2"))
    for (name, a), (_, b) in zip(
        first.state_dict().items(), second.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


DATASET_COLUMNS = {
    "chat": {"messages"},
    "alpaca": {"instruction", "input", "output"},
    "preference": {"prompt", "chosen", "rejected"},
    "unpaired-preference": {"prompt", "completion", "label"},
    "prompts": {"prompt", "reference", "answer"},
    "text": {"text"},
}


@pytest.mark.parametrize("name", sorted(DATASET_COLUMNS))
def test_datasets_have_their_format_columns_and_are_deterministic(name):
    rows = builtin.build_dataset_rows(name)
    assert len(rows) >= 32
    assert all(set(row) == DATASET_COLUMNS[name] for row in rows)
    assert builtin.build_dataset_rows(name) == rows
    assert builtin.build_dataset(name).num_rows == len(rows)


def test_preference_pairs_differ_and_unpaired_labels_are_balanced():
    assert all(r["chosen"] != r["rejected"] for r in builtin.build_dataset_rows("preference"))
    labels = [r["label"] for r in builtin.build_dataset_rows("unpaired-preference")]
    assert labels.count(True) == labels.count(False)


def test_prompts_carry_references_for_rewards():
    rows = builtin.build_dataset_rows("prompts")
    sprint = [r for r in rows if r["prompt"].startswith("List the sprint goals")]
    assert sprint and all(len(r["reference"].split("\n")) == 3 for r in sprint)


@pytest.mark.parametrize(
    ("call", "name", "message"),
    [
        (
            "model_path",
            "tiny-gpt",
            "builtin://tiny-llama, builtin://tiny-qwen2, builtin://tiny-qwen3-moe",
        ),
        ("build_dataset_rows", "pairs", "builtin://datasets/preference"),
    ],
)
def test_unknown_names_list_what_exists(call, name, message):
    with pytest.raises(ValueError, match=message):
        getattr(builtin, call)(name)
