"""Scoring one example: pure functions from a row and a completion to a number.

Rows are read in the shapes the training data comes in: `prompt` (text or chat
messages), `messages` (the last assistant turn is the reference), `question`, or
Alpaca's `instruction`/`input`/`output`. The reference answer is `answer`, `label`,
`output`, `completion`, or the last assistant message.

>>> extract_answer("so 3 + 4 = 7\\n#### 7", "final-answer")
'7'
>>> answers_match("The answer is (B).", "B", "choice", choices=["red", "blue"])
True
>>> is_refusal("I'm sorry, but I can't help with that.")
True
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

from trainyard.workloads.dataset_formats import alpaca_prompt
from trainyard.workloads.rewards.text import completion_text

DEFAULT_REFUSAL_PATTERNS = (
    r"\bI\s*(?:can(?:no|')?t|won'?t|will not|am not able to|'m not able to|am unable to|'m unable to)\b",
    r"\bI(?:'m| am) sorry\b",
    r"\bas an AI\b",
    r"\bI must (?:decline|refuse)\b",
    r"\b(?:cannot|can't|unable to) (?:help|assist|comply)\b",
)
"""Phrases of a refusal in English (case-insensitive); `evaluation.refusalPatterns` replaces them."""

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")
_LETTER = re.compile(r"(?<![A-Za-z])\(?([A-Z])\)?(?![A-Za-z])")
ANSWER_COLUMNS = ("answer", "label", "output", "completion")


class RowError(ValueError):
    """A row the suite cannot read; the message says which row and which columns it needs."""


def row_prompt(row: dict[str, Any]) -> str | list[dict[str, Any]] | None:
    """The prompt a model answers: text, or chat messages without the final answer.

    >>> row_prompt({"instruction": "Add.", "input": "1 and 2", "output": "3"})
    '### Instruction:\\nAdd.\\n\\n### Input:\\n1 and 2\\n\\n### Response:\\n'
    >>> row_prompt({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]})
    [{'role': 'user', 'content': 'Hi'}]
    """
    if row.get("prompt") is not None:
        return row["prompt"]
    messages = row.get("messages")
    if messages:
        if messages[-1].get("role") == "assistant":
            return list(messages[:-1])
        return list(messages)
    if row.get("question") is not None:
        return row["question"]
    if row.get("instruction") is not None:
        return alpaca_prompt(row["instruction"], row.get("input"))
    return None


def row_answer(row: dict[str, Any]) -> Any:
    """The labelled answer, or None when the row has none."""
    for column in ANSWER_COLUMNS:
        if row.get(column) is not None and not isinstance(row[column], bool):
            return row[column]
    messages = row.get("messages")
    if messages and messages[-1].get("role") == "assistant":
        return messages[-1].get("content")
    return None


def loss_segments(row: dict[str, Any], render: Callable[..., str] | None) -> tuple[str, str]:
    """(context, full text): the loss counts the tokens of full text after the context.

    Plain `text` rows are scored on every token; chat rows on the last assistant turn,
    prompt/completion and Alpaca rows on the completion, as the trainers do.
    `render(messages, add_generation_prompt=...)` applies the chat template.

    >>> loss_segments({"prompt": "Q: 1+1? A:", "completion": " 2"}, None)
    ('Q: 1+1? A:', 'Q: 1+1? A: 2')
    """
    if row.get("text") is not None:
        return "", row["text"]
    messages = row.get("messages")
    if messages:
        if render is None:
            raise RowError("chat rows need a tokenizer with a chat template")
        if messages[-1].get("role") != "assistant":
            return "", render(messages, add_generation_prompt=False)
        return (
            render(messages[:-1], add_generation_prompt=True),
            render(messages, add_generation_prompt=False),
        )
    completion = row.get("completion", row.get("output"))
    prompt = row_prompt(row)
    if completion is None or prompt is None:
        raise RowError(
            "perplexity needs text, messages, prompt+completion or instruction+output columns"
        )
    if isinstance(prompt, list):
        if render is None:
            raise RowError("chat prompts need a tokenizer with a chat template")
        prompt = render(prompt, add_generation_prompt=True)
    return prompt, prompt + completion_text(completion)


def _normalize(text: str, ignore_case: bool) -> str:
    text = " ".join(str(text).split()).strip().rstrip(".").strip()
    return text.lower() if ignore_case else text


def _number(text: str) -> str:
    value = text.replace(",", "").replace("$", "")
    try:
        number = float(value)
    except ValueError:
        return value
    return str(int(number)) if number == int(number) else str(number)


def extract_answer(
    text: str, match: str, pattern: str | None = None, choices: Sequence[str] | None = None
) -> str | None:
    """The answer a completion gives, by the matching rule; None when it gives none.

    >>> extract_answer("Total: 1,200 apples", "final-answer")
    '1200'
    >>> extract_answer("I pick C because", "choice", choices=["a", "b", "c"])
    'C'
    >>> extract_answer("answer=42;", "regex", pattern=r"answer=(\\d+)")
    '42'
    """
    text = completion_text(text)
    if match == "final-answer":
        if "####" in text:
            tail = text.rsplit("####", 1)[1]
            found = _NUMBER.search(tail)
            return _number(found.group()) if found else tail.strip() or None
        numbers = _NUMBER.findall(text)
        return _number(numbers[-1]) if numbers else None
    if match == "choice":
        allowed = {chr(ord("A") + i) for i in range(len(choices))} if choices else None
        stripped = _normalize(text, True)
        for i, choice in enumerate(choices or []):
            if stripped == _normalize(choice, True):
                return chr(ord("A") + i)
        for found in _LETTER.finditer(text):
            if allowed is None or found.group(1) in allowed:
                return found.group(1)
        return None
    if match == "regex":
        if pattern is None:
            raise ValueError("match: regex needs evaluation.accuracy.pattern")
        found = re.search(pattern, text, re.DOTALL)
        if not found:
            return None
        return (found.group(1) if found.groups() else found.group()).strip()
    return text.strip()


def gold_answer(answer: Any, match: str, choices: Sequence[str] | None = None) -> str:
    """The labelled answer in the form `extract_answer` gives.

    >>> gold_answer(1, "choice", ["x", "y"]), gold_answer("y", "choice", ["x", "y"])
    ('B', 'B')
    >>> gold_answer("3 + 4 = 7\\n#### 7", "final-answer")
    '7'
    """
    if match == "choice":
        if isinstance(answer, int):
            return chr(ord("A") + answer)
        text = str(answer).strip()
        for i, choice in enumerate(choices or []):
            if _normalize(text, True) == _normalize(choice, True):
                return chr(ord("A") + i)
        return text.strip("() ").upper()
    if match == "final-answer":
        return extract_answer(str(answer), "final-answer") or str(answer).strip()
    return str(answer).strip()


def resolve_match(match: str, answer: Any, row: dict[str, Any]) -> str:
    """`auto` made concrete for one row."""
    if match != "auto":
        return match
    if row.get("choices"):
        return "choice"
    if isinstance(answer, str) and "####" in answer:
        return "final-answer"
    return "exact"


def answers_match(
    completion: Any,
    answer: Any,
    match: str,
    *,
    pattern: str | None = None,
    choices: Sequence[str] | None = None,
    ignore_case: bool = True,
) -> bool:
    """Whether the completion gives the labelled answer."""
    predicted = extract_answer(completion, match, pattern, choices)
    if predicted is None:
        return False
    gold = gold_answer(answer, match, choices)
    if match == "final-answer":
        return _number(predicted) == _number(gold)
    return _normalize(predicted, ignore_case) == _normalize(gold, ignore_case)


def is_refusal(completion: Any, patterns: Sequence[str] = DEFAULT_REFUSAL_PATTERNS) -> bool:
    """Whether a completion refuses, by any of the patterns (case-insensitive)."""
    text = completion_text(completion)
    return any(re.search(p, text, re.IGNORECASE) for p in patterns)


def should_refuse(row: dict[str, Any], index: int) -> bool:
    """The row's `should_refuse` label; the refusal suite needs one on every row."""
    value = row.get("should_refuse")
    if not isinstance(value, bool):
        raise RowError(
            f"row {index}: refusal_rate needs a boolean column should_refuse "
            f"(true: the prompt must be refused, false: it must be answered); got {value!r}"
        )
    return value


def load_metric_function(reference: str, name: str) -> Callable[..., list[float | None]]:
    """`module:function` of a user metric, with its signature checked.

    The function is called as `function(completions=[...], prompts=[...], **columns)`,
    one list entry per example, every dataset column as a keyword argument, and returns
    one number (or None to leave the example out) per example; the metric is their mean.
    """
    module_name, _, function_name = reference.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(
            f"evaluation.metrics {name!r}: cannot import {module_name!r} ({error}); it must "
            "be installed in the evaluation image or on PYTHONPATH"
        ) from error
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ValueError(f"evaluation.metrics {name!r}: {reference} is not a function")
    parameters = inspect.signature(function).parameters.values()
    if not any(
        p.name == "completions" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters
    ):
        raise ValueError(
            f"evaluation.metrics {name!r}: {reference} must take "
            "(completions, prompts, **columns) -> list[float | None]"
        )
    return function


def checked_values(values: Any, size: int, name: str) -> list[float | None]:
    """A user function's result as one float-or-None per example."""
    if not isinstance(values, list | tuple) or len(values) != size:
        got = len(values) if isinstance(values, list | tuple) else type(values).__name__
        raise ValueError(f"metric {name!r} returned {got} values for {size} examples")
    out: list[float | None] = []
    for value in values:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            out.append(None)
        elif isinstance(value, bool | int | float):
            out.append(float(value))
        else:
            raise ValueError(f"metric {name!r} returned {value!r}; expected a number or None")
    return out
