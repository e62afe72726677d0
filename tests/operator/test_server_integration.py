"""The InferenceServer controller against the API emulation over HTTP, with the real operator.

Resync is 10 minutes (conftest): every step below is driven by a watch event. The test
plays the Deployment controller: it writes the Deployment's status as Kubernetes would
once the pods of a template are ready.
"""

from __future__ import annotations

from typing import Any

import pytest
from operator_fakes import DEPLOYMENTS, NAMESPACE, RUNS, SERVICES, eventually, training_run

from trainyard.api.inference import ServerCondition, ServerPhase

pytestmark = pytest.mark.timeout(120)

SERVERS = "trainyard.dev/v1alpha1/inferenceservers"
CHILD = "chat-server"


def inference_server(name: str = "chat", **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "trainyard.dev/v1alpha1",
        "kind": "InferenceServer",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {"model": {"source": "hf://Qwen/Qwen2.5-0.5B-Instruct"}, "replicas": 2},
    }
    body["spec"].update(spec)
    return body


@pytest.fixture
def servers(api):
    api.declare(SERVERS, "InferenceServer")
    return api


def status(api, name: str = "chat") -> dict[str, Any]:
    return (api.get(SERVERS, NAMESPACE, name) or {}).get("status") or {}


def condition(api, type_: str, name: str = "chat") -> dict[str, Any]:
    return next((c for c in status(api, name).get("conditions") or [] if c["type"] == type_), {})


def model_arg(api) -> str:
    deployment = api.get(DEPLOYMENTS, NAMESPACE, CHILD)
    return deployment["spec"]["template"]["spec"]["containers"][0]["args"][0]


async def roll_out(api, replicas: int = 2) -> None:
    """What the Deployment controller writes once every pod of the current template is ready."""
    deployment = api.get(DEPLOYMENTS, NAMESPACE, CHILD)
    await api.patch_object(
        DEPLOYMENTS,
        NAMESPACE,
        CHILD,
        {
            "status": {
                "observedGeneration": deployment["metadata"]["generation"],
                "replicas": replicas,
                "updatedReplicas": replicas,
                "readyReplicas": replicas,
                "availableReplicas": replicas,
            }
        },
        status=True,
    )


async def test_a_server_is_deployed_becomes_ready_rolls_to_a_new_model_and_goes(
    servers, start_operator
):
    api = servers
    async with start_operator() as metrics:
        await api.put_object(SERVERS, inference_server())
        deployment = await eventually(lambda: api.get(DEPLOYMENTS, NAMESPACE, CHILD), 20)
        # Created in one batch, concurrently: the Service may land just after the Deployment.
        await eventually(lambda: api.get(SERVICES, NAMESPACE, CHILD), 20)
        assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
        await eventually(lambda: status(api).get("phase") == ServerPhase.PROGRESSING)

        await roll_out(api)
        await eventually(lambda: status(api).get("phase") == ServerPhase.READY, 20)
        assert status(api)["model"] == "hf://Qwen/Qwen2.5-0.5B-Instruct"
        assert status(api)["url"] == f"http://{CHILD}.{NAMESPACE}.svc:8000"
        assert condition(api, ServerCondition.READY)["status"] == "True"
        gauge = metrics.inference_servers_ready.labels(NAMESPACE, "chat")
        await eventually(lambda: gauge._value.get() == 1)

        # A new model: the same Deployment gets a new template; the old model serves meanwhile.
        uid = deployment["metadata"]["uid"]
        await api.patch_object(
            SERVERS, NAMESPACE, "chat", {"spec": {"model": {"source": "hf://org/new-model"}}}
        )
        await eventually(lambda: model_arg(api) == "org/new-model", 20)
        rolled = api.get(DEPLOYMENTS, NAMESPACE, CHILD)
        assert rolled["metadata"]["uid"] == uid, "replaced in place, not deleted and created"
        assert rolled["metadata"]["generation"] == 2
        await eventually(lambda: status(api).get("phase") == ServerPhase.PROGRESSING)
        assert status(api)["model"] == "hf://Qwen/Qwen2.5-0.5B-Instruct", "old model serves"
        assert status(api)["rollout"]["model"] == "hf://org/new-model"
        assert gauge._value.get() == 0

        await roll_out(api)
        await eventually(lambda: status(api).get("model") == "hf://org/new-model", 20)
        assert status(api)["phase"] == ServerPhase.READY
        assert api.count("update", r"/deployments/") == 1

        # Deleting the server deletes its children (owner references).
        await api.delete_object(SERVERS, NAMESPACE, "chat")
        assert api.get(DEPLOYMENTS, NAMESPACE, CHILD) is None
        assert api.get(SERVICES, NAMESPACE, CHILD) is None
        await eventually(
            lambda: "chat" not in str(metrics.inference_servers_ready.collect()[0].samples)
        )


async def test_a_bad_spec_is_invalid_and_a_fix_deploys_it(servers, start_operator):
    api = servers
    async with start_operator():
        await api.put_object(SERVERS, inference_server(gpus=1, vllm={"tensorParallelSize": 4}))
        await eventually(lambda: status(api).get("phase") == ServerPhase.INVALID, 20)
        valid = condition(api, ServerCondition.VALID)
        assert valid["status"] == "False"
        assert "spec.vllm.tensorParallelSize" in valid["message"]
        assert api.get(DEPLOYMENTS, NAMESPACE, CHILD) is None
        await api.patch_object(
            SERVERS, NAMESPACE, "chat", {"spec": {"vllm": {"tensorParallelSize": 1}}}
        )
        await eventually(lambda: api.get(DEPLOYMENTS, NAMESPACE, CHILD), 20)
        await eventually(lambda: condition(api, ServerCondition.VALID).get("status") == "True")


async def test_a_run_finishing_deploys_the_server_that_waits_for_its_model(
    servers, kubelet, start_operator
):
    api = servers
    async with start_operator():
        await api.put_object(RUNS, training_run("sft"))
        await api.put_object(SERVERS, inference_server(model={"source": "run://sft"}))
        await eventually(lambda: status(api).get("phase") == ServerPhase.PENDING, 20)
        assert "TrainingRun sft has not finished" in status(api)["message"]
        assert api.get(DEPLOYMENTS, NAMESPACE, CHILD) is None

        job = await eventually(lambda: api.get("batch/v1/jobs", NAMESPACE, "sft-attempt-0"))
        await kubelet.start_pods(job)
        await kubelet.complete_job(job)
        await eventually(lambda: kubelet.status("sft").get("phase") == "Succeeded", 20)
        # The run's event enqueues the server that follows it: no resync needed.
        await eventually(lambda: api.get(DEPLOYMENTS, NAMESPACE, CHILD), 20)
        assert model_arg(api) == "s3://ckpt/demo/final"
        await roll_out(api)
        await eventually(lambda: status(api).get("phase") == ServerPhase.READY, 20)
        assert status(api)["model"] == "run://sft"


async def test_a_plan_replaces_children_whole_and_a_gone_one_is_no_error(api):
    """The update verb (Plan.updates → KubeClient.replace, a PUT) on its own."""
    from trainyard.operator import k8s
    from trainyard.operator.plan import Plan

    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": "d",
            "namespace": NAMESPACE,
            "labels": {"keep": "no"},
            "annotations": {"a": "1"},
        },
        "spec": {"replicas": 1, "template": {"spec": {"nodeSelector": {"old": "x"}}}},
    }
    created = await api.put_object(DEPLOYMENTS, dict(deployment))
    replacement = {
        **deployment,
        "metadata": {"name": "d", "namespace": NAMESPACE, "annotations": {"a": "2"}},
        "spec": {"replicas": 2, "template": {"spec": {}}},
    }
    gone = {**deployment, "metadata": {"name": "never-created", "namespace": NAMESPACE}}
    configuration = await k8s.load_configuration(str(api.url).rstrip("/"))
    async with k8s.KubeClient(configuration) as client:
        applied = await k8s.apply_plan(
            client,
            Plan(updates=(replacement, gone)),
            kind="InferenceServer",
            namespace=NAMESPACE,
            name="unused",
            resource_version=None,
        )
    assert applied.updated == 1
    now = api.get(DEPLOYMENTS, NAMESPACE, "d")
    assert now["metadata"]["uid"] == created["metadata"]["uid"]
    assert now["spec"] == replacement["spec"], "a removed map key is gone: not a merge"
    assert "labels" not in now["metadata"] and now["metadata"]["annotations"] == {"a": "2"}
    assert api.get(DEPLOYMENTS, NAMESPACE, "never-created") is None
    assert Plan(updates=(replacement,)).is_empty is False
