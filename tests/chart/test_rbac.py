"""The chart grants exactly what the operator does: no request of it is forbidden, nothing more is granted.

Two checks. The first builds the operator's needs by reading its code: every Kubernetes
client call in operator/trainyard/operator (k8s.py is the only module that talks to the
API), resolved through the code's own constants (k8s.RESOURCES, controller.CHILD_KINDS and
WATCHED_KINDS, the runtime's peering kinds) and the kinds the builders render for every
example, plus what kopf itself does. The second runs the real operator (kopf included) with the chart's own command line
against the Kubernetes API emulation of tests/operator, takes a run through creation and a
gang restart, an InferenceServer through a model change, and checks every request it made
against the rendered Roles.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import dataclasses
import sys
from collections.abc import Iterable
from typing import Any

import pytest
import yaml
from chart_rendering import REPO, VALUE_SETS, of_kind, operator_argv, rendered

from trainyard.api import parse_resource
from trainyard.api.base import GROUP
from trainyard.cli.operator_cmd import config_from_args, run_operator
from trainyard.operator import (
    controller,
    gate_controller,
    k8s,
    pipeline_controller,
    server_controller,
)
from trainyard.operator.builders import render_children
from trainyard.operator.observability import OperatorMetrics

sys.path.insert(0, str(REPO / "tests" / "operator"))
from apiserver import TrainyardApiServer, running_api_server  # noqa: E402
from operator_fakes import DEPLOYMENTS, JOBS, NAMESPACE, RUNS, Kubelet, eventually  # noqa: E402

SERVERS = "trainyard.dev/v1alpha1/inferenceservers"

OPERATOR_CODE = REPO / "operator" / "trainyard" / "operator"
Need = tuple[str, str, str]  # (API group, resource[/subresource], verb)
PEERING_GROUPS = ("kopf.dev", "zalando.org")  # kopf serves whichever of its two groups exists


def group_and_plural(kind: str) -> tuple[str, str]:
    prefix, plural = k8s.RESOURCES[kind]
    parts = prefix.strip("/").split("/")  # api/v1 | apis/<group>/<version>
    return ("" if parts[0] == "api" else parts[1]), plural


# -- what the operator's code calls ---------------------------------------------------------


def client_calls() -> set[tuple[str, str | None]]:
    """(method, first literal argument) of every call on a Kubernetes client in the operator."""
    calls = set()
    for path in OPERATOR_CODE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            receiver = ast.unparse(node.func.value)
            if receiver in ("client", "self.client", "self.client._client()"):
                first = node.args[0] if node.args else None
                literal = first.value if isinstance(first, ast.Constant) else None
                calls.add((node.func.attr, literal))
    return calls


def informer_kinds() -> set[str]:
    """The kinds the runtime builds informers (LIST + WATCH) for: what each registered
    controller owns (controller.py), and kopf's peering objects (runtime.py)."""
    source = (OPERATOR_CODE / "runtime.py").read_text()
    assert "registration.owns" in source and "PEERING_KINDS" in source, (
        "runtime.py builds its informers differently now: resolve them here"
    )
    return (
        set(controller.WATCHED_KINDS)
        | set(server_controller.CHILD_KINDS)
        | set(gate_controller.CHILD_KINDS)
        | set(pipeline_controller.CHILD_KINDS)
    )


def created_kinds() -> set[str]:
    """Every kind the builders render for the examples, suspended or not, with restarts."""
    kinds = set()
    for path in sorted((REPO / "examples").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "TrainingRun":
                run = parse_resource(doc)
                for suspend in (False, True):
                    children = render_children(run, uid="u", restart_attempt=1, suspend=suspend)
                    kinds.update(child["kind"] for child in children)
    return kinds


# How each client call maps onto (kind, subresource, verb); a call not listed fails the test.
def operator_needs() -> set[Need]:
    calls = client_calls()
    known = {
        ("create", None),  # apply_plan: plan.creates, the run's children
        ("delete", None),  # apply_plan: plan.deletes, the run's children
        ("replace", None),  # apply_plan: plan.updates, an InferenceServer's children (PUT)
        ("patch_status", None),  # apply_plan: the owner's status subresource (TrainingRun)
        ("request", "list"),  # Informer._list
        ("open", "GET"),  # Informer._watch: GET ?watch=true on the collection
    }
    assert calls == known, (
        f"the operator's Kubernetes calls changed: new {sorted(calls - known, key=str)}, "
        f"gone {sorted(known - calls, key=str)}; map them in operator_needs and grant them in "
        "charts/trainyard/templates/_helpers.tpl"
    )
    children = created_kinds()
    assert children <= set(controller.CHILD_KINDS), children - set(controller.CHILD_KINDS)
    needs: set[Need] = set()
    for kind in controller.CHILD_KINDS:
        group, plural = group_and_plural(kind)
        needs |= {(group, plural, "create"), (group, plural, "delete")}
    for kind in informer_kinds():
        group, plural = group_and_plural(kind)
        needs |= {(group, plural, "list"), (group, plural, "watch")}
    for kind in server_controller.CHILD_KINDS:  # created, deleted by GC, replaced when changed
        group, plural = group_and_plural(kind)
        needs |= {(group, plural, "create"), (group, plural, "update")}
    for kind in gate_controller.CHILD_KINDS:  # the evaluation's ConfigMap and Job
        group, plural = group_and_plural(kind)
        needs |= {(group, plural, "create"), (group, plural, "delete")}
    for kind in pipeline_controller.CHILD_KINDS:  # stages' runs and gates, the served model
        group, plural = group_and_plural(kind)
        needs |= {(group, plural, "create"), (group, plural, "delete")}
    for kind in pipeline_controller.UPDATED_KINDS:  # the serve stage rolls its server (PUT)
        group, plural = group_and_plural(kind)
        needs.add((group, plural, "update"))
    for kind in ("TrainingRun", server_controller.KIND, gate_controller.KIND, "TrainingPipeline"):
        group, plural = group_and_plural(kind)
        needs.add((group, f"{plural}/status", "patch"))
    return needs


# What kopf does on its own (kopf 1.4x: its docs' RBAC page, and its source: the resource and
# namespace observers, posting, peering). Its only handlers are `on.event`, which write
# nothing to the runs. The runtime's peering informers read what kopf's peering reads.
KOPF_NAMESPACED: set[Need] = {
    (GROUP, "trainingruns", "list"),
    (GROUP, "trainingruns", "watch"),
    (GROUP, "inferenceservers", "list"),
    (GROUP, "inferenceservers", "watch"),
    (GROUP, "promotiongates", "list"),
    (GROUP, "promotiongates", "watch"),
    (GROUP, "trainingpipelines", "list"),
    (GROUP, "trainingpipelines", "watch"),
    ("", "events", "create"),
}
KOPF_CLUSTER: set[Need] = {
    ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
    ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
}
KOPF_SERVED_NAMESPACES: set[Need] = {("", "namespaces", "list"), ("", "namespaces", "watch")}


def peering_needs(plural: str) -> set[Need]:
    return {(g, plural, v) for g in PEERING_GROUPS for v in ("list", "watch", "patch")}


# -- what the chart grants ------------------------------------------------------------------


def expand(rules: Iterable[dict[str, Any]]) -> set[Need]:
    return {
        (group, resource, verb)
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def grants(manifests: list[dict[str, Any]]) -> tuple[set[Need], dict[str, set[Need]]]:
    """(cluster-wide grants, grants per namespace) of the chart's bound roles."""
    (cluster_role,) = of_kind(manifests, "ClusterRole")
    (cluster_binding,) = of_kind(manifests, "ClusterRoleBinding")
    assert cluster_binding["roleRef"]["name"] == cluster_role["metadata"]["name"]
    roles = {
        (r["metadata"]["namespace"], r["metadata"]["name"]): r for r in of_kind(manifests, "Role")
    }
    per_namespace: dict[str, set[Need]] = {}
    for binding in of_kind(manifests, "RoleBinding"):
        namespace = binding["metadata"]["namespace"]
        role = roles[(namespace, binding["roleRef"]["name"])]
        per_namespace[namespace] = expand(role["rules"])
    assert len(per_namespace) == len(roles), "every Role is bound"
    return expand(cluster_role["rules"]), per_namespace


@pytest.mark.parametrize(
    "name", ["defaults", "two-namespaces", "replicas-2-peering", "namespaces-replicas-3"]
)
def test_chart_grants_exactly_what_the_operator_and_kopf_need(name):
    values = VALUE_SETS[name]
    namespaces = values.get("watchNamespaces") or []
    peering = values.get("replicas", 1) > 1
    namespaced = operator_needs() | KOPF_NAMESPACED
    cluster, per_namespace = grants(rendered(name))
    if not namespaces:
        expected = (
            namespaced | KOPF_CLUSTER | (peering_needs("clusterkopfpeerings") if peering else set())
        )
        assert cluster == expected, diff(cluster, expected)
        assert per_namespace == {}
    else:
        expected_cluster = KOPF_CLUSTER | KOPF_SERVED_NAMESPACES
        assert cluster == expected_cluster, diff(cluster, expected_cluster)
        expected = namespaced | (peering_needs("kopfpeerings") if peering else set())
        assert sorted(per_namespace) == sorted(namespaces)
        for namespace, granted in per_namespace.items():
            assert granted == expected, f"{namespace}: {diff(granted, expected)}"


def diff(granted: set[Need], needed: set[Need]) -> str:
    return f"missing {sorted(needed - granted)}, not needed {sorted(granted - needed)}"


# -- what the operator really asks the API server -------------------------------------------


def request_need(verb: str, path: str) -> tuple[str | None, Need] | None:
    """(namespace, need) of one recorded request; None for discovery (every account may)."""
    parts = path.strip("/").split("/")
    if parts[0] == "api" and len(parts) > 2:
        group, rest = "", parts[2:]
    elif parts[0] == "apis" and len(parts) > 3:
        group, rest = parts[1], parts[3:]
    else:
        return None  # /api, /apis, /apis/<group>/<version>, /version
    namespace = None
    if rest[0] == "namespaces" and len(rest) >= 3:
        namespace, rest = rest[1], rest[2:]
    resource = rest[0] + (f"/{rest[2]}" if len(rest) >= 3 else "")
    return namespace, (group, resource, verb)


def peering_objects(manifests: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(emulation resource id, manifest) of the chart's kopf peering objects."""
    return [
        (f"zalando.org/v1/{plural}", manifest)
        for kind, plural in (
            ("ClusterKopfPeering", "clusterkopfpeerings"),
            ("KopfPeering", "kopfpeerings"),
        )
        for manifest in of_kind(manifests, kind)
    ]


async def run_operator_from_chart(
    api: TrainyardApiServer, manifests: list[dict[str, Any]], argv: list[str]
) -> None:
    """The operator with the chart's flags, pointed at the emulation; a run created, then restarted."""
    for rid, peering in peering_objects(manifests):
        await api.put_object(rid, dict(peering))
    config = dataclasses.replace(
        config_from_args(argv),
        api_server=str(api.url).rstrip("/"),
        metrics_port=None,  # no real ports: other suites may run beside this one
        liveness_endpoint=None,
        watch_server_timeout=5.0,
        watch_client_timeout=8.0,
        request_timeout=5.0,
        api_backoffs=(0.02, 0.05, 0.1),
        error_backoff_base=0.1,
        run_metrics_url="http://127.0.0.1:9/metrics",  # nothing listens: no progress, fast
    )
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(
        run_operator(config, stop_flag=stop, ready_flag=ready, metrics=OperatorMetrics())
    )
    try:
        await asyncio.wait_for(ready.wait(), 10)
        kubelet = Kubelet(api)
        run = yaml.safe_load((REPO / "examples" / "grpo-run.yaml").read_text())
        run["metadata"]["namespace"] = NAMESPACE
        name = run["metadata"]["name"]
        await api.put_object(RUNS, run)
        job = await eventually(lambda: api.get(JOBS, NAMESPACE, f"{name}-attempt-0"))
        pods = await kubelet.start_pods(job)
        await kubelet.fail_pod(pods[0], reason="OOMKilled", exit_code=137)
        await eventually(lambda: api.get(JOBS, NAMESPACE, f"{name}-attempt-1"))
        await eventually(lambda: api.get(JOBS, NAMESPACE, f"{name}-attempt-0") is None)
        # An InferenceServer, then a new model: its Deployment is replaced.
        server = yaml.safe_load((REPO / "examples" / "inference-server.yaml").read_text())
        server["metadata"]["namespace"] = NAMESPACE
        server["spec"]["adapters"] = None
        await api.put_object(SERVERS, server)
        deployment = f"{server['metadata']['name']}-server"
        await eventually(lambda: api.get(DEPLOYMENTS, NAMESPACE, deployment))
        await api.patch_object(
            SERVERS,
            NAMESPACE,
            server["metadata"]["name"],
            {"spec": {"model": {"source": "hf://Qwen/Qwen2.5-1.5B-Instruct"}}},
        )
        await eventually(lambda: "1.5B" in str(api.get(DEPLOYMENTS, NAMESPACE, deployment)["spec"]))
        for rid, peering in peering_objects(manifests):  # kopf keeps alive in the chart's object
            meta = peering["metadata"]
            await eventually(
                lambda rid=rid, meta=meta: (
                    api.get(rid, meta.get("namespace"), meta["name"]) or {}
                ).get("status"),
            )
    finally:
        stop.set()
        try:
            await asyncio.wait_for(task, 10)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["namespaces-replicas-3", "replicas-2-peering"])
async def test_every_request_of_the_running_operator_is_granted(name, tmp_path):
    manifests = rendered(name, "--include-crds")
    cluster, per_namespace = grants(manifests)
    async with running_api_server() as api:
        api.declare(SERVERS, "InferenceServer")
        api.declare("zalando.org/v1/kopfpeerings", "KopfPeering", namespaced=True, status=False)
        api.declare(
            "zalando.org/v1/clusterkopfpeerings",
            "ClusterKopfPeering",
            namespaced=False,
            status=False,
        )
        for namespace in ("default", NAMESPACE):
            await api.put_object(
                "v1/namespaces",
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}},
            )
        await run_operator_from_chart(api, manifests, operator_argv(name, tmp_path))
        records = list(api.records)
    forbidden, seen = [], set()
    for record in records:
        found = request_need(record.verb, record.path)
        if found is None:
            continue
        namespace, need = found
        seen.add(need)
        if need not in cluster | (per_namespace.get(namespace, set()) if namespace else set()):
            forbidden.append(f"{record.verb} {record.path}")
    assert not forbidden, "requests the chart's RBAC forbids:\n" + "\n".join(sorted(set(forbidden)))
    # The scenario did reach the children's writes and the peering keep-alives.
    assert {
        ("batch", "jobs", "create"),
        ("batch", "jobs", "delete"),
        ("apps", "deployments", "create"),
        ("apps", "deployments", "update"),
        ("trainyard.dev", "inferenceservers/status", "patch"),
    } <= seen
    assert any(resource.endswith("kopfpeerings") and verb == "patch" for _, resource, verb in seen)
