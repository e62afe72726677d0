"""Table tests of the built-in rewards, called as TRL calls them (keyword completions,
prompts, dataset columns as lists, trainer extras)."""

from __future__ import annotations

import math

import pytest

from trainyard.workloads.rewards import (
    clause_presence_reward,
    count_match_reward,
    extraneous_content_penalty,
    length_reward,
    redundancy_penalty,
    reference_similarity_reward,
    regex_reward,
    strip_thinking,
    strip_thinking_from_completion,
)

STORY = r"^As an? .+, I want .+ so that .+"
GOOD = "As a shopper, I want a wishlist so that I can buy later"


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def call(function, completion, **kwargs) -> float:
    """Score one completion both as a string and as a chat message list, TRL-style."""
    extras = {"prompts": ["Write user stories."], "completion_ids": [[1, 2]], "trainer_state": None}
    columns = {k: [v] for k, v in kwargs.pop("columns", {}).items()}
    as_text = function(completions=[completion], **extras, **columns, **kwargs)
    as_chat = function(completions=[chat(completion)], **extras, **columns, **kwargs)
    assert as_text == as_chat, "string and chat completions must score the same"
    return as_text[0]


@pytest.mark.parametrize(
    ("completion", "args", "expected"),
    [
        pytest.param(GOOD, {"pattern": STORY}, 1.0, id="story-matches"),
        pytest.param("Sure! " + GOOD, {"pattern": STORY}, 0.0, id="preamble-breaks-anchor"),
        pytest.param(
            "as a shopper, i want x so that y", {"pattern": STORY}, 0.0, id="case-sensitive"
        ),
        pytest.param(
            "as a shopper, i want x so that y",
            {"pattern": STORY, "ignore_case": True},
            1.0,
            id="ignore-case",
        ),
        pytest.param(
            f"{GOOD}\n{GOOD}\nThanks!\n",
            {"pattern": STORY, "scope": "lines"},
            2 / 3,
            id="lines-fraction",
        ),
        pytest.param("", {"pattern": STORY, "scope": "lines"}, 0.0, id="lines-empty"),
        pytest.param(
            GOOD + " now",
            {"pattern": STORY + "later$", "mode": "fullmatch"},
            0.0,
            id="fullmatch-trailing",
        ),
        pytest.param("a\nb", {"pattern": "^b$", "multiline": True}, 1.0, id="multiline"),
    ],
)
def test_regex(completion, args, expected):
    assert call(regex_reward, completion, **args) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("completion", "args", "expected"),
    [
        pytest.param(GOOD, {"clauses": ["As a", "I want", "so that"]}, 1.0, id="all"),
        pytest.param(
            "As a user I want it",
            {"clauses": ["As a", "I want", "so that"]},
            0.667,
            id="two-of-three",
        ),
        pytest.param(
            "AS A user", {"clauses": ["as a"], "ignore_case": False}, 0.0, id="case-sensitive"
        ),
        pytest.param("total: 42", {"clauses": [r"\d+"], "regex": True}, 1.0, id="regex-clause"),
        pytest.param("total: 4.2", {"clauses": ["4.2"]}, 1.0, id="literal-dot"),
        pytest.param("total: 402", {"clauses": ["4.2"]}, 0.0, id="literal-not-regex"),
        pytest.param(
            f"{GOOD}\nAs a cook",
            {"clauses": ["As a", "I want", "so that"], "scope": "lines"},
            0.667,
            id="per-line",
        ),
    ],
)
def test_clause_presence(completion, args, expected):
    assert call(clause_presence_reward, completion, **args) == pytest.approx(expected, abs=1e-3)


WINDOW = {"min": 20, "max": 120}


@pytest.mark.parametrize(
    ("completion", "args", "expected"),
    [
        pytest.param("w " * 20, WINDOW, 1.0, id="at-min"),
        pytest.param("w " * 120, WINDOW, 1.0, id="at-max"),
        pytest.param("w " * 10, WINDOW, 0.5, id="half-of-min"),
        pytest.param("", WINDOW, 0.0, id="empty"),
        pytest.param("w " * 180, WINDOW, 0.5, id="one-and-half-max"),
        pytest.param("w " * 300, WINDOW, 0.0, id="far-above-clamped"),
        pytest.param("w " * 130, {**WINDOW, "scale": 20}, 0.5, id="custom-scale"),
        pytest.param(
            "w " * 140,
            {**WINDOW, "decay": "exponential", "scale": 20},
            math.exp(-1),
            id="exponential",
        ),
        pytest.param("x" * 30, {"min": 10, "max": 20, "unit": "chars"}, 0.5, id="chars"),
        pytest.param(
            "a\n\nb\nc", {"min": 1, "max": 2, "unit": "lines"}, 0.5, id="lines-skip-blank"
        ),
        pytest.param("don't stop-now", {"min": 4, "max": 4}, 1.0, id="words-are-word-tokens"),
    ],
)
def test_length(completion, args, expected):
    assert call(length_reward, completion, **args) == pytest.approx(expected, abs=1e-6)


ISSUES = "Users can reset their password|||||Admins can ban users|||||Export orders as CSV"


@pytest.mark.parametrize(
    ("completion", "args", "expected"),
    [
        pytest.param(
            "Users can reset their password\nAdmins can ban users\nExport orders as CSV",
            {},
            1.0,
            id="all-items-exact",
        ),
        # Item 1 matches exactly; item 2 shares "users can" (F1 4/9); item 3 nothing.
        pytest.param("Users can reset their password", {}, 0.481, id="one-of-three"),
        pytest.param(ISSUES, {}, 1.0, id="completion-uses-separator"),
        pytest.param("Bake a cake", {}, 0.0, id="unrelated"),
        pytest.param("", {}, 0.0, id="empty"),
        pytest.param("Users reset password", {"method": "token_f1"}, 0.375, id="token-f1-whole"),
        pytest.param(
            "users can reset their password; admins can ban users; export orders as csv",
            {"completion_separator": ";"},
            1.0,
            id="completion-separator",
        ),
    ],
)
def test_reference_similarity(completion, args, expected):
    score = call(
        reference_similarity_reward,
        completion,
        reference_field="issues",
        separator="|||||",
        columns={"issues": ISSUES},
        **args,
    )
    assert score == pytest.approx(expected, abs=1e-3)


def test_reference_similarity_names_missing_column():
    with pytest.raises(KeyError, match=r"no column 'issues'.*columns passed to rewards: answer"):
        reference_similarity_reward(
            ["x"], reference_field="issues", answer=["y"], trainer_state=None
        )


@pytest.mark.parametrize(
    ("completion", "args", "expected"),
    [
        pytest.param("one\ntwo\nthree", {}, 1.0, id="equal-lines"),
        pytest.param("one|||||two|||||three", {}, 1.0, id="equal-separator"),
        pytest.param("one\ntwo", {}, 0.667, id="one-missing"),
        pytest.param("1\n2\n3\n4\n5\n6", {}, 0.0, id="double-clamped"),
        pytest.param("one\ntwo", {"tolerance": 1}, 1.0, id="within-tolerance"),
        pytest.param("", {}, 0.0, id="empty"),
        pytest.param("a; b; c", {"completion_separator": ";"}, 1.0, id="completion-separator"),
    ],
)
def test_count_match(completion, args, expected):
    score = call(
        count_match_reward,
        completion,
        reference_field="issues",
        separator="|||||",
        columns={"issues": "a|||||b|||||c"},
        **args,
    )
    assert score == pytest.approx(expected, abs=1e-3)


@pytest.mark.parametrize(
    ("completion", "args", "expected"),
    [
        pytest.param("a cat\na dog\na bird", {}, 0.0, id="all-distinct"),
        pytest.param("a cat\na cat\na cat\na dog", {}, -0.5, id="exact-repeats"),
        pytest.param("A Cat\na cat", {}, -0.5, id="case-insensitive"),
        pytest.param("A Cat\na cat", {"ignore_case": False}, 0.0, id="case-sensitive"),
        pytest.param(
            "users can export orders as csv\nusers can export the orders as csv",
            {},
            -0.5,
            id="near-duplicate",
        ),
        pytest.param(
            "users can export orders as csv\nusers can export the orders as csv",
            {"similarity_threshold": 1.0},
            0.0,
            id="exact-only",
        ),
        pytest.param("x|||x|||y|||z", {"separator": "|||"}, -0.25, id="separator"),
        pytest.param("", {}, 0.0, id="empty"),
    ],
)
def test_redundancy_penalty(completion, args, expected):
    assert call(redundancy_penalty, completion, **args) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("completion", "args", "expected"),
    [
        pytest.param(GOOD, {}, 0.0, id="clean"),
        pytest.param(
            f"Here you go:\n{GOOD}\nHope this helps!", {"unit": "lines"}, -2 / 3, id="lines"
        ),
        pytest.param("Hi\n" + GOOD, {}, -2 / (2 + len(GOOD)), id="chars"),
        pytest.param("```\n" + GOOD + "\n```", {"unit": "lines"}, -2 / 3, id="fences"),
        pytest.param("", {}, 0.0, id="empty"),
        pytest.param("as a x, i want y so that z", {"ignore_case": True}, 0.0, id="ignore-case"),
    ],
)
def test_extraneous_content_penalty(completion, args, expected):
    score = call(extraneous_content_penalty, completion, pattern=STORY, **args)
    assert score == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("<think>plan</think>answer", "answer", id="block"),
        pytest.param("<think>a</think>x<think>b</think>y", "xy", id="two-blocks"),
        pytest.param(
            "plan from the prompt's open tag</think>\nanswer", "answer", id="opened-in-prompt"
        ),
        pytest.param("<think>never closed, out of tokens", "", id="unterminated"),
        pytest.param("answer <think>late thought", "answer", id="unterminated-after-answer"),
        pytest.param("<think>\nmulti\nline\n</think>\n\nanswer", "answer", id="multiline"),
        pytest.param("no reasoning here", "no reasoning here", id="untouched"),
    ],
)
def test_strip_thinking(text, expected):
    assert strip_thinking(text) == expected


def test_strip_thinking_keeps_chat_shape():
    completion = [
        {"role": "assistant", "content": "<think>x</think>Done"},
        {"role": "tool", "content": "<think>tool output keeps its text</think>"},
    ]
    assert strip_thinking_from_completion(completion) == [
        {"role": "assistant", "content": "Done"},
        {"role": "tool", "content": "<think>tool output keeps its text</think>"},
    ]
