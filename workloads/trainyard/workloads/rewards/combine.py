"""Turning a run's `rewards` specs into TRL reward functions and weights."""

from __future__ import annotations

import importlib
import inspect
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from trainyard.api.rewards import parse_reward_args
from trainyard.workloads.rewards.code_execution import (
    check_programs_remotely,
    code_execution_reward,
    sandbox_service_url,
    service_health,
)
from trainyard.workloads.rewards.format import clause_presence_reward, length_reward, regex_reward
from trainyard.workloads.rewards.penalties import extraneous_content_penalty, redundancy_penalty
from trainyard.workloads.rewards.sandbox import (
    check_stage_program,
    require_isolation,
    sandbox_python,
)
from trainyard.workloads.rewards.similarity import (
    count_match_reward,
    load_sentence_encoder,
    reference_similarity_reward,
)
from trainyard.workloads.rewards.thinking import strip_thinking_from_completion

RewardFunction = Callable[..., list[float | None]]

BUILTIN_REWARDS: dict[str, RewardFunction] = {
    "regex": regex_reward,
    "clause_presence": clause_presence_reward,
    "length": length_reward,
    "reference_similarity": reference_similarity_reward,
    "count_match": count_match_reward,
    "redundancy_penalty": redundancy_penalty,
    "extraneous_content_penalty": extraneous_content_penalty,
    "code_execution": code_execution_reward,
}
"""Built-in name (the API's enum value) -> reward function; its keyword arguments are the
fields of `trainyard.api.rewards.BUILTIN_REWARD_ARGS[name]`."""


class RewardSpecLike(Protocol):
    """What `build_reward_functions` reads from a reward spec (the API's `RewardSpec`)."""

    name: str
    builtin: str | None
    python: str | None
    weight: float
    args: dict[str, Any]


class NamedReward:
    """A reward function bound to its arguments and named after its spec, so TRL logs it as
    `rewards/<name>/mean`. Arguments win over dataset columns of the same name."""

    def __init__(
        self,
        name: str,
        function: RewardFunction,
        kwargs: dict[str, Any],
        strip_thinking: bool,
        prefix_metrics: bool = False,
    ):
        self.__name__ = name
        self.function = function
        self.kwargs = kwargs
        self.strip_thinking = strip_thinking
        self.prefix_metrics = prefix_metrics

    def _inputs(self, completions: list[Any], columns: dict[str, Any]) -> tuple[list, dict]:
        if self.strip_thinking:
            completions = [strip_thinking_from_completion(c) for c in completions]
        columns = {k: v for k, v in columns.items() if k not in self.kwargs}
        log_metric = columns.get("log_metric")
        if self.prefix_metrics and callable(log_metric):
            columns["log_metric"] = lambda metric, value: log_metric(
                f"rewards/{self.__name__}/{metric}", value
            )
        log_extra = columns.get("log_extra")
        if self.prefix_metrics and callable(log_extra):
            columns["log_extra"] = lambda column, values: log_extra(
                f"{self.__name__}/{column}", values
            )
        return completions, {**columns, **self.kwargs}

    def _checked(self, scores: Any, expected: int) -> list[float | None]:
        scores = list(scores)
        if len(scores) != expected:
            raise ValueError(
                f"reward {self.__name__!r} returned {len(scores)} scores for {expected} completions"
            )
        return [None if score is None else float(score) for score in scores]

    def __call__(self, completions: list[Any], **columns: Any) -> list[float | None]:
        completions, kwargs = self._inputs(completions, columns)
        return self._checked(self.function(completions, **kwargs), len(completions))

    def __repr__(self) -> str:
        return (
            f"NamedReward({self.__name__!r}, {getattr(self.function, '__name__', self.function)})"
        )


class AsyncNamedReward(NamedReward):
    """`NamedReward` of an `async def` user reward; TRL awaits such rewards concurrently."""

    async def __call__(self, completions: list[Any], **columns: Any) -> list[float | None]:  # type: ignore[override]
        completions, kwargs = self._inputs(completions, columns)
        return self._checked(await self.function(completions, **kwargs), len(completions))


def load_python_reward(reference: str, reward: str = "reward") -> RewardFunction:
    """The function named by `module:function` (importable on the trainer's PYTHONPATH).

    >>> load_python_reward("trainyard.workloads.rewards.format:length_reward").__name__
    'length_reward'
    """
    module_name, sep, function_name = reference.partition(":")
    if not sep or not module_name or not function_name:
        raise ValueError(f"reward {reward!r}: python must be 'module:function', got {reference!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(
            f"reward {reward!r}: cannot import module {module_name!r} for python {reference!r} "
            f"({error}); it must be installed in the trainer image or on PYTHONPATH"
        ) from error
    function = getattr(module, function_name, None)
    if function is None:
        public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise ValueError(
            f"reward {reward!r}: module {module_name!r} has no {function_name!r}; "
            f"its callables: {', '.join(public) or 'none'}"
        )
    if not callable(function):
        raise ValueError(
            f"reward {reward!r}: {reference!r} is a {type(function).__name__}, not a function"
        )
    _check_signature(function, reward, reference)
    return function


def _check_signature(function: Callable, reward: str, reference: str) -> None:
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: let TRL's call decide
        return
    takes_completions = any(p.name == "completions" for p in parameters)
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
    if not (takes_completions or takes_kwargs):
        raise ValueError(
            f"reward {reward!r}: {reference} must take TRL's reward arguments "
            "(completions, **kwargs) -> list[float]"
        )


def bind_reward(
    spec: RewardSpecLike, strip_thinking: bool, workers: int | None = None
) -> NamedReward:
    """One spec as a TRL reward function; checks what can be checked before training
    (arguments, the sandbox, the embedding model, the user's import). `workers` is the
    pool size of a code_execution reward whose args leave it out."""
    if (spec.builtin is None) == (spec.python is None):
        raise ValueError(f"reward {spec.name!r}: set exactly one of builtin or python")
    if spec.python is not None:
        function = load_python_reward(spec.python, spec.name)
        wrapper = AsyncNamedReward if inspect.iscoroutinefunction(function) else NamedReward
        return wrapper(spec.name, function, dict(spec.args or {}), strip_thinking)
    try:
        kwargs = parse_reward_args(spec.builtin, spec.args).model_dump()
    except ValueError as error:
        raise ValueError(f"reward {spec.name!r}: {error}") from None
    if spec.builtin == "reference_similarity" and kwargs["method"] == "embedding":
        kwargs["encoder"] = load_sentence_encoder(kwargs["model_path"])
    if spec.builtin == "code_execution":
        if kwargs["workers"] is None:
            kwargs["workers"] = workers
        _check_code_execution(spec.name, kwargs)
    return NamedReward(
        spec.name, BUILTIN_REWARDS[spec.builtin], kwargs, strip_thinking, prefix_metrics=True
    )


def _check_code_execution(name: str, kwargs: dict[str, Any]) -> None:
    """Before training: the isolation can be had, and every stage's program is found on
    the PATH it will run with (its env.PATH, else the sandbox's), where it will run:
    here, or in the sandbox service (which `trainyard run` starts on this machine)."""
    path = kwargs["env"].get("PATH")
    if kwargs["isolation"] == "service":
        # The pod's TRAINYARD_SANDBOX_URL (rendered from serviceUrl), else a local server.
        url = kwargs["service_url"] = sandbox_service_url(kwargs["workers"])
        health = service_health(url)
        programs = [stage["command"][0] for stage in kwargs["stages"]]
        problems = check_programs_remotely(url, programs, path)
        if problems:
            raise ValueError(f"reward {name!r}: in the sandbox service {url}: {problems[0]}")
        print(
            f"reward {name!r}: programs run in the sandbox service {url} "
            f"(isolation {health['isolation']}, {health['workers']} workers)",
            file=sys.stderr,
        )
        return
    require_isolation(kwargs["isolation"])
    for stage in kwargs["stages"]:
        try:
            check_stage_program(stage["command"][0], path)
        except ValueError as error:
            raise ValueError(f"reward {name!r}: stage {stage['name']!r}: {error}") from None
    if kwargs["isolation"] == "strict":
        kwargs["python_executable"] = sandbox_python(kwargs["python_executable"])


def build_reward_functions(
    rewards: Sequence[RewardSpecLike], strip_thinking: bool = False, workers: int | None = None
) -> tuple[list[NamedReward], list[float]]:
    """TRL-ready reward functions (`reward_funcs`) and their weights (`reward_weights`);
    `workers` (the spec's rewardWorkers) sizes code-execution pools whose args leave it out.

    >>> from types import SimpleNamespace as Spec
    >>> functions, weights = build_reward_functions([
    ...     Spec(name="format", builtin="regex", python=None, weight=2.0, args={"pattern": "^As an? "}),
    ...     Spec(name="short", builtin="length", python=None, weight=0.5, args={"max": 12}),
    ... ], strip_thinking=True)
    >>> [f.__name__ for f in functions], weights
    (['format', 'short'], [2.0, 0.5])
    >>> functions[0](completions=["<think>hmm</think>As a cook, I want knives"])
    [1.0]
    """
    names = [spec.name for spec in rewards]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"reward names must be unique; repeated: {', '.join(repeated)}")
    functions = [bind_reward(spec, strip_thinking, workers) for spec in rewards]
    return functions, [float(spec.weight) for spec in rewards]


def score_rewards(
    functions: Sequence[Callable[..., list[float | None]]], completions: list[Any], **columns: Any
) -> dict[str, list[float | None]]:
    """Each (synchronous) reward's scores by name, for code that is not TRL (evaluation)."""
    return {
        function.__name__: function(completions=completions, **columns) for function in functions
    }


def combined_reward(
    functions: Sequence[Callable[..., list[float | None]]],
    weights: Sequence[float],
    completions: list[Any],
    **columns: Any,
) -> list[float]:
    """The weighted sum of the rewards per completion, as TRL computes it: a None (the
    reward does not apply) adds nothing; NaN when no reward applies.

    >>> from types import SimpleNamespace as Spec
    >>> functions, weights = build_reward_functions([
    ...     Spec(name="format", builtin="regex", python=None, weight=1.0, args={"pattern": "^As an? "}),
    ...     Spec(name="short", builtin="length", python=None, weight=0.5, args={"max": 4}),
    ... ])
    >>> combined_reward(functions, weights, ["As a cook", "Hello there"])
    [1.5, 0.5]
    """
    if len(functions) != len(weights):
        raise ValueError(f"{len(functions)} reward functions but {len(weights)} weights")
    per_function = score_rewards(functions, completions, **columns)
    totals = []
    for i in range(len(completions)):
        values = [
            weight * scores[i]
            for weight, scores in zip(weights, per_function.values(), strict=True)
            if scores[i] is not None and not math.isnan(scores[i])
        ]
        totals.append(sum(values) if values else math.nan)
    return totals
