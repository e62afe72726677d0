"""The pipeline, work-queue and server panels (and the gate ones again) against the
operator's real registry.

test_live_stack proves the gate panels with real PromotionGates judging a real run; a
TrainingPipeline and an InferenceServer are not part of that stack. Here a real
`OperatorMetrics` is served over HTTP with values set through the attributes the
controllers set (pipeline_controller, server_controller, gate_controller, the runtime), so
Debian's prometheus scrapes the exact names and label sets and every query on those
panels, and the GateFailed alert, is proven against them.
"""

from __future__ import annotations

import asyncio
import json
import math

import pytest
from live_stack import alertmanager, eventually, prometheus, webhook
from observe_tools import with_grafana_variables

from trainyard.observe import alerts, dashboards
from trainyard.observe.labels import OPERATOR_JOB
from trainyard.operator.observability import OperatorMetrics

pytestmark = pytest.mark.timeout(300)


def set_like_the_controllers(metrics: OperatorMetrics) -> None:
    for verdict in ("Pending", "Passed", "Failed", "AwaitingApproval"):
        metrics.gate_verdict.labels("ml", "sft-gate", verdict).set(verdict == "Failed")
        metrics.gate_verdict.labels("ml", "dpo-gate", verdict).set(verdict == "Passed")
    metrics.gate_verdicts.labels("ml", "sft-gate", "Failed").inc()
    metrics.gate_verdicts.labels("ml", "dpo-gate", "Passed").inc()
    metrics.gate_criterion_value.labels("ml", "sft-gate", "eval_loss <= 1.8").set(2.1)
    metrics.gate_criterion_threshold.labels("ml", "sft-gate", "eval_loss <= 1.8").set(1.8)
    metrics.pipeline_stage.labels("ml", "math-pipeline").set(2)
    metrics.inference_servers_ready.labels("serve", "chat").set(1)
    metrics.queue_depth.labels("TrainingRun").set(3)
    metrics.queue_wait_seconds.labels("TrainingRun").observe(0.02)
    metrics.watch_restarts.labels("TrainingRun").inc()
    metrics.leader.set(1)
    metrics.record_api_error("patch", 409)
    metrics.reconciles.labels(result="changed").inc()
    metrics.reconcile_seconds.observe(0.01)


async def test_gate_pipeline_queue_and_server_queries_read_the_registry(tmp_path):
    metrics = OperatorMetrics()
    port = metrics.serve(0, addr="127.0.0.1")
    scrape = [
        {
            "job_name": OPERATOR_JOB,
            "honor_labels": True,  # as the chart's ServiceMonitor: keep the gates' namespace
            "static_configs": [{"targets": [f"127.0.0.1:{port}"]}],
        }
    ]
    try:
        set_like_the_controllers(metrics)
        async with (
            webhook() as receiver,
            alertmanager(tmp_path, f"http://127.0.0.1:{receiver.port}/") as am_url,
            prometheus(tmp_path, scrape, alerts.render(), am_url, interval="1s") as prom,
        ):
            await eventually(prom.targets_up, 60, "the operator target up")
            await asyncio.sleep(3)
            set_like_the_controllers(metrics)  # counters move between scrapes
            await asyncio.sleep(3)

            boards = [
                dashboards.PIPELINES_AND_GATES,
                dashboards.OPERATOR_BOARD,
                dashboards.VLLM_BOARD,
            ]
            empty, checked = [], 0
            for board in boards:
                for expr in dashboards.exprs(json.loads(dashboards.render(board))):
                    if f'job="{OPERATOR_JOB}"' not in expr or expr.startswith("label_values("):
                        continue  # training and vLLM series: the other live tests
                    checked += 1
                    query = with_grafana_variables(expr.replace("$__rate_interval", "5s"))
                    result = await prom.query(query)
                    if not any(math.isfinite(float(s["value"][1])) for s in result):
                        empty.append(f"{board.uid}: {expr}\n  → {result}")
            assert checked >= 12
            assert not empty, "queries without numbers:\n" + "\n".join(empty)

            gates = await prom.label_values(
                "gate", f'trainyard_gate_verdict{{job="{OPERATOR_JOB}"}}'
            )
            assert gates == ["dpo-gate", "sft-gate"]
            held = await prom.query(
                with_grafana_variables(
                    next(
                        e
                        for e in dashboards.exprs(
                            json.loads(dashboards.render(dashboards.PIPELINES_AND_GATES))
                        )
                        if "trainyard_gate_verdict{" in e and "== 1" in e
                    )
                )
            )
            assert {(s["metric"]["gate"], s["metric"]["verdict"]) for s in held} == {
                ("sft-gate", "Failed"),
                ("dpo-gate", "Passed"),
            }

            # The failed gate pages; the passed one does not.
            (failed,) = await eventually(
                lambda: receiver.alerts("TrainyardGateFailed", "firing"), 60, "the gate alert"
            )
            assert failed["labels"]["gate"] == "sft-gate"
            assert failed["labels"]["namespace"] == "ml"
    finally:
        metrics.stop_serving()
