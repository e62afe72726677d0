"""Render charts/trainyard with the real helm binary, once per named set of values.

helm comes from scripts/install.sh, which puts it next to this Python's scripts (where
`ruff` and `trainyard` are); TRAINYARD_HELM names another one, and PATH is the last place
looked. Tests skip only when no helm can be found at all.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "trainyard"
RELEASE, NAMESPACE = "trainyard", "trainyard-system"
SERVICE_MONITOR_API = "monitoring.coreos.com/v1/ServiceMonitor"
POD_MONITOR_API = "monitoring.coreos.com/v1/PodMonitor"
PROMETHEUS_RULE_API = "monitoring.coreos.com/v1/PrometheusRule"
# What a cluster with prometheus-operator advertises (helm template --api-versions ...).
MONITORING_APIS = (
    "--api-versions", SERVICE_MONITOR_API,
    "--api-versions", POD_MONITOR_API,
    "--api-versions", PROMETHEUS_RULE_API,
)  # fmt: skip
# prometheus-operator's own CRDs (see the README there).
PROMETHEUS_OPERATOR_CRDS = Path(__file__).parent / "prometheus-operator-crds"

# Named value sets: what a platform engineer would install. Each renders and validates.
VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "cluster-wide": {
        "watchNamespaces": [],
        "resyncSeconds": 15,
        "logLevel": "debug",
        "extraArgs": ["--request-timeout=60", "--api-backoffs=0.5,1,2"],
    },
    "two-namespaces": {"watchNamespaces": ["team-a", "team-b"]},
    "replicas-2-peering": {"replicas": 2},
    "namespaces-replicas-3": {"replicas": 3, "watchNamespaces": ["ml"]},
    "service-monitor": {
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}}
    },
    "images-and-scheduling": {
        "trainerImage": "registry.example.com/trainyard/trainer:0.1.0-cu128",
        "vllmImage": "registry.example.com/vllm/vllm-openai:v0.31.0",
        "imagePullSecrets": ["registry-credentials"],
        "priorityClassName": "system-cluster-critical",
        "nodeSelector": {"node-role.kubernetes.io/control-plane": ""},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {
                            "matchExpressions": [
                                {"key": "nvidia.com/gpu.present", "operator": "DoesNotExist"}
                            ]
                        }
                    ]
                }
            }
        },
        "podAnnotations": {"cluster-autoscaler.kubernetes.io/safe-to-evict": "false"},
        "serviceAccount": {"annotations": {"iam.gke.io/gcp-service-account": "ty@p.iam"}},
    },
    "metrics-off": {"metrics": {"enabled": False}},
    "monitoring": {
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}},
        "dashboards": {"enabled": True, "annotations": {"grafana_folder": "Trainyard"}},
        "prometheusRule": {"enabled": True, "labels": {"release": "prometheus"}},
        "podMonitors": {"enabled": True, "labels": {"release": "prometheus"}, "interval": "15s"},
    },
    "monitoring-two-namespaces": {
        "watchNamespaces": ["team-a", "team-b"],
        "dashboards": {"enabled": True, "namespace": "grafana", "label": "grafana_dashboard"},
        "prometheusRule": {"enabled": True},
        "podMonitors": {"enabled": True},
    },
    "no-rbac-existing-account": {
        "rbac": {"create": False},
        "serviceAccount": {"create": False, "name": "platform-operator"},
    },
}


@functools.cache
def prometheus_operator_schema(kind: str) -> dict[str, Any]:
    """The openAPIV3Schema of a prometheus-operator kind (ServiceMonitor, PodMonitor, PrometheusRule)."""
    for path in PROMETHEUS_OPERATOR_CRDS.glob("*.yaml"):
        crd = yaml.safe_load(path.read_text())
        if crd["spec"]["names"]["kind"] == kind:
            (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
            return _strict(version["schema"]["openAPIV3Schema"])
    raise LookupError(f"no CRD of kind {kind} in {PROMETHEUS_OPERATOR_CRDS}")


def _strict(schema: Any) -> Any:
    """The schema as `kubectl apply --validate=strict` judges: an unknown field is an error
    (CRD schemas allow them; the API server would prune them quietly). And Go's regexp
    takes a flag group after `^` (`^(?i)abort`), Python's re only at the start."""
    if isinstance(schema, dict):
        fixed = {key: _strict(value) for key, value in schema.items()}
        pattern = fixed.get("pattern")
        if isinstance(pattern, str) and pattern.startswith("^(?i)"):
            fixed["pattern"] = "(?i)^" + pattern[len("^(?i)") :]
        if (
            isinstance(fixed.get("properties"), dict)
            and "additionalProperties" not in fixed
            and not fixed.get("x-kubernetes-preserve-unknown-fields")
        ):
            fixed["additionalProperties"] = False
        return fixed
    if isinstance(schema, list):
        return [_strict(value) for value in schema]
    return schema


def helm_binary() -> str | None:
    """The helm that scripts/install.sh installs, else $TRAINYARD_HELM, else one on PATH."""
    candidates = [
        os.environ.get("TRAINYARD_HELM"),
        str(Path(sysconfig.get_path("scripts")) / "helm"),
        shutil.which("helm"),
    ]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def require_helm() -> str:
    helm = helm_binary()
    if helm is None:
        pytest.skip("helm is not installed (scripts/install.sh installs it)")
    return helm


def helm(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run helm; the caller checks the exit status."""
    return subprocess.run(
        [require_helm(), *args], input=stdin, capture_output=True, text=True, timeout=60, cwd=REPO
    )


def template(values: dict[str, Any], *extra: str) -> subprocess.CompletedProcess[str]:
    """`helm template` of the chart with `values` (a values file on stdin, so types survive)."""
    return helm(
        "template",
        RELEASE,
        str(CHART),
        "--namespace",
        NAMESPACE,
        "--values",
        "-",
        *extra,
        stdin=json.dumps(values),
    )


def documents(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


@functools.cache
def _rendered(name: str, extra: tuple[str, ...]) -> tuple[dict[str, Any], ...]:
    result = template(VALUE_SETS[name], *extra)
    assert result.returncode == 0, f"helm template ({name}) failed:\n{result.stderr}"
    return tuple(documents(result.stdout))


def rendered(name: str, *extra: str) -> list[dict[str, Any]]:
    """The manifests of a named value set (rendered once per test session)."""
    return list(_rendered(name, extra))


def of_kind(manifests: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [m for m in manifests if m["kind"] == kind]


def the(manifests: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = of_kind(manifests, kind)
    return found


def container(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    (operator,) = the(manifests, "Deployment")["spec"]["template"]["spec"]["containers"]
    return operator


def expand_kubernetes_references(text: str, env: dict[str, str]) -> str:
    """What the kubelet does to command and args: `$(NAME)` becomes the variable when defined,
    `$$` becomes `$`, anything else stays (k8s.io/kubernetes third_party/forked/golang/expansion)."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return re.sub(r"\$\$|\$\(([^)]*)\)", replace, text)


def operator_argv(name: str, tmp_path: Path) -> list[str]:
    """The argv `trainyard operator` receives in the pod: the image's entrypoint plus args, or
    the rendered command run through a real /bin/sh with a stand-in `trainyard` on PATH."""
    operator = container(rendered(name))
    env = {e["name"]: "pod-0" for e in operator.get("env", [])}
    args = [expand_kubernetes_references(a, env) for a in operator["args"]]
    if "command" not in operator:
        return args  # ENTRYPOINT ["trainyard", "operator"] (images/operator.Dockerfile)
    command = [expand_kubernetes_references(c, env) for c in operator["command"]]
    shell = shutil.which(Path(command[0]).name) or pytest.skip(f"no {command[0]} here")
    stand_in = tmp_path / "trainyard"
    stand_in.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    stand_in.chmod(0o755)
    result = subprocess.run(
        [shell, *command[1:], *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": f"{tmp_path}:{os.environ['PATH']}"},
    )
    assert result.returncode == 0, result.stderr
    argv = json.loads(result.stdout)
    assert argv[0] == "operator", argv
    return argv[1:]


# The newest release the pinned kubectl/helm layer targets (scripts/install.sh).
KUBERNETES_VERSION = "1.35.0"


def peering_schema(kind: str) -> dict[str, Any]:
    """The schema of kopf's peering kind, from the CRD the chart ships."""
    crds = documents((CHART / "crds" / "zalando.org_kopfpeerings.yaml").read_text())
    crd = next(c for c in crds if c["spec"]["names"]["kind"] == kind)
    (version,) = crd["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]


def validate(manifest: dict[str, Any], where: str) -> None:
    kind = manifest["kind"]
    try:
        if kind in ("ClusterKopfPeering", "KopfPeering"):
            jsonschema.validate(manifest, peering_schema(kind))
        elif kind in ("ServiceMonitor", "PodMonitor", "PrometheusRule"):
            jsonschema.validate(manifest, prometheus_operator_schema(kind))
        else:
            kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)
    except (kubernetes_validate.ValidationError, jsonschema.ValidationError) as error:
        pytest.fail(f"{where}: {error.message} at {list(error.path)}")
