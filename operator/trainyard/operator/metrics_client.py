"""Reading rank 0's Prometheus endpoint (pods have no API credentials; the operator reads them).

The URL comes from a template so a test (or a cluster without pod DNS) can point it
elsewhere; the default is the worker's stable DNS name through the headless Service.
"""

from __future__ import annotations

import logging

import aiohttp

from trainyard.operator.progress import MetricsSample, parse_metrics_text

logger = logging.getLogger("trainyard.operator.metrics_client")

DEFAULT_URL_TEMPLATE = "http://{job}-0.{service}.{namespace}.svc:{port}/metrics"


def metrics_url(
    template: str,
    *,
    run: str,
    namespace: str,
    job: str,
    service: str,
    port: int,
    pod_ip: str | None,
) -> str:
    """The metrics URL of rank 0 (fields: run, namespace, job, service, port, pod_ip).

    >>> metrics_url(DEFAULT_URL_TEMPLATE, run="r", namespace="ml", job="r-attempt-0", service="r-workers", port=9400, pod_ip=None)
    'http://r-attempt-0-0.r-workers.ml.svc:9400/metrics'
    """
    return template.format(
        run=run, namespace=namespace, job=job, service=service, port=port, pod_ip=pod_ip or ""
    )


class MetricsClient:
    """Fetches and parses rank 0's metrics; an unreachable endpoint reads as no sample."""

    def __init__(self, timeout: float = 2.0):
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def fetch(self, url: str) -> MetricsSample | None:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        try:
            async with self._session.get(url) as response:
                if response.status != 200:
                    logger.info("metrics %s answered %s", url, response.status)
                    return None
                text = await response.text()
        except (aiohttp.ClientError, TimeoutError) as error:
            logger.info("metrics %s unreachable: %s", url, error)
            return None
        try:
            return parse_metrics_text(text)
        except ValueError as error:
            logger.warning("metrics %s unreadable: %s", url, error)
            return None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
