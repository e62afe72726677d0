"""The InferenceServer's children, rendered from a table of named specs.

Each case is a spec (a patch over a small valid server), the `run://` resolutions the
reconcile would pass, and the fields its Deployment and Service must have, addressed by
path (`builder_cases.get`): "deployment.spec.replicas", "args.--tensor-parallel-size",
'env.AWS_ACCESS_KEY_ID.valueFrom'. Every manifest of every case (and of the example)
is checked against Kubernetes' own OpenAPI schemas.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.operator.builder_cases import ABSENT, get, options
from trainyard.api import parse_resource
from trainyard.api.inference import InferenceServer
from trainyard.operator.builders import UnrenderableRun
from trainyard.operator.builders.inference import (
    ADAPTERS_DIR,
    MODEL_REVISION_ANNOTATION,
    SPEC_HASH_ANNOTATION,
    render_server_children,
    service_url,
)

ROOT = Path(__file__).resolve().parents[2]
UID = "9a0c1b9e-2222-4d2a-9c3e-0123456789ab"
KUBERNETES_VERSIONS = ("1.31", kubernetes_validate.latest_version())


def server(name: str = "chat", **spec: Any) -> InferenceServer:
    doc: dict[str, Any] = {
        "apiVersion": "trainyard.dev/v1alpha1",
        "kind": "InferenceServer",
        "metadata": {"name": name, "namespace": "ml"},
        "spec": {"model": {"source": "hf://Qwen/Qwen2.5-0.5B-Instruct"}},
    }
    doc["spec"].update(copy.deepcopy(spec))
    parsed = parse_resource(doc)
    assert isinstance(parsed, InferenceServer)
    return parsed


def view(children: list[dict]) -> dict[str, Any]:
    """The children by role, with the vLLM container's args and env made addressable."""
    service, deployment = children
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    return {
        "service": service,
        "deployment": deployment,
        "pod": pod,
        "container": container,
        "args": options(container["args"]),
        "argv": container["args"],
        "env": {v["name"]: v for v in container["env"]},
        "init": pod.get("initContainers", ABSENT),
    }


@dataclass
class Case:
    id: str
    spec: dict[str, Any]
    expect: dict[str, Any]
    resolved: dict[str, str] = field(default_factory=dict)
    revision: str | None = None
    name: str = "chat"

    def render(self) -> list[dict]:
        return render_server_children(
            server(self.name, **self.spec),
            uid=UID,
            resolved=self.resolved,
            model_revision=self.revision,
        )


S3 = {"s3": {"endpoint": "http://minio:9000", "credentialsSecret": "s3-creds"}}
CASES = [
    Case(
        "hub model, defaults",
        {},
        {
            "argv[0]": "Qwen/Qwen2.5-0.5B-Instruct",
            "args.--served-model-name": "chat",
            "args.--port": "8000",
            "args.--tensor-parallel-size": "1",
            "args.--gpu-memory-utilization": "0.9",
            "args.--load-format": ABSENT,
            "args.--enable-lora": ABSENT,
            "deployment.metadata.name": "chat-server",
            "service.metadata.name": "chat-server",
            "deployment.spec.replicas": 1,
            "deployment.spec.strategy.rollingUpdate.maxUnavailable": 0,
            "deployment.spec.strategy.rollingUpdate.maxSurge": 1,
            'deployment.metadata.labels["trainyard.dev/server"]': "chat",
            'deployment.metadata.labels["app.kubernetes.io/component"]': "inference-server",
            'deployment.spec.selector.matchLabels["trainyard.dev/server"]': "chat",
            "pod.securityContext.runAsNonRoot": True,
            "pod.automountServiceAccountToken": False,
            "container.securityContext.allowPrivilegeEscalation": False,
            "container.securityContext.capabilities.drop": ["ALL"],
            "container.readinessProbe.httpGet.path": "/health",
            "container.livenessProbe.httpGet.path": "/health",
            "container.startupProbe.httpGet.path": "/health",
            "container.ports[0].name": "http",
            'container.resources.limits["nvidia.com/gpu"]': 1,
            "service.spec.ports[0].port": 8000,
            "service.spec.ports[0].targetPort": "http",
            "init": ABSENT,
        },
    ),
    Case(
        "hub revision, tensor parallel, engine options",
        {
            "model": {"source": "hf://Qwen/Qwen2.5-7B-Instruct@v2", "trustRemoteCode": True},
            "gpus": 4,
            "replicas": 3,
            "port": 9000,
            "servedModelName": "qwen",
            "vllm": {
                "tensorParallelSize": 4,
                "gpuMemoryUtilization": 0.8,
                "maxModelLen": 8192,
                "dtype": "bfloat16",
                "extraArgs": ["--enable-prefix-caching"],
            },
        },
        {
            "argv[0]": "Qwen/Qwen2.5-7B-Instruct",
            "args.--revision": "v2",
            "args.--tensor-parallel-size": "4",
            "args.--gpu-memory-utilization": "0.8",
            "args.--max-model-len": "8192",
            "args.--dtype": "bfloat16",
            "args.--trust-remote-code": True,
            "args.--enable-prefix-caching": True,
            "args.--served-model-name": "qwen",
            "args.--port": "9000",
            'container.resources.limits["nvidia.com/gpu"]': 4,
            "deployment.spec.replicas": 3,
            "service.spec.ports[0].port": 9000,
            "container.ports[0].containerPort": 9000,
        },
    ),
    Case(
        "s3 model streamed with Run:ai, credentials from the Secret",
        {"model": {"source": "s3://models/qwen-merged"}, "storage": S3},
        {
            "argv[0]": "s3://models/qwen-merged",
            "args.--load-format": "runai_streamer",
            "env.AWS_ENDPOINT_URL.value": "http://minio:9000",
            "env.AWS_ACCESS_KEY_ID.valueFrom.secretKeyRef.name": "s3-creds",
            "env.RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING.value": "0",
            "init": ABSENT,
        },
    ),
    Case(
        "run:// model resolved to its run's checkpoint, revision on the pod template",
        {"model": {"source": "run://sft"}, "storage": S3},
        {
            "argv[0]": "s3://ckpt/runs/sft/final",
            "args.--load-format": "runai_streamer",
            f'deployment.spec.template.metadata.annotations["{MODEL_REVISION_ANNOTATION}"]': "uid-1",
        },
        resolved={"run://sft": "s3://ckpt/runs/sft/final"},
        revision="uid-1",
    ),
    Case(
        "file model: a path in the image",
        {"model": {"source": "file:///models/merged"}, "gpus": 0},
        {
            "argv[0]": "/models/merged",
            "container.resources": {},
            "env.AWS_ENDPOINT_URL": ABSENT,
        },
    ),
    Case(
        "adapters: hub id, image path, and S3 fetched by an init container",
        {
            "adapters": [
                {"name": "hub-lora", "source": "hf://org/lora"},
                {"name": "local-lora", "source": "file:///adapters/x"},
                {"name": "s3-lora", "source": "s3://ckpt/lora"},
                {"name": "run-lora", "source": "run://grpo/step-40"},
            ],
            "storage": S3,
            "vllm": {"maxLoraRank": 64},
        },
        {
            "args.--enable-lora": True,
            "args.--max-lora-rank": "64",
            "args.--max-loras": "4",
            "init[0].name": "fetch-adapter-2",
            "init[1].name": "fetch-adapter-3",
            "init[2]": ABSENT,
            "init[1].args[0]": (
                f"aws s3 cp --recursive --no-progress s3://ckpt/runs/grpo/step-40/ "
                f"{ADAPTERS_DIR}/run-lora"
            ),
            "init[0].securityContext.runAsNonRoot": True,
            "init[0].env[1].name": "AWS_ENDPOINT_URL",
            "pod.volumes[2].name": "adapters",
            "env.AWS_ENDPOINT_URL": ABSENT,  # the base model is not on S3
        },
        resolved={"run://grpo/step-40": "s3://ckpt/runs/grpo/step-40"},
    ),
    Case(
        "an adapter named like the server: the base model answers to <name>-base",
        {"adapters": [{"name": "chat", "source": "hf://org/lora"}]},
        {"args.--served-model-name": "chat-base"},
    ),
    Case(
        "scheduling, queue, user env and labels",
        {
            "scheduling": {
                "queue": "serving",
                "nodeSelector": {"gpu": "h100"},
                "priorityClassName": "online",
            },
            "env": [{"name": "VLLM_LOGGING_LEVEL", "value": "DEBUG"}],
            "image": "vllm/vllm-openai:v0.30.0",
        },
        {
            'deployment.metadata.labels["kueue.x-k8s.io/queue-name"]': "serving",
            'deployment.spec.template.metadata.labels["kueue.x-k8s.io/queue-name"]': "serving",
            "pod.nodeSelector.gpu": "h100",
            "pod.priorityClassName": "online",
            "env.VLLM_LOGGING_LEVEL.value": "DEBUG",
            "container.image": "vllm/vllm-openai:v0.30.0",
        },
    ),
    Case(
        "a long name is cut and hashed, the label value too",
        {},
        {
            "deployment.metadata.name": "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-server-0f45e858",
            'deployment.metadata.labels["trainyard.dev/server"]': "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-0f45e858",
        },
        name="a" * 80,
    ),
]


def shown(value: Any) -> Any:
    return "<absent>" if value is ABSENT else value


def lookup(tree: dict[str, Any], path: str) -> Any:
    return get(tree, path)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_case_renders_expected_fields(case: Case):
    children = view(case.render())
    got = {path: shown(lookup(children, path)) for path in case.expect}
    assert got == {path: shown(want) for path, want in case.expect.items()}


def test_adapters_are_served_by_name_from_where_they_lie():
    case = next(c for c in CASES if c.id.startswith("adapters"))
    args = view(case.render())["argv"]
    modules = args[args.index("--lora-modules") + 1 :]
    assert modules == [
        "hub-lora=org/lora",
        "local-lora=/adapters/x",
        f"s3-lora={ADAPTERS_DIR}/s3-lora",
        f"run-lora={ADAPTERS_DIR}/run-lora",
    ]


def test_url_names_the_service_in_its_namespace():
    assert service_url(server("chat", port=9000)) == "http://chat-server.ml.svc:9000"


REFUSED = [
    ("builtin model", {"model": {"source": "builtin://tiny-gpt2"}}, "spec.model.source"),
    (
        "more tensor parallel ranks than GPUs",
        {"gpus": 2, "vllm": {"tensorParallelSize": 4}},
        "spec.vllm.tensorParallelSize",
    ),
    (
        "served model name equal to an adapter's",
        {"servedModelName": "x", "adapters": [{"name": "x", "source": "hf://o/l"}]},
        "spec.servedModelName",
    ),
    ("run:// not resolved", {"model": {"source": "run://sft"}}, "spec.model.source"),
    (
        "a LoRA rank vLLM does not offer",
        {"adapters": [{"name": "l", "source": "hf://o/l"}], "vllm": {"maxLoraRank": 12}},
        "spec.vllm.maxLoraRank",
    ),
    (
        "hub adapter at a revision",
        {"adapters": [{"name": "l", "source": "hf://o/l@v1"}]},
        "spec.adapters[0].source",
    ),
]


@pytest.mark.parametrize(("spec", "field_path"), [pytest.param(s, f, id=i) for i, s, f in REFUSED])
def test_unservable_specs_name_the_field(spec: dict[str, Any], field_path: str):
    with pytest.raises(UnrenderableRun) as refused:
        render_server_children(server(**spec), uid=UID)
    assert refused.value.field == field_path
    assert str(refused.value).startswith(f"{field_path}: ")


def test_rendering_is_deterministic_and_the_hash_follows_the_spec():
    first, again = (render_server_children(server(), uid=UID) for _ in range(2))
    assert first == again
    new_model = render_server_children(
        server(model={"source": "hf://Qwen/Qwen2.5-1.5B-Instruct"}), uid=UID
    )
    new_revision = render_server_children(server(), uid=UID, model_revision="other-run-uid")

    def digest(children: list[dict], kind: str) -> str:
        manifest = next(c for c in children if c["kind"] == kind)
        return manifest["metadata"]["annotations"][SPEC_HASH_ANNOTATION]

    assert digest(first, "Deployment") != digest(new_model, "Deployment")
    assert digest(first, "Deployment") != digest(new_revision, "Deployment")
    assert digest(first, "Service") == digest(new_model, "Service"), "the Service stays"


def test_every_child_is_owned_by_the_server():
    for child in render_server_children(server(), uid=UID):
        assert child["metadata"]["ownerReferences"] == [
            {
                "apiVersion": "trainyard.dev/v1alpha1",
                "kind": "InferenceServer",
                "name": "chat",
                "uid": UID,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]


def example_servers() -> list[InferenceServer]:
    out = []
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "InferenceServer":
                out.append(parse_resource(doc))
    assert out, "examples/ has an InferenceServer"
    return out


def all_manifests() -> list[Any]:
    manifests = []
    for case in CASES:
        for child in case.render():
            manifests.append(pytest.param(child, id=f"{case.id}/{child['kind']}"))
    for example in example_servers():
        resolved = {
            a.source: f"s3://ckpt/runs/{a.source[6:]}/final"
            for a in example.spec.adapters or []
            if a.source.startswith("run://")
        }
        for child in render_server_children(example, uid=UID, resolved=resolved):
            manifests.append(
                pytest.param(child, id=f"example {example.metadata.name}/{child['kind']}")
            )
    return manifests


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("manifest", all_manifests())
def test_manifest_matches_kubernetes_openapi_schema(manifest: dict, version: str):
    kubernetes_validate.validate(manifest, version, strict=True)
