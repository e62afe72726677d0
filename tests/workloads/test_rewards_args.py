"""The built-in rewards' argument models: complete, strict, in step with the functions."""

from __future__ import annotations

import inspect

import pytest
from pydantic import ValidationError

from trainyard.api.rewards import BUILTIN_REWARD_ARGS, parse_reward_args
from trainyard.api.training_run import BUILTIN_REWARDS as API_BUILTINS
from trainyard.api.training_run import RewardSpec
from trainyard.workloads.rewards import BUILTIN_REWARDS

# Keyword arguments the reward builder supplies itself, not the user.
BUILDER_ARGUMENTS = {"encoder"}

MINIMAL_ARGS = {
    "regex": {"pattern": "^As an? .+, I want .+ so that .+"},
    "clause_presence": {"clauses": ["As a", "I want", "so that"]},
    "length": {"min": 20, "max": 120},
    "reference_similarity": {"referenceField": "formatted_issues", "separator": "|||||"},
    "count_match": {"referenceField": "formatted_issues", "separator": "|||||"},
    "redundancy_penalty": {},
    "extraneous_content_penalty": {"pattern": "^As an? "},
    "code_execution": {"stages": [{"name": "tests", "command": ["{python}", "{file}"]}]},
}


def test_every_api_builtin_has_args_and_a_function():
    assert (
        set(BUILTIN_REWARD_ARGS) == set(API_BUILTINS) == set(BUILTIN_REWARDS) == set(MINIMAL_ARGS)
    )


@pytest.mark.parametrize("builtin", sorted(BUILTIN_REWARD_ARGS))
def test_args_model_matches_the_function_keywords(builtin):
    parameters = inspect.signature(BUILTIN_REWARDS[builtin]).parameters.values()
    keywords = {p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert set(BUILTIN_REWARD_ARGS[builtin].model_fields) == keywords - BUILDER_ARGUMENTS


@pytest.mark.parametrize("builtin", sorted(BUILTIN_REWARD_ARGS))
def test_every_argument_is_documented(builtin):
    undocumented = [
        n for n, f in BUILTIN_REWARD_ARGS[builtin].model_fields.items() if not f.description
    ]
    assert undocumented == []


@pytest.mark.parametrize("builtin", sorted(MINIMAL_ARGS))
def test_minimal_args_validate_in_the_api_spec(builtin):
    reward = RewardSpec.model_validate(
        {"name": "r", "builtin": builtin, "args": MINIMAL_ARGS[builtin]}
    )
    assert parse_reward_args(reward.builtin, reward.args).model_dump()


@pytest.mark.parametrize(
    ("builtin", "args", "message"),
    [
        pytest.param("regex", {}, "args.pattern: required field is missing", id="regex-missing"),
        pytest.param(
            "regex",
            {"patern": "x"},
            "args.patern: unknown field; did you mean 'pattern'",
            id="regex-typo",
        ),
        pytest.param(
            "regex",
            {"pattern": "x", "scope": "words"},
            "args.scope: 'words' is not allowed",
            id="regex-scope",
        ),
        pytest.param(
            "regex",
            {"pattern": "[a-"},
            "args.pattern: '\\[a-' is not a valid regular",
            id="regex-invalid",
        ),
        pytest.param("clause_presence", {"clauses": []}, "args.clauses", id="clauses-empty"),
        pytest.param(
            "clause_presence",
            {"clauses": ["("], "regex": True},
            "not a valid regular",
            id="clause-regex",
        ),
        pytest.param(
            "length",
            {"min": 50, "max": 10},
            "min \\(50\\) must not be greater than max",
            id="length-window",
        ),
        pytest.param(
            "length", {"max": "long"}, "args.max: must be a valid integer", id="length-type"
        ),
        pytest.param(
            "length",
            {"max": 10, "unit": "tokens"},
            "args.unit: 'tokens' is not allowed",
            id="length-unit",
        ),
        pytest.param(
            "length",
            {"max": 10, "Min": 2},
            "args.Min: unknown field; did you mean 'min'",
            id="length-case",
        ),
        pytest.param(
            "reference_similarity",
            {"referenceField": "r", "modelPath": "/m"},
            "modelPath is only used by method embedding",
            id="similarity-model-without-embedding",
        ),
        pytest.param(
            "reference_similarity",
            {"reference_field": "r", "method": "bleu"},
            "args.method: 'bleu' is not allowed",
            id="similarity-method",
        ),
        pytest.param(
            "count_match", {"referenceField": "r"}, "args.separator: required", id="count-separator"
        ),
        pytest.param(
            "redundancy_penalty",
            {"similarityThreshold": 0},
            "args.similarityThreshold",
            id="redundancy-threshold",
        ),
        pytest.param(
            "code_execution",
            {"stages": [{"name": "a", "command": ["x"]}, {"name": "a", "command": ["y"]}]},
            "stage names must be unique; repeated: a",
            id="code-duplicate-stage",
        ),
        pytest.param(
            "code_execution",
            {"stages": [{"name": "a", "command": ["x"], "weight": 0}]},
            "at least one stage needs a weight above 0",
            id="code-zero-weight",
        ),
        pytest.param(
            "code_execution",
            {"stages": [{"name": "a", "command": []}]},
            "args.stages\\[0\\].command",
            id="code-empty-command",
        ),
        pytest.param(
            "code_execution",
            {"stages": [{"name": "a", "command": ["x"]}], "fileName": "../escape.py"},
            "args.fileName",
            id="code-file-name-path",
        ),
        pytest.param(
            "code_execution",
            {"stages": [{"name": "a", "command": ["x"]}], "testFileName": "t.py"},
            "testFileName needs testField",
            id="code-test-file-without-field",
        ),
        pytest.param(
            "code_execution",
            {"stages": [{"name": "a", "command": ["x"]}], "isolation": "none"},
            "args.isolation: 'none' is not allowed",
            id="code-isolation",
        ),
        pytest.param(
            "code_execution",
            {"stages": [{"name": "a", "command": ["x"]}], "serviceUrl": "http://sandbox:8750"},
            "serviceUrl is only used by isolation service, not strict",
            id="code-service-url-without-service",
        ),
        pytest.param(
            "code_execution",
            {
                "stages": [{"name": "a", "command": ["x"]}],
                "isolation": "service",
                "serviceUrl": "sandbox:8750",
            },
            "args.serviceUrl",
            id="code-service-url-not-http",
        ),
        pytest.param(
            "code_execution",
            {"stages": [{"name": "a", "command": ["x"], "errorPattern": "(unclosed"}]},
            "is not a valid regular expression",
            id="code-error-pattern",
        ),
        pytest.param(
            "code_execution",
            {"stages": [{"name": "a", "command": ["x"], "errorScale": 0}]},
            "args.stages\\[0\\].errorScale",
            id="code-error-scale",
        ),
        pytest.param(
            "code_execution",
            {"stages": [{"name": "a", "command": ["x"]}], "timeoutSecond": 5},
            "args.timeoutSecond: unknown field; did you mean 'timeoutSeconds'",
            id="code-did-you-mean",
        ),
        pytest.param(
            "code_execution",
            {"stages": [{"name": "a", "command": ["x"]}], "env": {"1BAD": "x"}},
            "'1BAD' is not an environment variable name",
            id="code-env-name",
        ),
    ],
)
def test_invalid_args(builtin, args, message):
    with pytest.raises(ValueError, match=message):
        parse_reward_args(builtin, args)
    # The API model gives the same message, nested under the reward.
    with pytest.raises(ValidationError, match=message):
        RewardSpec.model_validate({"name": "r", "builtin": builtin, "args": args})


def test_snake_case_keys_are_accepted_too():
    assert (
        parse_reward_args("count_match", {"reference_field": "r", "separator": "|"}).reference_field
        == "r"
    )
