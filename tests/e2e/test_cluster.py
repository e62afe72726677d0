"""The operator against a real cluster (kind, k3d…): the integration scenarios with the real
Job controller, kubelet and garbage collector.

    TRAINYARD_E2E_KUBECONFIG=~/.kube/kind.yaml python -m pytest tests/e2e -q

Each test gets its own namespace (deleted afterwards); the TrainingRun CRD is applied
from crds/. Pods cannot train here (no GPUs, and `torchrun` is not in the image used),
which is what the failure scenarios rely on: a worker that cannot start fails for real.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

KUBECONFIG = os.environ.get("TRAINYARD_E2E_KUBECONFIG")
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(900),
    pytest.mark.skipif(
        not KUBECONFIG,
        reason="no cluster: set TRAINYARD_E2E_KUBECONFIG to a kind/k3d kubeconfig to run the real-cluster suite",
    ),
]
ROOT = Path(__file__).resolve().parents[2]
RUNS = "/apis/trainyard.dev/v1alpha1/namespaces/{ns}/trainingruns"
FAILING_IMAGE = "busybox:1.36"  # has no torchrun: the trainer container fails at start


def training_run(name: str, namespace: str, **spec: Any) -> dict[str, Any]:
    body = {
        "apiVersion": "trainyard.dev/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "method": "sft",
            "model": {"source": "hf://sshleifer/tiny-gpt2"},
            "dataset": {"source": "s3://data/train.jsonl"},
            "distributed": {"nodes": 1, "gpusPerNode": 0},
            "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}, "shmSize": "16Mi"},
            "image": FAILING_IMAGE,
        },
    }
    body["spec"].update(spec)
    return body


async def eventually(check, timeout: float = 120.0, interval: float = 0.5) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    last = None
    while asyncio.get_running_loop().time() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"not reached in {timeout}s; last value: {last!r}")


CRDS = (
    *sorted((ROOT / "crds").glob("trainyard.dev_*.yaml")),
    ROOT / "charts" / "trainyard" / "crds" / "zalando.org_kopfpeerings.yaml",
)
PIPELINES = "/apis/trainyard.dev/v1alpha1/namespaces/{ns}/trainingpipelines"
SERVERS = "/apis/trainyard.dev/v1alpha1/namespaces/{ns}/inferenceservers"


@pytest.fixture
async def client() -> AsyncIterator[Any]:
    from trainyard.operator.k8s import KubeClient, load_configuration

    os.environ["KUBECONFIG"] = os.path.expanduser(KUBECONFIG or "")
    async with KubeClient(await load_configuration()) as api:
        for path in CRDS:
            await api.request(
                "create",
                "POST",
                "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
                json=yaml.safe_load(path.read_text()),
                accept=(409,),
            )
        await eventually(lambda: _served(api), timeout=60)
        yield api


async def _served(api: Any) -> bool:
    status, body = await api.request(
        "get", "GET", "/apis/trainyard.dev/v1alpha1", accept=(404, 503)
    )
    served = {r["kind"] for r in (body or {}).get("resources") or []} if status == 200 else set()
    return {"TrainingRun", "PromotionGate", "TrainingPipeline", "InferenceServer"} <= served


@pytest.fixture
async def namespace(client: Any) -> AsyncIterator[str]:
    name = f"trainyard-e2e-{uuid.uuid4().hex[:6]}"
    await client.request(
        "create",
        "POST",
        "/api/v1/namespaces",
        json={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}},
    )
    yield name
    await client.request("delete", "DELETE", f"/api/v1/namespaces/{name}", accept=(404,))


def operator(namespace: str, **settings: Any) -> Any:
    """The operator in its own thread and loop, resync at 10 minutes: only events drive it.
    `async with operator(ns) as metrics:` gives its OperatorMetrics."""
    import sys

    sys.path.insert(0, str(ROOT / "tests" / "operator"))
    from operator_fakes import OperatorThread

    from trainyard.operator.settings import OperatorConfig

    config = OperatorConfig(
        namespaces=[namespace],
        standalone=True,
        resync_seconds=600.0,
        progress_seconds=2.0,
        metrics_port=None,
        **settings,
    )
    return OperatorThread(config)


async def status_of(client: Any, namespace: str, name: str) -> dict[str, Any]:
    body = await client.get("TrainingRun", namespace, name)
    return (body or {}).get("status") or {}


def condition(status: dict[str, Any], type_: str) -> dict[str, Any] | None:
    return next((c for c in status.get("conditions") or [] if c["type"] == type_), None)


async def children(client: Any, namespace: str, run: str) -> list[tuple[str, str]]:
    found = []
    for kind in ("ConfigMap", "Service", "Job"):
        found += [
            (kind, o["metadata"]["name"])
            for o in await client.list(kind, namespace, f"trainyard.dev/run={run}")
        ]
    return sorted(found)


async def test_run_gets_its_children_and_a_true_status(client, namespace):
    async with operator(namespace):
        await client.request(
            "create", "POST", RUNS.format(ns=namespace), json=training_run("hello", namespace)
        )
        expected = [
            ("ConfigMap", "hello-config-0"),
            ("Job", "hello-attempt-0"),
            ("Service", "hello-workers"),
        ]
        assert await eventually(lambda: _equals(children(client, namespace, "hello"), expected))
        status = await eventually(lambda: status_of(client, namespace, "hello"))
        assert condition(status, "Valid")["status"] == "True"
        job = (await client.list("Job", namespace, "trainyard.dev/run=hello"))[0]
        assert job["metadata"]["ownerReferences"][0]["kind"] == "TrainingRun"


async def test_failing_workers_use_up_the_budget_and_fail_the_run(client, namespace):
    async with operator(namespace):
        await client.request(
            "create",
            "POST",
            RUNS.format(ns=namespace),
            json=training_run("doomed", namespace, runPolicy={"maxRestarts": 1}),
        )
        status = await eventually(
            lambda: _phase(client, namespace, "doomed", "Failed"), timeout=600
        )
        assert status["restarts"] == 1 and status["restartAttempt"] == 1
        assert condition(status, "Failed")["reason"] == "RestartBudgetExhausted"
        await eventually(lambda: _equals(_jobs(client, namespace, "doomed"), []))


async def test_suspend_and_resume(client, namespace):
    async with operator(namespace):
        await client.request(
            "create",
            "POST",
            RUNS.format(ns=namespace),
            json=training_run("pausable", namespace, runPolicy={"maxRestarts": 50}),
        )
        await eventually(lambda: _jobs(client, namespace, "pausable"))
        path = RUNS.format(ns=namespace) + "/pausable"
        await client.request(
            "patch",
            "PATCH",
            path,
            json={"spec": {"suspend": True}},
            content_type="application/merge-patch+json",
        )
        await eventually(lambda: _phase(client, namespace, "pausable", "Suspended"))
        await eventually(lambda: _equals(_jobs(client, namespace, "pausable"), []))
        await client.request(
            "patch",
            "PATCH",
            path,
            json={"spec": {"suspend": False}},
            content_type="application/merge-patch+json",
        )
        status = await eventually(lambda: _resumed(client, namespace, "pausable"))
        assert condition(status, "Suspended")["reason"] == "Resumed"


async def test_spec_the_crd_accepts_but_the_operator_rejects_gets_a_condition(client, namespace):
    from trainyard.api import validate_resource

    bad = training_run(
        "typo",
        namespace,
        method="grpo",
        grpo={"rewards": [{"name": "len", "builtin": "length", "args": {"minimum": 1}}]},
    )
    problems = validate_resource(bad)
    assert problems
    async with operator(namespace):
        await client.request("create", "POST", RUNS.format(ns=namespace), json=bad)
        status = await eventually(lambda: _phase(client, namespace, "typo", "Invalid"))
        assert condition(status, "Valid")["message"] == "; ".join(problems)
        assert await children(client, namespace, "typo") == []


async def test_deleting_a_run_deletes_its_children_and_a_restart_duplicates_nothing(
    client, namespace
):
    async with operator(namespace):
        await client.request(
            "create",
            "POST",
            RUNS.format(ns=namespace),
            json=training_run("once", namespace, runPolicy={"maxRestarts": 50}),
        )
        await eventually(lambda: _equals(_count(client, namespace, "once"), 3))
    async with operator(namespace):
        await asyncio.sleep(5)
        kinds = [kind for kind, _ in await children(client, namespace, "once")]
        assert kinds.count("ConfigMap") == 1 and kinds.count("Service") == 1
        await client.request("delete", "DELETE", RUNS.format(ns=namespace) + "/once")
        await eventually(lambda: _equals(children(client, namespace, "once"), []), timeout=180)


async def test_a_deleted_run_is_forgotten_and_a_burst_of_child_events_coalesces(client, namespace):
    async with operator(namespace) as metrics:
        await client.request(
            "create",
            "POST",
            RUNS.format(ns=namespace),
            json=training_run("noisy", namespace, runPolicy={"maxRestarts": 50}),
        )
        await eventually(lambda: _jobs(client, namespace, "noisy"))
        await asyncio.sleep(3)
        before = _reconciles(metrics)
        jobs = f"/apis/batch/v1/namespaces/{namespace}/jobs/noisy-attempt-0"
        for index in range(100):
            await client.request(
                "patch",
                "PATCH",
                jobs,
                json={"metadata": {"annotations": {"e2e/n": str(index)}}},
                content_type="application/merge-patch+json",
            )
        await asyncio.sleep(3)
        assert _reconciles(metrics) - before <= 40, "100 child events, far fewer reconciles"
        await client.request("delete", "DELETE", RUNS.format(ns=namespace) + "/noisy")
        await eventually(
            lambda: _true(sum(metrics.runs.labels(phase=p)._value.get() for p in PHASES) == 0)
        )


async def test_two_replicas_only_the_active_one_reconciles_and_the_standby_takes_over(
    client, namespace
):
    peering = {
        "apiVersion": "zalando.org/v1",
        "kind": "KopfPeering",
        "metadata": {"name": "trainyard", "namespace": namespace},
    }
    await client.request(
        "create", "POST", f"/apis/zalando.org/v1/namespaces/{namespace}/kopfpeerings", json=peering
    )
    standby = operator(namespace, standalone=False, priority=100, identity="e2e-standby")
    async with standby as standby_metrics:
        active = operator(namespace, standalone=False, priority=200, identity="e2e-active")
        async with active as active_metrics:
            await eventually(lambda: _true(active_metrics.leader._value.get() == 1))
            await eventually(lambda: _true(standby_metrics.leader._value.get() == 0))
            await client.request(
                "create",
                "POST",
                RUNS.format(ns=namespace),
                json=training_run("shared", namespace, runPolicy={"maxRestarts": 50}),
            )
            await eventually(lambda: _jobs(client, namespace, "shared"))
            assert _reconciles(standby_metrics) == 0, "the standby reconciled nothing"
        await eventually(lambda: _true(standby_metrics.leader._value.get() == 1), timeout=30)
        await client.request("delete", "DELETE", RUNS.format(ns=namespace) + "/shared")
        await eventually(lambda: _equals(children(client, namespace, "shared"), []), timeout=180)
        assert _reconciles(standby_metrics) > 0


async def test_a_pipeline_stops_at_a_failed_stage_and_its_deletion_collects_everything(
    client, namespace
):
    """The first stage's run fails for real (its image has no torchrun): the pipeline fails
    naming the stage, starts nothing after it, and the garbage collector takes the run
    and the run's children when the pipeline is deleted (owner references)."""
    stage_run = training_run("unused", namespace, runPolicy={"maxRestarts": 0})["spec"]
    pipeline = {
        "apiVersion": "trainyard.dev/v1alpha1",
        "kind": "TrainingPipeline",
        "metadata": {"name": "chain", "namespace": namespace},
        "spec": {
            "stages": [
                {"name": "sft", "run": stage_run, "gate": {"criteria": ["loss <= 2.0"]}},
                {"name": "dpo", "run": {**stage_run, "model": {"source": "run://previous"}}},
            ]
        },
    }
    async with operator(namespace):
        await client.request("create", "POST", PIPELINES.format(ns=namespace), json=pipeline)
        run = await eventually(lambda: client.get("TrainingRun", namespace, "chain-sft"))
        owner = run["metadata"]["ownerReferences"][0]
        assert (owner["kind"], owner["name"], owner.get("controller")) == (
            "TrainingPipeline",
            "chain",
            True,
        )
        status = await eventually(
            lambda: _pipeline_phase(client, namespace, "chain", "Failed"), timeout=600
        )
        assert status["message"].startswith("stage sft: run chain-sft failed")
        assert "trainyard.dev/retry=sft" in status["message"], "it says how to retry"
        assert await client.get("TrainingRun", namespace, "chain-dpo") is None
        await client.request("delete", "DELETE", PIPELINES.format(ns=namespace) + "/chain")
        await eventually(
            lambda: _true_async(client.get("TrainingRun", namespace, "chain-sft"), None),
            timeout=180,
        )
        await eventually(lambda: _equals(children(client, namespace, "chain-sft"), []), 180)


async def test_an_inference_server_rolls_its_deployment_in_place_and_goes_with_it(
    client, namespace
):
    """The real Deployment controller and API server: generation, a replace (PUT) of the
    template for a new model on the same Deployment, and garbage collection."""
    server = {
        "apiVersion": "trainyard.dev/v1alpha1",
        "kind": "InferenceServer",
        "metadata": {"name": "chat", "namespace": namespace},
        "spec": {
            "model": {"source": "hf://Qwen/Qwen2.5-0.5B-Instruct"},
            "replicas": 1,
            "gpus": 0,
            "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}},
        },
    }
    async with operator(namespace):
        await client.request("create", "POST", SERVERS.format(ns=namespace), json=server)
        deployment = await eventually(lambda: client.get("Deployment", namespace, "chat-server"))
        assert await client.get("Service", namespace, "chat-server") is not None
        status = await eventually(lambda: _server_status(client, namespace))
        assert status["phase"] in ("Progressing", "Ready")
        await client.request(
            "patch",
            "PATCH",
            SERVERS.format(ns=namespace) + "/chat",
            json={"spec": {"model": {"source": "hf://org/new-model"}}},
            content_type="application/merge-patch+json",
        )
        rolled = await eventually(lambda: _generation(client, namespace, "chat-server", 2))
        assert rolled["metadata"]["uid"] == deployment["metadata"]["uid"]
        assert "org/new-model" in rolled["spec"]["template"]["spec"]["containers"][0]["args"]
        await client.request("delete", "DELETE", SERVERS.format(ns=namespace) + "/chat")
        await eventually(
            lambda: _true_async(client.get("Deployment", namespace, "chat-server"), None),
            timeout=180,
        )


async def _true_async(value: Any, expected: Any) -> bool:
    return (await value) == expected


async def _pipeline_phase(
    client: Any, namespace: str, name: str, phase: str
) -> dict[str, Any] | None:
    body = await client.get("TrainingPipeline", namespace, name)
    status = (body or {}).get("status") or {}
    return status if status.get("phase") == phase else None


async def _server_status(client: Any, namespace: str) -> dict[str, Any] | None:
    body = await client.get("InferenceServer", namespace, "chat")
    return ((body or {}).get("status") or {}) or None


async def _generation(client: Any, namespace: str, name: str, at_least: int) -> Any:
    body = await client.get("Deployment", namespace, name)
    return body if body and body["metadata"].get("generation", 0) >= at_least else None


PHASES = ("Pending", "Running", "Restarting", "Suspended", "Succeeded", "Failed", "Invalid")


def _reconciles(metrics: Any) -> float:
    return sum(
        metrics.reconciles.labels(result=r)._value.get()
        for r in ("converged", "changed", "invalid", "conflict", "error")
    )


async def _true(value: bool) -> bool:
    return value


async def _equals(value: Any, expected: Any) -> bool:
    return (await value) == expected


async def _jobs(client: Any, namespace: str, run: str) -> list[str]:
    return [
        j["metadata"]["name"]
        for j in await client.list("Job", namespace, f"trainyard.dev/run={run}")
    ]


async def _count(client: Any, namespace: str, run: str) -> int:
    return len(await children(client, namespace, run))


async def _phase(client: Any, namespace: str, name: str, phase: str) -> dict[str, Any] | None:
    status = await status_of(client, namespace, name)
    return status if status.get("phase") == phase else None


async def _resumed(client: Any, namespace: str, name: str) -> dict[str, Any] | None:
    status = await status_of(client, namespace, name)
    jobs = await _jobs(client, namespace, name)
    return (
        status
        if f"{name}-attempt-1" in jobs or status.get("restartAttempt", 0) >= 1 and jobs
        else None
    )
