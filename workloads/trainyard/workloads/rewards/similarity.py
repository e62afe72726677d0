"""Rewards against a reference from the dataset: similarity and item counts."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from trainyard.workloads.rewards.text import (
    column_values,
    completion_items,
    completion_texts,
    split_items,
    token_f1,
    tokenize,
)

Encoder = Callable[[list[str]], Sequence[Sequence[float]]]


def reference_similarity_reward(
    completions: list[Any],
    *,
    reference_field: str,
    separator: str | None = None,
    completion_separator: str | None = None,
    method: Literal["coverage", "token_f1", "embedding"] = "coverage",
    model: str | None = None,
    model_path: str | None = None,
    ignore_case: bool = True,
    encoder: Encoder | None = None,
    **columns: Any,
) -> list[float]:
    """How well each completion covers its reference (the `reference_field` column).

    coverage: the reference is split into items by `separator`; each item scores its best
    token F1 against any completion item, and the items' mean is the reward. token_f1:
    token F1 of the whole texts. embedding: coverage with the cosine similarity of
    sentence embeddings from `encoder` (built from `model_path` by the reward builder).

    >>> reference_similarity_reward(
    ...     ["Users can reset a password\\nAdmins can ban users"],
    ...     reference_field="issues", separator="|||||",
    ...     issues=["users reset password|||||admins ban users"],
    ... )
    [0.804]
    """
    texts = completion_texts(completions)
    references = column_values(columns, reference_field, "reference_similarity", len(texts))
    if method == "embedding" and encoder is None:
        encoder = load_sentence_encoder(model_path, model)
    scores = []
    for text, reference in zip(texts, references, strict=True):
        reference = str(reference or "")
        if method == "token_f1":
            flat = reference.replace(separator, " ") if separator else reference
            scores.append(
                round(token_f1(tokenize(text, ignore_case), tokenize(flat, ignore_case)), 3)
            )
            continue
        wanted = split_items(reference, separator) if separator else [reference.strip()]
        offered = completion_items(text, completion_separator, separator) if separator else [text]
        wanted, offered = [w for w in wanted if w], [o for o in offered if o.strip()]
        if not wanted or not offered:
            scores.append(0.0)
            continue
        if method == "embedding":
            best = _best_cosines(encoder, wanted, offered)
        else:
            offered_tokens = [tokenize(item, ignore_case) for item in offered]
            best = [
                max(token_f1(tokens, tokenize(item, ignore_case)) for tokens in offered_tokens)
                for item in wanted
            ]
        scores.append(round(sum(best) / len(best), 3))
    return scores


def _best_cosines(encoder: Encoder, wanted: list[str], offered: list[str]) -> list[float]:
    vectors = encoder(wanted + offered)
    wanted_vectors, offered_vectors = vectors[: len(wanted)], vectors[len(wanted) :]
    best = []
    for w in wanted_vectors:
        cosine = max(sum(a * b for a, b in zip(w, o, strict=True)) for o in offered_vectors)
        best.append(min(1.0, max(0.0, float(cosine))))
    return best


class SentenceEncoder:
    """Mean-pooled, L2-normalized sentence embeddings from a local transformers model
    (the pooling of sentence-transformers models such as all-MiniLM-L6-v2)."""

    def __init__(self, model_path: str, max_length: int = 256):
        import torch
        from transformers import AutoModel, AutoTokenizer

        self._torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        self.model = AutoModel.from_pretrained(model_path, local_files_only=True).eval()
        self.max_length = max_length

    def __call__(self, texts: list[str]) -> list[list[float]]:
        torch = self._torch
        batch = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        with torch.inference_mode():
            hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1).tolist()


def load_sentence_encoder(model_path: str | None, model: str | None = None) -> SentenceEncoder:
    """The encoder of `model_path`, or an error that says what to do; called when rewards are
    built, so a missing model fails the run at start, not at the first scored batch. A
    `model` source (hf://, s3://…) is fetched by the trainer first
    (`trainyard.workloads.methods.online.fetch_reward_models`), which sets model_path."""
    if model_path is None:
        raise ValueError(
            f"reference_similarity: model {model!r} is a model source the trainer fetches when "
            "training starts; outside a training run give modelPath, a local directory"
            if model
            else "reference_similarity: method embedding needs model (a model source) or "
            "modelPath (a local directory)"
        )
    path = Path(model_path)
    if not (path / "config.json").is_file():
        raise ValueError(
            f"reference_similarity: modelPath {model_path!r} is not a local model directory "
            "(no config.json); method embedding needs a sentence-embedding model saved with "
            "save_pretrained (e.g. all-MiniLM-L6-v2) on the trainer's filesystem, "
            "or use method coverage (lexical, no model)"
        )
    try:
        return SentenceEncoder(str(path))
    except ImportError as error:
        raise ValueError(
            "reference_similarity: method embedding needs torch and transformers "
            f"(pip install 'trainyard[train]'): {error}"
        ) from error
    except (OSError, ValueError) as error:
        raise ValueError(
            f"reference_similarity: could not load the embedding model at {model_path!r}: {error}"
        ) from error


def count_match_reward(
    completions: list[Any],
    *,
    reference_field: str,
    separator: str,
    completion_separator: str | None = None,
    tolerance: int = 0,
    **columns: Any,
) -> list[float]:
    """1.0 when the completion has as many items as its reference (split by `separator`),
    falling linearly to 0.0 as the difference (beyond `tolerance`) reaches the reference count.

    >>> count_match_reward(["story one\\nstory two", "only one"], reference_field="issues",
    ...     separator="|||||", issues=["a|||||b", "a|||||b"])
    [1.0, 0.5]
    """
    texts = completion_texts(completions)
    references = column_values(columns, reference_field, "count_match", len(texts))
    scores = []
    for text, reference in zip(texts, references, strict=True):
        expected = len(split_items(str(reference or ""), separator))
        found = len(completion_items(text, completion_separator, separator))
        difference = abs(found - expected) - tolerance
        if difference <= 0:
            scores.append(1.0)
        else:
            scores.append(round(max(0.0, 1.0 - difference / max(expected, 1)), 6))
    return scores
