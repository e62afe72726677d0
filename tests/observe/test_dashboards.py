"""The dashboards: checked in as generated, every query valid PromQL over names the code exports."""

from __future__ import annotations

import json

import pytest
from observe_tools import (
    CHART,
    TARGET_LABELS,
    operator_series,
    run,
    selectors,
    tool,
    training_series,
    vllm_series,
    with_grafana_variables,
)

from trainyard.observe import __main__ as generate
from trainyard.observe import dashboards
from trainyard.observe.labels import POD_LABELS

BOARDS = {board.uid: board for board in dashboards.BOARDS}


def checked_in(uid: str) -> dict:
    return json.loads((CHART / "dashboards" / f"{uid}.json").read_text())


def all_exprs() -> list[tuple[str, str]]:
    return [(uid, expr) for uid in BOARDS for expr in dashboards.exprs(checked_in(uid))]


def test_checked_in_files_are_what_the_generator_makes():
    assert generate.stale_files() == [], "run `python -m trainyard.observe` and commit the result"


def test_a_hand_edit_is_caught_as_stale(tmp_path):
    chart = tmp_path / "chart"
    assert generate.main(["--chart", str(chart)]) == 0
    assert generate.stale_files(chart) == []
    board = chart / "dashboards" / "trainyard-operator.json"
    board.write_text(board.read_text().replace("Reconciles by result", "Reconciles"))
    (chart / "dashboards" / "old-board.json").write_text("{}")
    assert generate.stale_files(chart) == [
        "dashboards/trainyard-operator.json",
        "dashboards/old-board.json",
    ]
    assert generate.main(["--check", "--chart", str(chart)]) == 1


def test_the_four_dashboards_have_what_the_issue_asks_for():
    titles = {uid: {panel["title"] for panel in checked_in(uid)["panels"]} for uid in BOARDS}
    assert {
        "Runs by phase",
        "Loss",
        "Learning rate",
        "Grad norm",
        "Reward mean",
        "Reward per component",
        "KL",
        "Completion length",
        "Tokens per second",
        "Step / max steps",
        "ETA",
        "Checkpoint upload time",
        "Restarts",
    } <= titles["trainyard-training-runs"]
    assert {
        "Current stage",
        "Verdict held",
        "Criteria: observed value against threshold",
    } <= titles["trainyard-pipelines-gates"]
    assert {
        "Reconciles by result",
        "Reconcile duration",
        "Queue depth",
        "API errors by verb and code",
        "Watch restarts",
    } <= titles["trainyard-operator"]
    assert {
        "Tokens per second",
        "Time to first token",
        "KV-cache use",
        "Requests running and waiting",
    } <= titles["trainyard-vllm"]


@pytest.mark.parametrize("uid", sorted(BOARDS))
def test_every_panel_queries_the_selected_prometheus(uid):
    model = checked_in(uid)
    assert model["uid"] == uid and model["title"].startswith("Trainyard / ")
    variables = {v["name"]: v for v in model["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    for panel in model["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], f"{panel['title']} has no query"
    ids = [panel["id"] for panel in model["panels"]]
    assert len(ids) == len(set(ids))


def test_every_query_parses_with_prometheus_own_parser(tmp_path):
    """promtool check rules parses each query as a recording rule's expression."""
    exprs = all_exprs()
    rules = {
        "groups": [
            {
                "name": "dashboard-queries",
                "rules": [
                    {"record": f"trainyard:dashboard_query:{i}", "expr": with_grafana_variables(e)}
                    for i, (_, e) in enumerate(exprs)
                    if not e.startswith("label_values(")
                ],
            }
        ]
    }
    path = tmp_path / "queries.rules.json"  # JSON is YAML
    path.write_text(json.dumps(rules))
    result = run(tool("promtool"), "check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules['groups'][0]['rules'])} rules found" in result.stdout


def variable_selector(expr: str) -> str:
    """label_values(SELECTOR, label) → SELECTOR."""
    assert expr.startswith("label_values(") and expr.endswith(")"), expr
    return expr[len("label_values(") : expr.rindex(",")]


def test_every_metric_a_query_reads_is_exported_with_the_labels_it_matches_on():
    exported = {**operator_series(), **training_series(), **vllm_series(), "up": set()}
    target = TARGET_LABELS | set(POD_LABELS)
    problems = []
    for uid, expr in all_exprs():
        query = with_grafana_variables(
            variable_selector(expr) if expr.startswith("label_values(") else expr
        )
        for name, labels in selectors(query):
            if name not in exported:
                problems.append(f"{uid}: {name} is exported by nothing (in {expr!r})")
            elif unknown := labels - exported[name] - target:
                problems.append(f"{uid}: {name} has no label {sorted(unknown)} (in {expr!r})")
    assert not problems, "\n".join(problems)


def test_the_name_check_catches_a_misspelt_metric():
    exported = {**operator_series(), **training_series(), **vllm_series()}
    ((name, _),) = selectors('vllm:gpu_cache_usage_perc{job="trainyard-vllm"}')  # vLLM V0's name
    assert name not in exported
    assert "vllm:kv_cache_usage_perc" in exported


@pytest.mark.parametrize("uid", sorted(BOARDS))
def test_checked_in_json_reads_back_into_the_sdks_dashboard_model(uid):
    """The SDK's own unmarshaller takes every panel and query of the file (Grafana's schema)."""
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.cog.plugins import register_default_plugins
    from grafana_foundation_sdk.models.dashboard import Dashboard

    register_default_plugins()
    model = checked_in(uid)
    decoded = Dashboard.from_json(model)
    assert json.loads(JSONEncoder().encode(decoded)) == model
