"""sandbox.enabled: the chart installs the sandbox service that code_execution rewards with
`isolation: service` call, object for object what `trainyard sandbox` prints
(builders/sandbox.py render_sandbox_service) given the same values, so the two cannot drift;
every pod the chart makes is held to the Pod Security Standard its namespace enforces."""

from __future__ import annotations

import copy
import functools
import json
from typing import Any

import kubernetes_validate
import pytest
from chart_rendering import CHART, NAMESPACE, documents, helm, template, validate
from pod_security import LEVELS, violations

from trainyard.api.rewards import DEFAULT_SANDBOX_SERVICE_URL
from trainyard.operator.builders.sandbox import DEFAULT_SANDBOX_IMAGE, render_sandbox_service

# What a platform engineer would set, and the same settings as render_sandbox_service's arguments.
CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "defaults": ({}, {}),
    "namespaces-tuned": (
        {
            "replicas": 4,
            "workers": 8,
            "image": "registry.example.com/trainyard/sandbox-gcc:1",
            "resources": {"requests": {"cpu": "8", "memory": "16Gi"}, "limits": {"memory": "16Gi"}},
        },
        {
            "replicas": 4,
            "workers": 8,
            "image": "registry.example.com/trainyard/sandbox-gcc:1",
            "resources": {"requests": {"cpu": "8", "memory": "16Gi"}, "limits": {"memory": "16Gi"}},
        },
    ),
    "gvisor": ({"runtime": "gvisor"}, {"runtime": "gvisor"}),
    "kata-own-namespace": (
        {
            "runtime": "gvisor",
            "runtimeClassName": "kata-qemu",
            "namespace": "code-sandbox",
            "replicas": 1,
            "workers": 1,
        },
        {
            "runtime": "gvisor",
            "runtime_class_name": "kata-qemu",
            "namespace": "code-sandbox",
            "replicas": 1,
            "workers": 1,
        },
    ),
}
KIND_ORDER = ("Namespace", "Deployment", "Service", "NetworkPolicy")  # the builder's order


@functools.cache
def _chart(sandbox: str) -> tuple[dict[str, Any], ...]:
    values = {"sandbox": {"enabled": True, **json.loads(sandbox)}} if sandbox != "off" else {}
    result = template(values)
    assert result.returncode == 0, f"helm template failed:\n{result.stderr}"
    return tuple(documents(result.stdout))


def chart(name: str) -> list[dict[str, Any]]:
    """Everything the chart renders with sandbox.enabled and the case's values."""
    return copy.deepcopy(list(_chart(json.dumps(CASES[name][0], sort_keys=True))))


def sandbox_objects(manifests: list[dict[str, Any]], namespace: str) -> list[dict[str, Any]]:
    found = [
        m
        for m in manifests
        if m["metadata"].get("namespace") == namespace
        or (m["kind"] == "Namespace" and m["metadata"]["name"] == namespace)
    ]
    return sorted(found, key=lambda m: KIND_ORDER.index(m["kind"]))


def namespace_of(name: str) -> str:
    return CASES[name][1].get("namespace", "trainyard-sandbox")


@pytest.mark.parametrize("name", list(CASES))
def test_chart_renders_what_trainyard_sandbox_renders(name):
    """The one source of truth is builders/sandbox.py; the template must render the same."""
    kwargs = CASES[name][1]
    assert sandbox_objects(chart(name), namespace_of(name)) == render_sandbox_service(**kwargs)


def test_the_comparison_sees_a_difference():
    """Not vacuous: other values render other objects, and the builder's are never empty."""
    assert render_sandbox_service(runtime="gvisor") != render_sandbox_service()
    assert sandbox_objects(chart("gvisor"), "trainyard-sandbox") != render_sandbox_service()
    assert sandbox_objects(chart("defaults"), "trainyard-sandbox") != render_sandbox_service(
        workers=2
    )


def test_sandbox_adds_its_four_objects_and_changes_nothing_else():
    off = list(_chart("off"))
    on = chart("defaults")
    added = sandbox_objects(on, "trainyard-sandbox")
    assert [m["kind"] for m in added] == list(KIND_ORDER)
    assert [m for m in on if m not in added] == off
    assert not sandbox_objects(off, "trainyard-sandbox")


def test_default_image_and_address_are_the_ones_runs_use():
    """Nothing to configure in the operator: a code reward without serviceUrl gets
    DEFAULT_SANDBOX_SERVICE_URL (builders/sandbox.py sandbox_service_url) as its trainer
    pod's TRAINYARD_SANDBOX_URL, which is the default install's Service."""
    objects = {m["kind"]: m for m in sandbox_objects(chart("defaults"), "trainyard-sandbox")}
    service = objects["Service"]
    (port,) = service["spec"]["ports"]
    address = f"http://{service['metadata']['name']}.{service['metadata']['namespace']}.svc"
    assert f"{address}:{port['port']}" == DEFAULT_SANDBOX_SERVICE_URL
    (container,) = objects["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert container["image"] == DEFAULT_SANDBOX_IMAGE


def test_set_flags_as_the_platform_team_types_them():
    """`--set` parses numbers as integers (values files as floats); both render the same."""
    result = template(
        {},
        "--set",
        "sandbox.enabled=true,sandbox.runtime=gvisor,sandbox.workers=4,sandbox.replicas=3",
        "--set",
        "sandbox.resources.requests.cpu=4",
    )
    assert result.returncode == 0, result.stderr
    expected = render_sandbox_service(
        runtime="gvisor", workers=4, replicas=3, resources={"requests": {"cpu": 4, "memory": "4Gi"}}
    )
    assert sandbox_objects(documents(result.stdout), "trainyard-sandbox") == expected


def test_helm_lint_strict_passes_with_the_sandbox():
    for runtime in ("namespaces", "gvisor"):
        result = helm(
            "lint",
            "--strict",
            str(CHART),
            "--set",
            f"sandbox.enabled=true,sandbox.runtime={runtime}",
        )
        assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", list(CASES))
def test_sandbox_objects_are_valid_kubernetes(name):
    """Against the chart's Kubernetes version, and 1.33: where hostUsers: false (user
    namespaces) is on by default."""
    for manifest in sandbox_objects(chart(name), namespace_of(name)):
        validate(manifest, f"{name}: {manifest['kind']}")
        kubernetes_validate.validate(manifest, "1.33", strict=True)


def pods(manifests: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (m["metadata"].get("namespace", ""), m["spec"]["template"]["spec"])
        for m in manifests
        if m["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job")
    ]


@pytest.mark.parametrize("name", list(CASES))
def test_every_pod_meets_the_level_its_namespace_enforces(name):
    """Restricted everywhere, except the jail's namespace under runtime namespaces, which is
    labelled privileged and is the only level that admits its pod."""
    manifests = chart(name)
    sandbox_namespace = namespace_of(name)
    (labels,) = [
        m["metadata"]["labels"]
        for m in manifests
        if m["kind"] == "Namespace" and m["metadata"]["name"] == sandbox_namespace
    ]
    jail = CASES[name][1].get("runtime", "namespaces") == "namespaces"
    expected = "privileged" if jail else "restricted"
    assert {
        labels[f"pod-security.kubernetes.io/{mode}"] for mode in ("enforce", "audit", "warn")
    } == {expected}
    found = pods(manifests)
    assert {namespace for namespace, _ in found} == {NAMESPACE, sandbox_namespace}
    for namespace, pod in found:
        level = expected if namespace == sandbox_namespace else "restricted"
        assert violations(pod, level) == [], (namespace, level)
        if namespace == sandbox_namespace and jail:
            refused = [lvl for lvl in LEVELS if violations(pod, lvl)]
            assert refused == ["baseline", "restricted"], "SYS_ADMIN: privileged only"
            assert pod["hostUsers"] is False


BREAKS = {
    "privileged": (lambda pod, c: c.update(privileged=True), "baseline", "privileged"),
    "host network": (lambda pod, c: pod.update(hostNetwork=True), "baseline", "hostNetwork"),
    "hostPath": (
        lambda pod, c: pod["volumes"].append({"name": "h", "hostPath": {"path": "/"}}),
        "baseline",
        "hostPath",
    ),
    "SYS_ADMIN": (
        lambda pod, c: c["capabilities"].update(add=["SYS_ADMIN"]),
        "baseline",
        "SYS_ADMIN",
    ),
    "AppArmor unconfined": (
        lambda pod, c: c.update(appArmorProfile={"type": "Unconfined"}),
        "baseline",
        "appArmorProfile",
    ),
    "an added capability": (
        lambda pod, c: c["capabilities"].update(add=["CHOWN"]),
        "restricted",
        "CHOWN",
    ),
    "root": (lambda pod, c: c.update(runAsNonRoot=False), "restricted", "runAsNonRoot"),
    "escalation": (
        lambda pod, c: c.update(allowPrivilegeEscalation=True),
        "restricted",
        "allowPrivilegeEscalation",
    ),
    "seccomp": (
        lambda pod, c: c.update(seccompProfile={"type": "Unconfined"}),
        "restricted",
        "seccompProfile",
    ),
}


@pytest.mark.parametrize(("mutate", "level", "found"), BREAKS.values(), ids=BREAKS.keys())
def test_the_standard_check_catches_each_control(mutate, level, found):
    """The check the pods are held to can fail: each control, broken once in the gVisor pod."""
    (pod,) = [p for ns, p in pods(chart("gvisor")) if ns == "trainyard-sandbox"]
    assert violations(pod, "restricted") == []
    mutate(pod, pod["containers"][0]["securityContext"])
    assert any(found in violation for violation in violations(pod, level)), violations(pod, level)
