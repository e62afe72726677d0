"""`trainyard`: validate, generate CRDs, render manifests, train locally, run the operator."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="trainyard",
        description="Kubernetes-native LLM post-training: validate specs, render them, run them.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    commands.add_parser(
        "validate", help="check resource files; every problem with its field path", add_help=False
    )
    commands.add_parser("crds", help="print the CRDs, or write them to a directory", add_help=False)
    commands.add_parser(
        "render", help="print the Kubernetes manifests a TrainingRun becomes", add_help=False
    )
    commands.add_parser(
        "run", help="train a TrainingRun on this machine (no cluster)", add_help=False
    )
    commands.add_parser(
        "evaluate",
        help="evaluate a model as a PromotionGate does (eval.json, report)",
        add_help=False,
    )
    commands.add_parser(
        "serve", help="serve a model with vLLM as an InferenceServer does", add_help=False
    )
    commands.add_parser(
        "lineage", help="how a promoted model came to be: stages, data, gates", add_help=False
    )
    commands.add_parser(
        "sandbox", help="print the sandbox service code-execution rewards call", add_help=False
    )
    commands.add_parser(
        "operator", help="run the operator against the current cluster", add_help=False
    )
    if not args or args[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if args else 2
    command, rest = args[0], args[1:]
    # Each command imports only what it needs: validate and crds must work in an
    # image without torch or kopf.
    if command == "validate":
        from trainyard.cli.validate import validate_command

        return validate_command(rest)
    if command == "crds":
        from trainyard.cli.crds import crds_command

        return crds_command(rest)
    if command == "render":
        from trainyard.cli.render import render_command

        return render_command(rest)
    if command == "run":
        try:
            from trainyard.workloads.local import run_command
        except ModuleNotFoundError as error:
            return _missing_extra(command, "train", error)
        return run_command(rest)
    if command == "evaluate":
        from trainyard.cli.evaluate import evaluate_command

        return evaluate_command(rest)
    if command == "serve":
        from trainyard.cli.serve import serve_command

        return serve_command(rest)
    if command == "sandbox":
        from trainyard.cli.sandbox_service import sandbox_command

        return sandbox_command(rest)
    if command == "lineage":
        from trainyard.cli.lineage import lineage_command

        return lineage_command(rest)
    if command == "operator":
        try:
            from trainyard.cli.operator_cmd import operator_command
        except ModuleNotFoundError as error:
            return _missing_extra(command, "operator", error)
        return operator_command(rest)
    parser.parse_args(args)  # prints the usage error for an unknown command
    return 2


def _missing_extra(command: str, extra: str, error: ModuleNotFoundError) -> int:
    from trainyard.cli.extras import missing_extra

    message = missing_extra(command, extra, error)
    if message is None:
        raise error
    print(message, file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
