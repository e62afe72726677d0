"""From the API's reward specs to TRL reward functions: binding, names, weights, user
rewards, think stripping, combining, errors at build time, and a real GRPO run."""

from __future__ import annotations

import asyncio
import math
import sys
import textwrap
from dataclasses import dataclass, field
from typing import Any

import pytest
from trl.trainer.utils import get_callable_name, is_async_callable

from trainyard.api.training_run import RewardSpec
from trainyard.workloads.rewards import (
    build_reward_functions,
    combined_reward,
    score_rewards,
)
from trainyard.workloads.rewards.sandbox import SandboxUnavailable, require_isolation

STORY = r"^As an? .+, I want .+ so that .+"
GOOD = "As a shopper, I want a wishlist so that I can buy later"


@dataclass
class Spec:
    """A duck-typed reward spec, for cases the API model refuses before we see them."""

    name: str
    builtin: str | None = None
    python: str | None = None
    weight: float = 1.0
    args: dict[str, Any] = field(default_factory=dict)


def spec(**fields) -> RewardSpec:
    """The real API model, from YAML-shaped (camelCase) fields."""
    return RewardSpec.model_validate(fields)


def trl_call(function, completions, **columns):
    """Call a reward the way TRL's GRPOTrainer does."""
    return function(
        prompts=["Write user stories."] * len(completions),
        completions=completions,
        completion_ids=[[0]] * len(completions),
        trainer_state=None,
        log_extra=lambda *a, **k: None,
        log_metric=columns.pop("log_metric", lambda name, value: None),
        **columns,
    )


def test_build_names_weights_and_scores_from_api_specs():
    functions, weights = build_reward_functions(
        [
            spec(name="format", builtin="regex", weight=2.0, args={"pattern": STORY}),
            spec(name="length", builtin="length", weight=0.5, args={"min": 5, "max": 30}),
            spec(
                name="coverage",
                builtin="reference_similarity",
                args={"referenceField": "formatted_issues", "separator": "|||||"},
            ),
            spec(
                name="count",
                builtin="count_match",
                args={"referenceField": "formatted_issues", "separator": "|||||"},
            ),
            spec(name="repeats", builtin="redundancy_penalty", weight=0.3),
            spec(name="extra", builtin="extraneous_content_penalty", args={"pattern": STORY}),
        ]
    )
    assert [get_callable_name(f) for f in functions] == [
        "format",
        "length",
        "coverage",
        "count",
        "repeats",
        "extra",
    ]
    assert weights == [2.0, 0.5, 1.0, 1.0, 0.3, 1.0]
    completion = [{"role": "assistant", "content": f"Here:\n{GOOD}\n{GOOD}"}]
    issues = [f"{GOOD}|||||As an admin, I want bans so that spam stops"]
    scores = [trl_call(f, [completion], formatted_issues=issues)[0] for f in functions]
    assert scores[0] == 0.0  # the preamble breaks the anchored format
    assert scores[1] == 1.0
    assert 0.5 < scores[2] < 1.0  # one of two reference items covered
    assert scores[3] == 0.5  # 3 lines for 2 items: off by one of two
    assert scores[4] == pytest.approx(-1 / 3)
    assert scores[5] == pytest.approx(-len("Here:") / (len("Here:") + 2 * len(GOOD)), abs=1e-6)


@pytest.mark.parametrize(
    ("strip", "expected"),
    [
        pytest.param(True, [1.0, 1.0, 0.0], id="stripped"),
        pytest.param(False, [0.0, 0.0, 0.0], id="kept"),
    ],
)
def test_strip_thinking_before_scoring(strip, expected):
    (function,), _ = build_reward_functions(
        [spec(name="format", builtin="regex", args={"pattern": STORY})], strip_thinking=strip
    )
    completions = [
        f"<think>User stories need a role.</think>\n{GOOD}",
        [{"role": "assistant", "content": f"the prompt opened the block</think>{GOOD}"}],
        "<think>never finished " + GOOD,
    ]
    assert trl_call(function, completions) == expected


def test_args_win_over_a_dataset_column_of_the_same_name():
    (function,), _ = build_reward_functions(
        [spec(name="format", builtin="regex", args={"pattern": STORY})]
    )
    assert trl_call(function, [GOOD], pattern=["^nothing matches this$"]) == [1.0]


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A user's reward module on the trainer's PYTHONPATH."""
    (tmp_path / "team_rewards.py").write_text(
        textwrap.dedent(
            """
            def exclamations(completions, prompts=None, bonus=0.0, answer=None, **kwargs):
                texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
                assert prompts is not None and kwargs["trainer_state"] is None
                return [t.count("!") + bonus + (a == t) for t, a in zip(texts, answer)]

            def not_applicable(completions, **kwargs):
                return [None] * len(completions)

            async def async_length(completions, **kwargs):
                return [float(len(c)) for c in completions]

            def wrong_count(completions, **kwargs):
                return [1.0]

            def no_completions(text):
                return [0.0]

            NOT_A_FUNCTION = 3
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "team_rewards"
    sys.modules.pop("team_rewards", None)


def test_user_python_reward_gets_args_and_columns(user_module):
    (function,), weights = build_reward_functions(
        [
            spec(
                name="excited",
                python=f"{user_module}:exclamations",
                weight=0.1,
                args={"bonus": 0.5},
            )
        ],
        strip_thinking=True,
    )
    assert weights == [0.1]
    assert get_callable_name(function) == "excited"
    assert trl_call(function, ["<think>hm!</think>Hi!!", "42"], answer=["x", "42"]) == [2.5, 1.5]


def test_async_user_reward_stays_async_for_trl(user_module):
    (function,), _ = build_reward_functions(
        [spec(name="chars", python=f"{user_module}:async_length")], strip_thinking=True
    )
    assert is_async_callable(function)
    assert asyncio.run(trl_call(function, ["<think>x</think>abc"])) == [3.0]


@pytest.mark.parametrize(
    ("python", "message"),
    [
        pytest.param(
            "no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'", id="no-module"
        ),
        pytest.param(
            "team_rewards:exclamation", "has no 'exclamation'.*exclamations", id="no-function"
        ),
        pytest.param("team_rewards:NOT_A_FUNCTION", "is a int, not a function", id="not-callable"),
        pytest.param(
            "team_rewards:no_completions", r"must take TRL's reward arguments", id="bad-signature"
        ),
    ],
)
def test_user_reward_errors_at_build_time(user_module, python, message):
    with pytest.raises(ValueError, match=message):
        build_reward_functions([Spec(name="mine", python=python)])


def test_wrong_number_of_scores_is_an_error(user_module):
    (function,), _ = build_reward_functions(
        [Spec(name="short", python=f"{user_module}:wrong_count")]
    )
    with pytest.raises(ValueError, match="returned 1 scores for 2 completions"):
        trl_call(function, ["a", "b"])


@pytest.mark.parametrize(
    ("specs", "message"),
    [
        pytest.param(
            [Spec(name="x", builtin="length", args={"min": 20, "maxx": 120})],
            r"reward 'x': args of builtin reward 'length': args.max: required field is missing; "
            r"args.maxx: unknown field; did you mean 'max'\?",
            id="unknown-arg-did-you-mean",
        ),
        pytest.param(
            [Spec(name="x", builtin="regex", args={"pattern": "("})],
            "not a valid regular expression",
            id="bad-regex",
        ),
        pytest.param(
            [Spec(name="x", builtin="count_match", args={"referenceField": "r", "separator": 3})],
            "args.separator: must be a valid string",
            id="wrong-type",
        ),
        pytest.param(
            [Spec(name="x", builtin="regexp")], "did you mean 'regex'", id="unknown-builtin"
        ),
        pytest.param([Spec(name="x", builtin="regex", python="m:f")], "exactly one of", id="both"),
        pytest.param([Spec(name="x"), Spec(name="x")], "repeated: x", id="duplicate-names"),
        pytest.param(
            [
                Spec(
                    name="x",
                    builtin="reference_similarity",
                    args={
                        "referenceField": "r",
                        "method": "embedding",
                        "modelPath": "/nonexistent/minilm",
                    },
                )
            ],
            "not a local model directory.*use method coverage",
            id="embedding-model-missing",
        ),
        pytest.param(
            [
                Spec(
                    name="x",
                    builtin="code_execution",
                    args={
                        "stages": [{"name": "compile", "command": ["no-such-compiler", "{file}"]}],
                        "isolation": "rlimits",
                    },
                )
            ],
            "reward 'x': stage 'compile': program 'no-such-compiler' not found on the sandbox PATH",
            id="code-missing-program",
        ),
    ],
)
def test_build_errors(specs, message):
    with pytest.raises(ValueError, match=message):
        build_reward_functions(specs)


def test_api_model_rejects_bad_args_with_path():
    with pytest.raises(ValueError, match=r"args.stages\[0\].command: unknown placeholder \{fiel\}"):
        spec(
            name="x",
            builtin="code_execution",
            args={"stages": [{"name": "t", "command": ["{fiel}"]}]},
        )


def test_combined_reward_is_the_weighted_sum_like_trl(user_module):
    functions, weights = build_reward_functions(
        [
            spec(name="format", builtin="regex", weight=2.0, args={"pattern": STORY}),
            spec(name="none", python=f"{user_module}:not_applicable", weight=5.0),
            spec(name="repeats", builtin="redundancy_penalty", weight=1.0),
        ]
    )
    columns = {"prompts": ["p", "p"], "trainer_state": None}
    per_reward = score_rewards(functions, [GOOD, "x\nx"], **columns)
    assert per_reward == {"format": [1.0, 0.0], "none": [None, None], "repeats": [0.0, -0.5]}
    assert combined_reward(functions, weights, [GOOD, "x\nx"], **columns) == [2.0, -0.5]
    (only_none,), _ = build_reward_functions(
        [Spec(name="n", python=f"{user_module}:not_applicable")]
    )
    assert math.isnan(combined_reward([only_none], [1.0], ["a"])[0])


STRICT = True
try:
    require_isolation("strict")
except SandboxUnavailable:
    STRICT = False


def test_code_execution_binding_logs_prefixed_stage_metrics():
    args = {
        "stages": [
            {
                "name": "compile",
                "command": ["{python}", "-m", "py_compile", "{file}"],
                "weight": 0.2,
            },
            {"name": "tests", "command": ["{python}", "{file}"], "weight": 0.8},
        ],
        "testField": "tests",
        "isolation": "strict" if STRICT else "rlimits",
    }
    (function,), _ = build_reward_functions(
        [spec(name="unit_tests", builtin="code_execution", args=args)], workers=2
    )
    assert function.kwargs["workers"] == 2, "rewardWorkers sizes the pool when args leave it out"
    # The reasoning holds a wrong draft in a fence; the answer is bare code.
    completions = [
        "<think>Draft:\n```python\ndef f():\n    return 2\n```\nNo, 1.</think>def f():\n    return 1\n",
        "def f(:",
    ]
    logged = {}
    scores = trl_call(
        function, completions, tests=["assert f() == 1"] * 2, log_metric=logged.__setitem__
    )
    assert scores == [0.2, 0.0], "not stripped: the draft in the reasoning is what gets tested"
    (function,), _ = build_reward_functions(
        [spec(name="unit_tests", builtin="code_execution", args=args)], strip_thinking=True
    )
    logged.clear()
    scores = trl_call(
        function, completions, tests=["assert f() == 1"] * 2, log_metric=logged.__setitem__
    )
    assert scores == [1.0, 0.0]
    assert logged == {
        "rewards/unit_tests/compile/pass_rate": 0.5,
        "rewards/unit_tests/tests/pass_rate": 0.5,
    }


@pytest.mark.skipif(not STRICT, reason="needs strict isolation to tell interpreters apart")
def test_code_execution_refuses_an_interpreter_the_sandbox_cannot_run(tmp_path):
    # Like a pyenv under /root: the file and its directory are the trainer's alone.
    hidden = tmp_path / "hidden"
    hidden.mkdir(mode=0o700)
    (hidden / "python").write_text("#!/bin/sh\n")
    (hidden / "python").chmod(0o700)
    args = {
        "stages": [{"name": "run", "command": ["{python}", "{file}"]}],
        "pythonExecutable": str(hidden / "python"),
    }
    with pytest.raises(SandboxUnavailable, match="not executable by other users"):
        build_reward_functions([spec(name="run", builtin="code_execution", args=args)])


def test_embedding_similarity_with_a_local_model():
    from trainyard.workloads import builtin

    model_dir = str(builtin.model_path("tiny-qwen2"))
    (function,), _ = build_reward_functions(
        [
            spec(
                name="semantic",
                builtin="reference_similarity",
                args={
                    "referenceField": "ref",
                    "separator": "|||||",
                    "method": "embedding",
                    "modelPath": model_dir,
                },
            )
        ]
    )
    ref = "Users can reset their password|||||Admins can ban users"
    same, other = trl_call(
        function,
        ["Users can reset their password\nAdmins can ban users", "banana"],
        ref=[ref, ref],
    )
    assert same == pytest.approx(1.0, abs=1e-3), "identical items embed identically"
    assert 0.0 <= other < same


@pytest.mark.slow
def test_grpo_logs_each_reward_by_name(tmp_path):
    """The bound functions in a real (tiny, 2-step) TRL GRPO run: TRL accepts them, and logs
    rewards/<name>/mean for each component."""
    from trl import GRPOConfig, GRPOTrainer

    from trainyard.workloads import builtin

    functions, weights = build_reward_functions(
        [
            spec(name="format", builtin="regex", args={"pattern": r"\d"}),
            spec(name="length", builtin="length", weight=0.5, args={"min": 1, "max": 8}),
            spec(
                name="goals",
                builtin="count_match",
                args={"referenceField": "reference", "separator": "\n"},
            ),
        ],
        strip_thinking=True,
    )
    config = GRPOConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        reward_weights=weights,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
    )
    model_dir = str(builtin.model_path("tiny-qwen2"))
    trainer = GRPOTrainer(
        model=model_dir,
        reward_funcs=functions,
        args=config,
        train_dataset=builtin.build_dataset("prompts"),
    )
    trainer.train()
    logged = {key for entry in trainer.state.log_history for key in entry}
    assert {"rewards/format/mean", "rewards/length/mean", "rewards/goals/mean"} <= logged
