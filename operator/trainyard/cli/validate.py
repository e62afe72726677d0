"""`trainyard validate FILE…`: every problem of every document, or OK."""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from trainyard.api import validate_resource
from trainyard.cli.documents import UnreadableFile, read_documents


def validate_command(argv: list[str], out: TextIO | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="trainyard validate",
        description="Check Trainyard resource files (multi-document YAML). Exit 1 on any problem.",
    )
    parser.add_argument("files", nargs="+", metavar="FILE", help="YAML files; - for standard input")
    parser.add_argument("-q", "--quiet", action="store_true", help="print problems only")
    args = parser.parse_args(argv)
    out = out or sys.stdout
    failed = False
    for path in args.files:
        try:
            documents = read_documents(path)
        except UnreadableFile as error:
            print(f"{error}", file=out)
            failed = True
            continue
        if not documents:
            print(f"{path}: no documents", file=out)
            failed = True
        for document in documents:
            problems = validate_resource(document.body)
            if problems:
                failed = True
                print(f"{document.label}: invalid", file=out)
                for problem in problems:
                    print(f"  {problem}", file=out)
            elif not args.quiet:
                print(f"{document.label}: ok", file=out)
                for line in isolation_lines(document.body):
                    print(f"  {line}", file=out)
    return 1 if failed else 0


def isolation_lines(body: dict) -> list[str]:
    """What isolation each code_execution reward of a valid TrainingRun will have."""
    if body.get("kind") != "TrainingRun":
        return []
    from trainyard.api import parse_resource
    from trainyard.api.rewards import code_execution_isolation

    rl = parse_resource(body).spec.online_rl
    return [
        f"reward {name!r}: isolation {isolation}: {meaning}"
        for name, isolation, meaning in code_execution_isolation((rl.rewards if rl else None) or [])
    ]
