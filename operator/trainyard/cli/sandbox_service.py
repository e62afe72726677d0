"""`trainyard sandbox`: the sandbox service's manifests, for the platform team to apply.

Code-execution rewards with `isolation: service` send programs to this service; it is
installed once per cluster (see `trainyard.operator.builders.sandbox` for why it lives
in a namespace of its own):

    trainyard sandbox [--image IMAGE] | kubectl apply -f -
"""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

import yaml

from trainyard.api.rewards import SANDBOX_NAMESPACE


def sandbox_command(argv: list[str], out: TextIO | None = None) -> int:
    from trainyard.operator.builders.sandbox import DEFAULT_SANDBOX_IMAGE, render_sandbox_service

    parser = argparse.ArgumentParser(
        prog="trainyard sandbox",
        description="Print the sandbox service (Namespace, Deployment, Service, NetworkPolicy) "
        "that code_execution rewards with isolation: service call.",
    )
    parser.add_argument(
        "--image",
        default=DEFAULT_SANDBOX_IMAGE,
        help="image with Trainyard and every program the stages run (default: "
        "images/sandbox.Dockerfile's, %(default)s, which has Python; build on it for compilers)",
    )
    parser.add_argument("--namespace", default=SANDBOX_NAMESPACE, help="default: %(default)s")
    parser.add_argument(
        "--runtime",
        choices=["namespaces", "gvisor"],
        default="namespaces",
        help="namespaces: the strict jail in pods of a namespace labelled privileged, each "
        "pod in its own user namespace; gvisor: pods under the restricted profile on a "
        "sandboxed runtime (runtimeClassName), rlimits inside",
    )
    parser.add_argument("--runtime-class-name", default="gvisor", help="with --runtime gvisor")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--workers", type=int, default=None, help="per replica; default its CPUs")
    args = parser.parse_args(argv)
    manifests = render_sandbox_service(
        image=args.image,
        namespace=args.namespace,
        runtime=args.runtime,
        runtime_class_name=args.runtime_class_name,
        replicas=args.replicas,
        workers=args.workers,
    )
    yaml.safe_dump_all(manifests, out or sys.stdout, sort_keys=False)
    return 0
