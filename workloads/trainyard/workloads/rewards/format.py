"""Format rewards: a pattern, required clauses, a length window."""

from __future__ import annotations

import math
import re
from typing import Any, Literal

from trainyard.workloads.rewards.text import completion_texts, split_items, tokenize


def _regex_flags(ignore_case: bool, multiline: bool = False, dotall: bool = False) -> int:
    return (
        (re.IGNORECASE if ignore_case else 0)
        | (re.MULTILINE if multiline else 0)
        | (re.DOTALL if dotall else 0)
    )


def regex_reward(
    completions: list[Any],
    *,
    pattern: str,
    scope: Literal["completion", "lines"] = "completion",
    mode: Literal["search", "match", "fullmatch"] = "search",
    ignore_case: bool = False,
    multiline: bool = False,
    dotall: bool = False,
    **columns: Any,
) -> list[float]:
    """1.0 when the completion matches `pattern`; with scope 'lines', the fraction of
    non-empty lines that match.

    >>> story = "As a user, I want to log in so that I see my orders"
    >>> regex_reward([story, "Sure! Here you go."], pattern=r"^As an? .+, I want .+ so that .+")
    [1.0, 0.0]
    >>> regex_reward([story + "\\nThanks!"], pattern=r"^As an? .+, I want .+ so that .+", scope="lines")
    [0.5]
    """
    compiled = re.compile(pattern, _regex_flags(ignore_case, multiline, dotall))
    matcher = getattr(compiled, mode)
    scores = []
    for text in completion_texts(completions):
        if scope == "completion":
            scores.append(1.0 if matcher(text.strip()) else 0.0)
            continue
        lines = split_items(text, None)
        scores.append(sum(1 for line in lines if matcher(line)) / len(lines) if lines else 0.0)
    return scores


def clause_presence_reward(
    completions: list[Any],
    *,
    clauses: list[str],
    regex: bool = False,
    ignore_case: bool = True,
    scope: Literal["completion", "lines"] = "completion",
    **columns: Any,
) -> list[float]:
    """The fraction of `clauses` present; with scope 'lines', averaged over non-empty lines.

    >>> clause_presence_reward(["As a buyer, I want refunds."], clauses=["As a", "I want", "so that"])
    [0.667]
    """
    patterns = [
        re.compile(clause if regex else re.escape(clause), re.IGNORECASE if ignore_case else 0)
        for clause in clauses
    ]

    def fraction(text: str) -> float:
        return sum(1 for p in patterns if p.search(text)) / len(patterns)

    scores = []
    for text in completion_texts(completions):
        if scope == "completion":
            score = fraction(text)
        else:
            lines = split_items(text, None)
            score = sum(fraction(line) for line in lines) / len(lines) if lines else 0.0
        scores.append(round(score, 3))
    return scores


def measure_length(text: str, unit: Literal["words", "chars", "lines"]) -> int:
    """Length of `text` in words (word tokens), characters (stripped) or non-empty lines.

    >>> measure_length("  two words  ", "words"), measure_length("  two words  ", "chars")
    (2, 9)
    """
    if unit == "words":
        return len(tokenize(text))
    if unit == "chars":
        return len(text.strip())
    return len(split_items(text, None))


def length_reward(
    completions: list[Any],
    *,
    # `min` and `max` shadow the builtins on purpose: they are the API's argument names.
    max: int,
    min: int = 0,
    unit: Literal["words", "chars", "lines"] = "words",
    decay: Literal["linear", "exponential"] = "linear",
    scale: float | None = None,
    **columns: Any,
) -> list[float]:
    """1.0 for a length inside [min, max]; outside, the score decays with the distance to
    the window over `scale` (default: `min` below the window, `max` above it), so linear
    decay reaches 0 at an empty completion and at twice the maximum.

    >>> length_reward(["word " * 60, "word " * 10, "word " * 180], min=20, max=120)
    [1.0, 0.5, 0.5]
    """
    scores = []
    for text in completion_texts(completions):
        size = measure_length(text, unit)
        if min <= size <= max:
            scores.append(1.0)
            continue
        distance = (min - size) if size < min else (size - max)
        width = scale or (min if size < min else max) or 1
        score = 1.0 - distance / width if decay == "linear" else math.exp(-distance / width)
        scores.append(round(score if score > 0 else 0.0, 6))
    return scores
