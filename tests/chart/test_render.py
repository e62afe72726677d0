"""Every named value set renders, and every manifest is valid against Kubernetes' own schemas."""

from __future__ import annotations

import pytest
from chart_rendering import (
    CHART,
    MONITORING_APIS,
    NAMESPACE,
    RELEASE,
    SERVICE_MONITOR_API,
    VALUE_SETS,
    container,
    of_kind,
    rendered,
    the,
    validate,
)
from pod_security import violations


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_value_set_renders_manifests_kubernetes_accepts(name):
    manifests = rendered(name, *MONITORING_APIS)
    assert manifests, f"{name}: nothing rendered"
    for manifest in manifests:
        validate(manifest, f"{name}: {manifest['kind']} {manifest['metadata'].get('name')}")


def test_crds_are_valid_custom_resource_definitions():
    crds = of_kind(rendered("defaults", "--include-crds"), "CustomResourceDefinition")
    assert len(crds) == len(list((CHART / "crds").glob("*.yaml"))) + 1  # kopf's file holds two
    for crd in crds:
        validate(crd, crd["metadata"]["name"])


def test_defaults_serve_every_namespace_with_one_standalone_operator():
    manifests = rendered("defaults")
    kinds = sorted(m["kind"] for m in manifests)
    assert kinds == [
        "ClusterRole",
        "ClusterRoleBinding",
        "Deployment",
        "Service",
        "ServiceAccount",
    ]
    deployment = the(manifests, "Deployment")
    assert deployment["metadata"]["namespace"] == NAMESPACE
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert container(manifests)["image"] == "ghcr.io/trainyard/operator:0.1.0"
    assert "command" not in container(manifests), "the image's entrypoint runs the operator"


def test_two_namespaces_get_a_role_each_and_only_kopfs_reads_cluster_wide():
    manifests = rendered("two-namespaces")
    roles = of_kind(manifests, "Role")
    bindings = of_kind(manifests, "RoleBinding")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    for binding in bindings:
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": f"{RELEASE}", "namespace": NAMESPACE}
        ]
    cluster_resources = {
        resource
        for rule in the(manifests, "ClusterRole")["rules"]
        for resource in rule["resources"]
    }
    assert cluster_resources == {"customresourcedefinitions", "namespaces"}


@pytest.mark.parametrize(
    ("name", "peering_kind", "namespaces"),
    [
        ("replicas-2-peering", "ClusterKopfPeering", [None]),
        ("namespaces-replicas-3", "KopfPeering", ["ml"]),
    ],
)
def test_more_replicas_peer_through_a_peering_object_the_chart_makes(
    name, peering_kind, namespaces
):
    manifests = rendered(name, "--include-crds")
    deployment = the(manifests, "Deployment")
    assert deployment["spec"]["strategy"] == {"type": "RollingUpdate"}
    peerings = of_kind(manifests, peering_kind)
    assert [p["metadata"].get("namespace") for p in peerings] == namespaces
    assert {p["metadata"]["name"] for p in peerings} == {"trainyard"}
    assert any(
        m["kind"] == "CustomResourceDefinition" and m["spec"]["names"]["kind"] == peering_kind
        for m in manifests
    )


def test_service_monitor_needs_the_api_or_force():
    assert not of_kind(rendered("service-monitor"), "ServiceMonitor"), "no API, no monitor"
    with_api = rendered("service-monitor", "--api-versions", SERVICE_MONITOR_API)
    monitor = the(with_api, "ServiceMonitor")
    service = the(with_api, "Service")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    assert not of_kind(
        rendered("defaults", "--api-versions", SERVICE_MONITOR_API), "ServiceMonitor"
    )


def test_metrics_service_reaches_the_operator_pods():
    manifests = rendered("defaults")
    service, deployment = the(manifests, "Service"), the(manifests, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] in {p["name"] for p in container(manifests)["ports"]}
    assert not of_kind(rendered("metrics-off"), "Service")


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_operator_pod_meets_the_restricted_pod_security_standard(name):
    manifests = rendered(name)
    pod = the(manifests, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    security = container(manifests)["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["readOnlyRootFilesystem"] is True
    assert not pod.get("hostNetwork") and not pod.get("hostPID") and not security.get("privileged")
    assert violations(pod, "restricted") == []


def test_probes_ask_kopfs_health_endpoint_on_its_port():
    operator = container(rendered("defaults"))
    ports = {p["name"]: p["containerPort"] for p in operator["ports"]}
    for probe in ("livenessProbe", "readinessProbe"):
        assert operator[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert f"--liveness=http://0.0.0.0:{ports['health']}/healthz" in operator["args"]


def test_scheduling_and_pull_values_reach_the_pod():
    manifests = rendered("images-and-scheduling")
    values = VALUE_SETS["images-and-scheduling"]
    pod = the(manifests, "Deployment")["spec"]["template"]
    spec = pod["spec"]
    assert spec["imagePullSecrets"] == [{"name": "registry-credentials"}]
    assert spec["priorityClassName"] == values["priorityClassName"]
    assert spec["nodeSelector"] == values["nodeSelector"]
    assert spec["tolerations"] == values["tolerations"]
    assert spec["affinity"] == values["affinity"]
    assert pod["metadata"]["annotations"] == values["podAnnotations"]
    account = the(manifests, "ServiceAccount")
    assert account["metadata"]["annotations"] == values["serviceAccount"]["annotations"]
    assert spec["serviceAccountName"] == account["metadata"]["name"]


def test_without_rbac_the_named_account_is_used_and_nothing_else_is_made():
    manifests = rendered("no-rbac-existing-account")
    assert sorted(m["kind"] for m in manifests) == ["Deployment", "Service"]
    spec = the(manifests, "Deployment")["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == "platform-operator"
