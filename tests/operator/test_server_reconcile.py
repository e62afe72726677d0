"""The InferenceServer's pure reconcile: named scenarios, observed state in, plan and status out.

`Cluster` plays the API server and the Deployment controller just enough: it applies a
plan's creates and updates to the children the next reconcile observes (with the
generation an update bumps), and reports a Deployment rolled out or not.
"""

from __future__ import annotations

import ast
import copy
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from trainyard.api.inference import (
    SERVER_CONDITION_MEANINGS,
    InferenceServerStatus,
    ServerCondition,
    ServerPhase,
    ServerReason,
)
from trainyard.operator.builders.inference import MODEL_REVISION_ANNOTATION, SPEC_HASH_ANNOTATION
from trainyard.operator.plan import Plan
from trainyard.operator.runtime import child_entry
from trainyard.operator.server_reconcile import ServerObserved, reconcile

ROOT = Path(__file__).resolve().parents[2]
NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
UID = "server-uid"


def run(name: str, phase: str | None, uid: str = "run-uid", checkpoint: str | None = None):
    body: dict[str, Any] = {
        "metadata": {"name": name, "namespace": "ml", "uid": uid},
        "spec": {"checkpoint": {"uri": checkpoint or f"s3://ckpt/runs/{name}"}},
    }
    if phase:
        body["status"] = {"phase": phase}
    return body


@dataclass
class Cluster:
    """An InferenceServer, its children and the runs it reads, as the operator observes them."""

    spec: dict[str, Any] = field(
        default_factory=lambda: {"model": {"source": "hf://Qwen/Qwen2.5-0.5B-Instruct"}}
    )
    status: dict[str, Any] | None = None
    generation: int = 1
    children: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    writes: list[str] = field(default_factory=list)

    def body(self) -> dict[str, Any]:
        body = {
            "apiVersion": "trainyard.dev/v1alpha1",
            "kind": "InferenceServer",
            "metadata": {
                "name": "chat",
                "namespace": "ml",
                "uid": UID,
                "generation": self.generation,
            },
            "spec": copy.deepcopy(self.spec),
        }
        if self.status is not None:
            body["status"] = copy.deepcopy(self.status)
        return body

    def reconcile(self) -> Plan:
        observed = ServerObserved(
            self.body(), [copy.deepcopy(c) for c in self.children.values()], self.runs, now=NOW
        )
        plan = reconcile(observed)
        self.apply(plan)
        return plan

    def apply(self, plan: Plan) -> None:
        if plan.status_patch is not None:
            self.writes.append("status")
            self.status = copy.deepcopy(plan.status)
        for manifest in plan.creates:
            self.writes.append(f"create {manifest['kind']}")
            entry = child_entry(manifest["kind"], copy.deepcopy(manifest))
            entry["metadata"]["uid"] = f"{manifest['kind']}-uid"
            entry["generation"] = 1
            entry["template"] = manifest["spec"].get("template")
            self.children[(manifest["kind"], manifest["metadata"]["name"])] = entry
        for manifest in plan.updates:
            self.writes.append(f"update {manifest['kind']}")
            key = (manifest["kind"], manifest["metadata"]["name"])
            old = self.children[key]
            entry = child_entry(manifest["kind"], copy.deepcopy(manifest))
            entry["metadata"]["uid"] = old["metadata"]["uid"]
            entry["generation"] = old["generation"] + 1
            entry["template"] = manifest["spec"].get("template")
            if "status" in old:
                entry["status"] = old["status"]  # the status still tells of the old template
            self.children[key] = entry

    def edit(self, **spec: Any) -> None:
        self.spec.update(spec)
        self.generation += 1

    @property
    def deployment(self) -> dict[str, Any]:
        return self.children[("Deployment", "chat-server")]

    def roll_out(self, available: int | None = None, *, seen: bool = True) -> None:
        """The Deployment controller: all replicas updated and available (or `available`)."""
        deployment = self.deployment
        replicas = int(self.spec.get("replicas", 1))
        count = replicas if available is None else available
        deployment["status"] = {
            "observedGeneration": deployment["generation"]
            if seen
            else deployment["generation"] - 1,
            "replicas": replicas,
            "updatedReplicas": replicas if seen else 0,
            "readyReplicas": count,
            "availableReplicas": count,
        }

    def condition(self, type_: str) -> dict[str, Any]:
        return next(c for c in self.status["conditions"] if c["type"] == type_)


# ------------------------------------------------------------------------- scenarios


def test_a_new_server_gets_its_service_and_deployment_and_progresses():
    cluster = Cluster()
    plan = cluster.reconcile()
    assert [(m["kind"], m["metadata"]["name"]) for m in plan.creates] == [
        ("Service", "chat-server"),
        ("Deployment", "chat-server"),
    ]
    assert plan.updates == ()
    assert cluster.status["phase"] == ServerPhase.PROGRESSING
    assert cluster.status["url"] == "http://chat-server.ml.svc:8000"
    assert cluster.status["servedModelName"] == "chat"
    assert cluster.condition(ServerCondition.READY)["reason"] == ServerReason.ROLLING_OUT
    assert cluster.condition(ServerCondition.VALID)["status"] == "True"
    assert "model" not in cluster.status, "nothing serves yet"


def test_a_rolled_out_deployment_makes_the_server_ready_and_then_nothing_is_written():
    cluster = Cluster(spec={"model": {"source": "hf://org/m"}, "replicas": 2})
    cluster.reconcile()
    cluster.roll_out()
    cluster.reconcile()
    assert cluster.status["phase"] == ServerPhase.READY
    assert cluster.status["ready"] is True
    assert cluster.status["readyReplicas"] == 2
    assert cluster.status["model"] == "hf://org/m"
    assert "rollout" not in cluster.status
    ready = cluster.condition(ServerCondition.READY)
    assert (ready["status"], ready["reason"]) == ("True", ServerReason.REPLICAS_AVAILABLE)
    assert cluster.reconcile().is_empty, "converged: a second reconcile writes nothing"


def test_a_model_change_replaces_the_deployment_and_the_old_model_serves_until_the_new_is_ready():
    cluster = Cluster(spec={"model": {"source": "hf://org/old"}, "replicas": 2})
    cluster.reconcile()
    cluster.roll_out()
    cluster.reconcile()
    old_hash = cluster.deployment["metadata"]["annotations"][SPEC_HASH_ANNOTATION]

    cluster.edit(model={"source": "hf://org/new"})
    plan = cluster.reconcile()
    assert plan.creates == ()
    assert [(m["kind"], m["metadata"]["name"]) for m in plan.updates] == [
        ("Deployment", "chat-server")
    ]
    assert plan.updates[0]["spec"]["template"]["spec"]["containers"][0]["args"][0] == "org/new"
    assert cluster.deployment["metadata"]["annotations"][SPEC_HASH_ANNOTATION] != old_hash
    assert cluster.status["phase"] == ServerPhase.PROGRESSING
    assert cluster.status["model"] == "hf://org/old", "the old model still serves"
    assert cluster.status["rollout"]["model"] == "hf://org/new"

    # The Deployment event of the update arrives before the Deployment controller saw the
    # new template: its status (all replicas updated and available) is the old template's.
    plan = cluster.reconcile()
    assert plan.updates == ()
    assert cluster.status["phase"] == ServerPhase.PROGRESSING
    assert cluster.status["model"] == "hf://org/old"

    cluster.roll_out(seen=False)  # the controller works on it: nothing updated yet
    cluster.deployment["status"]["observedGeneration"] = cluster.deployment["generation"]
    cluster.reconcile()
    assert cluster.status["phase"] == ServerPhase.PROGRESSING
    assert cluster.condition(ServerCondition.READY)["status"] == "True", "old replicas serve"

    cluster.roll_out()
    cluster.reconcile()
    assert cluster.status["phase"] == ServerPhase.READY
    assert cluster.status["model"] == "hf://org/new"
    assert "rollout" not in cluster.status
    assert cluster.writes.count("update Deployment") == 1
    assert cluster.writes.count("create Deployment") == 1


def test_a_changed_port_replaces_the_service_too():
    cluster = Cluster()
    cluster.reconcile()
    cluster.roll_out()
    cluster.reconcile()
    cluster.edit(port=9000)
    plan = cluster.reconcile()
    assert sorted(m["kind"] for m in plan.updates) == ["Deployment", "Service"]
    assert cluster.status["url"] == "http://chat-server.ml.svc:9000"


INVALID = [
    ("unknown field", {"model": {"source": "hf://org/m"}, "replica": 2}, "replica"),
    ("bad source scheme", {"model": {"source": "ftp://x/y"}}, "spec.model.source"),
    (
        "tensor parallel over more GPUs than a replica has",
        {"model": {"source": "hf://org/m"}, "gpus": 1, "vllm": {"tensorParallelSize": 2}},
        "spec.vllm.tensorParallelSize",
    ),
    ("builtin model", {"model": {"source": "builtin://tiny-gpt2"}}, "spec.model.source"),
    ("latest checkpoint of a run", {"model": {"source": "run://sft/latest"}}, "spec.model.source"),
]


@pytest.mark.parametrize(("spec", "field_path"), [pytest.param(s, f, id=i) for i, s, f in INVALID])
def test_a_bad_spec_is_invalid_with_the_field_and_nothing_is_touched(
    spec: dict[str, Any], field_path: str
):
    cluster = Cluster(spec=spec, runs={"sft": run("sft", "Running")})
    plan = cluster.reconcile()
    assert plan.creates == () and plan.updates == () and plan.deletes == ()
    assert cluster.status["phase"] == ServerPhase.INVALID
    valid = cluster.condition(ServerCondition.VALID)
    assert (valid["status"], valid["reason"]) == ("False", ServerReason.INVALID_SPEC)
    assert field_path in valid["message"]
    assert cluster.status["message"].startswith("fix the spec: ")


def test_a_bad_edit_leaves_the_serving_deployment_alone_and_a_fix_recovers():
    cluster = Cluster()
    cluster.reconcile()
    cluster.roll_out()
    cluster.reconcile()
    cluster.edit(gpus=1, vllm={"tensorParallelSize": 8})
    plan = cluster.reconcile()
    assert plan.updates == () and plan.deletes == ()
    assert cluster.status["phase"] == ServerPhase.INVALID
    assert cluster.status["model"] == "hf://Qwen/Qwen2.5-0.5B-Instruct"
    cluster.edit(vllm={"tensorParallelSize": 1})
    cluster.reconcile()
    assert cluster.status["phase"] == ServerPhase.READY
    assert cluster.condition(ServerCondition.VALID)["status"] == "True"


RUN_CASES = [
    ("run missing", {}, ServerPhase.PENDING, ServerReason.WAITING_FOR_MODEL, "does not exist"),
    (
        "run still training",
        {"sft": run("sft", "Running")},
        ServerPhase.PENDING,
        ServerReason.WAITING_FOR_MODEL,
        "has not finished",
    ),
    (
        "run failed",
        {"sft": run("sft", "Failed")},
        ServerPhase.FAILED,
        ServerReason.MODEL_UNAVAILABLE,
        "failed",
    ),
]


@pytest.mark.parametrize(
    ("runs", "phase", "reason", "says"), [pytest.param(*c[1:], id=c[0]) for c in RUN_CASES]
)
def test_a_run_model_waits_for_its_run(runs, phase, reason, says):
    cluster = Cluster(spec={"model": {"source": "run://sft"}}, runs=runs)
    plan = cluster.reconcile()
    assert plan.creates == ()
    assert cluster.status["phase"] == phase
    ready = cluster.condition(ServerCondition.READY)
    assert (ready["status"], ready["reason"]) == ("False", reason)
    assert says in cluster.status["message"]


def test_a_finished_run_is_served_from_its_checkpoint_and_a_rerun_rolls_the_server():
    cluster = Cluster(
        spec={"model": {"source": "run://sft"}},
        runs={"sft": run("sft", "Succeeded", uid="first", checkpoint="s3://ckpt/team/sft")},
    )
    plan = cluster.reconcile()
    deployment = next(m for m in plan.creates if m["kind"] == "Deployment")
    pod = deployment["spec"]["template"]
    assert pod["spec"]["containers"][0]["args"][0] == "s3://ckpt/team/sft/final"
    assert pod["metadata"]["annotations"][MODEL_REVISION_ANNOTATION] == "first"
    cluster.roll_out()
    cluster.reconcile()
    assert cluster.status["model"] == "run://sft"

    # The run is deleted and created again under its name: Pending, the old model serves.
    cluster.runs["sft"] = run("sft", "Running", uid="second", checkpoint="s3://ckpt/team/sft")
    plan = cluster.reconcile()
    assert plan.updates == ()
    assert cluster.status["phase"] == ServerPhase.PENDING
    assert cluster.condition(ServerCondition.READY)["status"] == "True"
    assert "still serving run://sft" in cluster.status["message"]

    cluster.runs["sft"]["status"]["phase"] = "Succeeded"
    plan = cluster.reconcile()
    (update,) = plan.updates
    assert update["spec"]["template"]["metadata"]["annotations"][MODEL_REVISION_ANNOTATION] == (
        "second"
    )


def test_a_step_checkpoint_is_served_while_its_run_still_trains():
    cluster = Cluster(
        spec={
            "model": {"source": "hf://org/base"},
            "adapters": [{"name": "lora", "source": "run://grpo/step-40"}],
        },
        runs={"grpo": run("grpo", "Running")},
    )
    plan = cluster.reconcile()
    deployment = next(m for m in plan.creates if m["kind"] == "Deployment")
    (fetch,) = deployment["spec"]["template"]["spec"]["initContainers"]
    assert "s3://ckpt/runs/grpo/step-40/" in fetch["args"][0]


def test_a_deployment_past_its_progress_deadline_fails_the_server():
    cluster = Cluster()
    cluster.reconcile()
    cluster.roll_out(available=0)
    cluster.deployment["status"]["conditions"] = [
        {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}
    ]
    cluster.reconcile()
    assert cluster.status["phase"] == ServerPhase.FAILED
    assert cluster.condition(ServerCondition.READY)["reason"] == ServerReason.NO_REPLICA_AVAILABLE


def test_scaled_to_zero_is_ready_and_says_so():
    cluster = Cluster(spec={"model": {"source": "hf://org/m"}, "replicas": 0})
    cluster.reconcile()
    cluster.roll_out()
    cluster.reconcile()
    assert cluster.status["phase"] == ServerPhase.READY
    assert cluster.status["ready"] is False
    assert cluster.condition(ServerCondition.READY)["reason"] == ServerReason.SCALED_TO_ZERO


def test_children_of_someone_else_are_not_ours():
    cluster = Cluster()
    cluster.reconcile()
    for child in cluster.children.values():
        child["metadata"]["ownerReferences"] = [{"uid": "another-owner"}]
    plan = cluster.reconcile()
    assert len(plan.creates) == 2, "ours are missing: created (the API answers AlreadyExists)"


# ------------------------------------------------------------------- status contract


def scenario_statuses() -> list[dict[str, Any]]:
    statuses = []
    for spec, runs in (
        ({"model": {"source": "hf://org/m"}}, {}),
        ({"model": {"source": "run://sft"}}, {}),
        ({"model": {"source": "run://sft"}}, {"sft": run("sft", "Failed")}),
        ({"model": {"source": "ftp://nope"}}, {}),
        ({"model": {"source": "hf://org/m"}, "replicas": 0}, {}),
    ):
        cluster = Cluster(spec=spec, runs=runs)
        cluster.reconcile()
        statuses.append(cluster.status)
        if ("Deployment", "chat-server") in cluster.children:
            cluster.roll_out()
            cluster.reconcile()
            statuses.append(cluster.status)
    return statuses


def test_every_status_validates_against_the_model_that_generates_the_crd():
    phases = set()
    for status in scenario_statuses():
        InferenceServerStatus.model_validate(status)
        phases.add(status["phase"])
    assert phases == {p.value for p in ServerPhase}


def test_the_reconcile_sets_exactly_the_documented_conditions_and_uses_every_reason():
    source = (ROOT / "operator" / "trainyard" / "operator" / "server_reconcile.py").read_text()
    calls = [
        node.args[0]
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "condition"
        and node.args
    ]
    assert all(ast.unparse(a).startswith("ServerCondition.") for a in calls)
    used = {ServerCondition[ast.unparse(a).split(".")[1]] for a in calls}
    assert used == set(ServerCondition) == set(SERVER_CONDITION_MEANINGS)
    reasons = [n for n in vars(ServerReason) if n.isupper()]
    assert [n for n in reasons if f"ServerReason.{n}" not in source] == []
    assert all(re.fullmatch(r"[A-Z][A-Za-z]+", getattr(ServerReason, n)) for n in reasons)


def test_the_crd_describes_exactly_those_conditions_and_phases():
    crd = yaml.safe_load((ROOT / "crds" / "trainyard.dev_inferenceservers.yaml").read_text())
    status = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    description = status["properties"]["conditions"]["description"]
    assert set(re.findall(r"(?:^|; )([A-Z][A-Za-z]+):", description)) == {
        c.value for c in ServerCondition
    }
    assert set(status["properties"]["phase"]["enum"]) == {p.value for p in ServerPhase}
