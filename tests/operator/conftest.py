"""Fixtures: a Kubernetes API emulation over HTTP (kmock), the real operator on it, a fake kubelet.

kmock 0.8 gaps filled in `apiserver.py` (see its docstring for details):
 1. resourceVersion (one counter; on every write and list)
 2. uid, creationTimestamp, generation (+1 on spec changes only)
 3. namespace defaulting from the URL (and mismatch → 400)
 4. generateName
 5. label selectors (=, ==, !=, in, notin, exists, !key) and metadata.name/namespace field selectors
 6. watches resuming from ?resourceVersion (event log replay), ?timeoutSeconds, 410 Gone when compacted
 7. the status subresource (PATCH …/status changes only status; main PATCH ignores status)
 8. merge patch (RFC 7386, null deletes) and JSON patch (RFC 6902)
 9. optimistic concurrency (stale metadata.resourceVersion → 409 Conflict; existing name → 409 AlreadyExists)
10. finalizers + deletionTimestamp; owner-reference garbage collection (recursive, unless Orphan)
11. PUT (replace)
12. the core group's discovery says groupVersion "v1" (kmock says "/v1")
13. `/api/v1/namespaces[/NAME]` (kmock's path parser fails on the Namespace resource's own URLs)
Fault injection: `api.faults.fail(verb, path_regex, status, times, retry_after)`, `api.expire_watches()`
(open watches end with 410 Gone), `api.faults.watch_gone[rid] = n` (next n watches get 410),
`api.faults.silent_until = loop.time() + s` (watch streams deliver nothing); `api.count(verb, path)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp.web
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from apiserver import TrainyardApiServer, running_api_server  # noqa: E402
from operator_fakes import NAMESPACE, Kubelet, MetricsServer, OperatorThread  # noqa: E402,F401

from trainyard.cli.operator_cmd import run_operator  # noqa: E402
from trainyard.operator.observability import OperatorMetrics  # noqa: E402
from trainyard.operator.settings import OperatorConfig  # noqa: E402


@pytest.fixture
async def api() -> AsyncIterator[TrainyardApiServer]:
    async with running_api_server() as server:
        for namespace in ("default", NAMESPACE):
            await server.put_object(
                "v1/namespaces",
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}},
            )
        yield server


@pytest.fixture
def kubelet(api: TrainyardApiServer) -> Kubelet:
    return Kubelet(api)


@pytest.fixture
async def rank0_metrics() -> AsyncIterator[MetricsServer]:
    server = MetricsServer()
    app = aiohttp.web.Application()
    app.router.add_get("/metrics", server.handle)
    runner = aiohttp.web.AppRunner(app)
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield server
    finally:
        await runner.cleanup()


@pytest.fixture
def operator_config(api: TrainyardApiServer) -> OperatorConfig:
    """Settings for fast tests: short watch timeouts and backoffs; resync at 10 minutes, so
    only events (and each reconcile's own requeue) can drive a test."""
    return OperatorConfig(
        namespaces=[NAMESPACE],
        standalone=True,
        resync_seconds=600.0,
        progress_seconds=0.3,
        error_backoff_base=0.1,
        error_backoff_cap=1.0,
        watch_server_timeout=5.0,
        watch_client_timeout=8.0,
        watch_reconnect_backoff=0.05,
        request_timeout=5.0,
        connect_timeout=2.0,
        api_backoffs=(0.02, 0.05, 0.1, 0.2, 0.2, 0.2),
        error_backoffs=(0.2, 0.3, 0.5),
        metrics_port=None,
        run_metrics_url="http://127.0.0.1:{port}/metrics",
        api_server=str(api.url).rstrip("/"),
        post_events=False,
    )


@contextlib.asynccontextmanager
async def operator_running(
    config: OperatorConfig, metrics: OperatorMetrics | None = None
) -> AsyncIterator[OperatorMetrics]:
    """The real operator (kopf) in a background task until the block ends."""
    metrics = metrics or OperatorMetrics()
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(
        run_operator(config, stop_flag=stop, ready_flag=ready, metrics=metrics)
    )
    try:
        await asyncio.wait_for(ready.wait(), 10)
        yield metrics
    finally:
        stop.set()
        try:
            await asyncio.wait_for(task, 10)
        except TimeoutError:
            task.cancel()


@pytest.fixture
def start_operator(operator_config: OperatorConfig) -> Callable[..., Any]:
    """`async with start_operator() as metrics:` runs the operator with the test settings."""

    def start(config: OperatorConfig | None = None, metrics: OperatorMetrics | None = None) -> Any:
        return operator_running(config or operator_config, metrics)

    return start
