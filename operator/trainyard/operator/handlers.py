"""kopf handlers: decorators only. Every cause (create, update, resume, resync) ends in `Controller.reconcile`."""

from __future__ import annotations

from typing import Any

import kopf

from trainyard.api.base import GROUP, VERSION
from trainyard.operator import k8s
from trainyard.operator.controller import Controller

RUNS = (GROUP, VERSION, "trainingruns")


def register_handlers(registry: kopf.OperatorRegistry, controller: Controller) -> None:
    """Register the operator's handlers into `registry`, all bound to `controller`."""
    config = controller.config

    @kopf.on.login(registry=registry)
    async def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        if config.api_server:
            info = kopf.ConnectionInfo(
                server=config.api_server, insecure=True, default_namespace="default"
            )
        else:
            info = kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)
        if info is not None:
            controller.set_connection(info)
        return info

    @kopf.on.cleanup(registry=registry)
    async def close(**_: Any) -> None:
        await controller.close()  # stops the resync loop too

    async def reconcile_now(body: kopf.Body, **_: Any) -> None:
        try:
            await controller.reconcile(body)
        except k8s.ApiError as error:
            raise kopf.TemporaryError(str(error), delay=1.0) from error

    for cause in (kopf.on.create, kopf.on.update, kopf.on.resume):
        cause(*RUNS, id=f"reconcile-on-{cause.__name__}", registry=registry)(reconcile_now)

    # Resync is one loop over the runs (controller.start_resync) rather than a kopf timer
    # per run: timers make kopf put a finalizer on every run (one more write, and a round
    # trip before the first reconcile), and 1,000 runs would be 1,000 timer tasks.
    @kopf.on.startup(registry=registry)
    async def start_resync(**_: Any) -> None:
        controller.start_resync()

    @kopf.on.delete(*RUNS, id="forget", optional=True, registry=registry)
    async def forget(uid: str, **_: Any) -> None:
        controller.forget(uid)  # children go with their owner references
