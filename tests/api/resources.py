"""Fluent builders for resource documents: start from a valid one, change it by dotted path.

    run("grpo").set("spec.grpo.numGenerations", 3).drop("spec.model").doc

Paths are written as in YAML (camelCase), list items as `rewards[0]`. Every builder
returns a new document, so a table of cases can share a starting point.
"""

from __future__ import annotations

import copy
import re
from typing import Any

# Criteria in their object form: the text form ('eval_loss <= 1.8') is covered by the
# examples, and these builders' documents must pass the CRD schema as they are.
EVAL_LOSS = {"metric": "eval_loss", "op": "<=", "value": 1.8}

_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def _parts(path: str) -> list[str | int]:
    return [int(index) if index else key for key, index in _PART.findall(path)]


class Doc:
    """A resource document under construction."""

    def __init__(self, doc: Any):
        self.doc = doc

    def set(self, path: str, value: Any) -> Doc:
        """The document with `path` set to `value` (missing mappings on the way are created)."""
        doc = copy.deepcopy(self.doc)
        *parents, last = _parts(path)
        node = doc
        for part in parents:
            if isinstance(part, str) and part not in node:
                node[part] = {}
            node = node[part]
        node[last] = copy.deepcopy(value)
        return Doc(doc)

    def drop(self, path: str) -> Doc:
        """The document without the field at `path`."""
        doc = copy.deepcopy(self.doc)
        *parents, last = _parts(path)
        node = doc
        for part in parents:
            node = node[part]
        del node[last]
        return Doc(doc)

    def get(self, path: str) -> Any:
        """The value at `path`."""
        node = self.doc
        for part in _parts(path):
            node = node[part]
        return node


def _resource(kind: str, name: str, spec: dict[str, Any]) -> Doc:
    return Doc(
        {
            "apiVersion": "trainyard.dev/v1alpha1",
            "kind": kind,
            "metadata": {"name": name},
            "spec": spec,
        }
    )


def run(method: str = "sft") -> Doc:
    """A small valid TrainingRun of `method` (grpo and rloo come with one reward)."""
    spec: dict[str, Any] = {
        "method": method,
        "model": {"source": "hf://Qwen/Qwen2.5-0.5B-Instruct"},
        "dataset": {"source": "s3://datasets/train.jsonl"},
    }
    if method in ("grpo", "rloo"):
        spec[method] = {
            "numGenerations": 4,
            "rewards": [{"name": "fmt", "builtin": "length", "args": {"min": 1, "max": 50}}],
        }
        spec["training"] = {"perDeviceBatchSize": 4}
    return _resource("TrainingRun", f"{method}-run", spec)


def gate() -> Doc:
    """A valid PromotionGate on a run."""
    return _resource("PromotionGate", "release", {"run": "sft-run", "criteria": [EVAL_LOSS]})


def pipeline() -> Doc:
    """A valid two-stage TrainingPipeline: sft, then dpo on the promoted model."""
    sft = run("sft").doc["spec"]
    dpo = Doc(run("dpo").doc["spec"]).set("model.source", "run://previous").doc
    return _resource(
        "TrainingPipeline",
        "assistant",
        {
            "stages": [
                {"name": "sft", "run": sft, "gate": {"criteria": [EVAL_LOSS]}},
                {"name": "dpo", "run": dpo},
            ]
        },
    )


def server() -> Doc:
    """A valid InferenceServer."""
    return _resource("InferenceServer", "chat", {"model": {"source": "run://sft-run"}})
