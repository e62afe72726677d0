"""Reading completions as text: chat messages, items, tokens, degenerate output."""

from __future__ import annotations

import re
import zlib
from typing import Any

_TOKEN = re.compile(r"\w+", re.UNICODE)


def completion_text(completion: Any) -> str:
    """The text of one completion, whether a string or a list of chat messages.

    Only assistant messages count (a completion may hold tool results too).

    >>> completion_text([{"role": "assistant", "content": "Hello"}])
    'Hello'
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    parts = []
    for message in completion:
        if message.get("role", "assistant") != "assistant":
            continue
        content = message.get("content") or ""
        if isinstance(content, list):  # multimodal content: [{"type": "text", "text": ...}]
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        parts.append(content)
    return "\n".join(parts)


def completion_texts(completions: list[Any]) -> list[str]:
    """`completion_text` of every completion."""
    return [completion_text(completion) for completion in completions]


def split_items(text: str, separator: str | None) -> list[str]:
    """Non-empty, stripped items of `text`: split by `separator`, or by lines when None.

    >>> split_items("a |||  b|||", "|||")
    ['a', 'b']
    """
    pieces = text.split(separator) if separator else text.splitlines()
    return [piece.strip() for piece in pieces if piece.strip()]


def completion_items(text: str, separator: str | None, fallback_separator: str | None) -> list[str]:
    """Items of a completion: `separator` if given, else `fallback_separator` when the text
    uses it (a model may echo the reference's separator), else lines."""
    if separator is None and fallback_separator and fallback_separator in text:
        separator = fallback_separator
    return split_items(text, separator)


def tokenize(text: str, ignore_case: bool = True) -> list[str]:
    """Word tokens (letters, digits, underscore).

    >>> tokenize("As a User, I want")
    ['as', 'a', 'user', 'i', 'want']
    """
    return _TOKEN.findall(text.lower() if ignore_case else text)


def token_f1(candidate: list[str], reference: list[str]) -> float:
    """SQuAD-style token F1 of two token lists (bag of words with counts).

    >>> round(token_f1(["a", "b", "c"], ["a", "b", "d"]), 3)
    0.667
    """
    if not candidate or not reference:
        return 0.0
    remaining: dict[str, int] = {}
    for token in reference:
        remaining[token] = remaining.get(token, 0) + 1
    common = 0
    for token in candidate:
        if remaining.get(token, 0) > 0:
            remaining[token] -= 1
            common += 1
    if common == 0:
        return 0.0
    precision, recall = common / len(candidate), common / len(reference)
    return 2 * precision * recall / (precision + recall)


def is_degenerate(text: str, max_chars: int, min_compression_ratio: float) -> bool:
    """Empty, longer than `max_chars`, or so repetitive that zlib shrinks it below the ratio.

    >>> is_degenerate("print(1)\\n" * 500, max_chars=20000, min_compression_ratio=0.1)
    True
    >>> is_degenerate("def add(a, b):\\n    return a + b\\n", max_chars=20000, min_compression_ratio=0.1)
    False
    """
    stripped = text.strip()
    if not stripped or len(text) > max_chars:
        return True
    raw = stripped.encode()
    # Short texts compress poorly whatever they hold; only judge repetition on longer ones.
    return len(raw) >= 200 and len(zlib.compress(raw, 6)) / len(raw) < min_compression_ratio


def column_values(columns: dict[str, Any], name: str, reward: str, size: int) -> list[Any]:
    """The dataset column `name` from a reward's keyword arguments, one value per completion."""
    if name not in columns:
        available = sorted(
            k for k in columns if k not in ("trainer_state", "log_extra", "log_metric")
        )
        raise KeyError(
            f"{reward}: the dataset has no column {name!r} (from the reward's args); "
            f"columns passed to rewards: {', '.join(available) or 'none'}"
        )
    values = list(columns[name])
    if len(values) != size:
        raise ValueError(
            f"{reward}: column {name!r} has {len(values)} values for {size} completions"
        )
    return values
