"""Test stand-ins for the rest of a cluster: the kubelet / Job controller, rank 0's /metrics."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import aiohttp.web
from apiserver import TrainyardApiServer

from trainyard.cli.operator_cmd import run_operator
from trainyard.operator.observability import OperatorMetrics
from trainyard.operator.settings import OperatorConfig

NAMESPACE = "ml"
RUNS = "trainyard.dev/v1alpha1/trainingruns"
JOBS = "batch/v1/jobs"
PODS = "v1/pods"
CONFIGMAPS = "v1/configmaps"
SERVICES = "v1/services"
DEPLOYMENTS = "apps/v1/deployments"


def training_run(name: str = "demo", **spec: Any) -> dict[str, Any]:
    """A small valid TrainingRun document; keyword arguments replace spec fields."""
    body: dict[str, Any] = {
        "apiVersion": "trainyard.dev/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "method": "sft",
            "model": {"source": "hf://sshleifer/tiny-gpt2"},
            "dataset": {"source": "s3://data/train.jsonl"},
            "distributed": {"nodes": 2, "gpusPerNode": 1},
            "checkpoint": {"uri": "s3://ckpt/demo", "everySteps": 10},
            "runPolicy": {"maxRestarts": 2},
        },
    }
    body["spec"].update(spec)
    return body


def fast_config(api_url: str, **overrides: Any) -> OperatorConfig:
    """Operator settings for tests: short watch timeouts and backoffs; resync at 10 minutes,
    so only events (and each reconcile's own requeue) can drive a test."""
    settings: dict[str, Any] = {
        "namespaces": [NAMESPACE],
        "standalone": True,
        "resync_seconds": 600.0,
        "progress_seconds": 0.3,
        "error_backoff_base": 0.1,
        "error_backoff_cap": 1.0,
        "watch_server_timeout": 5.0,
        "watch_client_timeout": 8.0,
        "watch_reconnect_backoff": 0.05,
        "request_timeout": 5.0,
        "connect_timeout": 2.0,
        "api_backoffs": (0.02, 0.05, 0.1, 0.2, 0.2, 0.2),
        "error_backoffs": (0.2, 0.3, 0.5),
        "metrics_port": None,
        "run_metrics_url": "http://127.0.0.1:{port}/metrics",
        "api_server": api_url.rstrip("/"),
        "post_events": False,
    }
    return OperatorConfig(**{**settings, **overrides})


async def eventually(
    check: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05
) -> Any:
    """Wait until `check()` returns something truthy (and return it), or fail with its last value."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: Any = None
    while loop.time() < deadline:
        last = check()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not met in {timeout}s; last value: {last!r}")


class Kubelet:
    """The test's stand-in for the Job controller and the kubelet: it writes pod and Job state."""

    def __init__(self, api: TrainyardApiServer):
        self.api = api

    def run(self, name: str) -> dict[str, Any] | None:
        return self.api.get(RUNS, NAMESPACE, name)

    def status(self, name: str) -> dict[str, Any]:
        return (self.run(name) or {}).get("status") or {}

    def condition(self, name: str, type_: str) -> dict[str, Any] | None:
        return next(
            (c for c in self.status(name).get("conditions") or [] if c["type"] == type_), None
        )

    def jobs(self, run: str) -> list[dict[str, Any]]:
        return self.api.objects(JOBS, NAMESPACE, f"trainyard.dev/run={run}")

    def pods(self, job: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            p
            for p in self.api.objects(PODS, NAMESPACE)
            if any(
                r["uid"] == job["metadata"]["uid"]
                for r in p["metadata"].get("ownerReferences") or []
            )
        ]

    async def start_pods(
        self, job: dict[str, Any], *, phase: str = "Running", pod_ip: str = "127.0.0.1"
    ) -> list[dict[str, Any]]:
        """Create one pod per completion index, as the Job controller does, in `phase`."""
        pods = []
        template = job["spec"]["template"]
        for index in range(job["spec"]["completions"]):
            labels = {
                **(template["metadata"].get("labels") or {}),
                "batch.kubernetes.io/job-name": job["metadata"]["name"],
                "batch.kubernetes.io/job-completion-index": str(index),
            }
            pod = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": f"{job['metadata']['name']}-{index}-x{index}",
                    "namespace": NAMESPACE,
                    "labels": labels,
                    "annotations": {"batch.kubernetes.io/job-completion-index": str(index)},
                    "ownerReferences": [
                        {
                            "apiVersion": "batch/v1",
                            "kind": "Job",
                            "name": job["metadata"]["name"],
                            "uid": job["metadata"]["uid"],
                            "controller": True,
                        }
                    ],
                },
                "spec": template["spec"],
                "status": {"phase": phase, "podIP": pod_ip},
            }
            pods.append(await self.api.put_object(PODS, pod))
        await self.api.patch_object(
            JOBS, NAMESPACE, job["metadata"]["name"], {"status": {"active": len(pods)}}, status=True
        )
        return pods

    async def fail_pod(
        self,
        pod: dict[str, Any],
        *,
        reason: str = "Error",
        exit_code: int = 1,
        disruption: str | None = None,
    ) -> None:
        status: dict[str, Any] = {
            "phase": "Failed",
            "containerStatuses": [
                {
                    "name": "trainer",
                    "state": {"terminated": {"exitCode": exit_code, "reason": reason}},
                }
            ],
        }
        if disruption:
            status["conditions"] = [
                {
                    "type": "DisruptionTarget",
                    "status": "True",
                    "reason": disruption,
                    "message": "preempted",
                }
            ]
        await self.api.patch_object(
            PODS, NAMESPACE, pod["metadata"]["name"], {"status": status}, status=True
        )

    async def complete_job(self, job: dict[str, Any]) -> None:
        for pod in self.pods(job):
            await self.api.patch_object(
                PODS,
                NAMESPACE,
                pod["metadata"]["name"],
                {"status": {"phase": "Succeeded"}},
                status=True,
            )
        await self.api.patch_object(
            JOBS,
            NAMESPACE,
            job["metadata"]["name"],
            {
                "status": {
                    "succeeded": job["spec"]["completions"],
                    "active": 0,
                    "conditions": [{"type": "Complete", "status": "True"}],
                }
            },
            status=True,
        )


class MetricsServer:
    """Rank 0's /metrics, served for real on 127.0.0.1; tests set the numbers."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}
        self.requests = 0
        self.port = 0

    def text(self) -> str:
        lines = []
        for name, value in self.values.items():
            lines += [f"# HELP {name} test gauge", f"# TYPE {name} gauge", f"{name} {value}"]
        return "\n".join(lines) + "\n"

    async def handle(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        self.requests += 1
        return aiohttp.web.Response(text=self.text(), content_type="text/plain")


class OperatorThread:
    """The real operator in its own thread and event loop, as a replica in its own process
    would be: kopf cancels every task of its loop that it did not find at start when it
    stops, so two operators in one loop cannot stop independently."""

    def __init__(self, config: OperatorConfig, metrics: OperatorMetrics | None = None):
        self.config, self.metrics = config, metrics or OperatorMetrics()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        async def main() -> None:
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            ready = asyncio.Event()
            task = asyncio.create_task(
                run_operator(
                    self.config, stop_flag=self._stop, ready_flag=ready, metrics=self.metrics
                )
            )
            await ready.wait()
            self._ready.set()
            await task

        asyncio.run(main())

    async def __aenter__(self) -> OperatorMetrics:
        self._thread.start()
        await asyncio.to_thread(self._ready.wait, 15)
        assert self._ready.is_set(), "the operator did not start within 15 s"
        return self.metrics

    async def __aexit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        await asyncio.to_thread(self._thread.join, 15)
