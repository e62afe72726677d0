"""The Deployment's command line parses with `trainyard operator`'s own parser and means what the values say."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from chart_rendering import VALUE_SETS, container, operator_argv, rendered

from trainyard.cli.operator_cmd import build_parser, config_from_args
from trainyard.operator.settings import OperatorConfig


@pytest.fixture(autouse=True)
def no_operator_environment(monkeypatch):
    """The chart passes flags only; TRAINYARD_* variables of this shell must not leak in."""
    for name in list(os.environ):
        if name.startswith("TRAINYARD_"):
            monkeypatch.delenv(name)


def operator_config(name: str, tmp_path: Path) -> OperatorConfig:
    return config_from_args(operator_argv(name, tmp_path))


def test_defaults_serve_every_namespace_standalone(tmp_path):
    config = operator_config("defaults", tmp_path)
    assert (config.clusterwide, config.namespaces, config.standalone) == (True, [], True)
    assert config.resync_seconds == 600.0
    assert config.metrics_port == 8080
    assert config.liveness_endpoint == "http://0.0.0.0:8081/healthz"
    assert (config.default_image, config.default_vllm_image) == (None, None)
    assert build_parser().parse_args(operator_argv("defaults", tmp_path)).verbose is False


def test_cluster_wide_with_resync_and_debug_logging(tmp_path):
    argv = operator_argv("cluster-wide", tmp_path)
    config = config_from_args(argv)
    assert config.clusterwide and config.resync_seconds == 15.0
    assert (config.request_timeout, config.api_backoffs) == (60.0, (0.5, 1.0, 2.0))
    assert build_parser().parse_args(argv).verbose is True


def test_watched_namespaces_become_namespace_flags(tmp_path):
    config = operator_config("two-namespaces", tmp_path)
    assert (config.clusterwide, config.namespaces) == (False, ["team-a", "team-b"])


@pytest.mark.parametrize("name", ["replicas-2-peering", "namespaces-replicas-3"])
def test_replicas_peer_with_a_priority_drawn_per_pod(name, tmp_path):
    configs = [operator_config(name, tmp_path) for _ in range(3)]
    assert all(not c.standalone and c.peering_name == "trainyard" for c in configs)
    priorities = [c.priority for c in configs]
    assert all(isinstance(p, int) and p >= 0 for p in priorities)
    assert len(set(priorities)) == len(priorities), f"equal priorities pause kopf: {priorities}"


def test_default_images_are_passed_on(tmp_path):
    config = operator_config("images-and-scheduling", tmp_path)
    values = VALUE_SETS["images-and-scheduling"]
    assert config.default_image == values["trainerImage"]
    assert config.default_vllm_image == values["vllmImage"]


def test_metrics_off_means_no_metrics_server(tmp_path):
    assert operator_config("metrics-off", tmp_path).metrics_port is None
    operator = container(rendered("metrics-off"))
    assert [p["name"] for p in operator["ports"]] == ["health"]


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_container_ports_are_the_ports_the_operator_serves(name, tmp_path):
    config = operator_config(name, tmp_path)
    ports: dict[str, Any] = {
        p["name"]: p["containerPort"] for p in container(rendered(name))["ports"]
    }
    assert config.liveness_endpoint == f"http://0.0.0.0:{ports['health']}/healthz"
    assert config.metrics_port == ports.get("metrics")
