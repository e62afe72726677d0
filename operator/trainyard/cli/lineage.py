"""`trainyard lineage MODEL`: how a promoted model came to be, stage by stage.

Reads the `provenance.json` a pipeline writes beside every model it promotes (the local
runner, or the operator's provenance Job on a cluster), then the one of that stage's
input model, and so on back to the first model: every dataset (with what pins its
contents), stage spec, image, gate verdict and approver on the way. Local paths,
file:// and s3:// (boto3's credentials; the endpoint from --endpoint or AWS_ENDPOINT_URL).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from trainyard.workloads import provenance

PROVENANCE_FILE = provenance.PROVENANCE_FILE


def storage_options(endpoint: str | None) -> dict[str, Any] | None:
    endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL")
    return {"s3": {"endpoint": endpoint}} if endpoint else None


def chain(uri: str, endpoint: str | None = None) -> list[dict[str, Any]]:
    """The provenance records from `uri` back to the first model that has none."""
    return provenance.chain(uri, storage_options(endpoint))


def _pins(fingerprint: dict[str, Any] | None) -> str:
    return ", ".join(f"{k} {v}" for k, v in (fingerprint or {}).items()) or "not fingerprinted"


def describe(record: dict[str, Any]) -> str:
    if record.get("origin"):
        return f"{record['model']}\n    the starting model (no {PROVENANCE_FILE}: not made by a pipeline)"
    gate = record.get("gate") or {}
    approval = gate.get("approval") or {}
    dataset = record.get("dataset") or {}
    lines = [
        f"{record['model']}  ({_pins(record.get('modelFingerprint'))})",
        f"    stage {record.get('pipeline')}/{record.get('stage')} ({record.get('method')}), "
        f"spec {record.get('specHash')}, {record.get('trainedSteps')} steps, "
        f"image {record.get('image')}",
        f"    trained {record.get('startedAt')} → {record.get('finishedAt')}",
        f"    data {dataset.get('source')}  ({_pins(dataset.get('fingerprint'))})",
        f"    from {record.get('inputModel')}  ({_pins(record.get('inputModelFingerprint'))})",
    ]
    if gate:
        lines.append(
            f"    gate {gate.get('name')}: {gate.get('verdict')} ({gate.get('message')})"
            + (f", approved by {approval.get('by')}" if approval.get("by") else "")
        )
        for result in gate.get("results") or []:
            observed = result.get("observed")
            lines.append(
                f"      {result.get('criterion')}: {result.get('result')}"
                + (f" (observed {observed:.4g})" if isinstance(observed, int | float) else "")
            )
    return "\n".join(lines)


def lineage_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="trainyard lineage",
        description="How a promoted model came to be: every stage, dataset and gate behind it.",
    )
    parser.add_argument(
        "model", metavar="MODEL", help="a promoted model: a folder, file:// or s3:// URI"
    )
    parser.add_argument("--endpoint", help="S3 endpoint URL (default: AWS_ENDPOINT_URL)")
    parser.add_argument("--json", action="store_true", help="print the records as JSON")
    args = parser.parse_args(argv)
    if "://" in args.model and not args.model.startswith(("file://", "s3://")):
        print(f"{args.model}: lineage is read from local folders, file:// and s3:// models")
        return 1
    try:
        records = chain(args.model, args.endpoint)
    except Exception as error:  # storage errors: one line, not a traceback
        print(f"{args.model}: could not read {PROVENANCE_FILE}: {error}")
        return 1
    if records[0].get("origin"):
        print(f"{args.model}: no {PROVENANCE_FILE} (a model a pipeline promoted has one)")
        return 1
    if args.json:
        print(json.dumps(records, indent=2))
    else:
        print("\n".join(describe(r) for r in records))
    return 0
