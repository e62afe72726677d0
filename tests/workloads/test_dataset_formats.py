"""Datasets brought into the column layout each method's TRL trainer reads."""

from __future__ import annotations

import pytest
from datasets import Dataset

from trainyard.api.training_run import DatasetSpec
from trainyard.workloads import builtin
from trainyard.workloads.dataset_formats import (
    DatasetFormatError,
    alpaca_prompt,
    detect_format,
    prepare_dataset,
)


def spec(**fields) -> DatasetSpec:
    return DatasetSpec(source="builtin://datasets/chat", **fields)


@pytest.mark.parametrize(
    ("dataset", "fields", "expected"),
    [
        ("chat", {}, "chat"),
        ("alpaca", {}, "alpaca"),
        ("preference", {}, "preference"),
        ("unpaired-preference", {}, "unpaired_preference"),
        ("prompts", {}, "prompt"),
        ("text", {}, "text"),
    ],
)
def test_detect_format_from_columns(dataset, fields, expected):
    columns = list(builtin.build_dataset_rows(dataset)[0])
    assert detect_format(columns, spec(**fields)) == expected


def test_detect_format_names_the_fields_when_nothing_fits():
    with pytest.raises(DatasetFormatError, match=r"dataset.format: cannot tell .*\['body', 'id'\]"):
        detect_format(["id", "body"], spec())


# (name, builtin dataset, method, spec fields, expected columns)
LAYOUTS = [
    ("chat for sft", "chat", "sft", {}, ["messages"]),
    ("alpaca for sft", "alpaca", "sft", {}, ["completion", "prompt"]),
    ("text for pretrain", "text", "pretrain", {}, ["text"]),
    ("pairs for dpo", "preference", "dpo", {}, ["chosen", "prompt", "rejected"]),
    ("pairs for reward", "preference", "reward", {}, ["chosen", "prompt", "rejected"]),
    ("unpaired for kto", "unpaired-preference", "kto", {}, ["completion", "label", "prompt"]),
    ("pairs unpaired for kto", "preference", "kto", {}, ["completion", "label", "prompt"]),
    ("prompts keep extras for grpo", "prompts", "grpo", {}, ["answer", "prompt", "reference"]),
    ("chat prompts for rloo", "chat", "rloo", {}, ["prompt", "reference"]),
    ("alpaca prompts for grpo", "alpaca", "grpo", {}, ["prompt", "reference"]),
]


@pytest.mark.parametrize(
    ("dataset", "method", "fields", "columns"),
    [case[1:] for case in LAYOUTS],
    ids=[case[0] for case in LAYOUTS],
)
def test_layout_per_method(dataset, method, fields, columns):
    prepared = prepare_dataset(builtin.build_dataset(dataset), spec(**fields), method)
    assert sorted(prepared.column_names) == columns
    assert prepared.num_rows >= len(builtin.build_dataset_rows(dataset))


def test_alpaca_becomes_prompt_and_completion():
    rows = [{"instruction": "Add the two numbers.", "input": "2 and 3", "output": "5"}]
    prepared = prepare_dataset(Dataset.from_list(rows), spec(), "sft")
    assert prepared[0] == {
        "prompt": alpaca_prompt("Add the two numbers.", "2 and 3"),
        "completion": "5",
    }
    assert "### Input:" not in alpaca_prompt("Say hi.", "")


def test_custom_field_names_are_mapped():
    rows = [{"question": "Q?", "good": " yes", "bad": " no", "id": 1}]
    fields = {"prompt_field": "question", "chosen_field": "good", "rejected_field": "bad"}
    prepared = prepare_dataset(Dataset.from_list(rows), spec(**fields), "dpo")
    assert prepared[0] == {"prompt": "Q?", "chosen": " yes", "rejected": " no"}


def test_chat_prompts_for_online_rl_end_before_the_assistant_turn():
    prepared = prepare_dataset(builtin.build_dataset("chat"), spec(), "grpo")
    row = prepared[0]
    assert [m["role"] for m in row["prompt"]] == ["system", "user"]
    assert row["reference"] == builtin.build_dataset_rows("chat")[0]["messages"][-1]["content"]


@pytest.mark.parametrize(
    ("dataset", "method", "fields", "message"),
    [
        ("text", "dpo", {}, "method dpo cannot train on text data; it takes preference"),
        ("chat", "pretrain", {}, "method pretrain cannot train on chat data"),
        ("prompts", "sft", {}, r"needs the columns completionField='completion'"),
        ("alpaca", "sft", {"format": "preference"}, r"chosenField='chosen'"),
    ],
)
def test_data_that_does_not_fit_the_method_is_refused(dataset, method, fields, message):
    with pytest.raises(DatasetFormatError, match=message):
        prepare_dataset(builtin.build_dataset(dataset), spec(**fields), method)
