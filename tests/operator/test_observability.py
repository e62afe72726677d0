"""The operator's own /metrics, scraped over HTTP while it works; the `trainyard operator` settings."""

from __future__ import annotations

import aiohttp
import pytest
from operator_fakes import RUNS, eventually, training_run
from prometheus_client.parser import text_string_to_metric_families

from trainyard.cli.operator_cmd import config_from_args

pytestmark = pytest.mark.timeout(60)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_metrics_endpoint_tells_reconciles_phases_restarts_and_api_errors(
    api, kubelet, start_operator, operator_config
):
    operator_config.metrics_port = 0
    api.faults.fail("create", r"/configmaps$", 503, times=2)
    async with start_operator(operator_config) as metrics:
        await api.put_object(RUNS, training_run("observed", runPolicy={"maxRestarts": 1}))
        job = await eventually(lambda: kubelet.jobs("observed"))
        pods = await kubelet.start_pods(job[0])
        await eventually(lambda: kubelet.status("observed").get("phase") == "Running")
        await kubelet.fail_pod(pods[0], reason="OOMKilled", exit_code=137)
        await eventually(lambda: kubelet.status("observed").get("restarts") == 1)
        await eventually(lambda: metrics.runs.labels(phase="Restarting")._value.get() == 1)
        await eventually(lambda: metrics.reconciles.labels(result="converged")._value.get() >= 1)
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{metrics.port}/metrics") as response,
        ):
            assert response.status == 200
            scraped = samples(await response.text())
    assert scraped[("trainyard_operator_reconciles_total", (("result", "changed"),))] >= 3
    assert scraped[("trainyard_operator_reconciles_total", (("result", "converged"),))] >= 1
    assert scraped[("trainyard_operator_reconcile_duration_seconds_count", ())] >= 4
    assert scraped[("trainyard_operator_runs", (("phase", "Restarting"),))] == 1
    assert scraped[("trainyard_operator_runs", (("phase", "Running"),))] == 0
    assert scraped[("trainyard_operator_restarts_total", (("reason", "OOMKilled"),))] == 1
    assert (
        scraped[("trainyard_operator_api_errors_total", (("code", "503"), ("verb", "create")))] == 2
    )


@pytest.mark.parametrize(
    ("name", "argv", "expected"),
    [
        (
            "namespaces",
            ["-n", "a", "-n", "b", "--standalone"],
            {"namespaces": ["a", "b"], "standalone": True, "clusterwide": False},
        ),
        (
            "cluster-wide",
            ["-A", "--resync-seconds", "5"],
            {"clusterwide": True, "resync_seconds": 5.0},
        ),
        (
            "backoffs and timeouts",
            ["-A", "--api-backoffs", "0.5,1", "--watch-client-timeout", "60"],
            {"api_backoffs": (0.5, 1.0), "watch_client_timeout": 60.0},
        ),
        ("metrics off", ["-A", "--metrics-port", "-1"], {"metrics_port": None}),
    ],
)
def test_operator_settings_from_arguments(name, argv, expected):
    config = config_from_args(argv)
    assert {key: getattr(config, key) for key in expected} == expected, name


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "name the namespaces to serve (-n NAME, repeatable) or serve all (-A)"),
        (["-A", "--api-backoffs", "1,x"], "--api-backoffs: '1,x' is not a list of numbers"),
    ],
)
def test_operator_settings_errors_say_what_to_do(argv, message):
    with pytest.raises(SystemExit) as exit_info:
        config_from_args(argv)
    assert message in str(exit_info.value)
