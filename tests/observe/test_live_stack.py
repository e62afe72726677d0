"""The whole path on 127.0.0.1, every part real: the operator (against the API emulation)
runs a TrainingRun whose rank 0 is a real tiny GRPO training process; Debian's prometheus
scrapes both with the labels the chart's monitors give; every training-dashboard query
returns numbers; Alertmanager pages the stall when the training process is stopped
(SIGSTOP) and sends the all-clear when it continues (SIGCONT); then two PromotionGates
judge the finished run, their panels return numbers and the failed one pages.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import sys
from pathlib import Path

import pytest
import yaml
from live_stack import alertmanager, eventually, free_port, process, prometheus, webhook
from observe_tools import REPO, with_grafana_variables

from trainyard.observe import alerts, dashboards
from trainyard.observe.labels import OPERATOR_JOB, POD_LABELS, TRAINING_JOB

sys.path.insert(0, str(REPO / "tests" / "operator"))

from apiserver import running_api_server  # noqa: E402
from operator_fakes import NAMESPACE, RUNS, Kubelet, fast_config  # noqa: E402

from trainyard.cli.operator_cmd import run_operator  # noqa: E402
from trainyard.operator.observability import OperatorMetrics  # noqa: E402
from trainyard.operator.settings import OperatorConfig  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

RUN = "live-grpo"
GATES = "trainyard.dev/v1alpha1/promotiongates"
# Short windows, so a stall pages within a minute (the chart ships AlertSettings()).
QUICK = alerts.AlertSettings(stall_window="30s")
# Grafana's $__rate_interval and $__range as a dashboard over the last minutes would set them.
RATE_INTERVAL, RANGE = "30s", "5m"


def run_document(metrics_port: int, checkpoints: Path) -> dict:
    return {
        "apiVersion": "trainyard.dev/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {
            "name": RUN,
            "namespace": NAMESPACE,
            "labels": {"trainyard.dev/pipeline": "live-pipeline"},
        },
        "spec": {
            "method": "grpo",
            "model": {"source": "builtin://tiny-qwen2"},
            "dataset": {"source": "builtin://datasets/prompts"},
            "training": {
                "maxSteps": 100000,  # runs until the test ends it
                "perDeviceBatchSize": 2,
                "learningRate": 5e-3,
                "loggingSteps": 1,
            },
            "grpo": {
                "numGenerations": 2,
                "maxCompletionLength": 8,
                "beta": 0.04,  # logs KL
                "rewards": [
                    {
                        "name": "count",
                        "builtin": "count_match",
                        "args": {"referenceField": "reference", "separator": "\n"},
                    },
                    {
                        "name": "length",
                        "builtin": "length",
                        "args": {"min": 40, "max": 60, "unit": "chars"},
                    },
                ],
            },
            "checkpoint": {"uri": checkpoints.as_uri(), "everySteps": 3, "keepLast": 2},
            "metrics": {"port": metrics_port},
            "runPolicy": {"maxRestarts": 3},
        },
    }


def operator_config(api_url: str) -> OperatorConfig:
    # metrics on a port of its own (Prometheus scrapes it); progress read every second
    return fast_config(api_url, progress_seconds=1.0, metrics_port=0)


def target_labels(pod: dict) -> dict[str, str]:
    """What the chart's training PodMonitor makes of this pod (tests/chart/test_monitoring.py
    proves its relabelings are these)."""
    labels = pod["metadata"]["labels"]
    found = {t: labels[p] for t, p in POD_LABELS.items() if p in labels}
    return {**found, "namespace": pod["metadata"]["namespace"], "pod": pod["metadata"]["name"]}


async def attempt_job(kubelet: Kubelet, attempt: int) -> dict:
    def job():
        return [
            j
            for j in kubelet.jobs(RUN)
            if j["metadata"]["labels"].get("trainyard.dev/attempt") == str(attempt)
        ]

    (found,) = await eventually(job, 60, f"the operator's Job for attempt {attempt}")
    return found


async def start_rank0(kubelet: Kubelet, attempt: int) -> dict:
    """Start the pods of the run's Job for `attempt` (as the Job controller would); rank 0's pod."""
    pods = await kubelet.start_pods(await attempt_job(kubelet, attempt))
    return next(
        p
        for p in pods
        if p["metadata"]["labels"]["batch.kubernetes.io/job-completion-index"] == "0"
    )


def promotion_gate(name: str, criterion: str) -> dict:
    return {
        "apiVersion": "trainyard.dev/v1alpha1",
        "kind": "PromotionGate",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {"run": RUN, "criteria": [criterion]},
    }


def gate_verdict(api, name: str) -> str | None:
    return ((api.get(GATES, NAMESPACE, name) or {}).get("status") or {}).get("verdict")


def discover(path: Path, port: int, pod: dict) -> None:
    """Write the file Prometheus discovers training targets from (written aside, then renamed)."""
    aside = path.with_suffix(".tmp")
    aside.write_text(json.dumps([{"targets": [f"127.0.0.1:{port}"], "labels": target_labels(pod)}]))
    aside.replace(path)


def finite(result: list[dict]) -> bool:
    return any(math.isfinite(float(series["value"][1])) for series in result)


def grafana(expr: str) -> str:
    return with_grafana_variables(
        expr.replace("$__rate_interval", RATE_INTERVAL).replace("$__range", RANGE)
    )


async def test_dashboards_show_a_real_run_and_a_stopped_run_pages(tmp_path):
    training_port = free_port()
    document = run_document(training_port, tmp_path / "checkpoints")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(document))
    env = {
        **os.environ,
        "TRAINYARD_METRICS_PORT": str(training_port),
        "TRAINYARD_CACHE": str(tmp_path / "cache"),
        "TRAINYARD_OUTPUT_DIR": str(tmp_path / "out"),
    }
    env.pop("TRAINYARD_RUNS_URI", None)

    async with running_api_server() as api:
        for namespace in ("default", NAMESPACE):
            await api.put_object(
                "v1/namespaces",
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}},
            )
        api.declare(GATES, "PromotionGate")
        kubelet = Kubelet(api)
        metrics = OperatorMetrics()
        stop, ready = asyncio.Event(), asyncio.Event()
        config = operator_config(str(api.url).rstrip("/"))
        operator = asyncio.create_task(
            run_operator(config, stop_flag=stop, ready_flag=ready, metrics=metrics)
        )
        try:
            await asyncio.wait_for(ready.wait(), 30)
            await eventually(lambda: metrics.port, 10, "the operator serving /metrics")

            # The run as the operator sees it; rank 0 is the real training process below.
            await api.put_object(RUNS, document)
            rank0 = await start_rank0(kubelet, attempt=0)
            targets = tmp_path / "training-targets.json"
            discover(targets, training_port, rank0)

            trainer_argv = [
                sys.executable,
                "-m",
                "trainyard.workloads.train",
                str(tmp_path / "run.yaml"),
                "--output",
                str(tmp_path / "out"),
            ]
            scrape_configs = [
                {
                    "job_name": OPERATOR_JOB,
                    "honor_labels": True,
                    "static_configs": [{"targets": [f"127.0.0.1:{metrics.port}"]}],
                },
                {
                    # Pods come and go with restarts: discovered from a file the test
                    # rewrites, as Kubernetes discovery would see them.
                    "job_name": TRAINING_JOB,
                    "file_sd_configs": [{"files": [str(targets)], "refresh_interval": "1s"}],
                },
            ]
            async with (
                webhook() as receiver,
                alertmanager(tmp_path, f"http://127.0.0.1:{receiver.port}/") as am_url,
                prometheus(tmp_path, scrape_configs, alerts.render(QUICK), am_url) as prom,
                process(
                    [*trainer_argv],
                    tmp_path / "training.log",
                    f"http://127.0.0.1:{training_port}/metrics",
                    timeout=180,
                ) as trainer,
            ):
                # Wait for enough history: steps, checkpoint uploads, a minute of rates.
                await eventually(prom.targets_up, 60, "both targets up")
                await eventually(
                    lambda: _value(
                        prom, f'trainyard_checkpoint_upload_seconds_count{{run="{RUN}"}}', 2
                    ),
                    240,
                    "two checkpoint uploads scraped",
                )
                await eventually(
                    lambda: kubelet.status(RUN).get("phase") == "Running", 30, "phase Running"
                )
                # Rank 0's pod is OOM-killed: the operator restarts the gang as attempt 1,
                # whose rank 0 (the same training process here) Prometheus discovers anew.
                await kubelet.fail_pod(rank0, reason="OOMKilled", exit_code=137)
                await eventually(
                    lambda: kubelet.status(RUN).get("restarts") == 1, 60, "the operator's restart"
                )
                rank0 = await start_rank0(kubelet, attempt=1)
                discover(targets, training_port, rank0)
                await eventually(
                    lambda: _value(prom, f'count(trainyard_step{{run="{RUN}", attempt="1"}})', 1),
                    60,
                    "attempt 1 scraped",
                )
                await asyncio.sleep(5)

                empty = []
                for expr in dashboards.exprs(
                    json.loads(dashboards.render(dashboards.TRAINING_RUNS))
                ):
                    if expr.startswith("label_values("):
                        continue
                    result = await prom.query(grafana(expr))
                    if not finite(result):
                        empty.append(f"{expr}\n  → {result}")
                assert not empty, "training-dashboard queries without numbers:\n" + "\n".join(empty)

                assert RUN in await prom.label_values(
                    "run", f'trainyard_step{{job="{TRAINING_JOB}"}}'
                )
                pipelines = await prom.label_values(
                    "pipeline", f'trainyard_loss{{job="{TRAINING_JOB}"}}'
                )
                assert pipelines == ["live-pipeline"]

                # The operator's panels that the operator has series for return numbers too.
                operator_board = json.loads(dashboards.render(dashboards.OPERATOR_BOARD))
                must = (
                    "reconciles_total",
                    "reconcile_duration_seconds",
                    "up{",
                    "queue_depth",
                    "queue_wait_seconds",
                    "operator_leader",
                )
                checked = 0
                for expr in dashboards.exprs(operator_board):
                    if any(name in expr for name in must):
                        checked += 1
                        assert finite(await prom.query(grafana(expr))), expr
                assert checked >= 7

                # A healthy run pages nobody.
                assert not receiver.alerts("TrainyardRunStalled", "firing"), receiver.notifications
                # Stop rank 0: no scrape answers, no steps. Alertmanager must page.
                trainer.send_signal(signal.SIGSTOP)
                try:
                    (fired,) = await eventually(
                        lambda: receiver.alerts("TrainyardRunStalled", "firing"),
                        150,
                        "the stall alert reaching the webhook",
                    )
                    assert fired["labels"]["run"] == RUN
                    assert fired["labels"]["namespace"] == NAMESPACE
                    assert fired["labels"]["severity"] == "critical"
                    assert "kubectl" in fired["annotations"]["runbook"]
                    assert RUN in fired["annotations"]["summary"]
                finally:
                    trainer.send_signal(signal.SIGCONT)
                resolved = await eventually(
                    lambda: receiver.alerts("TrainyardRunStalled", "resolved"),
                    150,
                    "the stall alert resolving after SIGCONT",
                )
                assert resolved[0]["labels"]["run"] == RUN
                assert trainer.poll() is None, "training died instead of continuing"

                # The run finishes; two PromotionGates judge it on the loss the operator read
                # from rank 0: one passes, one cannot. The gates dashboard shows both.
                await kubelet.complete_job(await attempt_job(kubelet, 1))
                await eventually(
                    lambda: kubelet.status(RUN).get("phase") == "Succeeded", 60, "run Succeeded"
                )
                await api.put_object(GATES, promotion_gate("loss-ok", "loss <= 1000"))
                await api.put_object(GATES, promotion_gate("loss-impossible", "loss <= -1"))
                for gate, expected in (("loss-ok", "Passed"), ("loss-impossible", "Failed")):
                    await eventually(
                        lambda gate=gate, expected=expected: gate_verdict(api, gate) == expected,
                        60,
                        f"gate {gate} {expected}",
                    )
                await eventually(
                    lambda: _value(
                        prom, f'count(trainyard_gate_verdict{{job="{OPERATOR_JOB}"}} == 1)', 2
                    ),
                    60,
                    "both verdicts scraped",
                )
                await eventually(  # a rate needs two samples of the new counter
                    lambda: _value(
                        prom,
                        f'min(count_over_time(trainyard_gate_verdicts_total{{job="{OPERATOR_JOB}"}}[{RATE_INTERVAL}]))',
                        3,
                    ),
                    60,
                    "three scrapes of the verdict counters",
                )
                gates_board = json.loads(dashboards.render(dashboards.PIPELINES_AND_GATES))
                gate_exprs = [
                    e
                    for e in dashboards.exprs(gates_board)
                    if "trainyard_gate_" in e and not e.startswith("label_values(")
                ]
                assert len(gate_exprs) >= 4
                for expr in gate_exprs:
                    assert finite(await prom.query(grafana(expr))), expr
                assert sorted(
                    await prom.label_values(
                        "gate", f'trainyard_gate_verdict{{job="{OPERATOR_JOB}"}}'
                    )
                ) == ["loss-impossible", "loss-ok"]
                (failed,) = await eventually(
                    lambda: receiver.alerts("TrainyardGateFailed", "firing"),
                    60,
                    "the failed gate paging",
                )
                assert failed["labels"]["gate"] == "loss-impossible"
        finally:
            stop.set()
            try:
                await asyncio.wait_for(operator, 15)
            except TimeoutError:
                operator.cancel()


async def _value(prom, expr: str, at_least: float) -> bool:
    result = await prom.query(expr)
    return bool(result) and float(result[0]["value"][1]) >= at_least
