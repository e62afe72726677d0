"""The code-execution reward end to end: real compilers and interpreters in the sandbox,
partial credit per stage, degenerate completions, the process pool, adversarial code."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import pytest

from trainyard.workloads.rewards import code_execution_reward, extract_code
from trainyard.workloads.rewards.sandbox import SandboxUnavailable, require_isolation

try:
    require_isolation("strict")
    ISOLATION = "strict"
except SandboxUnavailable:
    ISOLATION = "rlimits"  # the non-escape cases still hold without the jail

PYTHON_STAGES = [
    {"name": "compile", "command": ["{python}", "-m", "py_compile", "{file}"], "weight": 0.2},
    {"name": "tests", "command": ["{python}", "{file}"], "weight": 0.8},
]
TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"
CORRECT = "```python\ndef add(a, b):\n    return a + b\n```"


def score(completions, tests=TESTS, **kwargs):
    kwargs.setdefault("stages", PYTHON_STAGES)
    kwargs.setdefault("isolation", ISOLATION)
    kwargs.setdefault("workers", 0)
    kwargs.setdefault("timeout_seconds", 5)
    return code_execution_reward(
        completions, test_field="tests", tests=[tests] * len(completions), **kwargs
    )


@pytest.mark.parametrize(
    ("completion", "kwargs", "expected"),
    [
        pytest.param(CORRECT, {}, 1.0, id="passes-all"),
        pytest.param("def add(a, b):\n    return a - b", {}, 0.2, id="compiles-fails-tests"),
        pytest.param("def add(a, b) return a + b", {}, 0.0, id="syntax-error"),
        pytest.param("", {}, 0.0, id="empty"),
        pytest.param("I cannot write code today.", {}, 0.0, id="prose"),
        pytest.param(
            "Sure:\n```python\nprint('draft')\n```\nFinal:\n```python\ndef add(a, b):\n    return a + b\n```",
            {},
            1.0,
            id="last-block-wins",
        ),
        pytest.param(
            "```python\ndef add(a, b):\n    return a + b\n```\n```text\nnot code\n```",
            {"code_block_language": "python"},
            1.0,
            id="language-filter",
        ),
        pytest.param("```python\ndef add(a, b):\n    return a + b\n", {}, 1.0, id="unclosed-fence"),
        pytest.param(
            CORRECT, {"extract_code_block": False}, 0.0, id="no-extraction-fence-is-syntax-error"
        ),
        pytest.param(
            "def add(a, b):\n    return a + b\n" + "# filler\n" * 400,
            {},
            0.1,
            id="degenerate-repetitive",
        ),
        pytest.param(CORRECT, {"max_completion_chars": 20}, 0.1, id="degenerate-too-long"),
        pytest.param(
            "def add(a, b):\n    return a + b\n" + "# filler\n" * 400,
            {"degenerate_multiplier": 0.5},
            0.5,
            id="degenerate-multiplier",
        ),
    ],
)
def test_partial_credit(completion, kwargs, expected):
    assert score([completion], **kwargs) == [pytest.approx(expected)]


def test_chat_completions_are_scored_like_strings():
    assert score([[{"role": "assistant", "content": CORRECT}]]) == [1.0]


def test_test_file_beside_the_solution():
    stages = [{"name": "tests", "command": ["{python}", "{test_file}"], "weight": 1.0}]
    tests = "from solution import add\nassert add(2, 3) == 5\n"
    assert score([CORRECT], tests=tests, stages=stages, test_file_name="test_solution.py") == [1.0]


def test_stop_on_failure_false_runs_later_stages():
    stages = [
        {"name": "style", "command": ["{python}", "-c", "raise SystemExit(1)"], "weight": 1.0},
        {"name": "tests", "command": ["{python}", "{file}"], "weight": 3.0},
    ]
    assert score([CORRECT], stages=stages) == [0.0]
    assert score([CORRECT], stages=stages, stop_on_failure=False) == [0.75]


def test_stage_timeout_overrides_the_default():
    stages = [
        {"name": "compile", "command": ["{python}", "-m", "py_compile", "{file}"], "weight": 1.0},
        {
            "name": "slow",
            "command": ["{python}", "-c", "import time; time.sleep(5)"],
            "weight": 1.0,
            "timeout_seconds": 0.5,
        },
    ]
    started = time.monotonic()
    assert score([CORRECT], stages=stages) == [0.5]
    assert time.monotonic() - started < 4


@pytest.mark.skipif(shutil.which("gcc") is None, reason="no gcc")
def test_c_compile_then_run():
    stages = [
        {"name": "compile", "command": ["gcc", "-O0", "-o", "{dir}/prog", "{file}"], "weight": 0.5},
        {"name": "run", "command": ["{dir}/prog"], "weight": 0.5},
    ]
    good = '```c\n#include <stdio.h>\nint main(void) { puts("hi"); return 0; }\n```'
    crashes = "```c\nint main(void) { int *p = 0; return *p; }\n```"
    broken = "```c\nint main(void) { return }\n```"
    scores = code_execution_reward(
        [good, crashes, broken], stages=stages, file_name="main.c", isolation=ISOLATION, workers=2
    )
    assert scores == [1.0, 0.5, 0.0]


def test_pool_preserves_order():
    # Slow correct answers and fast wrong ones interleaved: completion order must not leak
    # into the result order.
    slow = "import time\ntime.sleep(0.3)\ndef add(a, b):\n    return a + b"
    fast_wrong = "def add(a, b):\n    return 0"
    batch = [slow if i % 2 == 0 else fast_wrong for i in range(10)]
    assert score(batch, workers=2) == [1.0 if i % 2 == 0 else 0.2 for i in range(10)]


def test_stage_pass_rates_are_logged():
    logged = {}
    score([CORRECT, "def add(a, b):\n    return 0", "syntax error("], log_metric=logged.__setitem__)
    assert logged == {
        "compile/pass_rate": pytest.approx(2 / 3),
        "tests/pass_rate": pytest.approx(1 / 3),
    }


def test_missing_test_column_is_a_clear_error():
    with pytest.raises(KeyError, match="no column 'tests'"):
        code_execution_reward(
            [CORRECT], stages=PYTHON_STAGES, test_field="tests", isolation="rlimits"
        )


def test_extract_code_without_fence_returns_text():
    assert extract_code("x = 1") == "x = 1"


@pytest.fixture
def trainer_port():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield server.getsockname()[1]


ADVERSARIAL = {
    "fork-bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
    "infinite-loop": "while True:\n    pass",
    "huge-output": "while True:\n    print('spam' * 4096)",
    "memory-hog": "blocks = []\nwhile True:\n    blocks.append(bytearray(50 * 2**20))",
    "network": "import socket\nsocket.create_connection(('127.0.0.1', PORT), timeout=2)",
    # World-writable first: only the read-only mounts stop that one (the uid would not).
    "write-outside": "open(WORLD, 'w').write('escaped')\nopen(OUTSIDE, 'w').write('escaped')",
    # Exits fine but leaves a setsid'd grandchild that would pass the tests later on.
    "escaped-daemon": "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(600)\n"
    "raise SystemExit(1)",
}


def sandbox_processes() -> list[int]:
    """Live processes of any sandbox uid (zombies excluded), after a short grace."""
    deadline = time.monotonic() + 2
    while True:
        found = []
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                try:
                    status = Path(f"/proc/{entry.name}/status").read_text()
                except OSError:
                    continue
                fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
                if int(fields["Uid"].split()[0]) >= 1_500_000_000 and "Z" not in fields["State"]:
                    found.append(int(entry.name))
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


@pytest.mark.skipif(ISOLATION != "strict", reason="escape cases need strict isolation")
def test_adversarial_batch_scores_compile_credit_only(trainer_port, tmp_path):
    """All adversarial programs in one pooled batch next to a correct one: each ends within
    its timeout, earns only the compile stage, and the correct answer still scores 1.0."""
    outside = tmp_path / "escaped.txt"
    world = Path(tempfile.mkdtemp(prefix="trainyard-world-"))
    world.chmod(0o777)
    programs = {
        name: code.replace("PORT", str(trainer_port))
        .replace("OUTSIDE", repr(str(outside)))
        .replace("WORLD", repr(str(world / "escaped.txt")))
        for name, code in ADVERSARIAL.items()
    }
    # Each program defines a correct add(): only the sandbox stopping it can fail the tests.
    batch = [
        f"```python\n{code}\ndef add(a, b):\n    return a + b\n```" for code in programs.values()
    ]
    batch.append(CORRECT)
    started = time.monotonic()
    scores = score(batch, workers=2, timeout_seconds=3, memory_mb=256, output_limit_bytes=8192)
    elapsed = time.monotonic() - started
    assert dict(zip([*programs, "correct"], scores, strict=True)) == {
        **dict.fromkeys(programs, 0.2),
        "correct": 1.0,
    }
    # 7 programs on 2 workers, at most ~2 timeouts each in sequence, plus start-up.
    assert elapsed < 3 * 4 + 10
    assert not outside.exists() and list(world.iterdir()) == []
    world.rmdir()
    assert sandbox_processes() == [], "no sandboxed process (daemon, bomb) outlives the batch"
    assert os.system("true") == 0, "the trainer can still start processes"


def test_home_is_not_the_working_directory():
    """Tools writing under HOME (opam, dune, pip caches) must not litter the directory
    the stages work in, which a test may list."""
    stages = [
        {
            "name": "home",
            "command": [
                "{python}",
                "-c",
                "import os, pathlib\n"
                "home = pathlib.Path(os.environ['HOME'])\n"
                "assert home.resolve() != pathlib.Path.cwd().resolve(), home\n"
                "(home / 'cache').write_text('x')\n"
                "assert 'cache' not in os.listdir('.'), os.listdir('.')\n",
            ],
        }
    ]
    assert score([CORRECT], stages=stages) == [1.0]


def test_stage_env_path_is_where_its_program_is_looked_up(tmp_path):
    """A program found only on the stage's env.PATH is accepted when the reward is bound
    and found when it runs; without that PATH it is refused by name."""
    from types import SimpleNamespace

    from trainyard.workloads.rewards import build_reward_functions

    bin_dir = tmp_path / "opt-bin"
    bin_dir.mkdir()
    tool = bin_dir / "checkcode"
    tool.write_text("#!/bin/sh\ngrep -q 'return a + b' \"$1\"\n")
    tool.chmod(0o755)
    for parent in (tmp_path, *tmp_path.parents):  # a sandbox uid must reach it
        parent.chmod(parent.stat().st_mode | 0o001)
    stages = [{"name": "check", "command": ["checkcode", "{file}"]}]

    def bind(env):
        args = {"stages": stages, "isolation": ISOLATION, "workers": 0, "env": env}
        spec = SimpleNamespace(
            name="code", builtin="code_execution", python=None, weight=1.0, args=args
        )
        return build_reward_functions([spec])[0][0]

    with pytest.raises(ValueError, match="'checkcode' not found on the sandbox PATH"):
        bind({})
    reward = bind({"PATH": f"{bin_dir}:/usr/bin:/bin"})
    assert reward(completions=[CORRECT, "def add(a, b):\n    return 0"]) == [1.0, 0.0]


@pytest.mark.parametrize(
    ("output", "exit_code", "expected"),
    [
        pytest.param("", 0, 1.0, id="clean"),
        pytest.param("Error: a\\nError: b\\n", 1, 0.6, id="two-errors"),
        pytest.param("Error: a\\n" * 9, 1, 0.0, id="past-the-scale"),
        pytest.param("Warning: w\\n", 0, 1.0, id="warnings-do-not-count"),
        pytest.param("Segmentation fault\\n", 1, 0.0, id="failed-without-errors"),
    ],
)
def test_stage_scored_by_count(output, exit_code, expected):
    """Partial credit scaled by the errors a stage reports, as the OCaml set-up scores
    its compiler: weight x max(0, 1 - errors / errorScale)."""
    program = f"import sys\nsys.stderr.write('{output}')\nsys.exit({exit_code})\n"
    stages = [
        {
            "name": "build",
            "command": ["{python}", "{file}"],
            "error_pattern": "^Error",
            "error_scale": 5,
        }
    ]
    extra = {}
    assert score([program], stages=stages, log_extra=extra.__setitem__) == [expected]
    (stage,) = extra["stages"][0]
    assert stage["score"] == pytest.approx(expected) and stage["passed"] == (exit_code == 0)
