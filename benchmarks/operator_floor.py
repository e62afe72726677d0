"""The framework floor for `operator_latency.py`: a bare kopf handler making the same API calls.

On each new TrainingRun it patches the run's status and posts a ConfigMap, a headless
Service and a Job, in the operator's order (status, then ConfigMap + Service together,
then the Job), with payloads of the same size taken from a pre-rendered template. It
validates nothing, renders nothing, watches no children: what is left is what kopf and
HTTP cost.

    python benchmarks/operator_floor.py --server http://127.0.0.1:PORT --namespace bench
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
from typing import Any

import aiohttp
import kopf

from trainyard.api import parse_resource
from trainyard.operator.builders import render_children

TEMPLATE_RUN = {
    "apiVersion": "trainyard.dev/v1alpha1",
    "kind": "TrainingRun",
    "metadata": {"name": "zzrunzz", "namespace": "zznszz"},
    "spec": {
        "method": "sft",
        "model": {"source": "hf://sshleifer/tiny-gpt2"},
        "dataset": {"source": "s3://data/train.jsonl"},
        "distributed": {"nodes": 2, "gpusPerNode": 1},
    },
}
PATHS = {
    "ConfigMap": "/api/v1/namespaces/{ns}/configmaps",
    "Service": "/api/v1/namespaces/{ns}/services",
    "Job": "/apis/batch/v1/namespaces/{ns}/jobs",
}
STATUS = {
    "phase": "Pending",
    "message": "waiting for workers: 0 of 2 running",
    "observedGeneration": 1,
    "restartAttempt": 0,
    "restarts": 0,
    "preemptions": 0,
    "conditions": [
        {
            "type": "Valid",
            "status": "True",
            "reason": "SpecValid",
            "message": "the spec is valid",
            "lastTransitionTime": "2026-01-01T00:00:00Z",
            "observedGeneration": 1,
        },
        {
            "type": "Running",
            "status": "False",
            "reason": "WaitingForPods",
            "message": "waiting for workers: 0 of 2 running",
            "lastTransitionTime": "2026-01-01T00:00:00Z",
            "observedGeneration": 1,
        },
    ],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", required=True)
    parser.add_argument("--namespace", required=True)
    args = parser.parse_args()
    # Same logging as `trainyard operator`, so both pay the same for kopf's messages.
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    template = json.dumps(render_children(parse_resource(TEMPLATE_RUN), uid="zzuidzz"))
    registry = kopf.OperatorRegistry()
    session: dict[str, aiohttp.ClientSession] = {}

    @kopf.on.login(registry=registry)
    async def login(**_: Any) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(server=args.server, insecure=True, default_namespace="default")

    @kopf.on.create("trainyard.dev", "v1alpha1", "trainingruns", registry=registry)
    async def create(name: str, namespace: str, uid: str, **_: Any) -> None:
        client = session.get("s")
        if client is None:
            client = session["s"] = aiohttp.ClientSession(args.server)
        children = json.loads(
            template.replace("zzrunzz", name).replace("zznszz", namespace).replace("zzuidzz", uid)
        )
        run_path = f"/apis/trainyard.dev/v1alpha1/namespaces/{namespace}/trainingruns/{name}/status"
        async with client.patch(
            run_path,
            json={"status": STATUS},
            headers={"Content-Type": "application/merge-patch+json"},
        ) as response:
            await response.read()

        async def post(manifest: dict[str, Any]) -> None:
            async with client.post(
                PATHS[manifest["kind"]].format(ns=namespace), json=manifest
            ) as response:
                await response.read()

        await asyncio.gather(*(post(m) for m in children if m["kind"] != "Job"))
        await asyncio.gather(*(post(m) for m in children if m["kind"] == "Job"))

    settings = kopf.OperatorSettings()
    settings.posting.level = logging.WARNING  # as `trainyard operator` sets it
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="trainyard.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="trainyard.dev", key="last-handled-configuration"
    )
    asyncio.run(
        kopf.operator(
            registry=registry, settings=settings, standalone=True, namespaces=[args.namespace]
        )
    )


if __name__ == "__main__":
    main()
