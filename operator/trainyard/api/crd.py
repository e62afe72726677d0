"""CustomResourceDefinitions generated from the API models (one source of truth).

pydantic's JSON Schema is turned into a structural OpenAPI v3 schema: references
inlined, `anyOf [X, null]` collapsed to X, titles dropped, `const` as a one-value enum,
exclusive bounds in OpenAPI v3.0 form, free-form maps marked
`x-kubernetes-preserve-unknown-fields`. The cross-field rules of `trainyard.api.rules`
become `x-kubernetes-validations` (CEL) wherever a TrainingRunSpec appears, next to the transition rule that freezes what
a running TrainingRun trains.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from trainyard.api.base import GROUP, VERSION
from trainyard.api.gate import PromotionGate
from trainyard.api.inference import InferenceServer
from trainyard.api.pipeline import TrainingPipeline
from trainyard.api.training_run import TrainingRun

# Fields a TrainingRun may not change once it has started: a changed method, model,
# data set or topology would silently mix two trainings in one checkpoint line.
IMMUTABLE_WHILE_RUNNING = ("method", "model", "dataset", "peft", "distributed")


@dataclass(frozen=True)
class Kind:
    """How one resource kind is served."""

    model: type[BaseModel]
    plural: str
    short_names: tuple[str, ...]
    columns: tuple[tuple[str, str, str], ...]  # (name, type, jsonPath)
    categories: tuple[str, ...] = ("trainyard", "all")


KIND_TABLE: tuple[Kind, ...] = (
    Kind(
        TrainingRun,
        "trainingruns",
        ("tr", "trun"),
        (
            ("Phase", "string", ".status.phase"),
            ("Method", "string", ".spec.method"),
            ("Step", "integer", ".status.progress.step"),
            ("Total", "integer", ".status.progress.totalSteps"),
            ("Loss", "number", ".status.progress.loss"),
            ("Reward", "number", ".status.progress.rewardMean"),
            ("Restarts", "integer", ".status.restarts"),
            ("Age", "date", ".metadata.creationTimestamp"),
        ),
    ),
    Kind(
        PromotionGate,
        "promotiongates",
        ("pg", "gate"),
        (
            ("Verdict", "string", ".status.verdict"),
            ("Run", "string", ".spec.run"),
            ("Age", "date", ".metadata.creationTimestamp"),
        ),
    ),
    Kind(
        TrainingPipeline,
        "trainingpipelines",
        ("tp", "pipeline"),
        (
            ("Phase", "string", ".status.phase"),
            ("Stage", "string", ".status.currentStage"),
            ("Age", "date", ".metadata.creationTimestamp"),
        ),
    ),
    Kind(
        InferenceServer,
        "inferenceservers",
        ("isvc", "infer"),
        (
            ("Phase", "string", ".status.phase"),
            ("Ready", "boolean", ".status.ready"),
            ("Replicas", "integer", ".status.readyReplicas"),
            ("Model", "string", ".status.model"),
            ("URL", "string", ".status.url"),
            ("Age", "date", ".metadata.creationTimestamp"),
        ),
    ),
)


def render_crds() -> list[dict[str, Any]]:
    """Every CRD, in a stable order."""
    return [render_crd(kind) for kind in KIND_TABLE]


def render_crd(kind: Kind) -> dict[str, Any]:
    """The apiextensions.k8s.io/v1 CRD for one kind."""
    name = kind.model.model_fields["kind"].default
    schema = openapi_schema(kind.model)
    properties = schema["properties"]
    # metadata is the API server's: only its type belongs in a CRD schema.
    properties["metadata"] = {"type": "object"}
    properties["apiVersion"] = {
        "type": "string",
        "description": properties["apiVersion"]["description"],
    }
    properties["kind"] = {"type": "string", "description": properties["kind"]["description"]}
    schema["required"] = ["spec"]
    # The operator's own bookkeeping (kopf) and fields added by newer operators survive
    # in status; everything users write in spec is checked.
    properties["status"]["x-kubernetes-preserve-unknown-fields"] = True
    # The status models allow extra fields (`additionalProperties: true`), but a
    # structural schema forbids additionalProperties beside properties; preserving
    # unknown fields is how a CRD says the same thing.
    properties["status"].pop("additionalProperties", None)
    if kind.model is TrainingRun:
        _add_training_run_rules(schema)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{kind.plural}.{GROUP}",
            "labels": {"app.kubernetes.io/part-of": "trainyard"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": name,
                "listKind": f"{name}List",
                "plural": kind.plural,
                "singular": name.lower(),
                "shortNames": list(kind.short_names),
                "categories": list(kind.categories),
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        {"name": n, "type": t, "jsonPath": p} for n, t, p in kind.columns
                    ],
                    "schema": {"openAPIV3Schema": schema},
                }
            ],
        },
    }


def _add_training_run_rules(schema: dict[str, Any]) -> None:
    frozen = " && ".join(
        f"has(self.spec.{f}) == has(oldSelf.spec.{f}) && "
        f"(!has(self.spec.{f}) || self.spec.{f} == oldSelf.spec.{f})"
        for f in IMMUTABLE_WHILE_RUNNING
    )
    schema["x-kubernetes-validations"] = [
        {
            "rule": (
                "!has(oldSelf.status) || !has(oldSelf.status.phase) || "
                f"oldSelf.status.phase == 'Pending' || oldSelf.status.phase == 'Invalid' || ({frozen})"
            ),
            "message": (
                "method, model, dataset, peft and distributed cannot change once a run has "
                "started; create a new TrainingRun"
            ),
        }
    ]


def openapi_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of a model, as a CRD wants it."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    definitions = raw.pop("$defs", {})
    return _structural(raw, definitions)


def _structural(node: Any, definitions: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_structural(item, definitions) for item in node]
    if not isinstance(node, dict):
        return node
    node = copy.deepcopy(node)
    if "$ref" in node:
        target = definitions[node.pop("$ref").rsplit("/", 1)[-1]]
        merged = {**copy.deepcopy(target), **node}  # the field's own description wins
        return _structural(merged, definitions)
    if "anyOf" in node:
        branches = [b for b in node.pop("anyOf") if b.get("type") != "null"]
        if node.get("default", ...) is None:
            node.pop("default")
        if len(branches) == 1:
            return _structural({**branches[0], **node}, definitions)
        if all(b.get("type") in ("integer", "string") for b in branches):
            node["x-kubernetes-int-or-string"] = True
            return _structural(node, definitions)
        raise ValueError(f"no structural form for a union of {branches}")
    node.pop("title", None)
    node.pop("additionalProperties", None) if node.get("additionalProperties") is False else None
    if "const" in node:
        node["enum"] = [node.pop("const")]
        node.setdefault("type", "string")
    for bound, plain in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(node.get(bound), int | float) and not isinstance(node.get(bound), bool):
            node[plain] = node[bound]
            node[bound] = True
    if node.get("x-kubernetes-int-or-string"):
        node.pop("type", None)
    if node.get("x-kubernetes-preserve-unknown-fields"):
        node.pop("additionalProperties", None)
    if (
        node.get("type") == "object"
        and not node.get("properties")
        and "additionalProperties" not in node
    ):
        node["x-kubernetes-preserve-unknown-fields"] = True
    if "enum" in node and node.get("default") is not None and node["default"] not in node["enum"]:
        raise ValueError(f"default {node['default']!r} not in enum {node['enum']}")
    for key in ("properties",):
        if key in node:
            node[key] = {k: _structural(v, definitions) for k, v in node[key].items()}
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            node[key] = _structural(node[key], definitions)
    return node
