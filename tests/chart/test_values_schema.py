"""Bad values stop `helm install` (here: `helm template`) with a message that names the value."""

from __future__ import annotations

import pytest
from chart_rendering import template

BAD_VALUES = {
    "negative replicas": ({"replicas": -1}, "/replicas"),
    "fractional replicas": ({"replicas": 1.5}, "/replicas"),
    "misspelt key": ({"replica": 2}, "'replica' not allowed"),
    "misspelt nested key": ({"metrics": {"prot": 9090}}, "'prot' not allowed"),
    "zero resync": ({"resyncSeconds": 0}, "/resyncSeconds"),
    "resync as words": ({"resyncSeconds": "fast"}, "/resyncSeconds"),
    "namespace glob": ({"watchNamespaces": ["team-*"]}, "/watchNamespaces/0"),
    "namespace twice": ({"watchNamespaces": ["ml", "ml"]}, "/watchNamespaces"),
    "unknown log level": ({"logLevel": "trace"}, "/logLevel"),
    "port out of range": ({"metrics": {"port": 70000}}, "/metrics/port"),
    "one port for both": ({"metrics": {"port": 8081}}, "metrics.port and health.port"),
    "bad pull policy": ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
    "scrape interval in words": (
        {"metrics": {"serviceMonitor": {"interval": "30 seconds"}}},
        "/metrics/serviceMonitor/interval",
    ),
    "extra arg that is no flag": ({"extraArgs": ["verbose"]}, "/extraArgs/0"),
    "extra arg the chart sets": ({"extraArgs": ["--standalone"]}, "extraArgs: --standalone"),
    "no account to use": ({"serviceAccount": {"create": False}}, "serviceAccount.name"),
    "node selector value not a string": ({"nodeSelector": {"gpu": True}}, "/nodeSelector/gpu"),
    "unknown sandbox runtime": ({"sandbox": {"runtime": "kata"}}, "/sandbox/runtime"),
    "no sandbox workers": ({"sandbox": {"workers": 0}}, "/sandbox/workers"),
    "misspelt sandbox key": ({"sandbox": {"runtimeClass": "kata"}}, "'runtimeClass' not allowed"),
    "sandbox in the release namespace": (
        {"sandbox": {"enabled": True, "namespace": "trainyard-system"}},
        "sandbox.namespace: trainyard-system is the release namespace",
    ),
    "sandbox in a watched namespace": (
        {"watchNamespaces": ["ml", "code"], "sandbox": {"enabled": True, "namespace": "code"}},
        "sandbox.namespace: code is in watchNamespaces",
    ),
}


@pytest.mark.parametrize(("values", "message"), BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_bad_value_fails_naming_it(values, message):
    result = template(values)
    assert result.returncode != 0, f"rendered despite {values}"
    assert message in result.stderr, result.stderr
