"""Every example is accepted by the models, by the CRD schema and by `trainyard validate`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.api.schemas import EXAMPLES_DIR, schema_errors
from trainyard.api import parse_resource
from trainyard.cli.main import main

EXAMPLES = sorted(EXAMPLES_DIR.glob("*.yaml"))
DOCUMENTS = [
    pytest.param(doc, id=f"{path.stem}#{i}" if i else path.stem)
    for path in EXAMPLES
    for i, doc in enumerate(d for d in yaml.safe_load_all(path.read_text()) if d is not None)
]

# The canonical example of issue 2, copied verbatim: examples/grpo-run.yaml must say
# exactly this (comments and layout aside).
CANONICAL_GRPO_RUN = """
apiVersion: trainyard.dev/v1alpha1
kind: TrainingRun
metadata:
  name: sprint-stories-grpo
spec:
  method: grpo
  model:
    source: hf://Qwen/Qwen2.5-0.5B-Instruct
  dataset:
    source: s3://datasets/sprint-goals/train.jsonl
    promptField: sprint_goal
  peft:
    type: lora
    r: 16
    alpha: 32
    targetModules: [q_proj, k_proj, v_proj, o_proj]
  training:
    learningRate: 1.0e-6
    epochs: 10
    perDeviceBatchSize: 16
    gradientAccumulationSteps: 8
    precision: bf16
  grpo:
    numGenerations: 8
    maxCompletionLength: 512
    beta: 0.04
    stripThinking: true
    rewards:
      - name: story-format
        builtin: regex
        weight: 0.15
        args:
          pattern: '^As an? .+, I want .+ so that .+'
      - name: coverage
        builtin: reference_similarity
        weight: 0.30
        args:
          referenceField: formatted_issues
          separator: '|||||'
      - name: length
        builtin: length
        weight: 0.10
        args: {min: 20, max: 120}
  rollout:
    vllm:
      mode: server
      tensorParallelSize: 1
      dataParallelSize: 2
      gpuMemoryUtilization: 0.9
  distributed:
    nodes: 1
    gpusPerNode: 2
    deepspeed:
      zeroStage: 2
  checkpoint:
    uri: s3://checkpoints/sprint-stories-grpo
    everySteps: 50
    keepLast: 3
  storage:
    s3:
      endpoint: http://minio.storage.svc:9000
      credentialsSecret: s3-credentials
"""


def test_there_are_examples_for_every_kind():
    kinds = {param.values[0]["kind"] for param in DOCUMENTS}
    assert kinds == {"TrainingRun", "PromotionGate", "TrainingPipeline", "InferenceServer"}


@pytest.mark.parametrize("document", DOCUMENTS)
def test_example_parses_through_the_models(document):
    resource = parse_resource(document)
    assert resource.metadata.name == document["metadata"]["name"]


@pytest.mark.parametrize("document", DOCUMENTS)
def test_example_passes_its_crd_schema(document):
    assert schema_errors(document["kind"], document) == []


@pytest.mark.parametrize("document", DOCUMENTS)
def test_model_defaults_pass_the_crd_schema(document):
    """What the operator writes back (the parsed spec with defaults) is still valid."""
    dumped = parse_resource(document).to_yaml_dict()
    assert schema_errors(document["kind"], dumped) == []


def test_canonical_example_is_the_issue_text():
    on_disk = yaml.safe_load((EXAMPLES_DIR / "grpo-run.yaml").read_text())
    assert on_disk == yaml.safe_load(CANONICAL_GRPO_RUN)


def test_canonical_example_keeps_every_value_it_sets():
    """Nothing in the canonical example is dropped or coerced on the way into the model."""
    canonical = yaml.safe_load(CANONICAL_GRPO_RUN)
    dumped = parse_resource(canonical).to_yaml_dict()
    assert _subset_mismatches(canonical, dumped) == []


def _subset_mismatches(wanted, got, path="") -> list[str]:
    if isinstance(wanted, dict):
        if not isinstance(got, dict):
            return [f"{path}: {got!r} is not a mapping"]
        return [
            m
            for key, value in wanted.items()
            for m in (
                _subset_mismatches(value, got[key], f"{path}.{key}")
                if key in got
                else [f"{path}.{key}: missing"]
            )
        ]
    if isinstance(wanted, list):
        if not isinstance(got, list) or len(got) != len(wanted):
            return [f"{path}: {got!r} != {wanted!r}"]
        return [
            m
            for i, (w, g) in enumerate(zip(wanted, got, strict=True))
            for m in _subset_mismatches(w, g, f"{path}[{i}]")
        ]
    # 10 and 10.0 are the same number to the API server; True and 1 are not.
    same = wanted == got and isinstance(wanted, bool) == isinstance(got, bool)
    return [] if same else [f"{path}: {got!r} != {wanted!r}"]


def test_validate_command_accepts_every_example(capsys):
    assert main(["validate", *map(str, EXAMPLES)]) == 0
    # Indented lines are notes under a document's "ok" (a code reward's isolation).
    lines = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("  ")]
    assert len(lines) == len(DOCUMENTS)
    assert all(line.endswith(": ok") for line in lines)


def test_trainyard_entrypoint_validates_the_examples():
    """The installed console script, as a user runs it, from outside the repository."""
    result = subprocess.run(
        ["trainyard", "validate", "--quiet", *map(str, EXAMPLES)],
        capture_output=True,
        text=True,
        cwd=Path(sys.prefix),
        timeout=120,
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
