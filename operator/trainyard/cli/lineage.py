"""`trainyard lineage MODEL`: how a promoted model came to be, stage by stage.

Reads the `provenance.json` a pipeline writes beside every model it promotes, then the
one of that stage's input model, and so on back to the first model: every dataset,
stage spec, gate verdict and approver on the way. Local paths and file:// URIs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

PROVENANCE_FILE = "provenance.json"


def local_dir(uri: str) -> Path | None:
    """The folder a model URI names on this machine, or None for remote storage."""
    if uri.startswith("file://"):
        return Path(urlparse(uri).path)
    if "://" not in uri:
        return Path(uri)
    return None


def chain(uri: str, limit: int = 50) -> list[dict[str, Any]]:
    """The provenance records from `uri` back to the first model that has none."""
    records: list[dict[str, Any]] = []
    current: str | None = uri
    while current is not None and len(records) < limit:
        folder = local_dir(current)
        path = folder / PROVENANCE_FILE if folder is not None else None
        if path is None or not path.is_file():
            records.append({"model": current, "origin": True})
            break
        record = json.loads(path.read_text())
        records.append(record)
        current = record.get("inputModel")
    return records


def describe(record: dict[str, Any]) -> str:
    if record.get("origin"):
        return f"{record['model']}\n    the starting model (no provenance.json: not made by a pipeline)"
    gate = record.get("gate") or {}
    approval = gate.get("approval") or {}
    lines = [
        f"{record['model']}",
        f"    stage {record.get('pipeline')}/{record.get('stage')} ({record.get('method')}), "
        f"spec {record.get('specHash')}, {record.get('trainedSteps')} steps",
        f"    data {record.get('dataset')}",
        f"    from {record.get('inputModel')}",
    ]
    if gate:
        lines.append(
            f"    gate {gate.get('name')}: {gate.get('verdict')} ({gate.get('message')})"
            + (f", approved by {approval.get('by')}" if approval.get("by") else "")
        )
        for result in gate.get("results") or []:
            lines.append(f"      {result.get('criterion')}: {result.get('message')}")
    return "\n".join(lines)


def lineage_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="trainyard lineage",
        description="How a promoted model came to be: every stage, dataset and gate behind it.",
    )
    parser.add_argument("model", metavar="MODEL", help="a promoted model's folder or file:// URI")
    parser.add_argument("--json", action="store_true", help="print the records as JSON")
    args = parser.parse_args(argv)
    folder = local_dir(args.model)
    if folder is None:
        print(f"{args.model}: only local paths and file:// URIs are read here")
        return 1
    if not (folder / PROVENANCE_FILE).is_file():
        print(f"{args.model}: no {PROVENANCE_FILE} (a model a pipeline promoted has one)")
        return 1
    records = chain(args.model)
    if args.json:
        print(json.dumps(records, indent=2))
    else:
        print("\n".join(describe(r) for r in records))
    return 0
