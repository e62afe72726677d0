"""`trainyard render FILE…`: the Kubernetes manifests each TrainingRun becomes, as YAML.

The same pure builders the operator applies, so what this prints is what the cluster
gets (with a placeholder owner uid, which only the API server can assign). Documents of
other kinds are skipped with a note on standard error; an invalid TrainingRun prints
its problems and makes the exit status 1.
"""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

import yaml

from trainyard.api import InvalidResource, TrainingRun, parse_resource
from trainyard.cli.documents import UnreadableFile, read_documents
from trainyard.operator.builders import UnrenderableRun, render_children

PLACEHOLDER_UID = "00000000-0000-0000-0000-000000000000"


class _ManifestDumper(yaml.SafeDumper):
    """Plain block YAML: no anchors or aliases, which kubectl users do not expect."""

    def ignore_aliases(self, data: object) -> bool:
        return True


def _represent_str(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    # Multi-line strings (run.json) as literal blocks, readable as the file the pod sees.
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_ManifestDumper.add_representer(str, _represent_str)


def dump_manifests(manifests: list[dict]) -> str:
    """Multi-document YAML of the manifests, keys in the order the builders wrote them."""
    return yaml.dump_all(
        manifests, Dumper=_ManifestDumper, sort_keys=False, explicit_start=True, width=100
    )


def render_command(argv: list[str], out: TextIO | None = None, err: TextIO | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="trainyard render",
        description="Print the Kubernetes manifests the operator makes for each TrainingRun.",
    )
    parser.add_argument("files", nargs="+", metavar="FILE", help="YAML files; - for standard input")
    parser.add_argument("-n", "--namespace", help="namespace for runs that name none")
    parser.add_argument("--image", help="default trainer image (the operator's --trainer-image)")
    parser.add_argument("--vllm-image", help="default vLLM image (the operator's --vllm-image)")
    parser.add_argument(
        "--attempt", type=int, default=0, help="restart attempt whose Job to render (default 0)"
    )
    parser.add_argument("--uid", default=PLACEHOLDER_UID, help="owner uid to write")
    args = parser.parse_args(argv)
    out = out or sys.stdout
    err = err or sys.stderr
    if args.attempt < 0:
        parser.error("--attempt must be 0 or more")

    manifests: list[dict] = []
    failed = False
    for path in args.files:
        try:
            documents = read_documents(path)
        except UnreadableFile as error:
            print(error, file=err)
            failed = True
            continue
        for document in documents:
            kind = document.body.get("kind") if isinstance(document.body, dict) else None
            if kind != "TrainingRun":
                print(f"{document.label}: skipped, only TrainingRuns are rendered", file=err)
                continue
            try:
                run = parse_resource(document.body)
            except InvalidResource as invalid:
                failed = True
                print(f"{document.label}: invalid", file=err)
                for problem in invalid.problems:
                    print(f"  {problem}", file=err)
                continue
            assert isinstance(run, TrainingRun)
            if args.namespace and not run.metadata.namespace:
                run = run.model_copy(
                    update={
                        "metadata": run.metadata.model_copy(update={"namespace": args.namespace})
                    }
                )
            try:
                manifests += render_children(
                    run,
                    uid=args.uid,
                    image=args.image,
                    restart_attempt=args.attempt,
                    vllm_image=args.vllm_image,
                )
            except UnrenderableRun as error:
                failed = True
                print(f"{document.label}: cannot be rendered", file=err)
                print(f"  {error}", file=err)
    if manifests:
        out.write(dump_manifests(manifests))
    return 1 if failed else 0
