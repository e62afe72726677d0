"""`trainyard run`'s spec handling: --set overrides and the rewrite for this machine (pure)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from trainyard.api import parse_resource
from trainyard.workloads.local_spec import (
    LocalOptions,
    OverrideError,
    apply_overrides,
    localize,
    parse_override,
)

REPO = Path(__file__).resolve().parents[2]
OUT = Path("/tmp/trainyard-out")
LOCAL_URI = f"file://{(OUT / 'checkpoints').resolve()}"


def example(name: str) -> dict:
    return yaml.safe_load((REPO / "examples" / name).read_text())


@pytest.mark.parametrize(
    ("text", "path", "value"),
    [
        pytest.param("training.maxSteps=5", ["spec", "training", "maxSteps"], 5, id="int"),
        pytest.param("training.learningRate=1e-4", ["spec", "training", "learningRate"], 1e-4, id="float"),
        pytest.param("peft.useDora=true", ["spec", "peft", "useDora"], True, id="bool"),
        pytest.param("peft.targetModules=[q_proj, v_proj]", ["spec", "peft", "targetModules"], ["q_proj", "v_proj"], id="list"),
        pytest.param("spec.method=dpo", ["spec", "method"], "dpo", id="explicit-spec"),
        pytest.param("metadata.name=x", ["metadata", "name"], "x", id="metadata"),
        pytest.param("grpo.rewards[1].weight=0.5", ["spec", "grpo", "rewards", 1, "weight"], 0.5, id="index"),
        pytest.param("model.source=hf://a/b=c", ["spec", "model", "source"], "hf://a/b=c", id="equals-in-value"),
        pytest.param("training.maxSteps=", ["spec", "training", "maxSteps"], "", id="empty-value"),
    ],
)  # fmt: skip
def test_parse_override(text, path, value):
    assert parse_override(text) == (path, value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("maxSteps", "expected key=value", id="no-equals"),
        pytest.param("=5", "expected key=value", id="no-key"),
        pytest.param("a..b=1", "is not a field path", id="empty-part"),
        pytest.param("[0].a=1", "is not a field path", id="starts-with-index"),
        pytest.param("a[x]=1", "is not a field path", id="non-numeric-index"),
        pytest.param("a=[1", "the value is not valid YAML", id="bad-yaml"),
    ],
)
def test_parse_override_refuses(text, message):
    with pytest.raises(OverrideError, match=message.replace("[", r"\[")):
        parse_override(text)


def test_overrides_apply_in_order_and_leave_the_input_alone():
    document = example("grpo-run.yaml")
    before = yaml.safe_dump(document)
    changed = apply_overrides(
        document,
        [
            "training.maxSteps=5",
            "grpo.rewards[0].weight=0.5",
            "training.maxSteps=7",
            "sft.packing=true",  # creates the missing mapping
        ],
    )
    assert yaml.safe_dump(document) == before
    assert changed["spec"]["training"]["maxSteps"] == 7
    assert changed["spec"]["grpo"]["rewards"][0]["weight"] == 0.5
    assert changed["spec"]["sft"] == {"packing": True}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        pytest.param("method.x=1", "spec.method is not a mapping", id="into-scalar"),
        pytest.param("grpo.rewards[7].weight=1", "spec.grpo.rewards has 3 entries; index 7", id="out-of-range"),
        pytest.param("grpo.numGenerations[0]=1", "spec.grpo.numGenerations is not a list", id="index-a-scalar"),
        pytest.param("dpo.extra[0].x=1", "spec.dpo.extra is not a list in this spec", id="missing-list"),
    ],
)  # fmt: skip
def test_overrides_that_cannot_apply(override, message):
    with pytest.raises(OverrideError, match=message.replace("[", r"\[")):
        apply_overrides(example("grpo-run.yaml"), [override])


def localized(document: dict, **options) -> tuple[dict, list[str]]:
    run = localize(parse_resource(document).to_yaml_dict(), LocalOptions(output_dir=OUT, **options))
    parse_resource(run.document)  # the result is a valid TrainingRun
    return run.document["spec"], run.notes


def test_no_checkpoint_gets_one_under_the_output_directory():
    document = example("quickstart.yaml")
    del document["spec"]["checkpoint"]
    spec, notes = localized(document)
    assert spec["checkpoint"]["uri"] == LOCAL_URI
    assert notes == [f"checkpoint.uri: {LOCAL_URI} (the spec sets no checkpoint)"]


def test_s3_checkpoints_go_local_unless_kept():
    spec, notes = localized(example("grpo-run.yaml"), metrics_port=9555)
    assert spec["checkpoint"]["uri"] == LOCAL_URI
    assert (spec["checkpoint"]["everySteps"], spec["checkpoint"]["keepLast"]) == (50, 3)
    assert any("instead of s3://checkpoints/sprint-stories-grpo" in n for n in notes)
    assert spec["metrics"]["port"] == 9555

    kept, notes = localized(example("grpo-run.yaml"), keep_storage=True)
    assert kept["checkpoint"]["uri"] == "s3://checkpoints/sprint-stories-grpo"
    assert not any(n.startswith("checkpoint.uri") for n in notes)


def test_file_checkpoints_are_kept_as_written():
    document = example("quickstart.yaml")
    document["spec"]["checkpoint"]["uri"] = "file:///data/ckpt"
    spec, notes = localized(document)
    assert spec["checkpoint"]["uri"] == "file:///data/ckpt"
    assert notes == []


@pytest.mark.parametrize(
    ("nodes", "gpus", "nproc", "changed"),
    [
        pytest.param(1, 1, 1, False, id="same"),
        pytest.param(1, 0, 1, False, id="cpu-spec-one-process"),
        pytest.param(1, 2, 2, False, id="same-two"),
        pytest.param(2, 8, 1, True, id="cluster-spec-one-process"),
        pytest.param(1, 1, 2, True, id="more-processes"),
    ],
)
def test_distribution_is_one_node_with_nproc_processes(nodes, gpus, nproc, changed):
    document = example("quickstart.yaml")
    document["spec"]["distributed"] = {"nodes": nodes, "gpusPerNode": gpus}
    spec, notes = localized(document, nproc=nproc)
    world = spec["distributed"]["nodes"] * max(spec["distributed"]["gpusPerNode"], 1)
    assert world == nproc
    assert any(n.startswith("distributed:") for n in notes) == changed


def test_without_cuda_vllm_and_quantization_are_dropped_with_notes():
    document = example("grpo-run.yaml")
    document["spec"]["model"]["quantization"] = {"bits": 4}
    spec, notes = localized(document, cuda=False)
    assert "rollout" not in spec
    assert "quantization" not in spec["model"]
    assert any(n.startswith("rollout.vllm: dropped") for n in notes)
    assert any(n.startswith("model.quantization: dropped") for n in notes)

    on_gpu, _ = localized(document, cuda=True)
    assert on_gpu["rollout"]["vllm"]["mode"] == "server"
    assert on_gpu["model"]["quantization"]["bits"] == 4


def test_nproc_that_breaks_the_generation_batch_rule_is_reported_on_reparse():
    document = example("grpo-run.yaml")
    document["spec"]["training"].update(perDeviceBatchSize=4, gradientAccumulationSteps=1)
    document["spec"]["grpo"]["numGenerations"] = 8
    document["spec"]["distributed"]["gpusPerNode"] = 2
    run = localize(parse_resource(document).to_yaml_dict(), LocalOptions(output_dir=OUT, nproc=1))
    from trainyard.api import InvalidResource

    with pytest.raises(InvalidResource, match="grpo.numGenerations"):
        parse_resource(run.document)
