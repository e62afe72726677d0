"""The model side of an evaluation: loading, batched generation, per-example losses.

Generation goes through vLLM when it is installed and a CUDA GPU is present, else
through transformers' `generate`, batched with left padding. Both are seeded, and the
settings are recorded in eval.json.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from trainyard.workloads import sources


@dataclass
class LoadedModel:
    """A model ready to score and generate."""

    uri: str
    path: str
    model: Any
    tokenizer: Any
    adapter: bool = False

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    @property
    def chat(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))


def load_model(
    uri: str,
    *,
    revision: str | None = None,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    storage: Any = None,
    checkpoint_uri: str | None = None,
    field: str = "model.source",
) -> LoadedModel:
    """A model (or LoRA adapter on its base) and its tokenizer from a source URI."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, kwargs = sources.resolve_model(
        uri, revision=revision, storage=storage, checkpoint_uri=checkpoint_uri, field=field
    )
    options = {"trust_remote_code": trust_remote_code, **kwargs}
    if dtype != "auto":
        options["dtype"] = getattr(torch, dtype)
    base = sources.adapter_base(path)
    if base is not None:
        from peft import PeftModel

        model = AutoModelForCausalLM.from_pretrained(base, **options)
        model = PeftModel.from_pretrained(model, path)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **options)
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if torch.cuda.is_available():
        model = model.to("cuda")
    model.eval()
    return LoadedModel(uri, path, model, tokenizer, adapter=base is not None)


def token_losses(
    loaded: LoadedModel, segments: list[tuple[str, str]], batch_size: int, max_length: int = 4096
) -> list[tuple[float, int]]:
    """(summed negative log-likelihood, tokens scored) per (context, full text) pair:
    the tokens of full text after the context, each predicted from those before it."""
    import torch

    tokenizer, model = loaded.tokenizer, loaded.model
    device = next(model.parameters()).device
    encoded = []
    for context, full in segments:
        ids = tokenizer(full, add_special_tokens=True)["input_ids"][:max_length]
        start = len(tokenizer(context, add_special_tokens=True)["input_ids"]) if context else 0
        # The first token of a text has nothing before it to be predicted from.
        encoded.append((ids, max(start, 1)))
    results: list[tuple[float, int]] = []
    pad = tokenizer.pad_token_id
    with torch.no_grad():
        for at in range(0, len(encoded), batch_size):
            batch = encoded[at : at + batch_size]
            width = max(len(ids) for ids, _ in batch)
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            for row, (ids, start) in enumerate(batch):
                input_ids[row, : len(ids)] = torch.tensor(ids)
                attention[row, : len(ids)] = 1
                labels[row, start : len(ids)] = torch.tensor(ids[start:], dtype=torch.long)
            logits = model(
                input_ids=input_ids.to(device), attention_mask=attention.to(device)
            ).logits.float()
            shifted = logits[:, :-1].reshape(-1, logits.shape[-1])
            targets = labels[:, 1:].reshape(-1).to(device)
            nll = torch.nn.functional.cross_entropy(
                shifted, targets, ignore_index=-100, reduction="none"
            ).view(len(batch), -1)
            counts = (labels[:, 1:] != -100).sum(dim=1)
            for row in range(len(batch)):
                results.append((float(nll[row].sum()), int(counts[row])))
    return results


def vllm_available() -> bool:
    try:
        import torch
        import vllm  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def render_prompt(loaded: LoadedModel, prompt: str | list[dict[str, Any]]) -> str:
    if isinstance(prompt, list):
        return loaded.render(prompt, add_generation_prompt=True)
    return prompt


def generate(
    loaded: LoadedModel, prompts: list[str], generation: Any, seed: int
) -> tuple[list[str], str]:
    """Completions of rendered prompts, in order, and the backend that made them."""
    if not prompts:
        return [], "none"
    if vllm_available() and not loaded.adapter:
        return _generate_vllm(loaded, prompts, generation, seed), "vllm"
    return _generate_transformers(loaded, prompts, generation, seed), "transformers"


def _generate_transformers(
    loaded: LoadedModel, prompts: list[str], generation: Any, seed: int
) -> list[str]:
    import torch
    from transformers import set_seed

    set_seed(seed)
    tokenizer, model = loaded.tokenizer, loaded.model
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    sample = generation.temperature > 0
    options: dict[str, Any] = {
        "max_new_tokens": generation.max_new_tokens,
        "do_sample": sample,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if sample:
        options.update(temperature=generation.temperature, top_p=generation.top_p)
    else:
        options.update(temperature=None, top_p=None, top_k=None)
    completions: list[str] = []
    try:
        with torch.no_grad():
            for at in range(0, len(prompts), generation.batch_size):
                batch = prompts[at : at + generation.batch_size]
                encoded = tokenizer(batch, return_tensors="pt", padding=True).to(device)
                output = model.generate(**encoded, **options)
                new = output[:, encoded["input_ids"].shape[1] :]
                completions += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return completions


def _generate_vllm(
    loaded: LoadedModel, prompts: list[str], generation: Any, seed: int
) -> list[str]:
    from vllm import LLM, SamplingParams

    llm = LLM(model=loaded.path, seed=seed, tokenizer=loaded.path)
    params = SamplingParams(
        temperature=generation.temperature,
        top_p=generation.top_p,
        max_tokens=generation.max_new_tokens,
        seed=seed,
    )
    outputs = llm.generate(prompts, params)
    return [output.outputs[0].text for output in outputs]


def perplexity(nll: float, tokens: int) -> float:
    """exp of the mean loss; NaN without tokens.

    >>> round(perplexity(2 * math.log(4), 2), 6)
    4.0
    """
    return math.exp(nll / tokens) if tokens else math.nan
