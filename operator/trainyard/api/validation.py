"""Turn a resource document into a model, or into problems a person can act on.

Every problem reads `path.to.field: what is wrong; what is allowed`. The CLI
(`trainyard validate`) and the operator (a `Valid=False` condition) both print these
lines, so a bad spec gets the same message wherever it is checked.
"""

from __future__ import annotations

import difflib
import types
import typing
from typing import Any, Union

from pydantic import BaseModel, ValidationError

from trainyard.api.base import API_VERSION
from trainyard.api.gate import PromotionGate
from trainyard.api.inference import InferenceServer
from trainyard.api.pipeline import TrainingPipeline
from trainyard.api.training_run import TrainingRun

KINDS: dict[str, type[BaseModel]] = {
    "TrainingRun": TrainingRun,
    "PromotionGate": PromotionGate,
    "TrainingPipeline": TrainingPipeline,
    "InferenceServer": InferenceServer,
}
Resource = TrainingRun | PromotionGate | TrainingPipeline | InferenceServer


class InvalidResource(ValueError):
    """A resource document that does not fit the API; `problems` has one line each."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


def parse_resource(document: Any) -> Resource:
    """The typed resource for a document, or InvalidResource listing every problem."""
    if not isinstance(document, dict):
        raise InvalidResource(
            [
                f"(document): expected a mapping with apiVersion, kind, metadata and spec; got {type(document).__name__}"
            ]
        )
    kind = document.get("kind")
    api_version = document.get("apiVersion")
    head: list[str] = []
    if api_version != API_VERSION:
        head.append(f"apiVersion: {api_version!r} is not served; allowed: {API_VERSION}")
    if kind not in KINDS:
        head.append(f"kind: {kind!r} is not a Trainyard kind; allowed: {', '.join(KINDS)}")
        raise InvalidResource(head)
    model = KINDS[kind]
    try:
        resource = model.model_validate(document)
    except ValidationError as error:
        problems = [
            f"{path}: {message}" for path, message in describe_errors(model, error.errors())
        ]
        raise InvalidResource(
            head + [p for p in problems if not p.startswith("apiVersion:")]
        ) from None
    if head:
        raise InvalidResource(head)
    return resource


def validate_resource(document: Any) -> list[str]:
    """Every problem of a document, empty when it is valid."""
    try:
        parse_resource(document)
    except InvalidResource as invalid:
        return invalid.problems
    return []


def describe_errors(
    model: type[BaseModel], errors: list[dict[str, Any]], prefix: str = ""
) -> list[tuple[str, str]]:
    """(field path, message) for each pydantic error, paths as written in YAML."""
    described: list[tuple[str, str]] = []
    # A value that fits no branch of a union (int | str) fails once per branch; say it
    # once: "must be a valid integer or a valid string; got [1]".
    union_misses: dict[str, int] = {}
    for error in errors:
        loc = [part for part in error["loc"] if not _is_union_tag(part)]
        path = _join(prefix, _format_loc(loc))
        ctx = error.get("ctx") or {}
        if "problems" in ctx:
            described.extend((_join(path, sub), msg) for sub, msg in ctx["problems"])
            continue
        path = path or "(document)"
        if len(loc) < len(error["loc"]) and error["type"].endswith("_type"):
            expected = error["msg"].removeprefix("Input should be ").split(",")[0]
            if path in union_misses:
                at = union_misses[path]
                head, _, got = described[at][1].partition("; got ")
                described[at] = (path, f"{head} or {expected}; got {got}")
                continue
            union_misses[path] = len(described)
            described.append((path, f"must be {expected}; got {error.get('input')!r}"))
            continue
        described.append((path, _message(model, loc, error)))
    return described


def _message(model: type[BaseModel], loc: list[Any], error: dict[str, Any]) -> str:
    kind, ctx, given = error["type"], error.get("ctx") or {}, error.get("input")
    if kind == "missing":
        return "required field is missing"
    if kind == "extra_forbidden":
        allowed = _allowed_fields(model, loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}?" if close else "allowed: " + ", ".join(allowed)
        return f"unknown field; {hint}"
    if kind == "literal_error":
        return f"{given!r} is not allowed; allowed: {ctx.get('expected')}"
    if kind == "string_pattern_mismatch":
        return f"{given!r} does not match the pattern {ctx.get('pattern')}"
    if kind in ("value_error", "assertion_error"):
        return str(ctx.get("error", error["msg"])).removeprefix("Value error, ")
    message = error["msg"].replace("Input should be", "must be")
    if given is not None and not isinstance(given, dict | list):
        message += f"; got {given!r}"
    return message


def _allowed_fields(model: type[BaseModel], loc: list[Any]) -> list[str]:
    """The YAML names of the fields of the object at `loc` below `model`."""
    current: Any = model
    for part in loc:
        current = _unwrap(current)
        if isinstance(part, int):
            continue
        if isinstance(current, type) and issubclass(current, BaseModel):
            fields = {f.alias or n: f for n, f in current.model_fields.items()}
            if part not in fields:
                return []
            current = fields[part].annotation
        else:
            return []
    current = _unwrap(current)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return [f.alias or n for n, f in current.model_fields.items()]
    return []


def _unwrap(annotation: Any) -> Any:
    """The model inside Optional[...], list[...] or dict[str, ...]."""
    while True:
        origin = typing.get_origin(annotation)
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if origin in (Union, types.UnionType) and args:
            models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
            annotation = models[0] if models else args[0]
        elif origin in (list, tuple) and args:
            annotation = args[0]
        elif origin is dict and len(args) == 2:
            annotation = args[1]
        elif origin is typing.Annotated:
            annotation = args[0]
        else:
            return annotation


def _is_union_tag(part: Any) -> bool:
    # pydantic puts the branch of a union it tried into the location (`int`, `str`, …).
    return isinstance(part, str) and (part in ("int", "str", "float", "bool") or "[" in part)


def _format_loc(loc: list[Any]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _join(prefix: str, path: str) -> str:
    if not prefix:
        return path
    if not path:
        return prefix
    return prefix + (path if path.startswith("[") else "." + path)
