"""A Qwen2.5-0.5B-shaped model with random weights, built from its config: no download.

The shape is Qwen/Qwen2.5-0.5B's config.json written out (24 layers, hidden 896, 14 query
heads and 2 KV heads of dim 64, SwiGLU 4864, vocab 151936, tied embeddings, QKV bias,
RoPE θ 1e6, RMSNorm ε 1e-6). The tokenizer is Trainyard's built-in byte-level BPE
(`trainyard.workloads.builtin`) padded with filler tokens up to the model's vocabulary,
so every id a random model samples decodes, and the embedding and LM head have their
real size. Token ids differ from Qwen's tokenizer; FLOPs, memory and speed do not.

`--tiny` everywhere swaps in TINY: the same architecture at a size a CPU trains in
milliseconds, so the benchmark code paths run in CI.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

# Qwen/Qwen2.5-0.5B config.json (transformers' Qwen2Config names).
QWEN25_05B: dict[str, Any] = {
    "model_type": "qwen2",
    "vocab_size": 151936,
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
    "use_sliding_window": False,
    "sliding_window": 32768,
    "max_window_layers": 24,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
}
# The same architecture, small enough for a CPU; the vocabulary is larger than the built-in
# tokenizer's so the filler-token path runs too.
TINY: dict[str, Any] = dict(
    QWEN25_05B,
    vocab_size=2048,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    sliding_window=2048,
    max_window_layers=2,
)

WORDS = [
    "train",
    "yard",
    "track",
    "switch",
    "signal",
    "engine",
    "freight",
    "car",
    "coupler",
    "brake",
    "rail",
    "sleeper",
    "station",
    "platform",
    "timetable",
    "driver",
    "cargo",
    "siding",
    "depot",
    "junction",
    "bridge",
    "tunnel",
]


def shape(tiny: bool) -> dict[str, Any]:
    return dict(TINY if tiny else QWEN25_05B)


def padded_tokenizer(vocab_size: int):
    """The built-in tokenizer with filler tokens `<|fill_N|>` up to vocab_size ids."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from trainyard.workloads.builtin import (
        CHAT_TEMPLATE,
        IM_END,
        IM_START,
        PAD_TOKEN,
        build_tokenizer,
    )

    base = build_tokenizer()
    data = json.loads(base.backend_tokenizer.to_str())
    vocab = data["model"]["vocab"]
    if vocab_size < len(vocab):
        raise ValueError(f"vocab_size {vocab_size} is below the tokenizer's {len(vocab)} tokens")
    # Plain ASCII names: byte-level BPE maps these characters to themselves, so they
    # decode to their own text. No merges lead to them, so text never encodes to them.
    vocab.update({f"<|fill_{i}|>": i for i in range(len(vocab), vocab_size)})
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(data)),
        pad_token=PAD_TOKEN,
        eos_token=IM_END,
        additional_special_tokens=[IM_START],
        model_max_length=32768,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model_dir(target: Path, config_values: dict[str, Any], dtype: str = "bfloat16") -> Path:
    """Save a randomly initialised model of this shape and its tokenizer into target."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if (target / "config.json").exists():
        return target
    values = dict(config_values)
    tokenizer = padded_tokenizer(values["vocab_size"])
    config = AutoConfig.for_model(
        values.pop("model_type"),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        **values,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def write_text_rows(path: Path, rows: int, min_tokens: int, tokenizer) -> Path:
    """JSONL of `text` rows, each at least min_tokens tokens long (checked), so SFT's
    truncation to max_length makes every sequence exactly max_length tokens."""
    rng = random.Random(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        for _ in range(rows):
            words: list[str] = []
            text = ""
            while len(tokenizer(text)["input_ids"]) < min_tokens:
                words.extend(rng.choice(WORDS) for _ in range(max(min_tokens // 2, 8)))
                text = " ".join(words)
            handle.write(json.dumps({"text": text}) + "\n")
    return path


def write_prompt_rows(path: Path, rows: int) -> Path:
    """JSONL of short `prompt` rows for GRPO."""
    rng = random.Random(1)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        for i in range(rows):
            topic = " ".join(rng.choice(WORDS) for _ in range(6))
            handle.write(json.dumps({"prompt": f"Task {i}: write about {topic}."}) + "\n")
    return path


def matmul_params(config: dict[str, Any]) -> int:
    """Weights that take part in a matmul per token: every linear layer and the LM head
    (tied or not); the embedding lookup is not a matmul."""
    h, i, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    head_dim = h // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim
    attention = h * h + 2 * h * kv + h * h  # q, k, v, o
    mlp = 3 * h * i  # gate, up, down
    return layers * (attention + mlp) + h * config["vocab_size"]


def training_flops_per_token(config: dict[str, Any], seq_len: int) -> float:
    """Model FLOPs per trained token (forward + backward), PaLM's accounting:
    6·N for the matmuls plus 12·L·H·T for attention scores and values (no recompute)."""
    return (
        6 * matmul_params(config)
        + 12 * config["num_hidden_layers"] * config["hidden_size"] * seq_len
    )


# Dense bf16 tensor-core peaks (no sparsity), from NVIDIA's data sheets.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),
    ("H200", 989.4),
    ("H800", 989.4),
    ("A100", 312.0),
    ("L40S", 362.0),
)


def peak_flops(override_tflops: float | None = None) -> tuple[float | None, str]:
    """(peak FLOP/s, device name) of GPU 0; (None, "cpu") without CUDA and no override."""
    import torch

    if not torch.cuda.is_available():
        return (override_tflops * 1e12 if override_tflops else None), "cpu"
    name = torch.cuda.get_device_name(0)
    if override_tflops:
        return override_tflops * 1e12, name
    for marker, tflops in PEAK_BF16_TFLOPS:
        if marker in name:
            return tflops * 1e12, name
    return None, name
