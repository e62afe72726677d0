"""Pod parts the training workers and the vLLM rollout server share.

Security: every container runs under the Kubernetes "restricted" Pod Security Standard
(non-root, seccomp RuntimeDefault, all capabilities dropped, no privilege escalation)
and pods get no service-account token, because nothing in them talks to the
Kubernetes API (progress flows through metrics the operator reads). Images must
therefore run as a numeric non-root user; UID/GID 1000 is set explicitly so an image
whose USER is a name (which the kubelet cannot verify) still starts.

Writable places: `/dev/shm` is a memory-backed emptyDir (NCCL and PyTorch data loaders
need far more than the container runtime's 64Mi default) and one emptyDir holds every
cache (Hugging Face downloads, Trainyard's model cache, HOME), so a non-root user never
needs to write into the image.
"""

from __future__ import annotations

import copy

from trainyard.api import TrainingRun, contract
from trainyard.api.common import Resources

GPU_RESOURCE = "nvidia.com/gpu"
RUN_AS_USER = 1000

SHM_VOLUME = "dshm"
CACHE_VOLUME = "cache"
CACHE_DIR = "/var/cache/trainyard"

# Conventional key names of the Secret in storage.s3.credentialsSecret, the names boto3
# (and vLLM's Run:ai streamer) read from the environment.
S3_ACCESS_KEY_ID = "AWS_ACCESS_KEY_ID"
S3_SECRET_ACCESS_KEY = "AWS_SECRET_ACCESS_KEY"
S3_SESSION_TOKEN = "AWS_SESSION_TOKEN"


def pod_security_context() -> dict:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_USER,
        "fsGroup": RUN_AS_USER,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> dict:
    return {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def volumes(resources: Resources | None) -> list[dict]:
    shm_size = (resources or Resources()).shm_size
    return [
        {"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": shm_size}},
        {"name": CACHE_VOLUME, "emptyDir": {}},
    ]


def volume_mounts() -> list[dict]:
    return [
        {"name": SHM_VOLUME, "mountPath": "/dev/shm"},
        {"name": CACHE_VOLUME, "mountPath": CACHE_DIR},
    ]


def cache_env() -> list[dict]:
    """Point every library cache into the cache volume."""
    return [
        {"name": "HOME", "value": f"{CACHE_DIR}/home"},
        {"name": "XDG_CACHE_HOME", "value": f"{CACHE_DIR}/xdg"},
        {"name": "HF_HOME", "value": f"{CACHE_DIR}/huggingface"},
        {"name": contract.Env.CACHE, "value": f"{CACHE_DIR}/trainyard"},
    ]


def runs_root(run: TrainingRun) -> str | None:
    """The runs root `run://` sources resolve under (the contract's rule: the parent of
    checkpoint.uri); None without checkpoint.uri."""
    return contract.runs_root(run.spec.checkpoint.uri if run.spec.checkpoint else None)


def runs_env(run: TrainingRun) -> list[dict]:
    """TRAINYARD_RUNS_URI, so the workload resolves `run://` where the operator does."""
    root = runs_root(run)
    return [{"name": contract.Env.RUNS_URI, "value": root}] if root else []


def s3_env(run: TrainingRun) -> list[dict]:
    """Endpoint, region and credentials of storage.s3, as boto3 reads them from the environment.

    Credentials come from the referenced Secret through secretKeyRef, never as literals.
    The session token is optional (only temporary credentials have one). Without a
    Secret, boto3's default chain applies (IRSA, GKE workload identity, instance roles).
    """
    s3 = run.spec.storage.s3 if run.spec.storage else None
    if s3 is None:
        return []
    env: list[dict] = []
    if s3.endpoint:
        env.append({"name": "AWS_ENDPOINT_URL", "value": s3.endpoint})
    if s3.region:
        env.append({"name": "AWS_REGION", "value": s3.region})
        env.append({"name": "AWS_DEFAULT_REGION", "value": s3.region})
    if s3.credentials_secret:
        for key, optional in (
            (S3_ACCESS_KEY_ID, False),
            (S3_SECRET_ACCESS_KEY, False),
            (S3_SESSION_TOKEN, True),
        ):
            ref = {"name": s3.credentials_secret, "key": key}
            if optional:
                ref["optional"] = True
            env.append({"name": key, "valueFrom": {"secretKeyRef": ref}})
    return env


def user_env(run: TrainingRun) -> list[dict]:
    """spec.env as Kubernetes EnvVars."""
    return [variable.to_yaml_dict() for variable in run.spec.env or []]


def merge_env(*groups: list[dict]) -> list[dict]:
    """Concatenate env lists; a later variable replaces an earlier one of the same name in
    place, so spec.env can override a default without a duplicate (which Kubernetes
    accepts but resolves by position, silently)."""
    merged: dict[str, dict] = {}
    for group in groups:
        for variable in group:
            merged[variable["name"]] = variable
    return list(merged.values())


def container_resources(resources: Resources | None, gpus: int) -> dict:
    """requests/limits from the spec, with the GPU count set in both (an extended resource
    must be requested and limited alike), overriding any GPU count written there."""
    resources = resources or Resources()
    requests = {k: v for k, v in (resources.requests or {}).items() if k != GPU_RESOURCE}
    limits = {k: v for k, v in (resources.limits or {}).items() if k != GPU_RESOURCE}
    if gpus > 0:
        requests[GPU_RESOURCE] = gpus
        limits[GPU_RESOURCE] = gpus
    out: dict = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def scheduling_fields(run: TrainingRun) -> dict:
    """nodeSelector, tolerations, affinity, priorityClassName, serviceAccountName of the pod spec."""
    scheduling = run.spec.scheduling
    if scheduling is None:
        return {}
    fields: dict = {}
    if scheduling.node_selector:
        fields["nodeSelector"] = dict(scheduling.node_selector)
    if scheduling.tolerations:
        fields["tolerations"] = [t.to_yaml_dict() for t in scheduling.tolerations]
    if scheduling.affinity:
        # A copy: the Job and the Deployment must never share (and mutate) one dict.
        fields["affinity"] = copy.deepcopy(scheduling.affinity)
    if scheduling.priority_class_name:
        fields["priorityClassName"] = scheduling.priority_class_name
    if scheduling.service_account_name:
        fields["serviceAccountName"] = scheduling.service_account_name
    return fields


def task_pod(
    container: dict,
    *,
    task_volume: str,
    task_dir: str,
    config_map: str,
    run: TrainingRun | None,
    resources: Resources | None = None,
) -> dict:
    """The pod spec of a one-pod task Job (a gate's evaluation, a stage's provenance write):
    `container` reads its task from ConfigMap `config_map` mounted read-only at `task_dir`,
    under the same security, caches and (given the run it works for) scheduling and image
    pull policy as that run's workers."""
    container = {
        **container,
        "securityContext": container_security_context(),
        "volumeMounts": [
            {"name": task_volume, "mountPath": task_dir, "readOnly": True},
            *volume_mounts(),
        ],
    }
    if run is not None:
        container["imagePullPolicy"] = run.spec.image_pull_policy
    return {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": pod_security_context(),
        **(scheduling_fields(run) if run is not None else {}),
        "containers": [container],
        "volumes": [{"name": task_volume, "configMap": {"name": config_map}}, *volumes(resources)],
    }
