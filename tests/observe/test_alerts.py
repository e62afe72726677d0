"""The alert rules: valid for Prometheus, each with a runbook, and each proven by promtool's
unit tests to fire on the series that mean trouble and to stay quiet on healthy ones."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import pytest
import yaml
from observe_tools import (
    CHART,
    TARGET_LABELS,
    operator_series,
    run,
    selectors,
    tool,
    training_series,
)

from trainyard.observe import alerts
from trainyard.observe.labels import POD_LABELS

RULES = CHART / "rules" / "trainyard.rules.yaml"


def checked_in_rules() -> list[dict]:
    return [
        rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]
    ]


def test_promtool_accepts_the_rule_file():
    result = run(tool("promtool"), "check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(checked_in_rules())} rules found" in result.stdout


def test_every_alert_says_what_to_do():
    for rule in checked_in_rules():
        annotations = rule["annotations"]
        assert {"summary", "description", "runbook"} <= set(annotations), rule["alert"]
        assert rule["labels"]["severity"] in ("info", "warning", "critical"), rule["alert"]
        assert "kubectl" in annotations["runbook"] or "dashboard" in annotations["runbook"], rule[
            "alert"
        ]


def test_the_issues_alerts_are_all_there():
    assert {rule["alert"] for rule in checked_in_rules()} >= {
        "TrainyardRunFailed",
        "TrainyardRunStalled",
        "TrainyardRunRestartsClimbing",
        "TrainyardCheckpointUploadFailing",
        "TrainyardCheckpointUploadSlow",
        "TrainyardGateFailed",
        "TrainyardGateAwaitingApproval",
        "TrainyardOperatorDown",
        "TrainyardOperatorReconcileErrors",
        "TrainyardOperatorAPIErrors",
        "TrainyardOperatorQueueBackingUp",
        "TrainyardInferenceServerNotReady",
        "TrainyardVLLMServerDown",
    }


def test_every_metric_an_alert_reads_is_exported_with_the_labels_it_matches_on():
    exported = {**operator_series(), **training_series(), "up": set()}
    target = TARGET_LABELS | set(POD_LABELS)
    problems = [
        f"{rule['alert']}: {name} {sorted(labels)}"
        for rule in checked_in_rules()
        for name, labels in selectors(rule["expr"])
        if name not in exported or labels - exported[name] - target
    ]
    assert not problems, "metrics nothing exports, or labels they lack:\n" + "\n".join(problems)


# ------------------------------------------------------------------ promtool unit tests

OP = 'job="trainyard-operator"'
TR = 'job="trainyard-training", namespace="ml", pod="r1-attempt-0-0"'


@dataclass
class Case:
    """Series in promtool's notation; at `fires` the alert fires with `labels`, at `quiet` it does not."""

    alert: str
    series: dict[str, str]
    fires: str
    labels: dict[str, str]
    quiet: str
    value: str = ""  # the text `{{ $value | ... }}` renders to, where an annotation shows it
    extra: list[dict] = field(default_factory=list)


CASES = [
    Case(
        "TrainyardRunFailed",
        {
            f'trainyard_operator_run_phase{{{OP}, namespace="ml", run="r9", phase="Running"}}': "1x20 _x40",
            f'trainyard_operator_run_phase{{{OP}, namespace="ml", run="r9", phase="Failed"}}': "_x20 1x20 _x20",
        },
        fires="25m",
        labels={"namespace": "ml", "run": "r9"},
        quiet="50m",  # the failed run was deleted
    ),
    Case(
        "TrainyardRunStalled",
        {
            # r1 steps once a minute for 30 minutes, then not at all, 70 steps short.
            f'trainyard_step{{{TR}, run="r1"}}': "0+1x30 30x40",
            f'trainyard_total_steps{{{TR}, run="r1"}}': "100x70",
            f'up{{{TR}, run="r1"}}': "1x70",
            # r2 is finished: its step stays at max steps.
            'trainyard_step{job="trainyard-training", namespace="ml", run="r2"}': "0+10x10 100x60",
            'trainyard_total_steps{job="trainyard-training", namespace="ml", run="r2"}': "100x70",
        },
        fires="50m",
        labels={"namespace": "ml", "run": "r1"},
        quiet="40m",  # it stepped 10 minutes ago
    ),
    Case(
        "TrainyardRunStalled",
        {
            # r3's rank 0 stops answering scrapes after 10 minutes (hung, or SIGSTOPped).
            'trainyard_step{job="trainyard-training", namespace="ml", run="r3"}': "0+1x10 _x30",
            'trainyard_total_steps{job="trainyard-training", namespace="ml", run="r3"}': "100x10 _x30",
            'up{job="trainyard-training", namespace="ml", run="r3"}': "1x10 0x30",
            # r4's rank 0 never answered (still loading, or crashing): not a stall.
            'up{job="trainyard-training", namespace="ml", run="r4"}': "0x40",
        },
        fires="30m",
        labels={"namespace": "ml", "run": "r3"},
        quiet="20m",  # it answered 10 minutes ago
    ),
    Case(
        "TrainyardRunRestartsClimbing",
        {
            f'trainyard_operator_restarts_total{{{OP}, reason="PodFailed"}}': "0x30 0+1x30",
            f'trainyard_operator_restarts_total{{{OP}, reason="Preempted"}}': "0x30 0+1x30",
        },
        fires="60m",
        labels={"reason": "PodFailed"},
        quiet="30m",
        extra=[{"reason": "Preempted"}],
    ),
    Case(
        "TrainyardCheckpointUploadFailing",
        {f'trainyard_checkpoint_upload_failures_total{{{TR}, run="r1"}}': "0x20 1x40"},
        fires="25m",
        labels={"namespace": "ml", "run": "r1"},
        quiet="60m",
    ),
    Case(
        "TrainyardCheckpointUploadSlow",
        {
            # r1's uploads take 10 to 30 minutes; r2's under 10 (not an alert).
            f'trainyard_checkpoint_upload_seconds_bucket{{{TR}, run="r1", le="600"}}': "0x60",
            f'trainyard_checkpoint_upload_seconds_bucket{{{TR}, run="r1", le="1800"}}': "0+1x60",
            f'trainyard_checkpoint_upload_seconds_bucket{{{TR}, run="r1", le="+Inf"}}': "0+1x60",
            'trainyard_checkpoint_upload_seconds_bucket{job="trainyard-training", namespace="ml", run="r2", le="600"}': "0+1x60",
            'trainyard_checkpoint_upload_seconds_bucket{job="trainyard-training", namespace="ml", run="r2", le="1800"}': "0+1x60",
            'trainyard_checkpoint_upload_seconds_bucket{job="trainyard-training", namespace="ml", run="r2", le="+Inf"}': "0+1x60",
        },
        fires="40m",
        labels={"namespace": "ml", "run": "r1"},
        quiet="0m",
        value="28m 0s",  # 600 + 0.9 × (1800 − 600) seconds
    ),
    Case(
        "TrainyardGateFailed",
        {
            f'trainyard_gate_verdict{{{OP}, namespace="ml", gate="g1", verdict="Failed"}}': "0x10 1x10",
            f'trainyard_gate_verdict{{{OP}, namespace="ml", gate="g1", verdict="Passed"}}': "0x20",
        },
        fires="15m",
        labels={"namespace": "ml", "gate": "g1"},
        quiet="5m",
    ),
    Case(
        "TrainyardGateAwaitingApproval",
        {
            f'trainyard_gate_verdict{{{OP}, namespace="ml", gate="g1", verdict="AwaitingApproval"}}': "1x1560"
        },
        fires="25h",
        labels={"namespace": "ml", "gate": "g1"},
        quiet="23h",
    ),
    Case(
        "TrainyardOperatorDown",
        {f'up{{{OP}, instance="10.0.0.1:8080"}}': "1x5 0x20"},
        fires="15m",
        labels={},
        quiet="8m",  # down, but not for 5 minutes yet
    ),
    Case(
        "TrainyardOperatorDown",
        {'up{job="something-else"}': "1x20"},  # never scraped at all
        fires="10m",
        labels={"job": "trainyard-operator"},
        quiet="3m",
    ),
    Case(
        "TrainyardOperatorReconcileErrors",
        {
            f'trainyard_operator_reconciles_total{{{OP}, result="error"}}': "0x5 0+5x30",
            f'trainyard_operator_reconciles_total{{{OP}, result="converged"}}': "0+5x35",
        },
        fires="30m",
        labels={},
        quiet="12m",  # erring, but not for 10 minutes yet
        value="50%",
    ),
    Case(
        "TrainyardOperatorAPIErrors",
        {f'trainyard_operator_api_errors_total{{{OP}, verb="patch", code="403"}}': "0+60x30"},
        fires="20m",
        labels={"verb": "patch", "code": "403"},
        quiet="8m",
        value="1",
    ),
    Case(
        "TrainyardOperatorQueueBackingUp",
        {
            f'trainyard_operator_queue_depth{{{OP}, kind="TrainingRun"}}': "500x30",
            f'trainyard_operator_queue_depth{{{OP}, kind="PromotionGate"}}': "5x30",
        },
        fires="15m",
        labels={"kind": "TrainingRun"},
        quiet="5m",
        value="500",
    ),
    Case(
        "TrainyardInferenceServerNotReady",
        {
            f'trainyard_inference_server_ready{{{OP}, namespace="serve", server="chat"}}': "1x5 0x20",
            f'trainyard_inference_server_ready{{{OP}, namespace="serve", server="code"}}': "1x25",
        },
        fires="20m",
        labels={"namespace": "serve", "server": "chat"},
        quiet="10m",
    ),
    Case(
        "TrainyardVLLMServerDown",
        {
            'up{job="trainyard-vllm", namespace="ml", pod="grpo-vllm-0", run="grpo"}': "1x5 0x30",
            'up{job="trainyard-vllm", namespace="serve", pod="chat-0", server="chat"}': "1x35",
        },
        fires="25m",
        labels={"namespace": "ml", "pod": "grpo-vllm-0", "run": "grpo"},
        quiet="15m",  # down for 10 minutes only
    ),
]


def expected_annotations(rule: dict, labels: dict[str, str], value: str) -> dict[str, str]:
    """The rule's annotation templates with the few constructs they use filled in."""

    def fill(text: str) -> str:
        text = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels[m.group(1)], text)
        text = re.sub(r"\{\{ \$value \| \w+ \}\}", value, text)
        assert "{{" not in text, f"a template construct this test does not know: {text}"
        return text

    return {key: fill(text) for key, text in rule["annotations"].items()}


def promtool_test(case: Case) -> dict:
    (rule,) = [r for r in checked_in_rules() if r["alert"] == case.alert]
    fired = []
    for labels in [case.labels, *case.extra]:
        all_labels = {**labels, **rule["labels"]}
        fired.append(
            {
                "exp_labels": all_labels,
                "exp_annotations": expected_annotations(rule, all_labels, case.value),
            }
        )
    return {
        "interval": "1m",
        "input_series": [{"series": s, "values": v} for s, v in case.series.items()],
        "alert_rule_test": [
            {"eval_time": case.fires, "alertname": case.alert, "exp_alerts": fired},
            {"eval_time": case.quiet, "alertname": case.alert, "exp_alerts": []},
        ],
    }


def test_every_alert_has_a_promtool_case():
    assert {case.alert for case in CASES} == {rule["alert"] for rule in checked_in_rules()}


@pytest.mark.parametrize("case", CASES, ids=[f"{c.alert}-{i}" for i, c in enumerate(CASES)])
def test_alert_fires_on_trouble_and_not_before(case, tmp_path):
    tests = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [promtool_test(case)],
    }
    path = tmp_path / "test.yaml"
    path.write_text(json.dumps(tests))
    result = run(tool("promtool"), "test", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_wrong_expectation_fails_promtool(tmp_path):
    """The harness can fail: the stall case expecting the wrong run is refused."""
    case = next(c for c in CASES if c.alert == "TrainyardRunStalled")
    wrong = Case(**{**case.__dict__, "labels": {**case.labels, "run": "r2"}})
    path = tmp_path / "test.yaml"
    path.write_text(
        json.dumps(
            {
                "rule_files": [str(RULES)],
                "evaluation_interval": "1m",
                "tests": [promtool_test(wrong)],
            }
        )
    )
    result = run(tool("promtool"), "test", "rules", str(path))
    assert result.returncode != 0
    assert "TrainyardRunStalled" in result.stdout + result.stderr


def test_settings_reach_the_rules():
    quick = alerts.rule_groups(alerts.AlertSettings(stall_window="30s", operator_down_for="1m"))
    rules = {r["alert"]: r for g in quick["groups"] for r in g["rules"]}
    assert "[30s]" in rules["TrainyardRunStalled"]["expr"]
    assert "offset 30s" in rules["TrainyardRunStalled"]["expr"]
    assert rules["TrainyardOperatorDown"]["for"] == "1m"
    assert "for" not in rules["TrainyardRunStalled"]
