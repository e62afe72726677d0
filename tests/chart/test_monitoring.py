"""Dashboards, alert rules and monitors in the chart: off by default, each on by its value,
valid against prometheus-operator's own CRDs, and carrying the labels the queries join on."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import yaml
from chart_rendering import (
    CHART,
    MONITORING_APIS,
    NAMESPACE,
    POD_MONITOR_API,
    PROMETHEUS_RULE_API,
    REPO,
    VALUE_SETS,
    documents,
    helm,
    of_kind,
    prometheus_operator_schema,
    rendered,
    template,
    the,
)

from trainyard.api import TrainingRun, parse_resource
from trainyard.observe.labels import POD_LABELS, TRAINING_JOB, VLLM_JOB, meta_label
from trainyard.operator.builders import labels as builder_labels
from trainyard.operator.builders.inference import render_server_deployment
from trainyard.operator.builders.job import render_worker_job
from trainyard.operator.builders.pipeline import render_stage_run
from trainyard.operator.builders.vllm import render_rollout_deployment

MONITORING_KINDS = ("PodMonitor", "PrometheusRule")


def dashboards(manifests):
    return [
        m for m in of_kind(manifests, "ConfigMap") if "grafana_dashboard" in m["metadata"]["labels"]
    ]


def test_monitoring_is_off_by_default():
    manifests = rendered("defaults", *MONITORING_APIS)
    assert not dashboards(manifests)
    for kind in MONITORING_KINDS:
        assert not of_kind(manifests, kind)


def test_monitors_and_rules_need_the_api_or_force():
    assert not of_kind(rendered("monitoring"), "PodMonitor")
    assert not of_kind(rendered("monitoring"), "PrometheusRule")
    assert (
        len(of_kind(rendered("monitoring", "--api-versions", POD_MONITOR_API), "PodMonitor")) == 2
    )
    assert of_kind(rendered("monitoring", "--api-versions", PROMETHEUS_RULE_API), "PrometheusRule")
    assert dashboards(rendered("monitoring")), "dashboards are ConfigMaps: no API needed"


@pytest.mark.parametrize("name", ["monitoring", "monitoring-two-namespaces"])
def test_monitoring_resources_are_valid_for_prometheus_operator(name):
    for manifest in rendered(name, *MONITORING_APIS):
        if manifest["kind"] in ("PodMonitor", "PrometheusRule", "ServiceMonitor"):
            try:
                jsonschema.validate(manifest, prometheus_operator_schema(manifest["kind"]))
            except jsonschema.ValidationError as error:
                pytest.fail(f"{name} {manifest['kind']}: {error.message} at {list(error.path)}")


def test_one_config_map_per_dashboard_with_the_sidecar_label_and_the_json_as_generated():
    maps = dashboards(rendered("monitoring"))
    files = sorted((CHART / "dashboards").glob("*.json"))
    assert len(maps) == len(files) == 4
    for config_map in maps:
        assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert config_map["metadata"]["annotations"] == {"grafana_folder": "Trainyard"}
        assert config_map["metadata"]["namespace"] == NAMESPACE
        ((key, text),) = config_map["data"].items()
        assert json.loads(text) == json.loads((CHART / "dashboards" / key).read_text())
    other = dashboards(rendered("monitoring-two-namespaces"))
    assert {m["metadata"]["namespace"] for m in other} == {"grafana"}


def test_prometheus_rule_carries_the_rule_file_with_its_templates_intact():
    rule = the(rendered("monitoring", *MONITORING_APIS), "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "prometheus"
    assert rule["spec"] == yaml.safe_load((CHART / "rules" / "trainyard.rules.yaml").read_text())
    stalled = next(
        r for g in rule["spec"]["groups"] for r in g["rules"] if r["alert"] == "TrainyardRunStalled"
    )
    assert "{{ $labels.run }}" in stalled["annotations"]["summary"]  # not eaten by helm


def test_alerts_can_be_left_out_and_labelled_for_routing():
    values = {
        "prometheusRule": {
            "enabled": True,
            "force": True,
            "disabled": [
                "TrainyardGateAwaitingApproval",
                "TrainyardInferenceServerNotReady",
                "TrainyardVLLMServerDown",
            ],
            "ruleLabels": {"team": "ml-platform", "severity": "page"},
        }
    }
    result = template(values)
    assert result.returncode == 0, result.stderr
    rule = the(documents(result.stdout), "PrometheusRule")
    shipped = yaml.safe_load((CHART / "rules" / "trainyard.rules.yaml").read_text())["groups"]
    rendered_rules = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    expected = {r["alert"]: r for g in shipped for r in g["rules"]}
    for name in values["prometheusRule"]["disabled"]:
        del expected[name]
    assert rendered_rules.keys() == expected.keys()
    assert "trainyard.serving" not in {g["name"] for g in rule["spec"]["groups"]}  # left empty
    for name, shipped_rule in expected.items():
        assert rendered_rules[name]["labels"] == {**shipped_rule["labels"], "team": "ml-platform"}
        assert rendered_rules[name]["expr"] == shipped_rule["expr"]
        assert rendered_rules[name]["annotations"] == shipped_rule["annotations"]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("RunStalled", "/prometheusRule/disabled/0"),  # the schema: not an alert name at all
        ("TrainyardRunStaled", "prometheusRule.disabled: TrainyardRunStaled is not an alert"),
    ],
)
def test_a_disabled_name_that_is_no_alert_is_refused(name, message):
    values = {"prometheusRule": {"enabled": True, "force": True, "disabled": [name]}}
    result = template(values)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


def monitor(manifests, job):
    found = [
        m
        for m in of_kind(manifests, "PodMonitor")
        if m["spec"]["podMetricsEndpoints"][0]["relabelings"][0]["replacement"] == job
    ]
    (one,) = found
    return one


def selects(selector: dict, pod_labels: dict[str, str]) -> bool:
    """A label selector's verdict on a pod's labels (matchLabels and In expressions)."""
    if not selector.get("matchLabels", {}).items() <= pod_labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        assert expression["operator"] == "In"
        if pod_labels.get(expression["key"]) not in expression["values"]:
            return False
    return True


def relabel(relabelings: list[dict], meta: dict[str, str]) -> dict[str, str]:
    """Prometheus' relabeling as the monitors use it: replace, default regex (.*), `;` separator."""
    target: dict[str, str] = {}
    for step in relabelings:
        assert step.get("action", "replace") == "replace" and "regex" not in step
        value = ";".join(meta.get(label, "") for label in step.get("sourceLabels", []))
        value = step.get("replacement", "$1").replace("$1", value)
        if value:
            target[step["targetLabel"]] = value
    return target


def pod_meta(pod_labels: dict[str, str]) -> dict[str, str]:
    return {meta_label(key): value for key, value in pod_labels.items()}


GRPO_RUN = TrainingRun.model_validate(
    {
        "apiVersion": "trainyard.dev/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {
            "name": "grpo-math",
            "namespace": "team-a",
            # A pipeline's runs carry its name; the operator copies run labels to every child.
            "labels": {"trainyard.dev/pipeline": "math-pipeline"},
        },
        "spec": {
            "method": "grpo",
            "model": {"source": "hf://Qwen/Qwen2.5-0.5B"},
            "dataset": {"source": "hf://trl-lib/DeepMath-103K"},
            "grpo": {"rewards": [{"name": "len", "builtin": "length", "args": {"max": 200}}]},
            "rollout": {"vllm": {"mode": "server"}},
        },
    }
)


def test_training_monitor_scrapes_rank_0_of_the_job_the_operator_builds_and_labels_run_and_pipeline():
    pod_monitor = monitor(rendered("monitoring", *MONITORING_APIS), TRAINING_JOB)
    job = render_worker_job(GRPO_RUN, restart_attempt=2, uid="u")
    pod_template = job["spec"]["template"]
    labels = dict(pod_template["metadata"]["labels"])
    # What the Job controller adds to each pod of an Indexed Job.
    rank0 = {**labels, "batch.kubernetes.io/job-completion-index": "0"}
    rank1 = {**labels, "batch.kubernetes.io/job-completion-index": "1"}
    assert selects(pod_monitor["spec"]["selector"], rank0)
    assert not selects(pod_monitor["spec"]["selector"], rank1)
    endpoint = pod_monitor["spec"]["podMetricsEndpoints"][0]
    (container,) = [c for c in pod_template["spec"]["containers"] if "ports" in c]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports[endpoint["port"]] == GRPO_RUN.spec.metrics.port
    target = relabel(endpoint["relabelings"], pod_meta(rank0))
    assert target == {
        "job": TRAINING_JOB,
        "run": "grpo-math",
        "pipeline": "math-pipeline",
        "attempt": "2",
        "component": builder_labels.WORKER,
    }


def test_vllm_monitor_scrapes_the_rollout_server_on_its_http_port():
    pod_monitor = monitor(rendered("monitoring", *MONITORING_APIS), VLLM_JOB)
    deployment = render_rollout_deployment(GRPO_RUN, uid="u")
    pod_template = deployment["spec"]["template"]
    labels = pod_template["metadata"]["labels"]
    assert selects(pod_monitor["spec"]["selector"], labels)
    (container,) = pod_template["spec"]["containers"]
    assert pod_monitor["spec"]["podMetricsEndpoints"][0]["port"] in {
        p["name"] for p in container["ports"]
    }
    target = relabel(pod_monitor["spec"]["podMetricsEndpoints"][0]["relabelings"], pod_meta(labels))
    assert target["run"] == "grpo-math" and target["pipeline"] == "math-pipeline"
    assert target["job"] == VLLM_JOB


def test_vllm_monitor_scrapes_the_inference_servers_pods_and_names_the_server():
    pod_monitor = monitor(rendered("monitoring", *MONITORING_APIS), VLLM_JOB)
    document = yaml.safe_load((REPO / "examples" / "inference-server.yaml").read_text())
    del document["spec"]["adapters"]  # a run:// adapter needs its run to render
    server = parse_resource(document)
    deployment = render_server_deployment(server, uid="u")
    pod_template = deployment["spec"]["template"]
    labels = pod_template["metadata"]["labels"]
    assert selects(pod_monitor["spec"]["selector"], labels)
    (container,) = pod_template["spec"]["containers"]
    endpoint = pod_monitor["spec"]["podMetricsEndpoints"][0]
    assert endpoint["port"] in {p["name"] for p in container["ports"]}
    target = relabel(endpoint["relabelings"], pod_meta(labels))
    assert target["server"] == server.metadata.name
    assert target["component"] == "inference-server"


def test_a_pipelines_run_carries_the_pipeline_label_the_monitor_turns_into_pipeline():
    document = yaml.safe_load((REPO / "examples" / "pipeline-staged.yaml").read_text())
    pipeline = parse_resource(document)
    first = pipeline.spec.stages[0]
    run = render_stage_run(pipeline, first, uid="u", model_source=None)
    job = render_worker_job(TrainingRun.model_validate(run), uid="u")
    labels = {
        **job["spec"]["template"]["metadata"]["labels"],
        "batch.kubernetes.io/job-completion-index": "0",
    }
    pod_monitor = monitor(rendered("monitoring", *MONITORING_APIS), TRAINING_JOB)
    assert selects(pod_monitor["spec"]["selector"], labels)
    target = relabel(pod_monitor["spec"]["podMetricsEndpoints"][0]["relabelings"], pod_meta(labels))
    assert target["pipeline"] == pipeline.metadata.name


def test_relabelings_and_the_generator_name_the_same_pod_labels():
    pod_monitor = monitor(rendered("monitoring", *MONITORING_APIS), TRAINING_JOB)
    relabelings = pod_monitor["spec"]["podMetricsEndpoints"][0]["relabelings"][1:]
    assert {r["targetLabel"]: r["sourceLabels"][0] for r in relabelings} == {
        target: meta_label(pod_label) for target, pod_label in POD_LABELS.items()
    }


def test_monitors_follow_the_watched_namespaces():
    for pod_monitor in of_kind(
        rendered("monitoring-two-namespaces", *MONITORING_APIS), "PodMonitor"
    ):
        assert pod_monitor["spec"]["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}
    for pod_monitor in of_kind(rendered("monitoring", *MONITORING_APIS), "PodMonitor"):
        assert pod_monitor["spec"]["namespaceSelector"] == {"any": True}


def test_operator_service_monitor_names_the_job_the_queries_select():
    service_monitor = the(rendered("monitoring", *MONITORING_APIS), "ServiceMonitor")
    (endpoint,) = service_monitor["spec"]["endpoints"]
    assert endpoint["honorLabels"] is True  # gate metrics keep their object's namespace
    assert endpoint["relabelings"] == [{"targetLabel": "job", "replacement": "trainyard-operator"}]
    assert re.fullmatch(r"\d+s", service_monitor["spec"]["endpoints"][0]["interval"])


def test_a_misspelt_monitor_field_is_refused():
    pod_monitor = monitor(rendered("monitoring", *MONITORING_APIS), TRAINING_JOB)
    spec = dict(pod_monitor["spec"])
    spec["podMetricEndpoints"] = spec.pop("podMetricsEndpoints")
    with pytest.raises(jsonschema.ValidationError, match="podMetricEndpoints"):
        jsonschema.validate({**pod_monitor, "spec": spec}, prometheus_operator_schema("PodMonitor"))


@pytest.mark.parametrize("name", ["monitoring", "monitoring-two-namespaces"])
def test_helm_lint_strict_passes_with_monitoring_on(name):
    result = helm(
        "lint", "--strict", str(CHART), "--values", "-", stdin=json.dumps(VALUE_SETS[name])
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout
