"""Status has one shape: what reconcile writes is what the CRD describes, both ways.

Condition types, phases and reasons are constants (trainyard.api.training_run,
trainyard.operator.reasons); the code sets exactly the documented conditions, the CRD's
description lists exactly them, every reason is used, and every status reconcile builds
validates against the TrainingRunStatus model that generates the CRD schema.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml
from test_reconcile import NOW, World

from trainyard.api import TrainingRunStatus
from trainyard.api.training_run import RUN_CONDITION_MEANINGS, RunCondition, RunPhase
from trainyard.operator import reasons

ROOT = Path(__file__).resolve().parents[2]
OPERATOR = ROOT / "operator" / "trainyard" / "operator"


def condition_calls() -> list[ast.expr]:
    """The type argument of every condition the operator sets: `status.condition(TYPE, …)`
    in reconcile, `ConditionChange(TYPE, …)` in the policy modules."""
    return [
        node.args[0]
        for path in OPERATOR.glob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call)
        and node.args
        and (
            (isinstance(node.func, ast.Attribute) and node.func.attr == "condition")
            or (isinstance(node.func, ast.Name) and node.func.id == "ConditionChange")
        )
    ]


def test_the_operator_sets_exactly_the_documented_conditions():
    calls = condition_calls()
    literal = [ast.unparse(a) for a in calls if isinstance(a, ast.Constant)]
    assert literal == [], f"condition types spelled as strings: {literal}"
    used = {
        RunCondition[a.attr]
        for a in calls
        if isinstance(a, ast.Attribute) and ast.unparse(a.value) == "RunCondition"
    }
    assert used == set(RunCondition), (
        f"documented, never set: {set(RunCondition) - used}; set, undocumented: {used - set(RunCondition)}"
    )
    assert set(RUN_CONDITION_MEANINGS) == set(RunCondition)


def test_the_crd_describes_exactly_those_conditions():
    crd = yaml.safe_load((ROOT / "crds" / "trainyard.dev_trainingruns.yaml").read_text())
    status = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    description = status["properties"]["conditions"]["description"]
    described = set(re.findall(r"(?:^|; )([A-Z][A-Za-z]+):", description))
    assert described == {c.value for c in RunCondition}


def test_phases_are_defined_once():
    from typing import get_args

    from trainyard.api.training_run import Phase

    assert set(get_args(Phase)) == {p.value for p in RunPhase}


def test_every_reason_is_used_by_the_operator():
    names = re.findall(r"^([A-Z_]+) = ", (OPERATOR / "reasons.py").read_text(), re.M)
    code = "".join(p.read_text() for p in OPERATOR.rglob("*.py") if p.name != "reasons.py")
    assert names and [n for n in names if f"reasons.{n}" not in code] == []
    assert all(re.fullmatch(r"[A-Z][A-Za-z]+", getattr(reasons, n)) for n in names), "CamelCase"


def scenarios():
    yield "new", World()
    yield "pending", World().with_children()
    yield "running", World().with_children().with_pods("Running")
    yield "failed worker", World().with_children().with_pods("Running", exitCode=1, reason="Error")
    yield (
        "succeeded",
        World()
        .with_children()
        .with_job_status(conditions=[{"type": "Complete", "status": "True"}]),
    )
    yield "suspended", World(suspend=True).with_children()
    yield "invalid", World(method="grpo")
    yield (
        "finished, ttl due",
        World(runPolicy={"ttlSecondsAfterFinished": 1})
        .with_status(phase="Succeeded", completionTime="2026-01-01T11:00:00Z")
        .with_children(),
    )


@pytest.mark.parametrize(
    ("name", "world"), list(scenarios()), ids=lambda x: x if isinstance(x, str) else ""
)
def test_every_status_reconcile_builds_is_a_valid_training_run_status(name, world):
    plan = world.at(NOW).reconcile()
    known = {field.alias or key for key, field in TrainingRunStatus.model_fields.items()}
    assert set(plan.status) <= known, f"{name}: undocumented status keys {set(plan.status) - known}"
    TrainingRunStatus.model_validate(plan.status)
    for condition in plan.status.get("conditions") or []:
        assert condition["type"] in {c.value for c in RunCondition}
        assert re.fullmatch(r"[A-Z][A-Za-z]+", condition["reason"])


def test_the_pipeline_sets_exactly_the_documented_conditions():
    from trainyard.api.pipeline import PIPELINE_CONDITION_MEANINGS, PipelineCondition

    source = (OPERATOR / "pipeline_reconcile.py").read_text()
    used = {PipelineCondition[name] for name in re.findall(r"PipelineCondition\.([A-Z_]+)", source)}
    assert used == set(PipelineCondition) == set(PIPELINE_CONDITION_MEANINGS)
    crd = yaml.safe_load((ROOT / "crds" / "trainyard.dev_trainingpipelines.yaml").read_text())
    status = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    described = set(
        re.findall(r"(?:^|; )([A-Z][A-Za-z]+):", status["properties"]["conditions"]["description"])
    )
    assert described == {c.value for c in PipelineCondition}
