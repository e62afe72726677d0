"""`trainyard serve MODEL` starts the command an InferenceServer's container runs."""

from __future__ import annotations

import json
import shlex

from trainyard.api import parse_resource
from trainyard.cli.main import main
from trainyard.operator.builders.inference import render_server_deployment


def test_the_local_command_is_the_inference_servers_own(tmp_path, capsys):
    model = tmp_path / "final"
    model.mkdir()
    assert main(["serve", str(model), "--name", "assistant", "--port", "8123", "--dry-run"]) == 0
    local = shlex.split(capsys.readouterr().out)
    server = parse_resource(
        {
            "apiVersion": "trainyard.dev/v1alpha1",
            "kind": "InferenceServer",
            "metadata": {"name": "assistant", "namespace": "ml"},
            "spec": {"model": {"source": model.as_uri()}, "port": 8123},
        }
    )
    deployment = render_server_deployment(server, uid="u")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    cluster = [*container["command"], *container["args"]]
    assert local == [a if a != "0.0.0.0" else "127.0.0.1" for a in cluster]
    assert local[:3] == ["vllm", "serve", str(model)]


def test_a_model_vllm_cannot_serve_is_refused_with_the_reason(capsys):
    assert main(["serve", "builtin://tiny-qwen2", "--dry-run"]) == 1
    assert "builtin models exist only inside trainer processes" in capsys.readouterr().err


def test_without_vllm_it_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no vllm on this PATH
    assert main(["serve", str(tmp_path)]) == 1
    assert "pip install 'trainyard[vllm]'" in capsys.readouterr().err


def adapter_folder(path, *, rank: int = 4, base_model: str = "/gone/cache/base"):
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(
        json.dumps({"r": rank, "base_model_name_or_path": base_model, "peft_type": "LORA"})
    )
    return path


def test_a_promoted_adapter_is_served_by_name_on_the_model_it_was_trained_on(tmp_path, capsys):
    base = tmp_path / "base-model"
    base.mkdir()
    adapter = adapter_folder(tmp_path / "sft" / "final")
    (adapter / "trainyard-base.json").write_text(json.dumps({"source": base.as_uri()}))
    assert main(["serve", str(adapter), "--name", "assistant", "--dry-run"]) == 0
    captured = capsys.readouterr()
    argv = shlex.split(captured.out)
    assert argv[:3] == ["vllm", "serve", str(base)]
    assert argv[argv.index("--served-model-name") + 1] == "assistant-base"
    assert argv[argv.index("--lora-modules") + 1] == f"assistant={adapter}"
    assert argv[argv.index("--max-lora-rank") + 1] == "8", "vLLM's smallest rank >= 4"
    assert "is a LoRA adapter" in captured.err


def test_an_adapter_stacked_on_an_adapter_is_served_on_the_base_saved_beside_it(tmp_path, capsys):
    adapter = adapter_folder(tmp_path / "dpo" / "final", rank=16)
    (adapter / "base").mkdir()
    (adapter / "base" / "config.json").write_text("{}")
    assert main(["serve", str(adapter), "--dry-run"]) == 0
    argv = shlex.split(capsys.readouterr().out)
    assert argv[:3] == ["vllm", "serve", str(adapter / "base")]
    assert argv[argv.index("--lora-modules") + 1] == f"local={adapter}"
