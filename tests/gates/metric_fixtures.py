"""User metrics for the evaluation tests, loaded by `module:function` as a user's would be."""

from __future__ import annotations


def says_please(completions, prompts, **columns):
    """1 when the completion says please; None (left out) for rows marked skip."""
    skip = columns.get("skip") or [False] * len(completions)
    return [
        None if s else float("please" in str(c).lower())
        for c, s in zip(completions, skip, strict=True)
    ]


def wrong_length(completions, **columns):
    return [1.0]


def no_completions(prompts):
    return []


def column_value(completions, value, **columns):
    """The row's own `value` column: a metric whose per-example values the test sets."""
    return list(value)
