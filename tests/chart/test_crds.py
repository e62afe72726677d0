"""The chart installs the generated CRDs of crds/ themselves (symlinks), plus kopf's peering CRDs."""

from __future__ import annotations

import os

import yaml
from chart_rendering import CHART, REPO, documents, helm

PEERING_CRDS = "zalando.org_kopfpeerings.yaml"  # kopf's, for replicas > 1; not generated


def test_chart_crds_are_the_generated_files():
    generated = sorted(p.name for p in (REPO / "crds").glob("*.yaml"))
    in_chart = sorted(p.name for p in (CHART / "crds").iterdir())
    assert in_chart == sorted([*generated, PEERING_CRDS]), (
        "charts/trainyard/crds must link every file of crds/: "
        "cd charts/trainyard/crds && ln -sf ../../../crds/NAME.yaml ."
    )
    for name in generated:
        link = CHART / "crds" / name
        assert link.is_symlink(), f"{link} must be a symlink to crds/{name}, not a copy"
        assert os.readlink(link) == f"../../../crds/{name}"
        assert link.read_bytes() == (REPO / "crds" / name).read_bytes()


def test_helm_installs_what_crds_holds():
    result = helm("show", "crds", str(CHART))
    assert result.returncode == 0, result.stderr
    shown = {doc["metadata"]["name"]: doc for doc in documents(result.stdout)}
    for path in (REPO / "crds").glob("*.yaml"):
        crd = yaml.safe_load(path.read_text())
        assert shown[crd["metadata"]["name"]] == crd
    assert {"kopfpeerings.zalando.org", "clusterkopfpeerings.zalando.org"} <= shown.keys()


def test_packaged_chart_carries_the_crd_contents(tmp_path):
    """`helm package` resolves the symlinks, so a chart from a repository has real files."""
    result = helm("package", str(CHART), "--destination", str(tmp_path))
    assert result.returncode == 0, result.stderr
    (package,) = tmp_path.glob("trainyard-*.tgz")
    shown = helm("show", "crds", str(package))
    assert shown.returncode == 0, shown.stderr
    names = {doc["metadata"]["name"] for doc in documents(shown.stdout)}
    generated = len(list((REPO / "crds").glob("*.yaml")))
    assert "trainingruns.trainyard.dev" in names and len(names) == generated + 2
