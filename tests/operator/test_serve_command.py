"""`trainyard serve MODEL` starts the command an InferenceServer's container runs."""

from __future__ import annotations

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
