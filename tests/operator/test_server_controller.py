"""The InferenceServer registration's own parts: which runs a server follows, its gauge."""

from __future__ import annotations

from typing import Any

import pytest

from trainyard.api.inference import ServerPhase
from trainyard.operator.observability import OperatorMetrics
from trainyard.operator.plan import Plan
from trainyard.operator.runtime import Runtime
from trainyard.operator.server_controller import (
    InferenceServers,
    referenced_runs,
    servers_of_run,
)
from trainyard.operator.settings import OperatorConfig


def body(name: str, model: str, *adapters: str, namespace: str = "ml") -> dict[str, Any]:
    return {
        "apiVersion": "trainyard.dev/v1alpha1",
        "kind": "InferenceServer",
        "metadata": {"name": name, "namespace": namespace, "uid": f"uid-{name}"},
        "spec": {
            "model": {"source": model},
            "adapters": [{"name": f"a{i}", "source": s} for i, s in enumerate(adapters)],
        },
    }


@pytest.mark.parametrize(
    ("server", "runs"),
    [
        pytest.param(body("s", "hf://org/m"), set(), id="hub model"),
        pytest.param(body("s", "run://sft"), {"sft"}, id="run model"),
        pytest.param(body("s", "run://sft/step-40"), {"sft"}, id="run checkpoint"),
        pytest.param(
            body("s", "hf://org/m", "run://dpo", "s3://b/l", "run://grpo/final"),
            {"dpo", "grpo"},
            id="run adapters",
        ),
        pytest.param({"spec": {"model": "not a mapping"}}, set(), id="malformed model"),
        pytest.param({"spec": {"model": {}, "adapters": 3}}, set(), id="malformed adapters"),
        pytest.param({"spec": None}, set(), id="no spec"),
    ],
)
def test_referenced_runs(server: dict[str, Any], runs: set[str]):
    assert referenced_runs(server) == runs


def test_a_run_event_names_the_servers_of_its_namespace_that_serve_it():
    runtime = Runtime(OperatorConfig())
    runtime.register(InferenceServers().registration())
    for server in (
        body("base", "run://sft"),
        body("lora", "hf://org/m", "run://sft/step-10"),
        body("other", "run://dpo"),
        body("elsewhere", "run://sft", namespace="team-b"),
    ):
        runtime.owner_event("InferenceServer", None, server)
    run = {"metadata": {"name": "sft", "namespace": "ml"}}
    assert sorted(servers_of_run(runtime, run)) == ["base", "lora"]


def gauge(metrics: OperatorMetrics) -> dict[tuple[str, str], float]:
    (family,) = metrics.inference_servers_ready.collect()
    return {(s.labels["namespace"], s.labels["server"]): s.value for s in family.samples}


@pytest.mark.parametrize(
    ("phase", "value"),
    [
        (ServerPhase.READY, 1),
        (ServerPhase.PROGRESSING, 0),
        (ServerPhase.PENDING, 0),
        (ServerPhase.FAILED, 0),
        (ServerPhase.INVALID, 0),
    ],
)
def test_the_ready_gauge_follows_the_phase_and_leaves_with_the_server(phase, value):
    metrics, servers = OperatorMetrics(), InferenceServers()
    server = body("chat", "hf://org/m")
    servers.recorded(metrics, server, Plan(status={"phase": phase}))
    assert gauge(metrics) == {("ml", "chat"): value}
    servers.recorded(metrics, {"metadata": {"uid": "uid-chat"}}, None)  # as the runtime forgets
    assert gauge(metrics) == {}
