"""The layering of STYLE.md §1, enforced by import-linter (`.importlinter` at the repo root)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONTRACTS = (
    "Operator layers: kopf handlers -> controller -> I/O -> reconcile -> policies -> builders -> API",
    "Only the I/O modules import HTTP, Kubernetes and S3 clients",
    "Builders, reconcile and policies are pure: no kopf, no I/O",
    "Workloads never import the operator, and never talk to the Kubernetes API",
    "The API imports neither the operator, the workloads nor the CLI",
    "Dashboards and alerts as code read names from the API and builders only: no kopf, "
    "no clients, no operator runtime",
)


def test_import_contracts_are_kept():
    command = shutil.which("lint-imports") or pytest.fail(
        "lint-imports is missing: pip install import-linter"
    )
    result = subprocess.run(
        [command, "--no-cache"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin", "COLUMNS": "400"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    kept = [line.split(" KEPT")[0] for line in result.stdout.splitlines() if " KEPT" in line]
    assert sorted(kept) == sorted(CONTRACTS), result.stdout
