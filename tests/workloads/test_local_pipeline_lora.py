"""A LoRA stage's adapter taken up by the next stage on another machine: its base is found
from the source recorded beside it (trainyard-base.json), fetched from S3 (moto's server),
when base_model_name_or_path names the cache of the pod that trained it."""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import torch

from trainyard.api import parse_resource
from trainyard.workloads import builtin
from trainyard.workloads.train import ADAPTER_BASE_FILE, merged_adapter_path


def test_an_adapter_trained_on_an_s3_model_merges_on_a_machine_without_that_model(
    s3_endpoint, s3_bucket, tmp_path, monkeypatch
):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base_dir = builtin.model_path("tiny-qwen2")
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    for path in Path(base_dir).iterdir():
        if path.is_file():
            client.upload_file(str(path), s3_bucket, f"models/base/{path.name}")
    torch.manual_seed(0)
    peft = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    with torch.no_grad():  # a trained adapter: B is no longer zero, so merging changes q
        for name, weight in peft.named_parameters():
            if "lora_B" in name:
                weight.normal_(std=0.5)
    adapter = tmp_path / "sft-final"
    peft.save_pretrained(adapter)
    # as the pod that trained it left it: a base path only that pod had, and the source
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "/var/cache/trainyard/s3/ckpt/models/base"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    source = f"s3://{s3_bucket}/models/base"
    (adapter / ADAPTER_BASE_FILE).write_text(json.dumps({"source": source}))

    monkeypatch.setenv("TRAINYARD_CACHE", str(tmp_path / "another-machine"))
    run = parse_resource(
        {
            "apiVersion": "trainyard.dev/v1alpha1",
            "kind": "TrainingRun",
            "metadata": {"name": "full"},
            "spec": {
                "method": "sft",
                "model": {"source": str(adapter.as_uri())},
                "dataset": {"source": "builtin://datasets/chat"},
                "storage": {"s3": {"endpoint": s3_endpoint}},
            },
        }
    )
    merged = merged_adapter_path(str(adapter), "sft", run.spec)
    assert Path(merged).is_relative_to(tmp_path / "another-machine")
    expected = peft.merge_and_unload().state_dict()
    got = AutoModelForCausalLM.from_pretrained(merged).state_dict()
    q = "model.layers.0.self_attn.q_proj.weight"
    assert torch.allclose(got[q], expected[q], atol=1e-5)
    original = AutoModelForCausalLM.from_pretrained(base_dir).state_dict()[q]
    assert not torch.allclose(got[q], original), "the adapter was merged in"
