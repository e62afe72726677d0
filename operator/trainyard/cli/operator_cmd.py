"""`trainyard operator`: run the TrainingRun controller (kopf) against a cluster."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import os
import secrets
import socket
from typing import Any

import kopf

from trainyard.operator import pipeline_controller
from trainyard.operator.controller import TrainingRuns
from trainyard.operator.gate_controller import PromotionGates
from trainyard.operator.handlers import register_handlers
from trainyard.operator.observability import OperatorMetrics
from trainyard.operator.runtime import Runtime
from trainyard.operator.server_controller import InferenceServers
from trainyard.operator.settings import OperatorConfig, configure_kopf


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trainyard operator",
        description="Reconcile TrainingRuns into Jobs, Services and ConfigMaps; keep their status true.",
    )
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "-n",
        "--namespace",
        action="append",
        dest="namespaces",
        default=None,
        help="namespace to serve (repeatable; kopf globs allowed)",
    )
    scope.add_argument(
        "-A",
        "--all-namespaces",
        action="store_true",
        dest="clusterwide",
        help="serve every namespace",
    )
    parser.add_argument("--standalone", action="store_true", help="no peering with other replicas")
    parser.add_argument(
        "--peering", default="trainyard", help="KopfPeering name replicas coordinate through"
    )
    parser.add_argument("--priority", type=int, default=0, help="peering priority of this replica")
    parser.add_argument(
        "--resync-seconds",
        type=float,
        default=600.0,
        help="reconcile every object this often without an event (a safety net)",
    )
    parser.add_argument(
        "--progress-seconds",
        type=float,
        default=10.0,
        help="read a running run's progress (rank 0's metrics) this often",
    )
    parser.add_argument(
        "--workers", type=int, default=8, help="reconciles in flight at once (different objects)"
    )
    parser.add_argument(
        "--watch-server-timeout", type=float, default=300.0, help="seconds a watch stays open"
    )
    parser.add_argument(
        "--watch-client-timeout",
        type=float,
        default=330.0,
        help="seconds of silence before a watch is re-opened",
    )
    parser.add_argument(
        "--request-timeout", type=float, default=30.0, help="seconds one API request may take"
    )
    parser.add_argument(
        "--api-backoffs",
        default="0.1,0.2,0.5,1,2,4",
        help="comma-separated retry pauses for 429/5xx",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=8080,
        help="port of the operator's /metrics (0: any, -1: off)",
    )
    parser.add_argument("--run-metrics-url", default=None, help="URL template of rank 0's metrics")
    parser.add_argument("--trainer-image", default=None, help="image for runs that name none")
    parser.add_argument("--vllm-image", default=None, help="image of vLLM rollout servers")
    parser.add_argument(
        "--consistency-timeout",
        type=float,
        default=15.0,
        help="seconds kopf waits for its own patches to come back",
    )
    parser.add_argument(
        "--server", default=None, help="API server URL without credentials (development)"
    )
    parser.add_argument(
        "--liveness", default=None, help="liveness endpoint, e.g. http://0.0.0.0:8081/healthz"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def config_from_args(argv: list[str]) -> OperatorConfig:
    args = build_parser().parse_args(argv)
    try:
        backoffs = tuple(float(x) for x in args.api_backoffs.split(",") if x)
    except ValueError:
        raise SystemExit(
            f"--api-backoffs: {args.api_backoffs!r} is not a list of numbers; allowed: e.g. 0.1,0.5,1"
        ) from None
    overrides: dict[str, Any] = {
        "standalone": args.standalone,
        "peering_name": args.peering,
        "priority": args.priority,
        "resync_seconds": args.resync_seconds,
        "progress_seconds": args.progress_seconds,
        "workers": args.workers,
        "watch_server_timeout": args.watch_server_timeout,
        "watch_client_timeout": args.watch_client_timeout,
        "request_timeout": args.request_timeout,
        "api_backoffs": backoffs,
        "metrics_port": None if args.metrics_port < 0 else args.metrics_port,
        "api_server": args.server,
        "liveness_endpoint": args.liveness,
        "consistency_timeout": args.consistency_timeout,
    }
    if args.namespaces:
        overrides["namespaces"] = args.namespaces
    if args.clusterwide:
        overrides["clusterwide"] = True
    if args.run_metrics_url:
        overrides["run_metrics_url"] = args.run_metrics_url
    if args.trainer_image:
        overrides["default_image"] = args.trainer_image
    if args.vllm_image:
        overrides["default_vllm_image"] = args.vllm_image
    config = OperatorConfig.from_environment(**overrides)
    if not config.namespaces and not config.clusterwide:
        raise SystemExit(
            "trainyard operator: name the namespaces to serve (-n NAME, repeatable) or serve all (-A)"
        )
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        # kopf logs every handler call ("Handler 'enqueue-TrainingRun' succeeded"): one line
        # per watch event, which costs more than the enqueue itself.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    return config


def replica_identity() -> str:
    """This replica's name in the peering object: its pod (POD_ID, as kopf reads it), else
    user@host with a random tail, so two replicas on one machine never share it."""
    pod = os.environ.get("POD_ID")
    if pod:
        return pod
    return f"{getpass.getuser()}@{socket.gethostname()}/{secrets.token_hex(3)}"


async def run_operator(
    config: OperatorConfig,
    *,
    stop_flag: asyncio.Event | None = None,
    ready_flag: asyncio.Event | None = None,
    metrics: OperatorMetrics | None = None,
) -> None:
    """Run until `stop_flag` is set (or forever): the entry point for the CLI, tests and benchmarks."""
    identity = config.identity or replica_identity()
    runtime = Runtime(config, metrics or OperatorMetrics(), identity=identity)
    runs = TrainingRuns(runtime)
    runtime.register(runs.registration())
    runtime.register(pipeline_controller.registration())
    runtime.register(InferenceServers().registration())
    gates = PromotionGates(runtime)
    runtime.register(gates.registration())
    registry = kopf.OperatorRegistry()
    register_handlers(registry, runtime)
    settings = kopf.OperatorSettings()
    configure_kopf(settings, config)
    if config.metrics_port is not None:
        port = runtime.metrics.serve(config.metrics_port)
        logging.getLogger("trainyard.operator").info("operator metrics on :%d/metrics", port)
    # Peering name and priority travel in the settings: passing them here would make
    # peering mandatory and block every watch on a cluster without the peering CRD.
    try:
        await kopf.operator(
            registry=registry,
            settings=settings,
            standalone=config.standalone,
            clusterwide=config.clusterwide,
            namespaces=config.namespaces,
            liveness_endpoint=config.liveness_endpoint,
            stop_flag=stop_flag,
            ready_flag=ready_flag,
            identity=identity,
            memo=kopf.Memo(runtime=runtime),
        )
    finally:
        await runs.close()
        await gates.close()
        runtime.metrics.stop_serving()


def operator_command(argv: list[str]) -> int:
    """`trainyard operator [options]`; returns the exit status."""
    config = config_from_args(argv)
    asyncio.run(run_operator(config))
    return 0
