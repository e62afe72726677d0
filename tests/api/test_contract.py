"""The pod contract: the operator and the workload agree because both read it, and
nobody else spells its names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.api.resources import run
from trainyard.api import TrainingRun, contract, parse_resource
from trainyard.operator.builders import job, vllm
from trainyard.workloads import sources

ROOT = Path(__file__).resolve().parents[2]
# The two sides of the pod contract. (Dashboards and alerts, trainyard.observe, read the
# metric names too; they are a third reader, checked by their own tests.)
SOURCE_ROOTS = [
    ROOT / "operator" / "trainyard" / "api",
    ROOT / "operator" / "trainyard" / "operator",
    ROOT / "operator" / "trainyard" / "cli",
    ROOT / "workloads" / "trainyard",
]
CONTRACT_FILE = ROOT / "operator" / "trainyard" / "api" / "contract.py"


def _names(namespace: type) -> set[str]:
    return {v for k, v in vars(namespace).items() if k.isupper() and isinstance(v, str)}


ENV_NAMES = _names(contract.Env)
METRIC_NAMES = _names(contract.Metric)


def _training_run(doc) -> TrainingRun:
    resource = parse_resource(doc.doc)
    assert isinstance(resource, TrainingRun)
    return resource


def test_no_module_spells_a_contract_name_itself():
    """Every environment variable and metric name of the contract is written in
    contract.py only; a string literal equal to one anywhere else is a second spelling."""
    found = []
    for root in SOURCE_ROOTS:
        for path in root.rglob("*.py"):
            if path == CONTRACT_FILE:
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Constant) and node.value in ENV_NAMES | METRIC_NAMES:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    assert not found, "spelled outside trainyard.api.contract:\n" + "\n".join(found)


def test_a_contract_name_spelled_elsewhere_is_found(tmp_path):
    """The scan above would see a second spelling (the test can fail)."""
    tree = ast.parse('NAME = "TRAINYARD_RUNS_URI"\n')
    assert any(isinstance(n, ast.Constant) and n.value in ENV_NAMES for n in ast.walk(tree))


@pytest.mark.parametrize(
    "source, expected",
    [
        ("run://sft", "s3://ckpt/runs/sft/final"),
        ("run://sft/final", "s3://ckpt/runs/sft/final"),
        ("run://sft/step-40", "s3://ckpt/runs/sft/step-40"),
        ("run://sft-v2.1/step-7/", "s3://ckpt/runs/sft-v2.1/step-7"),
    ],
)
def test_operator_and_workload_resolve_run_sources_alike(source, expected, monkeypatch):
    """The vLLM server the operator renders and the trainer pod load the same checkpoint:
    the workload resolves with the environment the operator gives the pod."""
    doc = (
        run("grpo")
        .set("spec.rollout", {"vllm": {"mode": "server"}})
        .set("spec.model.source", source)
        .set("spec.checkpoint", {"uri": "s3://ckpt/runs/grpo-stage"})
    )
    training_run = _training_run(doc)
    served, options = vllm.served_model(training_run)
    assert served == expected
    assert options == ["--load-format", "runai_streamer"]

    pod_env = {
        e["name"]: e["value"]
        for e in job.worker_env(training_run, restart_attempt=0)
        if "value" in e
    }
    assert pod_env[contract.Env.RUNS_URI] == "s3://ckpt/runs"
    for name in list(ENV_NAMES):
        monkeypatch.delenv(name, raising=False)
    for name, value in pod_env.items():
        monkeypatch.setenv(name, value)
    # The pod's own checkpoint.uri plays no part once the operator set the runs root.
    assert sources.run_checkpoint_uri(source, "s3://elsewhere/x/y") == expected


def test_the_runs_root_falls_back_to_the_parent_of_checkpoint_uri(monkeypatch):
    monkeypatch.delenv(contract.Env.RUNS_URI, raising=False)
    assert sources.run_checkpoint_uri("run://a/step-3", "file:///r/b/") == "file:///r/a/step-3"
    assert contract.runs_root(None) is None


def test_latest_is_resolved_at_run_time_only():
    doc = (
        run("grpo")
        .set("spec.rollout", {"vllm": {"mode": "server"}})
        .set("spec.model.source", "run://sft/latest")
        .set("spec.checkpoint", {"uri": "s3://ckpt/runs/grpo-stage"})
    )
    with pytest.raises(ValueError, match="latest is only known at run time"):
        vllm.served_model(_training_run(doc))
    assert contract.parse_run_reference("run://sft/latest").is_latest


def test_every_variable_the_operator_sets_for_trainyard_is_in_the_contract():
    doc = (
        run("grpo")
        .set("spec.rollout", {"vllm": {"mode": "server"}})
        .set("spec.checkpoint", {"uri": "s3://ckpt/runs/grpo-stage"})
    )
    names = {e["name"] for e in job.worker_env(_training_run(doc), restart_attempt=2)}
    ours = {n for n in names if n.startswith("TRAINYARD_")}
    assert ours <= ENV_NAMES
    assert {
        contract.Env.RUN_CONFIG,
        contract.Env.TRAINER_OPTIONS,
        contract.Env.RESTART_ATTEMPT,
        contract.Env.OUTPUT_DIR,
        contract.Env.CACHE,
        contract.Env.RUNS_URI,
        contract.Env.VLLM_URL,
    } <= ours


@pytest.mark.parametrize(
    "uri, message",
    [
        ("run://Bad_Name", "expected run://RUN, run://RUN/step-N"),
        ("run://sft/step-x", "expected run://RUN, run://RUN/step-N"),
        ("ftp://x", "allowed: hf://org/name"),
        ("s3://key:secret@bucket/x", "credentials must not be written"),
    ],
)
def test_bad_uris_are_refused_the_same_way_on_both_sides(uri, message):
    with pytest.raises(contract.SourceURIError, match=message):
        (contract.parse_run_reference if uri.startswith("run://") else contract.parse_source)(uri)
    with pytest.raises(sources.SourceError, match=f"model.source: .*{message}"):
        if uri.startswith("run://"):
            sources.run_checkpoint_uri(uri, "s3://a/b", "model.source")
        else:
            sources.parse_source(uri, "model.source")
