"""A monitoring stack on 127.0.0.1 for tests: Debian's prometheus and prometheus-alertmanager
as real processes, and a webhook receiver that keeps what Alertmanager delivers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import aiohttp.web
from observe_tools import tool


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def eventually(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.5):
    """Await `check()` (sync or async) until it is truthy; fail saying `what` did not happen."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"{what} did not happen within {timeout:.0f}s (last: {last!r})")


async def http_ok(url: str) -> bool:
    try:
        async with aiohttp.ClientSession() as session, session.get(url, timeout=2) as response:
            return response.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False


@contextlib.asynccontextmanager
async def process(argv: list[str], log: Path, ready_url: str, timeout: float = 60):
    """A subprocess, logging to `log`, until the block ends; up once `ready_url` answers 200."""
    with open(log, "w") as output:
        proc = subprocess.Popen(argv, stdout=output, stderr=subprocess.STDOUT)
        try:

            async def ready() -> bool:
                if proc.poll() is not None:
                    raise AssertionError(
                        f"{argv[0]} exited with {proc.returncode}:\n{log.read_text()}"
                    )
                return await http_ok(ready_url)

            await eventually(ready, timeout, f"{Path(argv[0]).name} answering {ready_url}")
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class Webhook:
    """Alertmanager's webhook receiver: every notification it POSTs, kept in order."""

    def __init__(self) -> None:
        self.notifications: list[dict[str, Any]] = []
        self.port = 0

    async def handle(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        self.notifications.append(await request.json())
        return aiohttp.web.Response(text="ok")

    def alerts(self, name: str, status: str) -> list[dict[str, Any]]:
        return [
            alert
            for notification in self.notifications
            for alert in notification["alerts"]
            if alert["labels"].get("alertname") == name and alert["status"] == status
        ]


@contextlib.asynccontextmanager
async def webhook() -> AsyncIterator[Webhook]:
    receiver = Webhook()
    app = aiohttp.web.Application()
    app.router.add_post("/", receiver.handle)
    runner = aiohttp.web.AppRunner(app)
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    receiver.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield receiver
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def alertmanager(directory: Path, webhook_url: str) -> AsyncIterator[str]:
    """Alertmanager delivering every alert to `webhook_url` at once; yields its URL."""
    port = free_port()
    config = {
        "route": {
            "receiver": "webhook",
            "group_by": ["alertname", "namespace", "run"],
            "group_wait": "1s",
            "group_interval": "1s",
            "repeat_interval": "1h",
        },
        "receivers": [
            {"name": "webhook", "webhook_configs": [{"url": webhook_url, "send_resolved": True}]}
        ],
    }
    (directory / "alertmanager.yml").write_text(json.dumps(config))
    argv = [
        tool("prometheus-alertmanager"),
        f"--config.file={directory / 'alertmanager.yml'}",
        f"--storage.path={directory / 'alertmanager-data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--cluster.listen-address=",  # one instance, no gossip
    ]
    url = f"http://127.0.0.1:{port}"
    async with process(argv, directory / "alertmanager.log", f"{url}/-/ready"):
        yield url


@contextlib.asynccontextmanager
async def prometheus(
    directory: Path,
    scrape_configs: list[dict[str, Any]],
    rules: str,
    alertmanager_url: str,
    interval: str = "2s",
) -> AsyncIterator[Prometheus]:
    port = free_port()
    (directory / "rules.yml").write_text(rules)
    config = {
        "global": {
            "scrape_interval": interval,
            "scrape_timeout": "1s",
            "evaluation_interval": "1s",
        },
        "rule_files": [str(directory / "rules.yml")],
        "alerting": {
            "alertmanagers": [
                {"static_configs": [{"targets": [alertmanager_url.removeprefix("http://")]}]}
            ]
        },
        "scrape_configs": scrape_configs,
    }
    (directory / "prometheus.yml").write_text(json.dumps(config))
    argv = [
        tool("prometheus"),
        f"--config.file={directory / 'prometheus.yml'}",
        f"--storage.tsdb.path={directory / 'prometheus-data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--rules.alert.resend-delay=1s",
    ]
    url = f"http://127.0.0.1:{port}"
    async with process(argv, directory / "prometheus.log", f"{url}/-/ready"):
        yield Prometheus(url)


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    async def api(self, path: str, **params: str) -> Any:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{self.url}/api/v1/{path}", params=params, timeout=30) as response,
        ):
            body = await response.json()
        assert body["status"] == "success", body
        return body["data"]

    async def query(self, expr: str) -> list[dict[str, Any]]:
        data = await self.api("query", query=expr)
        assert data["resultType"] == "vector", f"{expr} gave a {data['resultType']}"
        return data["result"]

    async def label_values(self, label: str, selector: str) -> list[str]:
        return await self.api(f"label/{label}/values", **{"match[]": selector})

    async def targets_up(self) -> bool:
        targets = (await self.api("targets"))["activeTargets"]
        return bool(targets) and all(t["health"] == "up" for t in targets)
