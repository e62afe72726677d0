"""The code-execution reward: compile and test each completion in a sandbox, in parallel."""

from __future__ import annotations

import atexit
import multiprocessing
import os
import re
import shutil
import sys
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

from trainyard.workloads.rewards.sandbox import (
    Isolation,
    Sandbox,
    SandboxLimits,
    isolate_worker,
    require_isolation,
    sandbox_python,
    sandbox_root,
)
from trainyard.workloads.rewards.text import column_values, completion_texts, is_degenerate

_FENCE = re.compile(r"```[ \t]*([\w+#.-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(text: str, language: str | None = None) -> str:
    """The last fenced code block of `text` (optionally only blocks tagged `language`); the
    whole text when it has none. An unclosed fence (the model ran out of tokens) counts.

    >>> extract_code("Here:\\n```python\\nprint(1)\\n```\\nDone.")
    'print(1)\\n'
    """
    blocks = [
        body
        for tag, body in _FENCE.findall(text)
        if language is None or tag.lower() == language.lower()
    ]
    return blocks[-1] if blocks else text


@dataclass(frozen=True)
class Stage:
    """One command of the code-execution reward (picklable, for the process pool)."""

    name: str
    command: tuple[str, ...]
    weight: float = 1.0
    timeout_seconds: float | None = None


@dataclass(frozen=True)
class ProgramJob:
    """Everything one worker needs to score one completion."""

    code: str
    tests: str | None
    stages: tuple[Stage, ...]
    file_name: str
    test_file_name: str | None
    stop_on_failure: bool
    python: str
    limits: SandboxLimits
    isolation: Isolation
    env: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class ProgramScore:
    """The score of one completion and what each stage did."""

    score: float
    stages: tuple[tuple[str, bool, str], ...]
    """(stage name, passed, short reason) for every stage that ran."""


def _fill(part: str, values: dict[str, str]) -> str:
    # Only the known placeholders; other braces (Python dicts, shell) are left alone.
    return re.sub(r"\{(file|test_file|dir|python)\}", lambda m: values[m.group(1)], part)


def _reason(result: Any) -> str:
    if result.timed_out:
        return "timeout"
    if result.output_exceeded:
        return "output limit"
    if result.returncode == 0:
        return "ok"
    tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or [""]
    return f"exit {result.returncode}: {tail[0][:200]}"


def score_program(job: ProgramJob) -> ProgramScore:
    """Run the stages on one program; the score is the weight of passed stages over the
    total weight. Runs in a pool worker (module-level, so it pickles by name)."""
    total = sum(stage.weight for stage in job.stages)
    if not job.code.strip():
        return ProgramScore(0.0, ())
    earned, ran = 0.0, []
    with Sandbox(job.limits, job.isolation) as box:
        code = job.code
        if job.tests and not job.test_file_name:
            code = code.rstrip("\n") + "\n\n" + job.tests
        path = box.write(job.file_name, code)
        test_path = box.write(job.test_file_name, job.tests or "") if job.test_file_name else path
        values = {
            "file": str(path),
            "test_file": str(test_path),
            "dir": str(box.directory),
            "python": job.python,
        }
        for stage in job.stages:
            result = box.run(
                [_fill(part, values) for part in stage.command],
                timeout_seconds=stage.timeout_seconds,
                env=dict(job.env),
            )
            ran.append((stage.name, result.passed, _reason(result)))
            if result.passed:
                earned += stage.weight
            elif job.stop_on_failure:
                break
    return ProgramScore(earned / total if total else 0.0, tuple(ran))


# One pool per (worker count, isolation), kept for the whole run: rewards are called every
# step and starting workers each time would cost more than scoring a batch.
_pools: dict[tuple[int, Isolation], tuple[Executor, str | None]] = {}


def _pool(workers: int, isolation: Isolation) -> Executor:
    if (workers, isolation) not in _pools:
        # spawn: the trainer has threads (and maybe CUDA); forking it is unsafe.
        context = multiprocessing.get_context("spawn")
        if isolation == "strict":
            root = sandbox_root()
            pool = ProcessPoolExecutor(
                max_workers=workers,
                mp_context=context,
                initializer=isolate_worker,
                initargs=(root,),
            )
        else:
            root, pool = None, ProcessPoolExecutor(max_workers=workers, mp_context=context)
        _pools[workers, isolation] = (pool, root)
    return _pools[workers, isolation][0]


@atexit.register
def shutdown_pools() -> None:
    """Stop the scoring workers and remove their sandbox roots."""
    for pool, root in _pools.values():
        pool.shutdown(wait=True, cancel_futures=True)
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)
    _pools.clear()


def score_programs(jobs: list[ProgramJob], workers: int) -> list[ProgramScore]:
    """Scores of `jobs` in order: in this process when `workers` is 0, else in a pool."""
    if workers == 0 or not jobs:
        return [score_program(job) for job in jobs]
    return list(_pool(workers, jobs[0].isolation).map(score_program, jobs))


def default_workers() -> int:
    """Pool size when the spec leaves it out: the CPUs this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def code_execution_reward(
    completions: list[Any],
    *,
    stages: list[dict[str, Any]] | list[Stage],
    file_name: str = "solution.py",
    extract_code_block: bool = True,
    code_block_language: str | None = None,
    test_field: str | None = None,
    test_file_name: str | None = None,
    stop_on_failure: bool = True,
    python_executable: str | None = None,
    timeout_seconds: float = 10.0,
    cpu_seconds: int = 10,
    memory_mb: int = 1024,
    file_size_mb: int = 16,
    max_processes: int = 64,
    max_open_files: int = 64,
    output_limit_bytes: int = 65536,
    env: dict[str, str] | None = None,
    isolation: Literal["strict", "rlimits"] = "strict",
    workers: int | None = None,
    max_completion_chars: int = 20000,
    min_compression_ratio: float = 0.1,
    degenerate_multiplier: float = 0.1,
    **columns: Any,
) -> list[float]:
    """Run `stages` (e.g. compile, then tests) on each completion's code in a sandbox;
    the reward is the weight of passing stages over the total, times
    `degenerate_multiplier` for an empty, extremely repetitive or over-long completion.

    >>> stages = [
    ...     {"name": "compile", "command": ["{python}", "-m", "py_compile", "{file}"], "weight": 0.2},
    ...     {"name": "tests", "command": ["{python}", "{file}"], "weight": 0.8},
    ... ]
    >>> code_execution_reward(
    ...     ["```python\\ndef add(a, b):\\n    return a + b\\n```", "def add(a, b): return a - b"],
    ...     stages=stages, test_field="tests", tests=["assert add(2, 3) == 5"] * 2,
    ...     isolation="rlimits", workers=0)
    [1.0, 0.2]
    """
    texts = completion_texts(completions)
    tests = column_values(columns, test_field, "code_execution", len(texts)) if test_field else None
    stage_list = tuple(
        stage if isinstance(stage, Stage) else _stage_from_args(stage) for stage in stages
    )
    require_isolation(isolation)
    # Under rlimits the program runs as the trainer's own user, who may run any interpreter.
    if isolation == "strict":
        python = sandbox_python(python_executable)
    else:
        python = python_executable or sys.executable
    limits = SandboxLimits(
        timeout_seconds=timeout_seconds,
        cpu_seconds=cpu_seconds,
        memory_mb=memory_mb,
        file_size_mb=file_size_mb,
        max_processes=max_processes,
        max_open_files=max_open_files,
        output_limit_bytes=output_limit_bytes,
    )
    jobs = [
        ProgramJob(
            code=extract_code(text, code_block_language) if extract_code_block else text,
            tests=None if tests is None else str(tests[i] or ""),
            stages=stage_list,
            file_name=file_name,
            test_file_name=test_file_name,
            stop_on_failure=stop_on_failure,
            python=python,
            limits=limits,
            isolation=isolation,
            env=tuple(sorted((env or {}).items())),
        )
        for i, text in enumerate(texts)
    ]
    results = score_programs(jobs, default_workers() if workers is None else workers)
    log_metric = columns.get("log_metric")
    if callable(log_metric) and results:
        # Which stage fails is the signal a code-RL run is read by (compiles? passes tests?).
        for stage in stage_list:
            passed = sum(
                1 for r in results for name, ok, _ in r.stages if name == stage.name and ok
            )
            log_metric(f"{stage.name}/pass_rate", passed / len(results))
    scores = []
    for text, result in zip(texts, results, strict=True):
        score = result.score
        if is_degenerate(text, max_completion_chars, min_compression_ratio):
            score *= degenerate_multiplier
        scores.append(round(score, 6))
    return scores


def _stage_from_args(stage: dict[str, Any]) -> Stage:
    return Stage(
        name=stage["name"],
        command=tuple(stage["command"]),
        weight=float(stage.get("weight", 1.0)),
        timeout_seconds=stage.get("timeout_seconds"),
    )
