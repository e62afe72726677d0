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
from operator_fakes import (  # noqa: E402,F401
    NAMESPACE,
    Kubelet,
    MetricsServer,
    OperatorThread,
    fast_config,
)

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
    return fast_config(str(api.url))


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
