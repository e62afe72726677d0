"""The table of TrainingRuns the builder tests render, and a view to read their children.

Each case is a named spec (built with the fluent `tests.api.resources` builders) and
the fields its children must have, addressed by path into `view(children)`:

    "job.spec.parallelism"                      a field of the Job
    'job.metadata.labels["kueue.x-k8s.io/queue-name"]'  a key with dots, quoted
    "job_env.AWS_ACCESS_KEY_ID.valueFrom"       the trainer's env, by variable name
    "trainer_json.vllm_mode"                    the parsed trainer.json of the ConfigMap

`ABSENT` expects the field not to be there. Examples in examples/ (and the stages of
pipelines) are rendered too: `example_runs()`.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.api.resources import Doc, run
from trainyard.api import TrainingPipeline, TrainingRun, parse_resource

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
UID = "5f0c1b9e-1111-4d2a-9c3e-0123456789ab"
ABSENT = object()

_TOKEN = re.compile(r'\["([^"]+)"\]|\[(\d+)\]|([^.\[\]]+)')


def get(tree: Any, path: str) -> Any:
    """The value at `path` in `tree`, or ABSENT."""
    node = tree
    for quoted, index, key in _TOKEN.findall(path):
        if index:
            if not isinstance(node, list) or int(index) >= len(node):
                return ABSENT
            node = node[int(index)]
        else:
            name = quoted or key
            if not isinstance(node, dict) or name not in node:
                return ABSENT
            node = node[name]
    return node


def options(args: list[str]) -> dict[str, Any]:
    """Command-line options as {"--flag": value}; a flag without a value maps to True."""
    found: dict[str, Any] = {}
    for i, arg in enumerate(args):
        if arg.startswith("--"):
            following = args[i + 1] if i + 1 < len(args) else None
            found[arg] = True if following is None or following.startswith("--") else following
    return found


def view(children: list[dict]) -> dict[str, Any]:
    """The children by role, plus the parts tests read most: containers, env, parsed config."""
    roles: dict[str, Any] = {"kinds": [c["kind"] for c in children]}
    for child in children:
        component = child["metadata"]["labels"]["app.kubernetes.io/component"]
        role = {
            "config": "config",
            "rendezvous": "workers",
            "worker": "job",
            "rollout-server": "vllm" if child["kind"] == "Deployment" else "vllm_service",
        }[component]
        assert role not in roles, f"two children with role {role}"
        roles[role] = child
    if "config" in roles:
        roles["run_json"] = json.loads(roles["config"]["data"]["run.json"])
        roles["trainer_json"] = json.loads(roles["config"]["data"]["trainer.json"])
    for role in ("job", "vllm"):
        if role in roles:
            pod = roles[role]["spec"]["template"]["spec"]
            container = pod["containers"][0]
            roles[f"{role}_pod"] = pod
            roles[f"{role}_container"] = container
            roles[f"{role}_args"] = container.get("args", [])
            roles[f"{role}_opts"] = options(roles[f"{role}_args"])
            roles[f"{role}_env"] = {
                v["name"]: v.get("value", v.get("valueFrom")) for v in container.get("env", [])
            }
    return roles


@dataclass(frozen=True)
class Case:
    """A named spec, the render options, and the fields expected in `view(children)`."""

    id: str
    doc: Doc
    expect: dict[str, Any]
    render: dict[str, Any] = field(default_factory=dict)

    def training_run(self) -> TrainingRun:
        resource = parse_resource(self.doc.doc)
        assert isinstance(resource, TrainingRun)
        return resource


def grpo(mode: str, **vllm: Any) -> Doc:
    return run("grpo").set("spec.rollout", {"vllm": {"mode": mode, **vllm}})


S3 = {
    "endpoint": "http://minio.storage.svc:9000",
    "region": "eu-west-1",
    "credentialsSecret": "s3-credentials",
    "addressingStyle": "path",
}
TOLERATIONS = [
    {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
    {
        "key": "team",
        "operator": "Equal",
        "value": "ml",
        "effect": "NoExecute",
        "tolerationSeconds": 60,
    },
]
AFFINITY = {
    "nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [
                {"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["h100"]}]}
            ]
        }
    }
}

CASES: list[Case] = [
    Case(
        "single-node",
        run("sft"),
        {
            "kinds": ["ConfigMap", "Service", "Job"],
            "job.metadata.name": "sft-run-attempt-0",
            "job.spec.completionMode": "Indexed",
            "job.spec.completions": 1,
            "job.spec.parallelism": 1,
            "job.spec.backoffLimit": 0,
            "job.spec.suspend": False,
            "job_container.command": ["torchrun"],
            "job_args": [
                "--nnodes",
                "1",
                "--nproc-per-node",
                "1",
                "--node-rank",
                "$(JOB_COMPLETION_INDEX)",
                "--master-addr",
                "sft-run-attempt-0-0.sft-run-workers",
                "--master-port",
                "29500",
                "-m",
                "trainyard.workloads.train",
                "/etc/trainyard/run.json",
            ],  # fmt: skip
            'job_container.resources.limits["nvidia.com/gpu"]': 1,
            'job_container.resources.requests["nvidia.com/gpu"]': 1,
            "job_pod.subdomain": "sft-run-workers",
            "job_pod.restartPolicy": "Never",
            "job_container.image": "ghcr.io/trainyard/trainer:0.1.0",
            "workers.spec.clusterIP": "None",
            "workers.spec.publishNotReadyAddresses": True,
            "trainer_json": {},
            "run_json.spec.method": "sft",
            "job_env.TRAINYARD_RUN_NAME": "sft-run",
            "job_env.TRAINYARD_OUTPUT_DIR": "/var/lib/trainyard/output",
            "job_env.HF_HOME": "/var/cache/trainyard/huggingface",
            "job_env.TRAINYARD_VLLM_URL": ABSENT,
            'job.metadata.labels["kueue.x-k8s.io/queue-name"]': ABSENT,
        },
    ),
    Case(
        "multi-node",
        run("sft").set("spec.distributed", {"nodes": 4, "gpusPerNode": 8}),
        {
            "job.spec.completions": 4,
            "job.spec.parallelism": 4,
            "job_args[1]": "4",
            "job_args[3]": "8",
            "job_args[7]": "sft-run-attempt-0-0.sft-run-workers",
            'job_container.resources.limits["nvidia.com/gpu"]': 8,
            'job_container.resources.requests["nvidia.com/gpu"]': 8,
            "job_env.JOB_COMPLETION_INDEX.fieldRef.fieldPath": (
                "metadata.annotations['batch.kubernetes.io/job-completion-index']"
            ),
        },
    ),
    Case(
        "deepspeed",
        run("sft").set(
            "spec.distributed",
            {
                "nodes": 2,
                "gpusPerNode": 4,
                "deepspeed": {"zeroStage": 3, "offloadOptimizer": "cpu"},
            },
        ),
        {
            "job.spec.parallelism": 2,
            "job_args[3]": "4",
            "run_json.spec.distributed.deepspeed.zeroStage": 3,
            "run_json.spec.distributed.deepspeed.offloadOptimizer": "cpu",
            "job_pod.volumes[1].emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"},
            "job_container.volumeMounts[1].mountPath": "/dev/shm",
        },
    ),
    Case(
        "lora",
        run("sft").set(
            "spec.peft",
            {"type": "lora", "r": 8, "alpha": 16, "targetModules": ["q_proj", "v_proj"]},
        ),
        {
            "run_json.spec.peft.r": 8,
            "run_json.spec.peft.alpha": 16,
            "run_json.spec.peft.targetModules": ["q_proj", "v_proj"],
            "run_json.spec.peft.dropout": 0.05,
            "kinds": ["ConfigMap", "Service", "Job"],
        },
    ),
    Case(
        "grpo-server",
        grpo(
            "server",
            tensorParallelSize=2,
            dataParallelSize=1,
            gpuMemoryUtilization=0.8,
            maxModelLen=4096,
        ),
        {
            "kinds": ["ConfigMap", "Service", "Service", "Deployment", "Job"],
            "vllm.metadata.name": "grpo-run-vllm",
            "vllm.spec.replicas": 1,
            "vllm.spec.strategy.type": "Recreate",
            "vllm_container.command": ["vllm", "serve"],
            "vllm_args[0]": "Qwen/Qwen2.5-0.5B-Instruct",
            "vllm_opts.--tensor-parallel-size": "2",
            "vllm_opts.--data-parallel-size": "1",
            "vllm_opts.--gpu-memory-utilization": "0.8",
            "vllm_opts.--max-model-len": "4096",
            "vllm_opts.--port": "8000",
            "vllm_opts.--enable-prefix-caching": True,
            "vllm_opts.--weight-transfer-config": '{"backend": "nccl"}',
            "vllm_opts.--logprobs-mode": "processed_logprobs",
            "vllm_opts.--max-logprobs": "-1",
            "vllm_opts.--revision": ABSENT,
            "vllm_opts.--load-format": ABSENT,
            'vllm_container.resources.limits["nvidia.com/gpu"]': 2,
            "vllm_container.readinessProbe.httpGet": {"path": "/health", "port": "http"},
            "vllm_container.startupProbe.httpGet": {"path": "/health", "port": "http"},
            "vllm_container.livenessProbe": ABSENT,
            "vllm_env.VLLM_SERVER_DEV_MODE": "1",
            "vllm_env.AWS_ACCESS_KEY_ID": ABSENT,
            "vllm_service.spec.ports[0].port": 8000,
            "trainer_json": {
                "use_vllm": True,
                "vllm_mode": "server",
                "vllm_server_base_url": "http://grpo-run-vllm:8000",
                "vllm_group_port": 51216,
                "vllm_server_timeout": 1800.0,
            },
            "job_env.TRAINYARD_VLLM_URL": "http://grpo-run-vllm:8000",
            "job_container.ports[2]": {
                "name": "vllm-group",
                "containerPort": 51216,
                "protocol": "TCP",
            },
        },
    ),
    Case(
        "grpo-colocate",
        grpo("colocate", gpuMemoryUtilization=0.4),
        {
            "kinds": ["ConfigMap", "Service", "Job"],
            "trainer_json": {
                "use_vllm": True,
                "vllm_mode": "colocate",
                "vllm_tensor_parallel_size": 1,
                "vllm_gpu_memory_utilization": 0.4,
            },
            "job_env.TRAINYARD_VLLM_URL": ABSENT,
            "job_container.ports[2]": ABSENT,
        },
    ),
    Case(
        "grpo-colocate-trl-default-memory",
        grpo("colocate", tensorParallelSize=2, maxModelLen=2048).set(
            "spec.distributed.gpusPerNode", 4
        ),
        {
            "trainer_json": {
                "use_vllm": True,
                "vllm_mode": "colocate",
                "vllm_tensor_parallel_size": 2,
                "vllm_gpu_memory_utilization": 0.3,
                "vllm_max_model_length": 2048,
            },
        },
    ),
    Case(
        "rloo-server",
        run("rloo").set("spec.rollout", {"vllm": {"mode": "server"}}),
        {
            "kinds": ["ConfigMap", "Service", "Service", "Deployment", "Job"],
            "trainer_json.vllm_mode": "server",
            'vllm_container.resources.limits["nvidia.com/gpu"]': 1,
        },
    ),
    Case(
        "custom-image-tolerations-queue",
        grpo("server")
        .set("spec.image", "registry.example.com/ml/trainer:2.1")
        .set("spec.imagePullPolicy", "Always")
        .set(
            "spec.scheduling",
            {
                "queue": "team-a",
                "priorityClassName": "training-high",
                "nodeSelector": {"gpu": "h100"},
                "tolerations": TOLERATIONS,
                "affinity": AFFINITY,
                "serviceAccountName": "trainer",
            },
        )
        .set("spec.rollout.vllm.image", "registry.example.com/vllm:0.31.0"),
        {
            "job_container.image": "registry.example.com/ml/trainer:2.1",
            "job_container.imagePullPolicy": "Always",
            'job.metadata.labels["kueue.x-k8s.io/queue-name"]': "team-a",
            "job.spec.suspend": True,
            "job_pod.priorityClassName": "training-high",
            "job_pod.nodeSelector": {"gpu": "h100"},
            "job_pod.tolerations": TOLERATIONS,
            "job_pod.affinity": AFFINITY,
            "job_pod.serviceAccountName": "trainer",
            "job_pod.automountServiceAccountToken": False,
            "vllm_container.image": "registry.example.com/vllm:0.31.0",
            'vllm.metadata.labels["kueue.x-k8s.io/queue-name"]': "team-a",
            'vllm.spec.template.metadata.labels["kueue.x-k8s.io/queue-name"]': "team-a",
            "vllm_pod.tolerations": TOLERATIONS,
        },
    ),
    Case(
        "operator-default-images",
        grpo("server"),
        {
            "job_container.image": "operator.example/trainer:9",
            "vllm_container.image": "operator.example/vllm:9",
        },
        render={"image": "operator.example/trainer:9", "vllm_image": "operator.example/vllm:9"},
    ),
    Case(
        "s3-secret",
        run("sft")
        .set("spec.storage", {"s3": S3})
        .set("spec.checkpoint", {"uri": "s3://checkpoints/sft-run"}),
        {
            "job_env.AWS_ENDPOINT_URL": "http://minio.storage.svc:9000",
            "job_env.AWS_REGION": "eu-west-1",
            "job_env.AWS_ACCESS_KEY_ID": {
                "secretKeyRef": {"name": "s3-credentials", "key": "AWS_ACCESS_KEY_ID"}
            },
            "job_env.AWS_SECRET_ACCESS_KEY": {
                "secretKeyRef": {"name": "s3-credentials", "key": "AWS_SECRET_ACCESS_KEY"}
            },
            "job_env.AWS_SESSION_TOKEN": {
                "secretKeyRef": {
                    "name": "s3-credentials",
                    "key": "AWS_SESSION_TOKEN",
                    "optional": True,
                }
            },
            "run_json.spec.storage.s3.credentialsSecret": "s3-credentials",
        },
    ),
    Case(
        "s3-model-on-vllm-server",
        grpo("server")
        .set("spec.model.source", "s3://models/qwen-0.5b")
        .set("spec.storage", {"s3": S3}),
        {
            "vllm_args[0]": "s3://models/qwen-0.5b",
            "vllm_opts.--load-format": "runai_streamer",
            "vllm_env.AWS_ACCESS_KEY_ID": {
                "secretKeyRef": {"name": "s3-credentials", "key": "AWS_ACCESS_KEY_ID"}
            },
            "vllm_env.AWS_ENDPOINT_URL": "http://minio.storage.svc:9000",
            "vllm_env.RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING": "0",
        },
    ),
    Case(
        "run-model-on-vllm-server",
        grpo("server")
        .set("spec.model.source", "run://sft-stage/step-200")
        .set("spec.checkpoint", {"uri": "s3://checkpoints/grpo-run"}),
        {
            "vllm_args[0]": "s3://checkpoints/sft-stage/step-200",
            "vllm_opts.--load-format": "runai_streamer",
        },
    ),
    Case(
        "hub-revision-and-remote-code",
        grpo("server", enablePrefixCaching=False)
        .set("spec.model.source", "hf://Qwen/Qwen2.5-0.5B-Instruct@v1")
        .set("spec.model.trustRemoteCode", True)
        .set("spec.model.dtype", "bfloat16"),
        {
            "vllm_args[0]": "Qwen/Qwen2.5-0.5B-Instruct",
            "vllm_opts.--revision": "v1",
            "vllm_opts.--trust-remote-code": True,
            "vllm_opts.--dtype": "bfloat16",
            "vllm_opts.--no-enable-prefix-caching": True,
            "vllm_opts.--enable-prefix-caching": ABSENT,
        },
    ),
    Case(
        "env-and-resources",
        run("sft")
        .set(
            "spec.env",
            [
                {"name": "HF_HOME", "value": "/models/hf"},
                {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}},
                {"name": "NCCL_DEBUG", "value": "INFO"},
            ],
        )
        .set(
            "spec.resources",
            {
                "requests": {"cpu": 8, "memory": "64Gi"},
                "limits": {"memory": "64Gi", "nvidia.com/gpu": 3},
                "shmSize": "32Gi",
            },
        )
        .set("spec.distributed.gpusPerNode", 2),
        {
            "job_env.HF_HOME": "/models/hf",
            "job_env.HF_TOKEN": {"secretKeyRef": {"name": "hf", "key": "token"}},
            "job_env.NCCL_DEBUG": "INFO",
            "job_container.resources": {
                "requests": {"cpu": 8, "memory": "64Gi", "nvidia.com/gpu": 2},
                "limits": {"memory": "64Gi", "nvidia.com/gpu": 2},
            },
            "job_pod.volumes[1].emptyDir.sizeLimit": "32Gi",
        },
    ),
    Case(
        # Reporting and trainer options reach the pod in run.json; a tracker's key comes
        # from a Secret (a literal WANDB_API_KEY is refused by the spec rules).
        "report-to-and-extra-options",
        run("sft")
        .set("spec.training.reportTo", ["tensorboard", "wandb"])
        .set("spec.training.extra", {"torch_compile": True, "use_liger_kernel": True})
        .set(
            "spec.env",
            [
                {"name": "WANDB_PROJECT", "value": "sprints"},
                {
                    "name": "WANDB_API_KEY",
                    "valueFrom": {"secretKeyRef": {"name": "wandb", "key": "api-key"}},
                },
            ],
        ),
        {
            "run_json.spec.training.reportTo": ["tensorboard", "wandb"],
            "run_json.spec.training.extra": {"torch_compile": True, "use_liger_kernel": True},
            "job_env.WANDB_PROJECT": "sprints",
            "job_env.WANDB_API_KEY": {"secretKeyRef": {"name": "wandb", "key": "api-key"}},
        },
    ),
    Case(
        "cpu-only",
        run("sft").set("spec.distributed.gpusPerNode", 0),
        {"job_args[3]": "1", "job_container.resources": {}},
    ),
    Case(
        "suspended-third-attempt",
        run("sft").set("spec.distributed.nodes", 2),
        {
            "job.metadata.name": "sft-run-attempt-2",
            'job.metadata.labels["trainyard.dev/attempt"]': "2",
            'job.spec.template.metadata.labels["trainyard.dev/attempt"]': "2",
            "job.spec.suspend": True,
            "job_args[7]": "sft-run-attempt-2-0.sft-run-workers",
            "job_env.TRAINYARD_RESTART_ATTEMPT": "2",
        },
        render={"restart_attempt": 2, "suspend": True},
    ),
    Case(
        "namespaced-with-user-labels",
        grpo("server")
        .set("metadata.namespace", "ml-team")
        .set("metadata.labels", {"team": "ml", "trainyard.dev/run": "not-mine"}),
        {
            "job.metadata.namespace": "ml-team",
            "vllm.metadata.namespace": "ml-team",
            "config.metadata.namespace": "ml-team",
            'job.metadata.labels["team"]': "ml",
            'job.metadata.labels["trainyard.dev/run"]': "grpo-run",
            "trainer_json.vllm_server_base_url": "http://grpo-run-vllm.ml-team.svc:8000",
            "run_json.metadata": {
                "name": "grpo-run",
                "namespace": "ml-team",
                "labels": {"team": "ml", "trainyard.dev/run": "not-mine"},
            },
        },
    ),
    Case(
        "long-dotted-name",
        grpo("server").set("metadata.name", "q" * 20 + ".experiment." + "x" * 60),
        {
            "workers.metadata.name": "q" * 20 + "-experiment-" + "x" * 14 + "-workers-a815ed71",
        },
    ),
]


def example_runs() -> list[tuple[str, TrainingRun]]:
    """Every TrainingRun in examples/, and every stage of every pipeline there, by id."""
    runs: list[tuple[str, TrainingRun]] = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        for index, body in enumerate(yaml.safe_load_all(path.read_text())):
            if not body:
                continue
            resource = parse_resource(body)
            label = f"{path.stem}#{index}" if index else path.stem
            if isinstance(resource, TrainingRun):
                runs.append((label, resource))
            elif isinstance(resource, TrainingPipeline):
                for stage in resource.spec.stages:
                    document = {
                        "apiVersion": resource.api_version,
                        "kind": "TrainingRun",
                        "metadata": {"name": f"{resource.metadata.name}-{stage.name}"},
                        "spec": copy.deepcopy(
                            stage.run.model_dump(by_alias=True, exclude_none=True)
                        ),
                    }
                    runs.append((f"{label}:{stage.name}", TrainingRun.model_validate(document)))
    return runs
