"""Removing reasoning (`<think>…</think>`) from completions before they are scored."""

from __future__ import annotations

import re
from typing import Any

_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL)
# Chat templates (Qwen3, DeepSeek-R1) often open the think block in the prompt, so the
# completion starts inside it and only the closing tag appears.
_LEADING_UNOPENED = re.compile(r"^(?:(?!<think>).)*?</think>", re.DOTALL)
_UNTERMINATED = re.compile(r"<think>(?:(?!</think>).)*\Z", re.DOTALL)


def strip_thinking(text: str) -> str:
    """The text without its reasoning: `<think>…</think>` blocks, a closing tag whose
    opening was in the prompt, and a think block that never closes (all of it is reasoning).

    >>> strip_thinking("<think>Count the items.</think>\\nThree items.")
    'Three items.'
    >>> strip_thinking("still thinking</think>Answer")
    'Answer'
    >>> strip_thinking("<think>ran out of tokens")
    ''
    """
    text = _LEADING_UNOPENED.sub("", text, count=1)
    text = _THINK_BLOCK.sub("", text)
    text = _UNTERMINATED.sub("", text)
    return text.strip()


def strip_thinking_from_completion(completion: Any) -> Any:
    """`strip_thinking` applied to a string completion or to the assistant messages of a
    chat completion, keeping its shape so user rewards still get the format they expect."""
    if isinstance(completion, str):
        return strip_thinking(completion)
    stripped = []
    for message in completion:
        if message.get("role", "assistant") == "assistant" and isinstance(
            message.get("content"), str
        ):
            message = {**message, "content": strip_thinking(message["content"])}
        stripped.append(message)
    return stripped
