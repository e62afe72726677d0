"""kopf handlers: decorators only. kopf logs in, watches the owners and keeps peering;
every owner event goes to the runtime's queue (`Runtime.owner_event`).

`kopf.on.event` rather than create/update/resume/delete handlers: it sees every watch
event, a deletion by any propagation policy included, and makes kopf write nothing to
the objects (no finalizer, no progress or diff-base annotations); the runtime's
reconcile is level-triggered, so it needs no cause.
"""

from __future__ import annotations

from typing import Any

import kopf

from trainyard.api.base import GROUP, VERSION
from trainyard.operator import k8s
from trainyard.operator.runtime import Runtime

PLURALS = {
    "TrainingRun": "trainingruns",
    "PromotionGate": "promotiongates",
    "TrainingPipeline": "trainingpipelines",
    "InferenceServer": "inferenceservers",
}


def connection_info(configuration: Any) -> kopf.ConnectionInfo:
    """The kubernetes_asyncio credentials, as kopf takes them: one source for both."""
    authorization = (configuration.api_key or {}).get("BearerToken") or (
        configuration.api_key or {}
    ).get("authorization")
    scheme, _, token = (authorization or "").partition(" ")
    if authorization and not token:
        scheme, token = "Bearer", authorization
    return kopf.ConnectionInfo(
        server=configuration.host,
        ca_path=configuration.ssl_ca_cert,
        insecure=not configuration.verify_ssl,
        certificate_path=configuration.cert_file,
        private_key_path=configuration.key_file,
        scheme=scheme or None,
        token=token or None,
        username=configuration.username or None,
        password=configuration.password or None,
        default_namespace="default",
    )


def register_handlers(registry: kopf.OperatorRegistry, runtime: Runtime) -> None:
    """Register the operator's handlers into `registry`, all bound to `runtime`."""
    config = runtime.config

    @kopf.on.login(registry=registry)
    async def login(**_: Any) -> kopf.ConnectionInfo:
        configuration = await k8s.load_configuration(config.api_server)
        runtime.set_configuration(configuration)
        await runtime.start()  # once: watches, workers and resync need the credentials
        return connection_info(configuration)

    @kopf.on.cleanup(registry=registry)
    async def close(**_: Any) -> None:
        await runtime.close()

    for kind in runtime.registrations:

        @kopf.on.event(GROUP, VERSION, PLURALS[kind], id=f"enqueue-{kind}", registry=registry)
        async def enqueue(
            event: kopf.RawEvent, body: kopf.Body, kind: str = kind, **_: Any
        ) -> None:
            runtime.owner_event(kind, event.get("type"), event.get("object") or body)
