"""Penalties (scores in [-1, 0]): repeated items, content outside the expected format."""

from __future__ import annotations

import re
from typing import Any, Literal

from trainyard.workloads.rewards.text import completion_texts, split_items, tokenize


def _jaccard(a: set[str], b: set[str]) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def redundancy_penalty(
    completions: list[Any],
    *,
    separator: str | None = None,
    similarity_threshold: float = 0.8,
    ignore_case: bool = True,
    **columns: Any,
) -> list[float]:
    """Minus the fraction of items (lines, or `separator`-split parts) that repeat an
    earlier item: exactly, or with token Jaccard similarity >= `similarity_threshold`.

    >>> redundancy_penalty(["Add login\\nAdd login\\nAdd logout\\nExport CSV"])
    [-0.25]
    """
    scores = []
    for text in completion_texts(completions):
        items = split_items(text, separator)
        seen: list[set[str]] = []
        exact: set[str] = set()
        repeats = 0
        for item in items:
            key = item.lower() if ignore_case else item
            tokens = set(tokenize(item, ignore_case))
            if key in exact or any(
                _jaccard(tokens, other) >= similarity_threshold for other in seen
            ):
                repeats += 1
            exact.add(key)
            seen.append(tokens)
        scores.append(-round(repeats / len(items), 6) if repeats else 0.0)
    return scores


def extraneous_content_penalty(
    completions: list[Any],
    *,
    pattern: str,
    unit: Literal["chars", "lines"] = "chars",
    ignore_case: bool = False,
    **columns: Any,
) -> list[float]:
    """Minus the share of non-empty lines that do not match `pattern` (preambles, sign-offs,
    markdown), measured in characters or lines; an empty completion scores 0.0.

    >>> extraneous_content_penalty(
    ...     ["Sure! Here they are:\\nAs a user, I want search so that I find items"],
    ...     pattern=r"^As an? .+, I want .+ so that .+", unit="lines")
    [-0.5]
    """
    compiled = re.compile(pattern, re.IGNORECASE if ignore_case else 0)
    scores = []
    for text in completion_texts(completions):
        lines = split_items(text, None)
        if not lines:
            scores.append(0.0)
            continue
        extra = [line for line in lines if not compiled.search(line)]
        if unit == "lines":
            share = len(extra) / len(lines)
        else:
            share = sum(len(line) for line in extra) / sum(len(line) for line in lines)
        scores.append(-round(share, 6) if share else 0.0)
    return scores
