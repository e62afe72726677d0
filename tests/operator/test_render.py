"""`trainyard render FILE…`: the builders' manifests as YAML a person and kubectl can read."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import kubernetes_validate
import yaml

from tests.api.resources import run
from tests.operator.builder_cases import EXAMPLES, grpo
from trainyard.api import parse_resource
from trainyard.cli.main import main
from trainyard.cli.render import PLACEHOLDER_UID, render_command


def render(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = render_command(list(argv), out, err)
    return code, out.getvalue(), err.getvalue()


def write(tmp_path, name: str, *docs: dict) -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump_all(list(docs), sort_keys=False))
    return str(path)


def test_grpo_example_renders_five_valid_manifests():
    code, out, err = render(str(EXAMPLES / "grpo-run.yaml"))
    assert (code, err) == (0, "")
    manifests = list(yaml.safe_load_all(out))
    assert [(m["kind"], m["metadata"]["name"]) for m in manifests] == [
        ("ConfigMap", "sprint-stories-grpo-config-0"),
        ("Service", "sprint-stories-grpo-workers"),
        ("Service", "sprint-stories-grpo-vllm"),
        ("Deployment", "sprint-stories-grpo-vllm"),
        ("Job", "sprint-stories-grpo-attempt-0"),
    ]
    for manifest in manifests:
        kubernetes_validate.validate(manifest, kubernetes_validate.latest_version(), strict=True)
        assert manifest["metadata"]["ownerReferences"][0]["uid"] == PLACEHOLDER_UID
    # Plain YAML: no anchors/aliases, and run.json as a literal block that reads back.
    assert "&id" not in out and "*id" not in out
    assert "run.json: |" in out
    document = json.loads(manifests[0]["data"]["run.json"])
    source = yaml.safe_load((EXAMPLES / "grpo-run.yaml").read_text())
    assert parse_resource(document).spec == parse_resource(source).spec


def test_options_set_namespace_attempt_and_default_images():
    code, out, _ = render(
        str(EXAMPLES / "grpo-run.yaml"),
        "--namespace", "ml",
        "--attempt", "3",
        "--image", "registry.example/trainer:7",
        "--vllm-image", "registry.example/vllm:7",
        "--uid", "abc",
    )  # fmt: skip
    assert code == 0
    manifests = {(m["kind"], m["metadata"]["name"]): m for m in yaml.safe_load_all(out)}
    assert {m["metadata"]["namespace"] for m in manifests.values()} == {"ml"}
    job = manifests[("Job", "sprint-stories-grpo-attempt-3")]
    assert job["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.example/trainer:7"
    deployment = manifests[("Deployment", "sprint-stories-grpo-vllm")]
    assert (
        deployment["spec"]["template"]["spec"]["containers"][0]["image"]
        == "registry.example/vllm:7"
    )
    assert {m["metadata"]["ownerReferences"][0]["uid"] for m in manifests.values()} == {"abc"}


def test_other_kinds_are_skipped_with_a_note(tmp_path):
    gate = yaml.safe_load((EXAMPLES / "promotion-gate.yaml").read_text())
    path = write(tmp_path, "mixed.yaml", run("sft").doc, gate)
    code, out, err = render(path)
    assert code == 0
    assert [m["kind"] for m in yaml.safe_load_all(out)] == ["ConfigMap", "Service", "Job"]
    assert "PromotionGate" in err and "skipped" in err


def test_invalid_run_lists_its_problems_and_fails_but_renders_the_rest(tmp_path):
    bad = run("sft").set("metadata.name", "broken").set("spec.distributed.nodes", 0).doc
    path = write(tmp_path, "runs.yaml", bad, run("dpo").doc)
    code, out, err = render(path)
    assert code == 1
    assert "broken" in err and "spec.distributed.nodes:" in err
    assert {m["metadata"]["name"] for m in yaml.safe_load_all(out)} == {
        "dpo-run-config-0",
        "dpo-run-workers",
        "dpo-run-attempt-0",
    }


def test_unrenderable_run_names_the_field(tmp_path):
    path = write(
        tmp_path,
        "builtin.yaml",
        grpo("server").set("spec.model.source", "builtin://tiny-qwen2").doc,
    )
    code, out, err = render(path)
    assert (code, out) == (1, "")
    assert "cannot be rendered" in err and "spec.model.source: " in err


def test_unreadable_file_fails(tmp_path):
    code, out, err = render(str(tmp_path / "missing.yaml"))
    assert (code, out) == (1, "")
    assert "missing.yaml" in err


def test_trainyard_cli_dispatches_render(capsys):
    assert main(["render", str(EXAMPLES / "quickstart.yaml")]) == 0
    kinds = [m["kind"] for m in yaml.safe_load_all(capsys.readouterr().out)]
    assert kinds == ["ConfigMap", "Service", "Job"]


def test_trainyard_render_output_pipes_into_kubernetes_validate(tmp_path):
    """The installed command's output, checked by kubernetes-validate's own CLI."""
    rendered = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainyard.cli.main",
            "render",
            str(EXAMPLES / "grpo-cot-lora-zero2.yaml"),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    manifest_file = tmp_path / "out.yaml"
    manifest_file.write_text(rendered.stdout)
    checked = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", str(manifest_file)],
        capture_output=True,
        text=True,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.count("passed") == 5
