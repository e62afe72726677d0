"""Arguments of the built-in GRPO/RLOO rewards, as written under `rewards[].args`.

One model per built-in, keyed by the built-in's name in `BUILTIN_REWARD_ARGS`. Field
names are the keyword arguments of the reward functions in
`trainyard.workloads.rewards` (snake_case in Python, camelCase in YAML), so a spec's
`args` bind one to one. Pure pydantic: the operator image imports this module.
"""

from __future__ import annotations

import difflib
import re
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from trainyard.api.base import ApiModel

# Placeholders a code-execution command may use; anything else in braces is refused so
# a typo like {fiel} fails at validation instead of reaching the compiler.
COMMAND_PLACEHOLDERS = ("file", "test_file", "dir", "python")
FILE_NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$"


# The sandbox service (isolation: service): `python -m trainyard.workloads.rewards.sandbox_server`
# in pods of its own; the operator renders it (trainyard.operator.builders.sandbox) and
# `trainyard run` starts it on this machine, both with `sandbox_server_args`.
SANDBOX_SERVER_MODULE = "trainyard.workloads.rewards.sandbox_server"
SANDBOX_SERVICE_PORT = 8750
SANDBOX_NAMESPACE = "trainyard-sandbox"
SANDBOX_URL_ENV = "TRAINYARD_SANDBOX_URL"
"""The trainer pod's environment variable with the sandbox service's base URL (rendered
from serviceUrl); unset (`trainyard run`), the reward starts a sandbox server here."""
DEFAULT_SANDBOX_SERVICE_URL = (
    f"http://trainyard-sandbox.{SANDBOX_NAMESPACE}.svc:{SANDBOX_SERVICE_PORT}"
)


def sandbox_server_args(
    host: str = "0.0.0.0",
    port: int = SANDBOX_SERVICE_PORT,
    isolation: Literal["strict", "rlimits"] = "strict",
    workers: int | None = None,
) -> list[str]:
    """Arguments after `python` of the sandbox server, as its pod and `trainyard run` start it.

    >>> sandbox_server_args(port=0)
    ['-m', 'trainyard.workloads.rewards.sandbox_server', '--host', '0.0.0.0', '--port', '0', '--isolation', 'strict']
    """
    args = ["-m", SANDBOX_SERVER_MODULE, "--host", host, "--port", str(port)]
    args += ["--isolation", isolation]
    if workers is not None:
        args += ["--workers", str(workers)]
    return args


def _check_regex(value: str) -> str:
    try:
        re.compile(value)
    except re.error as error:
        raise ValueError(f"{value!r} is not a valid regular expression: {error}") from None
    return value


class RegexArgs(ApiModel):
    """`regex`: 1.0 when the completion matches a pattern (format reward)."""

    pattern: str = Field(min_length=1)
    """Python regular expression the completion must match, e.g. '^As an? .+, I want .+ so that .+'."""
    scope: Literal["completion", "lines"] = "completion"
    """'completion': 1.0 if the whole completion matches, else 0.0; 'lines': the fraction of non-empty lines that match."""
    mode: Literal["search", "match", "fullmatch"] = "search"
    """How the pattern is applied (Python's re.search / re.match / re.fullmatch); anchor with ^ and $ under search."""
    ignore_case: bool = False
    """Match case-insensitively (re.IGNORECASE)."""
    multiline: bool = False
    """^ and $ match at every line (re.MULTILINE); only useful with scope 'completion'."""
    dotall: bool = False
    """'.' also matches newlines (re.DOTALL)."""

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, value: str) -> str:
        return _check_regex(value)


class ClausePresenceArgs(ApiModel):
    """`clause_presence`: the fraction of required clauses found in the completion."""

    clauses: list[str] = Field(min_length=1)
    """Phrases (or regular expressions with regex: true) that should each appear, e.g. ['As a', 'I want', 'so that']."""
    regex: bool = False
    """Treat clauses as regular expressions instead of literal phrases."""
    ignore_case: bool = True
    """Compare case-insensitively."""
    scope: Literal["completion", "lines"] = "completion"
    """'completion': clauses may appear anywhere; 'lines': score each non-empty line and average."""

    @field_validator("clauses")
    @classmethod
    def _clauses(cls, value: list[str]) -> list[str]:
        if any(not clause for clause in value):
            raise ValueError("clauses must not be empty strings")
        return value

    @model_validator(mode="after")
    def _regexes(self) -> ClausePresenceArgs:
        if self.regex:
            for clause in self.clauses:
                _check_regex(clause)
        return self


class LengthArgs(ApiModel):
    """`length`: 1.0 inside a length window, decaying outside it."""

    min: int = Field(default=0, ge=0)
    """Shortest length that scores 1.0, in `unit`s."""
    max: int = Field(gt=0)
    """Longest length that scores 1.0, in `unit`s."""
    unit: Literal["words", "chars", "lines"] = "words"
    """words: whitespace-separated tokens; chars: characters after stripping surrounding whitespace; lines: non-empty lines."""
    decay: Literal["linear", "exponential"] = "linear"
    """Shape of the score outside the window."""
    scale: float | None = Field(default=None, gt=0)
    """Distance outside the window over which the score falls to 0 (linear) or 1/e (exponential); min below the window and max above it when left out."""

    @model_validator(mode="after")
    def _window(self) -> LengthArgs:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) must not be greater than max ({self.max})")
        return self


class ReferenceSimilarityArgs(ApiModel):
    """`reference_similarity`: how well the completion covers a reference from a dataset column."""

    reference_field: str = Field(min_length=1)
    """Dataset column holding the reference text, e.g. formatted_issues."""
    separator: str | None = None
    """Splits the reference into items (e.g. '|||||'); the whole reference is one item when left out."""
    completion_separator: str | None = None
    """Splits the completion into items; `separator` when the completion contains it, else non-empty lines."""
    method: Literal["coverage", "token_f1", "embedding"] = "coverage"
    """coverage: mean over reference items of the best token F1 with any completion item; token_f1: token F1 of the whole texts; embedding: like coverage with cosine similarity of sentence embeddings."""
    model: str | None = None
    """The sentence-embedding model (transformers format) as a model source, like model.source: hf://org/name[@revision], s3://bucket/prefix, file://path, builtin://NAME or run://RUN; fetched when training starts (S3 with the run's storage settings)."""
    model_path: str | None = None
    """Local directory of a sentence-embedding model already on the trainer's filesystem; instead of model."""
    ignore_case: bool = True
    """Lower-case tokens before comparing (lexical methods)."""

    @field_validator("model")
    @classmethod
    def _model_source(cls, value: str | None) -> str | None:
        if value is not None:
            from trainyard.api.common import check_source

            check_source(value)
        return value

    @model_validator(mode="after")
    def _embedding(self) -> ReferenceSimilarityArgs:
        given = [name for name, v in (("model", self.model), ("modelPath", self.model_path)) if v]
        if self.method == "embedding" and len(given) != 1:
            raise ValueError(
                "method embedding needs exactly one of model (a model source: hf://, s3://, "
                "file://, builtin://, run://) or modelPath (a local directory)"
                + (f"; got {' and '.join(given)}" if given else "")
            )
        if self.method != "embedding" and given:
            raise ValueError(f"{given[0]} is only used by method embedding, not {self.method}")
        return self


class CountMatchArgs(ApiModel):
    """`count_match`: 1.0 when the completion has as many items as the reference."""

    reference_field: str = Field(min_length=1)
    """Dataset column holding the reference items."""
    separator: str = Field(min_length=1)
    """Splits the reference into items, e.g. '|||||'."""
    completion_separator: str | None = None
    """Splits the completion into items; `separator` when the completion contains it, else non-empty lines."""
    tolerance: int = Field(default=0, ge=0)
    """Count difference that still scores 1.0."""


class RedundancyPenaltyArgs(ApiModel):
    """`redundancy_penalty`: minus the fraction of items that repeat an earlier item (0.0 when all differ)."""

    separator: str | None = None
    """Splits the completion into items; non-empty lines when left out."""
    similarity_threshold: float = Field(default=0.8, gt=0, le=1)
    """Token Jaccard similarity at or above which two items count as repeats (1.0: exact repeats only)."""
    ignore_case: bool = True
    """Lower-case items before comparing."""


class ExtraneousContentPenaltyArgs(ApiModel):
    """`extraneous_content_penalty`: minus the share of the completion outside the expected format."""

    pattern: str = Field(min_length=1)
    """Regular expression an expected line matches, e.g. '^As an? .+, I want .+ so that .+'; other non-empty lines are extraneous."""
    unit: Literal["chars", "lines"] = "chars"
    """Measure the extraneous share in characters or in lines."""
    ignore_case: bool = False
    """Match case-insensitively."""

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, value: str) -> str:
        return _check_regex(value)


class CodeExecutionStage(ApiModel):
    """One command run on the completion, e.g. a compiler or a test runner."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,63}$")
    """Name of the stage (compile, tests, …)."""
    command: list[str] = Field(min_length=1)
    """Program and arguments, no shell; placeholders {file}, {test_file}, {dir} and {python} are replaced."""
    weight: float = Field(default=1.0, ge=0)
    """Share of the score this stage earns when it exits 0."""
    timeout_seconds: float | None = Field(default=None, gt=0, le=600)
    """Wall-clock limit of this stage; the reward's timeoutSeconds when left out."""
    error_pattern: str | None = None
    """Score by count: a regular expression (multiline) matched against the stage's stdout and stderr, one match per error it reports, e.g. '^Error' for OCaml's compiler; the stage then earns weight x max(0, 1 - errors / errorScale) instead of all or nothing (nothing when it fails without reporting an error, times out or writes too much)."""
    error_scale: float = Field(default=10.0, gt=0)
    """Errors at which a stage scored by count earns nothing (with errorPattern)."""

    @field_validator("error_pattern")
    @classmethod
    def _error_pattern(cls, value: str | None) -> str | None:
        return None if value is None else _check_regex(value)

    @field_validator("command")
    @classmethod
    def _placeholders(cls, value: list[str]) -> list[str]:
        for part in value:
            for name in re.findall(r"\{(\w+)\}", part):
                if name not in COMMAND_PLACEHOLDERS:
                    raise ValueError(
                        f"unknown placeholder {{{name}}} in {part!r}; allowed: "
                        + ", ".join(f"{{{p}}}" for p in COMMAND_PLACEHOLDERS)
                    )
        return value


class CodeExecutionArgs(ApiModel):
    """`code_execution`: run the completion through compile/test stages in a sandbox, with partial credit."""

    stages: list[CodeExecutionStage] = Field(min_length=1)
    """Commands run in order; the score is the weight of passing stages over the total weight."""
    file_name: str = Field(default="solution.py", pattern=FILE_NAME_PATTERN)
    """Name of the file the completion is written to ({file})."""
    extract_code_block: bool = True
    """Take the code from the last fenced ``` block of the completion when it has one."""
    code_block_language: str | None = None
    """Only take fenced blocks tagged with this language (```python)."""
    test_field: str | None = None
    """Dataset column with test code for each prompt."""
    test_file_name: str | None = Field(default=None, pattern=FILE_NAME_PATTERN)
    """Write the test code to this file ({test_file}); appended to the completion's file when left out."""
    stop_on_failure: bool = True
    """Skip later stages once a stage fails (tests are not run on code that does not compile)."""
    python_executable: str | None = None
    """Interpreter for {python}; the trainer's own interpreter when the sandbox user may run it, else python3 on PATH."""
    timeout_seconds: float = Field(default=10.0, gt=0, le=600)
    """Wall-clock limit of each stage; the whole process group is killed when it passes."""
    cpu_seconds: int = Field(default=10, gt=0, le=3600)
    """CPU-time limit of each stage (RLIMIT_CPU)."""
    memory_mb: int = Field(default=1024, ge=64)
    """Address-space limit of each process (RLIMIT_AS), in MiB."""
    file_size_mb: int = Field(default=16, ge=1)
    """Largest file a stage may write (RLIMIT_FSIZE), in MiB."""
    max_processes: int = Field(default=64, ge=1)
    """Processes and threads the sandbox user may have at once (RLIMIT_NPROC); stops fork bombs."""
    max_open_files: int = Field(default=64, ge=16)
    """Open file descriptors per process (RLIMIT_NOFILE)."""
    output_limit_bytes: int = Field(default=65536, ge=1024)
    """Bytes kept from each of stdout and stderr; a stage that writes more is killed and fails."""
    env: dict[str, str] = Field(default_factory=dict)
    """Extra environment variables of the stages (the trainer's environment is never passed)."""
    isolation: Literal["strict", "rlimits", "service"] = "strict"
    """strict: own network and mount namespaces, read-only filesystem except the work directory, a fresh unprivileged uid (needs root with CAP_SYS_ADMIN in the trainer container: `trainyard run` as root; the operator refuses it, its trainer pods being restricted); rlimits: limits, timeout and a fresh directory only — not a jail, for trusted code; service: each program goes to the sandbox service (serviceUrl), which jails it as strict does in a pod of its own, so the trainer keeps the restricted profile (`trainyard run` starts one on this machine)."""
    service_url: str | None = Field(default=None, pattern=r"^https?://[^\s/]+(/\S*)?$")
    """Base URL of the sandbox service for isolation service, given to the trainer pod as TRAINYARD_SANDBOX_URL; the platform's shared one (http://trainyard-sandbox.trainyard-sandbox.svc:8750) when left out. `trainyard run` starts a server on this machine instead."""
    workers: int | None = Field(default=None, ge=0)
    """Processes scoring completions in parallel; the CPU count when left out; 0 scores in the calling process."""
    max_completion_chars: int = Field(default=20000, gt=0)
    """Completions longer than this are degenerate."""
    min_compression_ratio: float = Field(default=0.1, ge=0, lt=1)
    """Completions of 200+ characters that zlib compresses below this ratio (extremely repetitive) are degenerate."""
    degenerate_multiplier: float = Field(default=0.1, ge=0, le=1)
    """Factor applied to the score of a degenerate completion."""

    @field_validator("stages")
    @classmethod
    def _stages(cls, value: list[CodeExecutionStage]) -> list[CodeExecutionStage]:
        names = [stage.name for stage in value]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"stage names must be unique; repeated: {', '.join(repeated)}")
        if sum(stage.weight for stage in value) <= 0:
            raise ValueError("at least one stage needs a weight above 0")
        return value

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", name):
                raise ValueError(f"{name!r} is not an environment variable name")
        return value

    @model_validator(mode="after")
    def _service_url(self) -> CodeExecutionArgs:
        if self.service_url and self.isolation != "service":
            raise ValueError(f"serviceUrl is only used by isolation service, not {self.isolation}")
        return self

    @model_validator(mode="after")
    def _test_file(self) -> CodeExecutionArgs:
        if self.test_file_name and not self.test_field:
            raise ValueError("testFileName needs testField: the dataset column with the test code")
        if self.test_file_name and self.test_file_name == self.file_name:
            raise ValueError("testFileName must differ from fileName")
        return self


BUILTIN_REWARD_ARGS: dict[str, type[ApiModel]] = {
    "regex": RegexArgs,
    "clause_presence": ClausePresenceArgs,
    "length": LengthArgs,
    "reference_similarity": ReferenceSimilarityArgs,
    "count_match": CountMatchArgs,
    "redundancy_penalty": RedundancyPenaltyArgs,
    "extraneous_content_penalty": ExtraneousContentPenaltyArgs,
    "code_execution": CodeExecutionArgs,
}
"""Built-in reward name (the API's enum value) -> model of its `args`."""


def parse_reward_args(builtin: str, args: dict[str, Any] | None) -> ApiModel:
    """Validate a built-in reward's `args`; errors name the key, what was wrong and what is allowed.

    >>> parse_reward_args("length", {"min": 20, "max": 120}).max
    120
    >>> parse_reward_args("length", {"min": 20, "maxx": 120})
    Traceback (most recent call last):
    ...
    ValueError: args of builtin reward 'length': args.max: required field is missing; args.maxx: unknown field; did you mean 'max'?
    """
    from trainyard.api.validation import describe_errors

    if builtin not in BUILTIN_REWARD_ARGS:
        hint = difflib.get_close_matches(builtin, BUILTIN_REWARD_ARGS, n=1)
        raise ValueError(
            f"unknown builtin reward {builtin!r}"
            + (f" (did you mean {hint[0]!r}?)" if hint else "")
            + f"; allowed: {', '.join(BUILTIN_REWARD_ARGS)}"
        )
    model = BUILTIN_REWARD_ARGS[builtin]
    try:
        return model.model_validate(args or {})
    except ValidationError as error:
        problems = describe_errors(model, error.errors(), prefix="args")
        raise ValueError(
            f"args of builtin reward {builtin!r}: "
            + "; ".join(f"{path}: {message}" for path, message in problems)
        ) from None


ISOLATION_DESCRIPTIONS = {
    "strict": "strict jail in the trainer container (needs root with CAP_SYS_ADMIN there: "
    "works with `trainyard run` as root; the operator refuses it, as its trainer pods run "
    "under the restricted Pod Security Standard: use service on a cluster)",
    "rlimits": "rlimits only, not a jail (limits, timeout and a fresh directory; the "
    "program runs as the trainer's user with its network)",
    "service": "strict jail in the sandbox service at {url} (its own pods; the trainer "
    "keeps the restricted profile; `trainyard run` starts one on this machine)",
}


def code_execution_isolation(rewards: list[Any]) -> list[tuple[str, str, str]]:
    """(reward name, isolation, what it means) of each code_execution reward among
    `rewards` (the spec's RewardSpecs); rewards whose args are invalid are left out.

    >>> from types import SimpleNamespace as Spec
    >>> stage = {"name": "t", "command": ["{python}", "{file}"]}
    >>> [i[:2] for i in code_execution_isolation([
    ...     Spec(name="tests", builtin="code_execution", args={"stages": [stage], "isolation": "service"})])]
    [('tests', 'service')]
    """
    found = []
    for reward in rewards:
        if getattr(reward, "builtin", None) != "code_execution":
            continue
        try:
            args = parse_reward_args("code_execution", reward.args)
        except ValueError:
            continue
        url = args.service_url or DEFAULT_SANDBOX_SERVICE_URL
        meaning = ISOLATION_DESCRIPTIONS[args.isolation].format(url=url)
        found.append((reward.name, args.isolation, meaning))
    return found
