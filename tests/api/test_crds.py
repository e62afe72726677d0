"""The checked-in CRDs: current, structural, valid CustomResourceDefinitions, with the columns users see."""

from __future__ import annotations

import shutil
import subprocess

import jsonschema
import kubernetes_validate
import pytest

from tests.api.schemas import CRD_DIR, REPO, load_crds, openapi_schema, to_json_schema, walk
from trainyard.api.crd import render_crds
from trainyard.cli.main import main

KINDS = ("TrainingRun", "PromotionGate", "TrainingPipeline", "InferenceServer")
NODES = {kind: list(walk(openapi_schema(crd))) for kind, crd in load_crds().items()}
# Keys a structural schema must not carry (or that pydantic's JSON Schema has and a CRD
# has no use for).
FORBIDDEN_KEYS = (
    "$ref",
    "$defs",
    "definitions",
    "anyOf",
    "oneOf",
    "allOf",
    "not",
    "title",
    "const",
    "uniqueItems",
    "patternProperties",
    "propertyNames",
    "prefixItems",
    "discriminator",
)


def test_checked_in_crds_are_what_the_models_generate(capsys):
    assert main(["crds", "--check", str(CRD_DIR)]) == 0
    assert capsys.readouterr().out == ""


def test_crds_check_through_the_console_script():
    result = subprocess.run(
        ["trainyard", "crds", "--check", "crds"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (result.returncode, result.stdout) == (0, "")


def test_a_stale_crd_fails_the_check(tmp_path, capsys):
    copy = tmp_path / "crds"
    shutil.copytree(CRD_DIR, copy)
    stale = copy / "trainyard.dev_trainingruns.yaml"
    stale.write_text(stale.read_text().replace("shortNames:\n    - tr\n", "shortNames:\n"))
    assert main(["crds", "--check", str(copy)]) == 1
    assert capsys.readouterr().out.splitlines() == [
        f"{copy}/trainyard.dev_trainingruns.yaml: stale; run `trainyard crds --output {copy}`"
    ]


def test_a_missing_crd_fails_the_check(tmp_path, capsys):
    copy = tmp_path / "crds"
    shutil.copytree(CRD_DIR, copy)
    (copy / "trainyard.dev_promotiongates.yaml").unlink()
    assert main(["crds", "--check", str(copy)]) == 1
    assert "trainyard.dev_promotiongates.yaml: stale" in capsys.readouterr().out


def test_output_then_check_round_trips(tmp_path, capsys):
    assert main(["crds", "--output", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in CRD_DIR.iterdir())
    assert main(["crds", "--check", str(tmp_path)]) == 0


def test_one_crd_per_kind():
    assert sorted(load_crds()) == sorted(KINDS)
    assert [crd["spec"]["names"]["kind"] for crd in render_crds()] == list(KINDS)


@pytest.mark.parametrize("kind", KINDS)
def test_crd_is_a_valid_custom_resource_definition(kind):
    """Checked offline against the apiextensions.k8s.io/v1 schema of Kubernetes 1.30."""
    assert kubernetes_validate.validate(load_crds()[kind], "1.30", strict=True) == "1.30"


@pytest.mark.parametrize("kind", KINDS)
def test_crd_names_group_version_and_status(kind):
    crd = load_crds()[kind]
    spec = crd["spec"]
    plural = spec["names"]["plural"]
    assert crd["metadata"]["name"] == f"{plural}.trainyard.dev"
    assert (spec["group"], spec["scope"]) == ("trainyard.dev", "Namespaced")
    assert spec["names"]["singular"] == kind.lower()
    assert spec["names"]["listKind"] == f"{kind}List"
    assert "trainyard" in spec["names"]["categories"]
    assert len(spec["names"]["shortNames"]) >= 1
    (version,) = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}


def test_short_names_are_unique_across_kinds():
    names = [n for crd in load_crds().values() for n in crd["spec"]["names"]["shortNames"]]
    assert len(names) == len(set(names))


@pytest.mark.parametrize(
    ("kind", "columns"),
    [
        ("TrainingRun", {"Phase", "Method", "Step", "Loss", "Reward", "Age"}),
        ("PromotionGate", {"Verdict"}),
        ("TrainingPipeline", {"Stage"}),
        ("InferenceServer", {"Ready", "URL"}),
    ],
)
def test_printer_columns_the_issue_asks_for(kind, columns):
    (version,) = load_crds()[kind]["spec"]["versions"]
    names = {c["name"] for c in version["additionalPrinterColumns"]}
    assert columns <= names


PRINTER_TYPES = {"integer": "integer", "number": "number", "string": "string", "boolean": "boolean"}


@pytest.mark.parametrize("kind", KINDS)
def test_printer_columns_point_at_fields_of_the_right_type(kind):
    crd = load_crds()[kind]
    (version,) = crd["spec"]["versions"]
    schema = openapi_schema(crd)
    for column in version["additionalPrinterColumns"]:
        if column["jsonPath"] == ".metadata.creationTimestamp":
            assert column["type"] == "date"
            continue
        node = schema
        for part in column["jsonPath"].split(".")[1:]:
            node = node.get("properties", {}).get(part)
            assert node is not None, f"{column['name']}: {column['jsonPath']} is not in the schema"
        assert node.get("type") == PRINTER_TYPES[column["type"]], column


def _structural_problems(path: str, node: dict) -> list[str]:
    problems = [f"{path}: has {key}" for key in FORBIDDEN_KEYS if key in node]
    if node.get("additionalProperties") is False:
        problems.append(f"{path}: additionalProperties false")
    if "properties" in node and "additionalProperties" in node:
        problems.append(f"{path}: properties beside additionalProperties")
    if node.get("x-kubernetes-int-or-string"):
        if "type" in node:
            problems.append(f"{path}: int-or-string with a type")
    elif "type" not in node and node.get("x-kubernetes-preserve-unknown-fields") is not True:
        problems.append(f"{path}: no type")
    for flag, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if flag in node and (node[flag] is not True or bound not in node):
            problems.append(f"{path}: {flag} without {bound}")
    kinds = {"string": str, "integer": int, "number": (int, float), "boolean": bool}
    if "enum" in node and not all(isinstance(v, kinds[node["type"]]) for v in node["enum"]):
        problems.append(f"{path}: enum values are not {node['type']}")
    return problems


@pytest.mark.parametrize("kind", KINDS)
def test_schema_is_structural(kind):
    problems = [p for path, node in NODES[kind] for p in _structural_problems(path, node)]
    assert problems == []


@pytest.mark.parametrize("kind", KINDS)
def test_every_field_is_described(kind):
    """`kubectl explain` shows these; metadata is the API server's and stays bare."""
    undescribed = [
        path
        for path, node in NODES[kind]
        if path != ".metadata"
        and not path.endswith(("[*]", "{*}"))
        and not node.get("description", "").strip()
    ]
    assert undescribed == []


@pytest.mark.parametrize("kind", KINDS)
def test_defaults_are_valid_for_their_field(kind):
    invalid = [
        f"{path}: {error.message}"
        for path, node in NODES[kind]
        if "default" in node
        for error in jsonschema.Draft202012Validator(to_json_schema(node)).iter_errors(
            node["default"]
        )
    ]
    assert invalid == []


def test_the_structural_check_can_fail():
    bad = {"type": "object", "properties": {"a": {}}, "additionalProperties": True, "title": "x"}
    assert _structural_problems("", bad) == [
        ": has title",
        ": properties beside additionalProperties",
    ]
    assert _structural_problems(".a", {}) == [".a: no type"]


def test_root_metadata_is_only_typed():
    for crd in load_crds().values():
        assert openapi_schema(crd)["properties"]["metadata"] == {"type": "object"}


def test_spec_is_required_and_status_keeps_operator_fields():
    for crd in load_crds().values():
        schema = openapi_schema(crd)
        assert schema["required"] == ["spec"]
        assert schema["properties"]["status"]["x-kubernetes-preserve-unknown-fields"] is True


def test_training_run_spec_blocks_are_defaulted_whole():
    """CEL rules read spec.training.* and spec.distributed.* even when left out."""
    spec = openapi_schema(load_crds()["TrainingRun"])["properties"]["spec"]
    for block in ("training", "distributed", "metrics", "runPolicy"):
        assert spec["properties"][block]["default"] == {}


def test_kubectl_explain_grpo_has_help():
    grpo = openapi_schema(load_crds()["TrainingRun"])["properties"]["spec"]["properties"]["grpo"]
    assert "GRPO" in grpo["description"] or "grpo" in grpo["description"]
    for name in ("numGenerations", "beta", "rewards", "stripThinking"):
        assert grpo["properties"][name]["description"]
