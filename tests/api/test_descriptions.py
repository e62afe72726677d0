"""Every field of every API model says what it is: `kubectl explain` and the docs show it."""

from __future__ import annotations

import typing
from typing import Any

import pytest
from pydantic import BaseModel

from trainyard.api import KINDS, ApiModel
from trainyard.api.rewards import BUILTIN_REWARD_ARGS


def _models_below(roots: list[type[BaseModel]]) -> list[type[BaseModel]]:
    """Every model reachable through the fields of `roots` (unions, lists, maps unwrapped)."""
    seen: dict[str, type[BaseModel]] = {}
    todo = list(roots)
    while todo:
        model = todo.pop()
        if model.__qualname__ in seen:
            continue
        seen[model.__qualname__] = model
        for field in model.model_fields.values():
            for inner in _inner_models(field.annotation):
                todo.append(inner)
    return sorted(seen.values(), key=lambda m: m.__qualname__)


def _inner_models(annotation: Any) -> list[type[BaseModel]]:
    """Models inside a type: X, X | None, list[X], dict[str, X], Annotated[X, …]."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _inner_models(arg)]


MODELS = _models_below([*KINDS.values(), *BUILTIN_REWARD_ARGS.values()])


def test_walk_reaches_the_nested_models():
    names = {m.__name__ for m in MODELS}
    assert {
        "TrainingRunSpec",
        "GRPOSpec",
        "RewardSpec",
        "LoraSpec",
        "Stage",
        "Criterion",
        "VLLMServing",
        "Condition",
        "LengthArgs",
        "CodeExecutionStage",
    } <= names


def test_every_model_is_an_api_model():
    assert [m.__name__ for m in MODELS if not issubclass(m, ApiModel)] == []


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_model_has_a_docstring(model):
    assert (model.__doc__ or "").strip()


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_every_field_has_a_one_line_description(model):
    problems = [
        f"{name}: {field.description!r}"
        for name, field in model.model_fields.items()
        if not (field.description or "").strip() or "\n" in field.description.strip()
    ]
    assert problems == []


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_yaml_names_are_camel_case(model):
    """Python attributes snake_case, YAML fields camelCase: no underscore reaches YAML."""
    aliases = [field.alias or name for name, field in model.model_fields.items()]
    assert [a for a in aliases if "_" in a] == []
