"""The indexed Job that runs one attempt of a run: one pod per node, torchrun in each.

Each pod is one torchrun node: `--node-rank` is the pod's completion index, and the
master is index 0, reached by its stable DNS name `<job-name>-0.<service>` (hostname
from the indexed Job, subdomain from the headless Service). torchrun starts one
training process per GPU of the pod (one process when the pod has no GPU).

The Job never retries on its own (`backoffLimit: 0`): a torchrun gang cannot absorb a
replaced pod (the surviving ranks are stuck in collectives with a peer that is gone, and
a fresh pod cannot rejoin a static rendezvous), so any failed pod fails the Job, and the
operator's failure policy restarts the whole gang from the latest checkpoint as a new
attempt (a new Job, see `names.worker_job_name`) and counts it against the budget.
"""

from __future__ import annotations

from trainyard.api import TrainingRun
from trainyard.api.contract import Env
from trainyard.operator.builders import labels, names, pod_settings, sandbox, vllm
from trainyard.operator.builders.config_map import (
    CONFIG_DIR,
    RUN_CONFIG_PATH,
    TRAINER_OPTIONS_PATH,
)
from trainyard.operator.builders.service import RENDEZVOUS_PORT

DEFAULT_TRAINER_IMAGE = "ghcr.io/trainyard/trainer:0.1.0"
TRAINER_CONTAINER = "trainer"
CONFIG_VOLUME = "run-config"
# Where the trainer writes checkpoints before they are uploaded, and its final model:
# node disk, sized by the node, gone with the pod (checkpoint.uri is what persists).
OUTPUT_VOLUME = "output"
OUTPUT_DIR = "/var/lib/trainyard/output"
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"


def nproc_per_node(run: TrainingRun) -> int:
    return max(run.spec.distributed.gpus_per_node, 1)


def master_address(run: TrainingRun, restart_attempt: int) -> str:
    """DNS name of index 0 of the attempt's Job, through the headless Service."""
    job = names.worker_job_name(run.metadata.name, restart_attempt)
    return f"{job}-0.{names.workers_service_name(run.metadata.name)}"


def torchrun_args(run: TrainingRun, restart_attempt: int) -> list[str]:
    """Arguments of `torchrun` in every worker pod."""
    return [
        "--nnodes", str(run.spec.distributed.nodes),
        "--nproc-per-node", str(nproc_per_node(run)),
        # Expanded by the kubelet from the env var the Job controller fills in.
        "--node-rank", "$(JOB_COMPLETION_INDEX)",
        "--master-addr", master_address(run, restart_attempt),
        "--master-port", str(RENDEZVOUS_PORT),
        "-m", "trainyard.workloads.train",
        RUN_CONFIG_PATH,
    ]  # fmt: skip


def worker_env(run: TrainingRun, restart_attempt: int) -> list[dict]:
    own = [
        # Declared here, not left to the Job controller, so `$(JOB_COMPLETION_INDEX)` in
        # the arguments resolves from the spec we wrote.
        {
            "name": "JOB_COMPLETION_INDEX",
            "valueFrom": {
                "fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"}
            },
        },
        {"name": Env.RUN_NAME, "value": run.metadata.name},
        {
            "name": Env.RUN_NAMESPACE,
            "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
        },
        {"name": Env.RESTART_ATTEMPT, "value": str(restart_attempt)},
        {"name": Env.RUN_CONFIG, "value": RUN_CONFIG_PATH},
        {"name": Env.TRAINER_OPTIONS, "value": TRAINER_OPTIONS_PATH},
        {"name": Env.OUTPUT_DIR, "value": OUTPUT_DIR},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    if vllm.needs_rollout_server(run):
        # The name the workload reads (trainyard.workloads.methods.online); trainer.json
        # carries the same URL under TRL's name, with the timeout and group port.
        own.append({"name": Env.VLLM_URL, "value": vllm.server_base_url(run)})
    return pod_settings.merge_env(
        own,
        pod_settings.cache_env(),
        pod_settings.runs_env(run),
        pod_settings.s3_env(run),
        sandbox.trainer_env(run),
        pod_settings.user_env(run),
    )


def worker_ports(run: TrainingRun) -> list[dict]:
    ports = [
        {"name": "rendezvous", "containerPort": RENDEZVOUS_PORT, "protocol": "TCP"},
        {"name": "metrics", "containerPort": run.spec.metrics.port, "protocol": "TCP"},
    ]
    if vllm.needs_rollout_server(run):
        # The vLLM server's workers connect to rank 0 here for NCCL weight sync.
        ports.append({"name": "vllm-group", "containerPort": vllm.GROUP_PORT, "protocol": "TCP"})
    return ports


def pod_failure_policy() -> dict:
    """Fail the Job at the first failed pod, naming why in the Job's Failed condition.

    backoffLimit 0 would fail it too; the policy makes the failure immediate (the other
    pods are stopped at once instead of hanging in collectives) and leaves
    `reason: PodFailurePolicy` with the matched rule in the condition message, so a
    disruption (preemption, eviction, node drain) is told apart from a crash.
    """
    return {
        "rules": [
            {
                "action": "FailJob",
                "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
            },
            {
                "action": "FailJob",
                "onExitCodes": {
                    "containerName": TRAINER_CONTAINER,
                    "operator": "NotIn",
                    "values": [0],
                },
            },
        ]
    }


def render_worker_job(
    run: TrainingRun,
    *,
    uid: str,
    image: str | None = None,
    restart_attempt: int = 0,
    suspend: bool = False,
) -> dict:
    """The indexed Job of attempt `restart_attempt`.

    `image` is the operator's default trainer image, used when the spec names none.
    `suspend` is the reconcile code's decision (spec.suspend); a run with a Kueue queue
    is always created suspended, because Kueue admits a Job by unsuspending it.
    """
    sandbox.check_isolation(run)  # a code reward the restricted trainer cannot jail
    spec = run.spec
    nodes = spec.distributed.nodes
    job_name = names.worker_job_name(run.metadata.name, restart_attempt)
    attempt = {labels.ATTEMPT_LABEL: str(restart_attempt)}
    metadata = labels.child_metadata(run, job_name, labels.WORKER, uid)
    metadata["labels"].update(attempt)
    queue = spec.scheduling.queue if spec.scheduling else None
    if queue:
        metadata["labels"][labels.KUEUE_QUEUE_LABEL] = queue

    container = {
        "name": TRAINER_CONTAINER,
        "image": spec.image or image or DEFAULT_TRAINER_IMAGE,
        "imagePullPolicy": spec.image_pull_policy,
        "command": ["torchrun"],
        "args": torchrun_args(run, restart_attempt),
        "env": worker_env(run, restart_attempt),
        "ports": worker_ports(run),
        "resources": pod_settings.container_resources(
            spec.resources, spec.distributed.gpus_per_node
        ),
        "securityContext": pod_settings.container_security_context(),
        "volumeMounts": [
            {"name": CONFIG_VOLUME, "mountPath": CONFIG_DIR, "readOnly": True},
            *pod_settings.volume_mounts(),
            {"name": OUTPUT_VOLUME, "mountPath": OUTPUT_DIR},
        ],
    }
    pod_spec = {
        "restartPolicy": "Never",
        "subdomain": names.workers_service_name(run.metadata.name),
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": pod_settings.pod_security_context(),
        **pod_settings.scheduling_fields(run),
        "containers": [container],
        "volumes": [
            {
                "name": CONFIG_VOLUME,
                "configMap": {"name": names.config_map_name(run.metadata.name, restart_attempt)},
            },
            *pod_settings.volumes(spec.resources),
            {"name": OUTPUT_VOLUME, "emptyDir": {}},
        ],
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata,
        "spec": {
            "completionMode": "Indexed",
            "completions": nodes,
            "parallelism": nodes,
            "backoffLimit": 0,
            "podFailurePolicy": pod_failure_policy(),
            "suspend": bool(suspend or queue),
            "template": {
                "metadata": {"labels": {**labels.child_labels(run, labels.WORKER), **attempt}},
                "spec": pod_spec,
            },
        },
    }
