"""The sandbox service that code_execution rewards with `isolation: service` call.

Why a service of its own: strict isolation (network and mount namespaces, a fresh uid
per program) needs root with CAP_SYS_ADMIN, and Pod Security admission judges a whole
pod against its namespace's level. A trainer namespace that enforces `restricted`
admits no capability but NET_BIND_SERVICE in any container of the pod, so a privileged
sidecar next to the trainer is refused there; `baseline` refuses SYS_ADMIN as well. The
jail therefore lives in pods of a namespace of its own, labelled for the one level that
admits SYS_ADMIN (`privileged`), installed once by the platform team; trainer pods, in
namespaces that stay `restricted`, reach it over HTTP through a Service.

What the sandbox pods are given, and why it is acceptable there:

- root with only the capabilities the jail uses (SYS_ADMIN for unshare and the
  read-only remounts; SETUID/SETGID/CHOWN to hand each program a uid and directory of
  its own; KILL and DAC_OVERRIDE to stop and clean up after it), every other one
  dropped, no privilege escalation, seccomp RuntimeDefault (which allows unshare and
  mount to a container holding SYS_ADMIN);
- `hostUsers: false`: the pod runs in its own user namespace (beta and on by default
  since Kubernetes 1.33, GA in 1.36; Linux 6.3+, containerd 2.0+ or CRI-O 1.25+), so
  its root and SYS_ADMIN count only inside that namespace, never on the node; the
  sandbox uids are narrowed to the 65536 uids such a pod maps (TRAINYARD_SANDBOX_UIDS);
- AppArmor unconfined: the runtime's default AppArmor profile denies every mount, which
  would stop the read-only remounts (only on nodes with AppArmor);
- no service-account token, no service links, no egress at all (NetworkPolicy), and
  ingress only from Trainyard trainer pods on the service port.

`runtime="gvisor"` renders the alternative for clusters with a sandboxed runtime
(gVisor's runsc or Kata, through `runtimeClassName`): the pod is then the jail, so it
runs under the restricted profile (uid 1000, every capability dropped) and its
namespace is labelled `restricted`; programs in it get rlimits, timeouts and a
directory each, but share the pod's uid with each other.
"""

from __future__ import annotations

from typing import Literal

from trainyard.api import TrainingRun
from trainyard.api.rewards import (
    DEFAULT_SANDBOX_SERVICE_URL,
    SANDBOX_NAMESPACE,
    SANDBOX_SERVICE_PORT,
    SANDBOX_URL_ENV,
    code_execution_isolation,
    parse_reward_args,
    sandbox_server_args,
)
from trainyard.operator.builders import labels, pod_settings
from trainyard.operator.builders.errors import UnrenderableRun

DEFAULT_SANDBOX_IMAGE = "ghcr.io/trainyard/sandbox:0.1.0"  # images/sandbox.Dockerfile
SANDBOX_NAME = "trainyard-sandbox"
SANDBOX_COMPONENT = "sandbox"
SANDBOX_CONTAINER = "sandbox"
# Uids a user-namespaced pod maps are 0-65535; the sandboxes take the upper ones.
SANDBOX_UIDS = "10000-65535"
# app.kubernetes.io/component of the pods that call the service: trainers and gate
# evaluations (builders/evaluation.py's EVALUATION; the test checks both pods get in).
CALLER_COMPONENTS = (labels.WORKER, "evaluation")
JAIL_CAPABILITIES = ["CHOWN", "DAC_OVERRIDE", "KILL", "SETGID", "SETUID", "SYS_ADMIN"]

Runtime = Literal["namespaces", "gvisor"]


def _labels() -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "trainyard",
        "app.kubernetes.io/part-of": "trainyard",
        "app.kubernetes.io/managed-by": labels.MANAGED_BY,
        labels.COMPONENT_LABEL: SANDBOX_COMPONENT,
    }


def _pod_security_labels(level: str) -> dict[str, str]:
    return {
        f"pod-security.kubernetes.io/{mode}": level for mode in ("enforce", "audit", "warn")
    } | {"pod-security.kubernetes.io/enforce-version": "latest"}


def jail_security_context() -> dict:
    """The sandbox container's securityContext under runtime "namespaces"."""
    return {
        "runAsUser": 0,
        "runAsNonRoot": False,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"], "add": list(JAIL_CAPABILITIES)},
        "seccompProfile": {"type": "RuntimeDefault"},
        "appArmorProfile": {"type": "Unconfined"},
    }


def render_sandbox_service(
    *,
    image: str = DEFAULT_SANDBOX_IMAGE,
    namespace: str = SANDBOX_NAMESPACE,
    runtime: Runtime = "namespaces",
    runtime_class_name: str = "gvisor",
    replicas: int = 2,
    workers: int | None = None,
    resources: dict | None = None,
) -> list[dict]:
    """Namespace, Deployment, Service and NetworkPolicy of the sandbox service.

    `image` must hold Trainyard's workloads and every program the stages run (the
    sandbox image has Python; build on it for compilers). `workers` is the pool size of each replica (its CPU count when
    left out)."""
    isolation = "strict" if runtime == "namespaces" else "rlimits"

    # Fresh dicts for every use: no manifest shares (or lets a caller mutate) another's.
    def metadata() -> dict:
        return {"name": SANDBOX_NAME, "namespace": namespace, "labels": _labels()}

    def selector() -> dict:
        return {"app.kubernetes.io/name": "trainyard", labels.COMPONENT_LABEL: SANDBOX_COMPONENT}

    def probe(**more: int) -> dict:
        return {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 10, **more}

    port = {"name": "http", "containerPort": SANDBOX_SERVICE_PORT, "protocol": "TCP"}
    container: dict = {
        "name": SANDBOX_CONTAINER,
        "image": image,
        "command": ["python"],
        "args": sandbox_server_args(
            host="0.0.0.0", port=SANDBOX_SERVICE_PORT, isolation=isolation, workers=workers
        ),
        "env": [
            {"name": "PYTHONUNBUFFERED", "value": "1"},
            {"name": "HOME", "value": "/tmp"},
        ],
        "ports": [port],
        "readinessProbe": probe(),
        "livenessProbe": probe(failureThreshold=6),
        "resources": resources or {"requests": {"cpu": "2", "memory": "4Gi"}},
    }
    pod: dict = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "containers": [container],
        "volumes": [{"name": "tmp", "emptyDir": {}}],
    }
    container["volumeMounts"] = [{"name": "tmp", "mountPath": "/tmp"}]
    if runtime == "namespaces":
        pod["hostUsers"] = False
        container["securityContext"] = jail_security_context()
        container["env"].append({"name": "TRAINYARD_SANDBOX_UIDS", "value": SANDBOX_UIDS})
        level = "privileged"
    else:
        pod["runtimeClassName"] = runtime_class_name
        pod["securityContext"] = pod_settings.pod_security_context()
        container["securityContext"] = pod_settings.container_security_context()
        level = "restricted"
    namespace_object = {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": namespace, "labels": {**_labels(), **_pod_security_labels(level)}},
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(),
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": selector()},
            "template": {"metadata": {"labels": _labels()}, "spec": pod},
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(),
        "spec": {
            "selector": selector(),
            "ports": [{"name": "http", "port": SANDBOX_SERVICE_PORT, "targetPort": "http"}],
        },
    }
    network_policy = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata(),
        "spec": {
            "podSelector": {"matchLabels": selector()},
            "policyTypes": ["Ingress", "Egress"],
            # Only trainer pods and gate evaluation pods (their reward suite scores with
            # the run's rewards) of any namespace; nothing out (not even DNS).
            "ingress": [
                {
                    "from": [
                        {
                            "namespaceSelector": {},
                            "podSelector": {
                                "matchLabels": {
                                    "app.kubernetes.io/name": "trainyard",
                                    labels.COMPONENT_LABEL: component,
                                }
                            },
                        }
                        for component in CALLER_COMPONENTS
                    ],
                    "ports": [{"port": SANDBOX_SERVICE_PORT, "protocol": "TCP"}],
                }
            ],
            "egress": [],
        },
    }
    return [namespace_object, deployment, service, network_policy]


def sandbox_service_url(run: TrainingRun) -> str | None:
    """The sandbox service the run's trainer calls: the serviceUrl of its first
    code_execution reward with isolation service (the default service when it names
    none); None when no reward uses one."""
    rl = run.spec.online_rl
    for reward in (rl.rewards if rl else None) or []:
        if reward.builtin != "code_execution":
            continue
        args = parse_reward_args("code_execution", reward.args)
        if args.isolation == "service":
            return args.service_url or DEFAULT_SANDBOX_SERVICE_URL
    return None


def check_isolation(run: TrainingRun) -> None:
    """Refuse code rewards with isolation strict: their jail needs root with CAP_SYS_ADMIN
    in the trainer container, and Trainyard's pods run under the restricted profile, so
    every program would fail to start in the pod after the image pull (`trainyard run`,
    as root, keeps strict)."""
    rl = run.spec.online_rl
    urls: dict[str, int] = {}
    for index, reward in enumerate((rl.rewards if rl else None) or []):
        if reward.builtin != "code_execution":
            continue
        args = parse_reward_args("code_execution", reward.args)
        if args.isolation == "service":
            url = args.service_url or DEFAULT_SANDBOX_SERVICE_URL
            if urls and url not in urls:
                first = next(iter(urls))
                raise UnrenderableRun(
                    f"spec.{run.spec.method}.rewards[{index}].args.serviceUrl",
                    f"{url} differs from {first} (rewards[{urls[first]}]); a trainer pod "
                    "has one sandbox service (TRAINYARD_SANDBOX_URL): give them the same",
                )
            urls.setdefault(url, index)
        if args.isolation == "strict":
            raise UnrenderableRun(
                f"spec.{run.spec.method}.rewards[{index}].args.isolation",
                "strict needs root with CAP_SYS_ADMIN in the trainer container, which "
                "trainer pods (restricted Pod Security Standard: uid 1000, every capability "
                "dropped) never have; set isolation: service (the same jail in the sandbox "
                "service, installed with `trainyard sandbox`) or rlimits (no jail)",
            )


def trainer_env(run: TrainingRun) -> list[dict]:
    """TRAINYARD_SANDBOX_URL for a trainer whose rewards use the sandbox service."""
    url = sandbox_service_url(run)
    return [{"name": SANDBOX_URL_ENV, "value": url}] if url else []


def isolation_note(run: TrainingRun) -> str:
    """For the run's Valid condition: the isolation each code_execution reward's programs
    will have ("" without such rewards)."""
    rl = run.spec.online_rl
    found = code_execution_isolation((rl.rewards if rl else None) or [])
    return "".join(
        f"; reward {name!r} runs programs with isolation {isolation}: {meaning}"
        for name, isolation, meaning in found
    )
