"""The GPU benchmarks' code paths at tiny size on CPU: model shape, tokenizer padding,
FLOP accounting, and each benchmark's run through the workload (SFT, GRPO with
transformers generation, DeepSpeed ZeRO-2). vLLM backends report why they are skipped."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    try:
        yield {
            name: importlib.import_module(name)
            for name in ("qwen_shape", "sft_throughput", "grpo_step_time")
        }
    finally:
        sys.path.remove(str(BENCH))


def test_the_shape_is_qwen2_5_0_5b(bench):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = bench["qwen_shape"]
    values = dict(shape.QWEN25_05B)
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    # Qwen2.5-0.5B's model card: 0.49B parameters, 0.36B without the embedding.
    total = sum(p.numel() for p in model.parameters())
    assert total == 494_032_768
    embedding = config.vocab_size * config.hidden_size
    assert round((total - embedding) / 1e9, 2) == 0.36
    assert model.model.layers[0].self_attn.q_proj.bias is not None  # QKV bias
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied
    # Every 2-D weight takes part in a matmul: the FLOP count's N.
    matrices = sum(p.numel() for p in model.parameters() if p.dim() == 2)
    assert shape.matmul_params(shape.QWEN25_05B) == matrices


def test_flops_per_token_follows_palm(bench):
    shape = bench["qwen_shape"]
    n = shape.matmul_params(shape.QWEN25_05B)
    assert shape.training_flops_per_token(shape.QWEN25_05B, 2048) == 6 * n + 12 * 24 * 896 * 2048


def test_padded_tokenizer_covers_the_model_vocabulary(bench):
    tokenizer = bench["qwen_shape"].padded_tokenizer(2048)
    assert len(tokenizer) == 2048
    assert tokenizer.decode([2047]) == "<|fill_2047|>"
    ids = tokenizer("What is 1 + 5? A trainyard sorts freight cars.")["input_ids"]
    assert ids and max(ids) < 1024  # real text never encodes to filler tokens


def test_sft_throughput_tiny(bench, tmp_path):
    sft = bench["sft_throughput"]
    args = sft.parse_args(["--tiny", "--workdir", str(tmp_path), "--peak-tflops", "1"])
    result = sft.run(args)
    assert result["steps"] == 4
    assert result["tokensPerStep"] == 2 * 64
    assert result["tokensLogged"] == 4 * 2 * 64  # every sequence exactly seq-len tokens
    assert result["tokensPerSecond"] == pytest.approx(128 / result["stepSecondsMedian"])
    assert result["mfu"] == pytest.approx(result["modelTflopsPerSecond"] / 1.0)
    assert result["deepspeedEngine"] is False


def test_grpo_step_time_tiny_with_transformers_generation(bench, tmp_path):
    grpo = bench["grpo_step_time"]
    args = grpo.parse_args(
        ["--tiny", "--one", "--rollout", "transformers", "--workdir", str(tmp_path)]
    )
    result = grpo.run_one(args)
    assert result["steps"] == 3 and result["stepSecondsMedian"] > 0
    assert result["completionTokensPerSecond"] == pytest.approx(4 * 8 / result["stepSecondsMedian"])


@pytest.mark.parametrize("rollout", ["vllm-colocate", "vllm-server"])
def test_vllm_backends_say_why_they_are_skipped_without_cuda(bench, rollout):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the vLLM backends may run here")
    grpo = bench["grpo_step_time"]
    results = grpo.run_all(grpo.parse_args(["--tiny", "--rollout", rollout]))
    assert results == [{"rollout": rollout, "skipped": "vLLM rollouts need CUDA"}]


def test_zero2_step_time_tiny_runs_under_deepspeed(tmp_path):
    # A process of its own: DeepSpeed initialises torch.distributed for the whole process.
    out = tmp_path / "zero2.json"
    done = subprocess.run(
        [sys.executable, str(BENCH / "zero2_step_time.py"), "--tiny", "--workdir", str(tmp_path),
         "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["deepspeedEngine"] is True
    assert result["deepspeed"] == {"zeroStage": 2, "offloadOptimizer": "none"}
    assert result["tokensLogged"] == 4 * 2 * 64
    assert "DeepSpeed ZeRO-2 step time" in done.stdout
