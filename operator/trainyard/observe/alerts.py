"""Prometheus alert rules: runs, checkpoints, gates, the operator, serving.

`rule_groups(AlertSettings())` is what the chart ships (rules/trainyard.rules.yaml, in a
PrometheusRule when `prometheusRule.enabled`); tests build the same rules with short
windows to watch them fire against a real Prometheus. Every alert carries `summary`,
`description` and `runbook` (what to look at first, as commands) annotations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from trainyard.api.contract import Metric as M
from trainyard.observe.labels import OPERATOR_JOB, TRAINING_JOB, VLLM_JOB

TRAINING = f'job="{TRAINING_JOB}"'
OPERATOR = f'job="{OPERATOR_JOB}"'


@dataclass(frozen=True)
class AlertSettings:
    """Windows and thresholds, as Prometheus durations and numbers."""

    stall_window: str = "15m"
    """No step progress for this long while the run has steps left: stalled."""
    stall_memory: str = "6h"
    """How far back the last step of a run whose rank 0 stopped answering is looked for."""
    restarts_window: str = "1h"
    restarts_threshold: int = 3
    upload_slow_seconds: float = 600
    upload_window: str = "30m"
    approval_wait: str = "24h"
    operator_down_for: str = "5m"
    error_ratio: float = 0.1
    errors_for: str = "10m"
    queue_depth: int = 100
    queue_wait_seconds: float = 30
    queue_for: str = "10m"
    server_not_ready_for: str = "10m"
    vllm_down_for: str = "15m"
    """A vLLM pod answers /metrics only once its model is loaded: long enough for a big one."""
    gate_failed_for: str = "0m"


@dataclass(frozen=True)
class Alert:
    name: str
    expr: str
    for_: str
    severity: str
    summary: str
    description: str
    runbook: str

    def rule(self) -> dict[str, Any]:
        rule: dict[str, Any] = {"alert": self.name, "expr": self.expr}
        if self.for_ not in ("0m", "0s", ""):
            rule["for"] = self.for_
        rule["labels"] = {"severity": self.severity}
        rule["annotations"] = {
            "summary": self.summary,
            "description": self.description,
            "runbook": self.runbook,
        }
        return rule


def run_alerts(s: AlertSettings) -> list[Alert]:
    stalled_steps = (
        f"max by (namespace, run) (changes({M.STEP}{{{TRAINING}}}[{s.stall_window}])) == 0"
        # ...and the run was already training a whole window ago (a new run loads its model)...
        f"\nand on (namespace, run) max by (namespace, run) ({M.STEP}{{{TRAINING}}} offset {s.stall_window})"
        # ...and has steps left.
        f"\nand on (namespace, run) max by (namespace, run) "
        f"({M.STEP}{{{TRAINING}}} < {M.TOTAL_STEPS}{{{TRAINING}}})"
    )
    # A hung or stopped process answers no scrape either: its rank 0 down the whole window,
    # after it had reported steps and before it reported the last one (a pod that never
    # answered has not stalled, and a finished one is gone, not down).
    unreachable = (
        f"max by (namespace, run) (max_over_time(up{{{TRAINING}}}[{s.stall_window}])) == 0"
        f"\nand on (namespace, run) max by (namespace, run) ("
        f"last_over_time({M.STEP}{{{TRAINING}}}[{s.stall_memory}])"
        f" < last_over_time({M.TOTAL_STEPS}{{{TRAINING}}}[{s.stall_memory}]))"
    )
    return [
        Alert(
            "TrainyardRunFailed",
            f'max by (namespace, run) (trainyard_operator_run_phase{{{OPERATOR}, phase="Failed"}}) == 1',
            "0m",
            "warning",
            "TrainingRun {{ $labels.namespace }}/{{ $labels.run }} failed",
            "The run is in phase Failed; the alert lasts while the run exists (as Kubernetes' KubeJobFailed does).",
            "kubectl get trainingruns -A (PHASE column); kubectl describe trainingrun NAME "
            "(its conditions say why); kubectl logs job/NAME-attempt-N.",
        ),
        Alert(
            "TrainyardRunStalled",
            f"(\n{stalled_steps}\n)\nor\n(\n{unreachable}\n)",
            "0m",
            "critical",
            "TrainingRun {{ $labels.namespace }}/{{ $labels.run }} makes no progress",
            "Its rank-0 pod reported no new step for "
            f"{s.stall_window} though steps are left, or did not answer a scrape for that long.",
            "kubectl -n {{ $labels.namespace }} get pods -l trainyard.dev/run={{ $labels.run }}; "
            "kubectl -n {{ $labels.namespace }} logs POD (NCCL timeouts, OOM, a hung data "
            "loader); py-spy dump --pid 1 in the pod shows where it waits.",
        ),
        Alert(
            "TrainyardRunRestartsClimbing",
            f"sum by (reason) (increase(trainyard_operator_restarts_total{{{OPERATOR}}}[{s.restarts_window}]))"
            f" > {s.restarts_threshold}",
            "0m",
            "warning",
            "TrainingRuns restart repeatedly ({{ $labels.reason }})",
            f"More than {s.restarts_threshold} gang restarts for {{{{ $labels.reason }}}} in "
            f"{s.restarts_window}.",
            "kubectl get trainingruns -A -o wide (RESTARTS column); kubectl describe "
            "trainingrun NAME for the restart reason; node problems show in "
            "kubectl get events -A --field-selector reason=NodeNotReady.",
        ),
        Alert(
            "TrainyardCheckpointUploadFailing",
            f"max by (namespace, run) (increase({M.CHECKPOINT_UPLOAD_FAILURES}_total{{{TRAINING}}}[{s.upload_window}])) > 0",
            "0m",
            "warning",
            "Checkpoint uploads of {{ $labels.namespace }}/{{ $labels.run }} fail",
            f"Checkpoint uploads failed in the last {s.upload_window}; a restart would resume "
            "from an older checkpoint.",
            "kubectl -n {{ $labels.namespace }} logs -l trainyard.dev/run={{ $labels.run }} "
            "| grep -i upload (credentials, bucket policy, throttling); check the run's "
            "spec.checkpoint.uri.",
        ),
        Alert(
            "TrainyardCheckpointUploadSlow",
            "histogram_quantile(0.9, sum by (namespace, run, le) "
            f"(rate({M.CHECKPOINT_UPLOAD_SECONDS}_bucket{{{TRAINING}}}[{s.upload_window}])))"
            f" > {s.upload_slow_seconds:g}",
            "0m",
            "warning",
            "Checkpoint uploads of {{ $labels.namespace }}/{{ $labels.run }} are slow",
            "90% of its checkpoint uploads took up to {{ $value | humanizeDuration }} "
            f"(over {s.upload_slow_seconds:g}s).",
            "kubectl -n {{ $labels.namespace }} logs -l trainyard.dev/run={{ $labels.run }} "
            f"| grep -i upload; compare the checkpoint size ({M.CHECKPOINT_UPLOAD_BYTES}_total) "
            "with the node's egress, or save less often (spec.checkpoint.everySteps).",
        ),
    ]


def gate_alerts(s: AlertSettings) -> list[Alert]:
    return [
        Alert(
            "TrainyardGateFailed",
            f'max by (namespace, gate) (trainyard_gate_verdict{{{OPERATOR}, verdict="Failed"}}) == 1',
            s.gate_failed_for,
            "warning",
            "PromotionGate {{ $labels.namespace }}/{{ $labels.gate }} failed",
            "Its criteria were not met; its pipeline does not advance.",
            "kubectl -n {{ $labels.namespace }} get promotiongate {{ $labels.gate }} -o yaml "
            "(status.criteria lists each observed value against its threshold).",
        ),
        Alert(
            "TrainyardGateAwaitingApproval",
            f'max by (namespace, gate) (trainyard_gate_verdict{{{OPERATOR}, verdict="AwaitingApproval"}}) == 1',
            s.approval_wait,
            "info",
            "PromotionGate {{ $labels.namespace }}/{{ $labels.gate }} waits for approval",
            f"Its criteria passed {s.approval_wait} ago or more; it waits for a person.",
            "Review it, then kubectl -n {{ $labels.namespace }} annotate promotiongate "
            "{{ $labels.gate }} trainyard.dev/approved=true.",
        ),
    ]


def operator_alerts(s: AlertSettings) -> list[Alert]:
    return [
        Alert(
            "TrainyardOperatorDown",
            f"sum(up{{{OPERATOR}}}) == 0 or absent(up{{{OPERATOR}}})",
            s.operator_down_for,
            "critical",
            "The Trainyard operator is down",
            "No operator replica answered a scrape: nothing reconciles runs, gates or pipelines.",
            "kubectl -n NAMESPACE get pods -l app.kubernetes.io/name=trainyard; kubectl logs "
            "deploy/trainyard --previous (crash loop, RBAC denials).",
        ),
        Alert(
            "TrainyardOperatorReconcileErrors",
            f'sum(rate(trainyard_operator_reconciles_total{{{OPERATOR}, result="error"}}[5m]))'
            f" / sum(rate(trainyard_operator_reconciles_total{{{OPERATOR}}}[5m])) > {s.error_ratio:g}",
            s.errors_for,
            "warning",
            "The Trainyard operator's reconciles fail",
            "{{ $value | humanizePercentage }} of reconciles end in an error.",
            "kubectl logs deploy/trainyard | grep -i error; the Operator dashboard's API "
            "errors panel shows the verb and status code.",
        ),
        Alert(
            "TrainyardOperatorAPIErrors",
            f"sum by (verb, code) (rate(trainyard_operator_api_errors_total{{{OPERATOR}}}[5m]))"
            " > 0.1",
            s.errors_for,
            "warning",
            "Kubernetes API answers {{ $labels.verb }} with {{ $labels.code }}",
            "{{ $value | humanize }} errors per second.",
            "403: the chart's RBAC lacks a verb, check with kubectl auth can-i {{ $labels.verb }} "
            "RESOURCE --as=system:serviceaccount:NAMESPACE:trainyard and helm upgrade with "
            "rbac.create=true; 429/5xx: the API server is overloaded; 0: the operator cannot reach it.",
        ),
        Alert(
            "TrainyardOperatorQueueBackingUp",
            f"max by (kind) (trainyard_operator_queue_depth{{{OPERATOR}}}) > {s.queue_depth}"
            "\nor\nhistogram_quantile(0.9, sum by (kind, le) "
            f"(rate(trainyard_operator_queue_wait_seconds_bucket{{{OPERATOR}}}[5m])))"
            f" > {s.queue_wait_seconds:g}",
            s.queue_for,
            "warning",
            "The operator's {{ $labels.kind }} queue backs up",
            "Objects wait in the work queue longer than they should (depth or 90% wait "
            "{{ $value | humanize }}).",
            "The Operator dashboard's latency panel: slow reconciles (API latency) or too "
            "many objects for one replica; raise resources or split watchNamespaces.",
        ),
    ]


def serving_alerts(s: AlertSettings) -> list[Alert]:
    return [
        Alert(
            "TrainyardInferenceServerNotReady",
            f"max by (namespace, server) (trainyard_inference_server_ready{{{OPERATOR}}}) == 0",
            s.server_not_ready_for,
            "critical",
            "InferenceServer {{ $labels.namespace }}/{{ $labels.server }} is not ready",
            f"Not all its vLLM replicas have been ready for {s.server_not_ready_for}.",
            "kubectl -n {{ $labels.namespace }} describe inferenceserver {{ $labels.server }}; "
            "kubectl logs of its pods (model download, CUDA out of memory, a bad --max-model-len).",
        ),
        Alert(
            "TrainyardVLLMServerDown",
            f'max by (namespace, pod, run, server) (up{{job="{VLLM_JOB}"}}) == 0',
            s.vllm_down_for,
            "warning",
            "vLLM pod {{ $labels.namespace }}/{{ $labels.pod }} answers no scrape",
            f"Its /metrics has not answered for {s.vllm_down_for}: the model is still loading, "
            "or the server hangs or crashed (a GRPO run waits for its rollout server).",
            "kubectl -n {{ $labels.namespace }} logs {{ $labels.pod }} (download progress, "
            "CUDA out of memory, engine errors); kubectl -n {{ $labels.namespace }} describe pod "
            "{{ $labels.pod }}.",
        ),
    ]


def rule_groups(settings: AlertSettings | None = None) -> dict[str, Any]:
    """The rule file: {"groups": [...]} as Prometheus and PrometheusRule's spec take it."""
    s = settings or AlertSettings()
    groups = [
        ("trainyard.runs", run_alerts(s)),
        ("trainyard.gates", gate_alerts(s)),
        ("trainyard.operator", operator_alerts(s)),
        ("trainyard.serving", serving_alerts(s)),
    ]
    return {
        "groups": [{"name": name, "rules": [a.rule() for a in alerts]} for name, alerts in groups]
    }


class _Dumper(yaml.SafeDumper):
    """Multi-line expressions as literal blocks, so the file reads like hand-written rules."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def render(settings: AlertSettings | None = None) -> str:
    header = (
        "# Generated by `python -m trainyard.observe` (operator/trainyard/observe/alerts.py).\n"
    )
    return header + yaml.dump(rule_groups(settings), Dumper=_Dumper, sort_keys=False, width=100)
