"""The chart as a package: lint, metadata that follows the project, values that explain themselves."""

from __future__ import annotations

import re
import tomllib

import yaml
from chart_rendering import CHART, REPO, helm


def test_helm_lint_strict_passes():
    result = helm("lint", "--strict", str(CHART))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


def test_app_version_is_the_project_version():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert chart["apiVersion"] == "v2"
    assert chart["appVersion"] == project["version"]


def test_every_value_has_a_comment_naming_it():
    """STYLE.md §11: each value's comment starts with its (dotted) name.

    A mapping without a comment groups values (`image:`); a mapping with one is itself a
    value (`resources:`), and what is inside it is Kubernetes' to explain, not the chart's.
    """
    lines = (CHART / "values.yaml").read_text().splitlines()
    enclosing: list[tuple[int, str, bool]] = []  # (indent, key, is a commented value)
    missing = []
    for number, line in enumerate(lines):
        match = re.match(r"^( *)([A-Za-z][A-Za-z0-9]*):(.*)$", line)
        if match is None:
            continue
        indent, key, rest = len(match.group(1)), match.group(2), match.group(3).strip()
        enclosing = [entry for entry in enclosing if entry[0] < indent]
        if any(is_value for _, _, is_value in enclosing):
            continue
        dotted = ".".join([k for _, k, _ in enclosing] + [key])
        first = number
        while first > 0 and lines[first - 1].strip().startswith("#"):
            first -= 1  # a comment may take several lines; the name starts the first
        commented = first < number and bool(
            re.match(rf"# {re.escape(dotted)}(?![\w.])", lines[first].strip())
        )
        if rest and not commented:
            missing.append(f"values.yaml:{number + 1}: {dotted}")
        enclosing.append((indent, key, commented))
    assert not missing, "values without a comment that starts with their name:\n" + "\n".join(
        missing
    )
