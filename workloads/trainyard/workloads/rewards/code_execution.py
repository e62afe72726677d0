"""The code-execution reward: compile and test each completion in a sandbox, in parallel."""

from __future__ import annotations

import atexit
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Literal

from trainyard.api.rewards import SANDBOX_URL_ENV, sandbox_server_args
from trainyard.workloads.rewards.sandbox import (
    Isolation,
    Sandbox,
    SandboxLimits,
    SandboxUnavailable,
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
    error_pattern: str | None = None
    """Score by count: matches of this (multiline) pattern in the output are errors."""
    error_scale: float = 10.0
    """Errors at which a stage scored by count earns nothing."""


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
class StageResult:
    """What one stage did to one completion."""

    name: str
    passed: bool
    """Exited 0 within its limits."""
    score: float
    """Share of the stage's weight earned: 1 or 0, or the count-scaled credit."""
    reason: str
    errors: int | None = None
    """Errors its output reported (stages scored by count)."""


@dataclass(frozen=True)
class ProgramScore:
    """The score of one completion and what each stage did."""

    score: float
    stages: tuple[StageResult, ...]
    """Every stage that ran, in order."""

    def to_json(self) -> dict[str, Any]:
        return {"score": self.score, "stages": [asdict(stage) for stage in self.stages]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ProgramScore:
        return cls(float(data["score"]), tuple(StageResult(**s) for s in data["stages"]))


def job_to_json(job: ProgramJob) -> dict[str, Any]:
    """A job as the sandbox service protocol carries it (JSON; see sandbox_server)."""
    return asdict(job)


def job_from_json(data: dict[str, Any]) -> ProgramJob:
    """The inverse of `job_to_json`; unknown or missing fields raise TypeError/KeyError."""
    return ProgramJob(
        **{
            **data,
            "stages": tuple(
                Stage(**{**stage, "command": tuple(stage["command"])}) for stage in data["stages"]
            ),
            "limits": SandboxLimits(**data["limits"]),
            "env": tuple((str(k), str(v)) for k, v in data.get("env", ())),
        }
    )


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


def stage_credit(stage: Stage, result: Any) -> tuple[float, int | None]:
    """(share of the stage's weight earned, errors counted) for one run of `stage`.

    >>> from trainyard.workloads.rewards.sandbox import SandboxResult
    >>> ocaml = Stage("build", ("dune", "build"), error_pattern=r"^Error", error_scale=4)
    >>> stage_credit(ocaml, SandboxResult(1, "", "Error: x\\nError: y\\n", 0.1))
    (0.5, 2)
    """
    if stage.error_pattern is None:
        return (1.0 if result.passed else 0.0), None
    if result.timed_out or result.output_exceeded:
        return 0.0, None
    output = f"{result.stdout}\n{result.stderr}"
    errors = len(re.findall(stage.error_pattern, output, re.MULTILINE))
    if result.returncode != 0 and errors == 0:
        return 0.0, 0  # failed without saying why (a crash): no partial credit
    return max(0.0, 1.0 - errors / stage.error_scale), errors


def score_program(job: ProgramJob) -> ProgramScore:
    """Run the stages on one program; the score is the weight earned (a passed stage's
    weight, or its count-scaled share) over the total weight. Runs in a pool worker
    (module-level, so it pickles by name)."""
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
            credit, errors = stage_credit(stage, result)
            ran.append(StageResult(stage.name, result.passed, credit, _reason(result), errors))
            earned += stage.weight * credit
            if not result.passed and job.stop_on_failure:
                break
    return ProgramScore(earned / total if total else 0.0, tuple(ran))


# One pool per (worker count, isolation), kept for the whole run: rewards are called every
# step and starting workers each time would cost more than scoring a batch.
_pools: dict[tuple[int, Isolation], tuple[Executor, str | None]] = {}


_pools_lock = threading.Lock()  # the sandbox server scores requests from several threads


def _pool(workers: int, isolation: Isolation) -> Executor:
    with _pools_lock:
        return _pool_locked(workers, isolation)


def _pool_locked(workers: int, isolation: Isolation) -> Executor:
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


# --------------------------------------------------------------------- sandbox service
# isolation "service": jobs go as JSON over HTTP to `python -m
# trainyard.workloads.rewards.sandbox_server` (POST /v1/score), which scores them under
# its own isolation in its own pod. Without TRAINYARD_SANDBOX_URL (`trainyard run`), one
# server is started on 127.0.0.1 with the arguments the operator renders for its pods.

_local_server: tuple[subprocess.Popen, str] | None = None
_local_server_lock = threading.Lock()


def _stop_local_server() -> None:
    global _local_server
    if _local_server is not None:
        process, _ = _local_server
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        _local_server = None


def local_sandbox_server(workers: int | None = None) -> str:
    """Base URL of a sandbox server on 127.0.0.1, started once per process (stopped at
    exit); it refuses to start, and this raises with its reason, where strict isolation
    is impossible."""
    global _local_server
    with _local_server_lock:
        if _local_server is not None and _local_server[0].poll() is None:
            return _local_server[1]
        args = sandbox_server_args(host="127.0.0.1", port=0, workers=workers)
        process = subprocess.Popen(
            [sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        line = process.stdout.readline().strip()  # "listening on URL", once it is ready
        if not line.startswith("listening on "):
            process.wait()
            raise SandboxUnavailable(
                f"isolation service: no {SANDBOX_URL_ENV} here, and the sandbox server this "
                f"machine would run ({' '.join(args)}) did not start: "
                + (process.stderr.read().strip() or line or f"exit {process.returncode}")
                + f". Run as root, point {SANDBOX_URL_ENV} at a sandbox service, or for a "
                "local run of trusted code --set the reward's args.isolation=rlimits"
            )
        # Its log (stderr) goes on to ours, so nothing blocks on a full pipe.
        threading.Thread(target=_forward, args=(process.stderr,), daemon=True).start()
        _local_server = (process, line.removeprefix("listening on "))
        if not getattr(local_sandbox_server, "registered", False):
            atexit.register(_stop_local_server)
            local_sandbox_server.registered = True  # type: ignore[attr-defined]
        return _local_server[1]


def _forward(stream: Any) -> None:
    for line in stream:
        sys.stderr.write(line)


def sandbox_service_url(workers: int | None = None) -> str:
    """Where isolation-service jobs go: TRAINYARD_SANDBOX_URL (set in the trainer pod),
    else a sandbox server on this machine."""
    return os.environ.get(SANDBOX_URL_ENV) or local_sandbox_server(workers)


def _request(url: str, body: dict[str, Any] | None, timeout: float, attempts: int = 5) -> Any:
    """JSON over HTTP; a service that is (re)starting is retried with backoff, anything
    else raises SandboxUnavailable: a broken sandbox must never score as failed code."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url,
        data=data,
        headers={"Content-Type": "application/json"},
        method="GET" if body is None else "POST",
    )
    for attempt in range(attempts):
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            detail = error.read().decode(errors="replace")[:2000]
            raise SandboxUnavailable(
                f"sandbox service {url}: HTTP {error.code}: {detail}"
            ) from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
            if attempt == attempts - 1:
                raise SandboxUnavailable(
                    f"sandbox service {url} unreachable after {attempts} tries: {error}. "
                    "Is the sandbox service installed (trainyard.operator.builders.sandbox) and "
                    "does a NetworkPolicy let the trainer reach it?"
                ) from None
            time.sleep(min(2**attempt, 10))
    raise AssertionError("unreachable")


def service_health(url: str) -> dict[str, Any]:
    """The sandbox service's /healthz: its isolation, workers and PATH."""
    return _request(url.rstrip("/") + "/healthz", None, timeout=30)


def check_programs_remotely(url: str, programs: list[str], path: str | None) -> list[str]:
    """Problems the sandbox service finds with stage programs (missing on its PATH)."""
    answer = _request(
        url.rstrip("/") + "/v1/check", {"programs": programs, "path": path}, timeout=30
    )
    return list(answer["problems"])


def score_remotely(url: str, jobs: list[ProgramJob]) -> list[ProgramScore]:
    """Scores of `jobs` from the sandbox service at `url`, in order."""
    if not jobs:
        return []
    # A generous ceiling: every stage of every job timing out one after another.
    ceiling = 60 + sum(
        sum(stage.timeout_seconds or job.limits.timeout_seconds for stage in job.stages)
        for job in jobs
    )
    answer = _request(
        url.rstrip("/") + "/v1/score", {"jobs": [job_to_json(j) for j in jobs]}, timeout=ceiling
    )
    scores = [ProgramScore.from_json(item) for item in answer["scores"]]
    if len(scores) != len(jobs):
        raise SandboxUnavailable(
            f"sandbox service {url} answered {len(scores)} of {len(jobs)} jobs"
        )
    return scores


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
    isolation: Literal["strict", "rlimits", "service"] = "strict",
    service_url: str | None = None,
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
    # Under rlimits the program runs as the trainer's own user, who may run any interpreter;
    # the sandbox service picks its own ("" here).
    if isolation == "strict":
        python = sandbox_python(python_executable)
    elif isolation == "service":
        python = python_executable or ""
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
    if isolation == "service":
        results = score_remotely(service_url or sandbox_service_url(workers), jobs)
    else:
        results = score_programs(jobs, default_workers() if workers is None else workers)
    log_extra = columns.get("log_extra")
    if callable(log_extra) and results:
        # Per completion, what each stage did (TRL's completions table and completions.jsonl).
        log_extra("stages", [[asdict(stage) for stage in r.stages] for r in results])
    log_metric = columns.get("log_metric")
    if callable(log_metric) and results:
        # Which stage fails is the signal a code-RL run is read by (compiles? passes tests?).
        for stage in stage_list:
            passed = sum(1 for r in results for s in r.stages if s.name == stage.name and s.passed)
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
        error_pattern=stage.get("error_pattern"),
        error_scale=float(stage.get("error_scale", 10.0)),
    )
