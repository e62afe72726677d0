"""A new user's mistakes and missing pieces end in one line saying what, why and the fix,
never a traceback.

A package that is "not installed" is hidden from a child interpreter (a None entry in
`sys.modules`, Python's own marker for a module that cannot be imported), the way a
minimal install lacks it; the code under test is unchanged.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "examples" / "quickstart.yaml"

# What a package that is not installed looks like to Python: `import` raises
# ModuleNotFoundError and `importlib.util.find_spec` returns None.
HIDE = """
import sys
for name in {hidden!r}:
    sys.modules[name] = None
"""


def python(code: str, *, hidden: set[str] = frozenset(), cwd: Path | None = None):
    """Run `code` in a fresh interpreter in which the `hidden` packages are not installed."""
    return subprocess.run(
        [sys.executable, "-c", HIDE.format(hidden=set(hidden)) + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env=dict(os.environ, COLUMNS="200"),
    )


def assert_one_line(output: str) -> None:
    assert "Traceback" not in output, output
    assert len(output.strip().splitlines()) == 1, output


@pytest.mark.parametrize("command", ["validate", "render", "run"])
def test_a_file_that_is_not_utf8_is_named_with_the_fix(tmp_path, command):
    spec = tmp_path / "latin1.yaml"
    spec.write_bytes(QUICKSTART.read_bytes().replace(b"name: quickstart", b"name: caf\xe9"))
    done = python(
        f"from trainyard.cli.main import main; sys.exit(main([{command!r}, {str(spec)!r}]))",
        cwd=tmp_path,
    )
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert_one_line(output)
    assert f"{spec}: not UTF-8 text (byte 0xe9 at offset" in output
    assert f"iconv -f latin1 -t utf-8 {spec}" in output


@pytest.mark.parametrize(
    ("argv", "hidden", "extra"),
    [
        (["operator", "--help"], {"kopf"}, "operator"),
        (["run", str(QUICKSTART)], {"torch", "trl"}, "train"),
    ],
)
def test_a_command_without_its_extra_names_the_pip_command(tmp_path, argv, hidden, extra):
    done = python(
        f"from trainyard.cli.main import main; sys.exit(main({argv!r}))",
        hidden=hidden,
        cwd=tmp_path,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert_one_line(done.stderr)
    assert f"pip install 'trainyard[{extra}]'" in done.stderr
    assert all(name in done.stderr for name in hidden)
    assert not (tmp_path / "runs").exists()  # nothing started


def test_run_help_is_the_runners_own():
    done = python("from trainyard.cli.main import main; sys.exit(main(['run', '--help']))")
    assert done.returncode == 0, done.stderr
    assert "usage: trainyard run" in done.stdout and "--set" in done.stdout


def test_deepspeed_without_deepspeed_installed_says_how_to_install_or_drop_it():
    done = python(
        """
        from trainyard.api import parse_resource
        from trainyard.workloads.methods.common import Environment, SpecError, check_environment
        import yaml
        doc = yaml.safe_load(open(QUICKSTART))
        doc["spec"]["distributed"] = {"deepspeed": {"zeroStage": 2}}
        try:
            check_environment(parse_resource(doc).spec, Environment(cuda=False))
        except SpecError as error:
            print(error)
        """.replace("QUICKSTART", repr(str(QUICKSTART))),
        hidden={"deepspeed"},
    )
    assert done.returncode == 0, done.stderr
    assert_one_line(done.stdout)
    assert done.stdout.startswith("distributed.deepspeed: DeepSpeed is not installed here")
    assert "pip install 'trainyard[deepspeed]'" in done.stdout
    assert "--set distributed.deepspeed=null" in done.stdout


def test_an_8bit_optimizer_without_bitsandbytes_says_what_to_use():
    done = python(
        """
        from trainyard.api import parse_resource
        from trainyard.workloads.methods.common import Environment, SpecError, check_environment
        import yaml
        doc = yaml.safe_load(open(QUICKSTART))
        doc["spec"]["training"]["optim"] = "paged_adamw_8bit"
        try:
            check_environment(parse_resource(doc).spec, Environment(cuda=False))
        except SpecError as error:
            print(error)
        """.replace("QUICKSTART", repr(str(QUICKSTART))),
        hidden={"bitsandbytes"},
    )
    assert done.returncode == 0, done.stderr
    assert_one_line(done.stdout)
    assert "training.optim: paged_adamw_8bit needs bitsandbytes" in done.stdout
    assert "--set training.optim=adamw_torch" in done.stdout


@pytest.mark.parametrize(
    ("data", "message"),
    [
        pytest.param(
            ("train.npy", b"\x93NUMPY"),
            "dataset.source: train.npy has an unknown suffix; allowed: .csv, .json, .jsonl, .parquet",
            id="unknown-suffix",
        ),
        pytest.param(
            ("train.jsonl", b'{"question": "2+2?", "answer": "4"}\n'),
            "dataset: format chat needs the columns messagesField='messages'; "
            "the data has ['answer', 'question']",
            id="missing-columns",
        ),
        pytest.param((None, b""), "does not exist", id="missing-file"),
    ],
)
def test_data_problems_are_found_before_the_workload_starts(tmp_path, capsys, data, message):
    from trainyard.workloads.local import run_command

    name, content = data
    path = tmp_path / (name or "absent.jsonl")
    if name:
        path.write_bytes(content)
    code = run_command(
        [
            str(QUICKSTART),
            "--output",
            str(tmp_path / "out"),
            "--set",
            f"dataset.source=file://{path}",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 1
    assert "(TrainingRun/quickstart): cannot be trained here" in printed
    assert message in printed
    assert not (tmp_path / "out" / "train.log").exists()  # the workload never started


def test_a_grpo_batch_larger_than_the_data_is_refused_up_front(tmp_path, capsys):
    from trainyard.workloads.local import run_command

    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(f'{{"prompt": "What is {i} + 1?"}}\n' for i in range(3)))
    spec = tmp_path / "grpo.yaml"
    spec.write_text(
        textwrap.dedent(
            f"""
            apiVersion: trainyard.dev/v1alpha1
            kind: TrainingRun
            metadata: {{name: small-grpo}}
            spec:
              method: grpo
              model: {{source: builtin://tiny-qwen2}}
              dataset: {{source: "file://{data}"}}
              training: {{perDeviceBatchSize: 8, maxSteps: 2}}
              grpo:
                numGenerations: 2
                rewards: [{{name: short, builtin: length, args: {{max: 20}}}}]
            """
        )
    )
    code = run_command([str(spec), "--output", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert code == 1, printed
    assert "dataset: 3 rows are fewer than the 4 prompts one generation batch takes" in printed
    assert "grpo.numGenerations 2" in printed
    assert not (tmp_path / "out" / "train.log").exists()


def test_trainyard_run_refuses_deepspeed_it_cannot_import_before_starting(tmp_path):
    out = tmp_path / "out"
    argv = ["run", str(QUICKSTART), "--output", str(out)]
    argv += ["--set", "distributed.deepspeed={zeroStage: 2}"]
    done = python(
        f"from trainyard.cli.main import main; sys.exit(main({argv!r}))",
        hidden={"deepspeed"},
        cwd=tmp_path,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert "(TrainingRun/quickstart): cannot be trained here" in done.stdout
    assert "distributed.deepspeed: DeepSpeed is not installed here" in done.stdout
    assert not (out / "train.log").exists()  # the workload never started
