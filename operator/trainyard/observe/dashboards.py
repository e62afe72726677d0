"""The Grafana dashboards: training runs, pipelines and gates, the operator, vLLM.

Built with `grafana-foundation-sdk` (Grafana Labs' typed builders for the dashboard
schema) rather than hand-kept JSON: a panel is a few lines, a typo in an option is an
AttributeError instead of a panel Grafana silently ignores, and the JSON is regenerated,
never edited. Each dashboard is a list of rows of `Graph`s; `build_*` turns them into
the SDK's builders.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as dash
from grafana_foundation_sdk.builders import prometheus, stat, statetimeline, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import (
    LegendDisplayMode,
    LegendPlacement,
    VisibilityMode,
)
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DataSourceRef,
    VariableRefresh,
    VariableSort,
)

from trainyard.api.contract import Metric as M
from trainyard.observe.labels import OPERATOR_JOB, TRAINING_JOB, VLLM_JOB

DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")

# Selectors of the dashboards' variables.
TRAINING = f'job="{TRAINING_JOB}", namespace=~"$namespace", run=~"$run"'
PIPELINE_RUNS = f'job="{TRAINING_JOB}", namespace=~"$namespace", pipeline=~"$pipeline"'
OPERATOR = f'job="{OPERATOR_JOB}"'
GATES = f'job="{OPERATOR_JOB}", namespace=~"$namespace"'
PIPELINES = f'job="{OPERATOR_JOB}", namespace=~"$namespace", pipeline=~"$pipeline"'
VLLM = f'job="{VLLM_JOB}", namespace=~"$namespace", run=~"$run"'
PER_RUN = "namespace, run"


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""


@dataclass(frozen=True)
class Graph:
    """One panel: a time series (or a stat) of one or more queries."""

    title: str
    queries: tuple[Query, ...]
    unit: str = "short"
    description: str = ""
    kind: str = "timeseries"  # or "stat", "state-timeline"
    width: int = 12
    min: float | None = None
    max: float | None = None


@dataclass(frozen=True)
class Variable:
    name: str
    label: str
    query: str  # label_values(...)
    include_all: bool = True


@dataclass(frozen=True)
class Board:
    uid: str
    title: str
    description: str
    variables: tuple[Variable, ...]
    rows: tuple[tuple[str, tuple[Graph, ...]], ...]
    tags: tuple[str, ...] = field(default=("trainyard",))


def graph(title: str, *queries: tuple[str, str] | str, **options) -> Graph:
    """A Graph from (expr, legend) pairs or bare exprs."""
    made = tuple(Query(*q) if isinstance(q, tuple) else Query(q) for q in queries)
    return Graph(title, made, **options)


def per_run(metric: str, selector: str = TRAINING) -> str:
    """A training gauge per run: the max over its pods, so a restart's new pod continues the line."""
    return f"max by ({PER_RUN}) ({metric}{{{selector}}})"


def quantiles(metric: str, selector: str, by: str, legend: str) -> tuple[tuple[str, str], ...]:
    return tuple(
        (
            f"histogram_quantile({q}, sum by ({by}le) (rate({metric}_bucket{{{selector}}}[$__rate_interval])))",
            f"p{round(q * 100)} {legend}".strip(),
        )
        for q in (0.5, 0.9, 0.99)
    )


NAMESPACE_OF = {
    "training": Variable(
        "namespace", "Namespace", f'label_values({M.STEP}{{job="{TRAINING_JOB}"}}, namespace)'
    ),
    "operator": Variable(
        "namespace",
        "Namespace",
        f'label_values(trainyard_gate_verdict{{job="{OPERATOR_JOB}"}}, namespace)',
    ),
    "vllm": Variable(
        "namespace",
        "Namespace",
        f'label_values(vllm:num_requests_running{{job="{VLLM_JOB}"}}, namespace)',
    ),
}

TRAINING_RUNS = Board(
    uid="trainyard-training-runs",
    title="Trainyard / Training runs",
    description="TrainingRuns by phase; per run: loss, learning rate, rewards, KL, throughput, "
    "progress and ETA, checkpoint uploads, restarts (metrics of each run's rank-0 pod).",
    variables=(
        NAMESPACE_OF["training"],
        Variable(
            "run",
            "Run",
            f'label_values({M.STEP}{{job="{TRAINING_JOB}", namespace=~"$namespace"}}, run)',
        ),
    ),
    rows=(
        (
            "Runs",
            (
                graph(
                    "Runs by phase",
                    (f"max by (phase) (trainyard_operator_runs{{{OPERATOR}}})", "{{phase}}"),
                    description="TrainingRuns the operator knows, by status.phase.",
                    width=24,
                ),
            ),
        ),
        (
            "Progress",
            (
                graph(
                    "Step / max steps",
                    (per_run(M.STEP), "{{run}} step"),
                    (per_run(M.TOTAL_STEPS), "{{run}} max steps"),
                    width=8,
                ),
                graph(
                    "ETA",
                    (
                        f"({per_run(M.TOTAL_STEPS)} - {per_run(M.STEP)})"
                        f" / max by ({PER_RUN}) (deriv({M.STEP}{{{TRAINING}}}[5m]) > 0)",
                        "{{run}}",
                    ),
                    unit="s",
                    description="Steps left over the step rate of the last 5 minutes.",
                    width=8,
                ),
                graph(
                    "Tokens per second",
                    (per_run(M.TOKENS_PER_SECOND), "{{run}}"),
                    width=8,
                ),
            ),
        ),
        (
            "Optimisation",
            (
                graph("Loss", (per_run(M.LOSS), "{{run}}"), width=8),
                graph("Learning rate", (per_run(M.LEARNING_RATE), "{{run}}"), width=8),
                graph("Grad norm", (per_run(M.GRAD_NORM), "{{run}}"), width=8),
            ),
        ),
        (
            "Rewards (GRPO/RLOO)",
            (
                graph(
                    "Reward mean",
                    (per_run(M.REWARD_MEAN), "{{run}} mean"),
                    (per_run(M.REWARD_STD), "{{run}} std"),
                ),
                graph(
                    "Reward per component",
                    (
                        f"max by ({PER_RUN}, component) ({M.REWARD_COMPONENT_MEAN}{{{TRAINING}}})",
                        "{{run}} {{component}}",
                    ),
                ),
                graph("KL", (per_run(M.KL), "{{run}}")),
                graph(
                    "Completion length",
                    (per_run(M.COMPLETION_LENGTH), "{{run}}"),
                    description="Mean completion length in tokens.",
                ),
            ),
        ),
        (
            "Checkpoints and restarts",
            (
                graph(
                    "Checkpoint upload time",
                    *quantiles(
                        M.CHECKPOINT_UPLOAD_SECONDS,
                        TRAINING,
                        "namespace, run, ",
                        "{{run}}",
                    ),
                    unit="s",
                    width=8,
                ),
                graph(
                    "Checkpoints uploaded (newest step) and failed uploads",
                    (per_run(M.CHECKPOINT_LAST_STEP), "{{run}} newest step"),
                    (
                        f"max by ({PER_RUN}) ({M.CHECKPOINT_UPLOAD_FAILURES}_total{{{TRAINING}}})",
                        "{{run}} failed uploads",
                    ),
                    width=8,
                ),
                graph(
                    "Restarts",
                    (
                        f"count by ({PER_RUN}) (count by ({PER_RUN}, attempt) "
                        f"(count_over_time({M.STEP}{{{TRAINING}}}[$__range]))) - 1",
                        "{{run}} attempts - 1",
                    ),
                    (
                        f"sum by (reason) (increase(trainyard_operator_restarts_total{{{OPERATOR}}}[$__rate_interval]))",
                        "all runs: {{reason}}",
                    ),
                    description="Attempts of each run seen in the time range (each restart is a new "
                    "attempt), and the operator's gang restarts by reason.",
                    width=8,
                ),
            ),
        ),
    ),
)

PIPELINES_AND_GATES = Board(
    uid="trainyard-pipelines-gates",
    title="Trainyard / Pipelines and gates",
    description="Each TrainingPipeline's stage, PromotionGate verdicts over time, and every "
    "criterion's observed value against its threshold.",
    variables=(
        NAMESPACE_OF["operator"],
        Variable(
            "pipeline",
            "Pipeline",
            f'label_values(trainyard_pipeline_stage{{{OPERATOR}, namespace=~"$namespace"}}, pipeline)',
        ),
        Variable(
            "gate",
            "Gate",
            f'label_values(trainyard_gate_verdict{{{OPERATOR}, namespace=~"$namespace"}}, gate)',
        ),
    ),
    rows=(
        (
            "Pipelines",
            (
                graph(
                    "Current stage",
                    (
                        f"max by (namespace, pipeline) (trainyard_pipeline_stage{{{PIPELINES}}})",
                        "{{pipeline}}",
                    ),
                    description="0-based index of the stage each pipeline is at.",
                ),
                graph(
                    "Loss of the pipeline's runs",
                    (
                        f"max by (namespace, pipeline, run) ({M.LOSS}{{{PIPELINE_RUNS}}})",
                        "{{pipeline}} / {{run}}",
                    ),
                    description="Training pods carry their pipeline's label (the PodMonitor copies it).",
                ),
            ),
        ),
        (
            "Gates",
            (
                graph(
                    "Verdict held",
                    (
                        f'max by (namespace, gate, verdict) (trainyard_gate_verdict{{{GATES}, gate=~"$gate"}}) == 1',
                        "{{gate}}: {{verdict}}",
                    ),
                    description="One row per gate and verdict, filled while the gate holds it.",
                    kind="state-timeline",
                ),
                graph(
                    "Verdicts reached",
                    (
                        f'sum by (verdict) (increase(trainyard_gate_verdicts_total{{{GATES}, gate=~"$gate"}}[$__rate_interval]))',
                        "{{verdict}}",
                    ),
                ),
                graph(
                    "Criteria: observed value against threshold",
                    (
                        f'max by (namespace, gate, criterion) (trainyard_gate_criterion_value{{{GATES}, gate=~"$gate"}})',
                        "{{gate}} {{criterion}} observed",
                    ),
                    (
                        f'max by (namespace, gate, criterion) (trainyard_gate_criterion_threshold{{{GATES}, gate=~"$gate"}})',
                        "{{gate}} {{criterion}} threshold",
                    ),
                    width=24,
                ),
            ),
        ),
    ),
)

OPERATOR_BOARD = Board(
    uid="trainyard-operator",
    title="Trainyard / Operator",
    description="The operator's reconciles, their latency, its work queue, Kubernetes API "
    "errors and watch restarts.",
    variables=(),
    rows=(
        (
            "Health",
            (
                graph(
                    "Replicas up / leader",
                    (f"sum(up{{{OPERATOR}}})", "up"),
                    (f"sum(trainyard_operator_leader{{{OPERATOR}}})", "leader"),
                    kind="stat",
                    width=8,
                ),
                graph(
                    "Reconciles by result",
                    (
                        f"sum by (result) (rate(trainyard_operator_reconciles_total{{{OPERATOR}}}[$__rate_interval]))",
                        "{{result}}",
                    ),
                    unit="ops",
                    width=16,
                ),
            ),
        ),
        (
            "Latency",
            (
                graph(
                    "Reconcile duration",
                    *quantiles("trainyard_operator_reconcile_duration_seconds", OPERATOR, "", ""),
                    unit="s",
                ),
                graph(
                    "Reconciles per duration bucket",
                    (
                        f"sum by (le) (rate(trainyard_operator_reconcile_duration_seconds_bucket{{{OPERATOR}}}[$__rate_interval]))",
                        "≤ {{le}} s",
                    ),
                    unit="ops",
                    description="Cumulative histogram buckets: the rate of reconciles at most this long.",
                ),
            ),
        ),
        (
            "Work queue",
            (
                graph(
                    "Queue depth",
                    (f"max by (kind) (trainyard_operator_queue_depth{{{OPERATOR}}})", "{{kind}}"),
                ),
                graph(
                    "Queue wait",
                    *quantiles(
                        "trainyard_operator_queue_wait_seconds", OPERATOR, "kind, ", "{{kind}}"
                    ),
                    unit="s",
                ),
            ),
        ),
        (
            "Kubernetes API",
            (
                graph(
                    "API errors by verb and code",
                    (
                        f"sum by (verb, code) (rate(trainyard_operator_api_errors_total{{{OPERATOR}}}[$__rate_interval]))",
                        "{{verb}} {{code}}",
                    ),
                    unit="ops",
                ),
                graph(
                    "Watch restarts",
                    (
                        f"sum by (kind) (increase(trainyard_operator_watch_restarts_total{{{OPERATOR}}}[$__rate_interval]))",
                        "{{kind}}",
                    ),
                ),
            ),
        ),
    ),
)

VLLM_BOARD = Board(
    uid="trainyard-vllm",
    title="Trainyard / vLLM",
    description="vLLM rollout servers and InferenceServers, with vLLM's own metric names: "
    "throughput, time to first token, KV-cache use, waiting requests.",
    variables=(
        NAMESPACE_OF["vllm"],
        Variable(
            "run",
            "Run (rollout servers)",
            f'label_values(vllm:num_requests_running{{job="{VLLM_JOB}", namespace=~"$namespace"}}, run)',
        ),
    ),
    rows=(
        (
            "Servers",
            (
                graph(
                    "InferenceServers ready",
                    (
                        f'max by (namespace, server) (trainyard_inference_server_ready{{{OPERATOR}, namespace=~"$namespace"}})',
                        "{{server}}",
                    ),
                    min=0,
                    max=1,
                ),
                graph(
                    "Requests running and waiting",
                    (
                        f"sum by (namespace, pod) (vllm:num_requests_running{{{VLLM}}})",
                        "{{pod}} running",
                    ),
                    (
                        f"sum by (namespace, pod) (vllm:num_requests_waiting{{{VLLM}}})",
                        "{{pod}} waiting",
                    ),
                ),
            ),
        ),
        (
            "Throughput and latency",
            (
                graph(
                    "Tokens per second",
                    (
                        f"sum by (namespace, pod) (rate(vllm:generation_tokens_total{{{VLLM}}}[$__rate_interval]))",
                        "{{pod}} generated",
                    ),
                    (
                        f"sum by (namespace, pod) (rate(vllm:prompt_tokens_total{{{VLLM}}}[$__rate_interval]))",
                        "{{pod}} prompt",
                    ),
                ),
                graph(
                    "Time to first token",
                    *quantiles("vllm:time_to_first_token_seconds", VLLM, "", ""),
                    unit="s",
                ),
                graph(
                    "End-to-end request latency",
                    *quantiles("vllm:e2e_request_latency_seconds", VLLM, "", ""),
                    unit="s",
                ),
                graph(
                    "KV-cache use",
                    (f"max by (namespace, pod) (vllm:kv_cache_usage_perc{{{VLLM}}})", "{{pod}}"),
                    unit="percentunit",
                    min=0,
                    max=1,
                ),
            ),
        ),
    ),
)

BOARDS = (TRAINING_RUNS, PIPELINES_AND_GATES, OPERATOR_BOARD, VLLM_BOARD)


def build_variable(variable: Variable) -> dash.QueryVariable:
    return (
        dash.QueryVariable(variable.name)
        .id(variable.name)
        .label(variable.label)
        .datasource(DATASOURCE)
        .query(variable.query)
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(variable.include_all)
        .all_value(".*")
    )


def build_panel(spec: Graph, panel_id: int):
    if spec.kind == "state-timeline":
        panel = (
            statetimeline.Panel()
            .show_value(VisibilityMode.NEVER)
            .merge_values(True)
            .line_width(0)
            .fill_opacity(70)
        )
    elif spec.kind == "stat":
        panel = stat.Panel().reduce_options(
            common_builders.ReduceDataOptions().calcs(["lastNotNull"])
        )
    else:
        panel = (
            timeseries.Panel()
            .line_width(1)
            .fill_opacity(10)
            .legend(
                common_builders.VizLegendOptions()
                .show_legend(True)
                .display_mode(LegendDisplayMode.LIST)
                .placement(LegendPlacement.BOTTOM)
            )
        )
    panel = (
        panel.id(panel_id).title(spec.title).datasource(DATASOURCE).unit(spec.unit).span(spec.width)
    )
    panel = panel.height(8)
    if spec.description:
        panel = panel.description(spec.description)
    if spec.min is not None:
        panel = panel.min(spec.min)
    if spec.max is not None:
        panel = panel.max(spec.max)
    for index, query in enumerate(spec.queries):
        target = (
            prometheus.Dataquery()
            .expr(query.expr)
            .ref_id(chr(ord("A") + index))
            .datasource(DATASOURCE)
        )
        if query.legend:
            target = target.legend_format(query.legend)
        panel = panel.with_target(target)
    return panel


def build_dashboard(board: Board) -> dash.Dashboard:
    builder = (
        dash.Dashboard(board.title)
        .uid(board.uid)
        .description(board.description)
        .tags(list(board.tags))
        .editable()
        .tooltip(DashboardCursorSync.CROSSHAIR)
        .refresh("30s")
        .time("now-6h", "now")
        .timezone("browser")
        .with_variable(
            dash.DatasourceVariable("datasource")
            .id("datasource")
            .label("Data source")
            .type("prometheus")
        )
    )
    for variable in board.variables:
        builder = builder.with_variable(build_variable(variable))
    panel_id = 0
    for title, graphs in board.rows:
        panel_id += 1
        builder = builder.with_row(dash.Row(title).id(panel_id))
        for spec in graphs:
            panel_id += 1
            builder = builder.with_panel(build_panel(spec, panel_id))
    return builder


def render(board: Board) -> str:
    """The dashboard's JSON model, as checked in."""
    model = build_dashboard(board).build()
    return json.dumps(json.loads(JSONEncoder().encode(model)), indent=2, sort_keys=True) + "\n"


def file_name(board: Board) -> str:
    return f"{board.uid}.json"


def render_all() -> dict[str, str]:
    """File name → JSON text of every dashboard."""
    return {file_name(board): render(board) for board in BOARDS}


def exprs(model: dict) -> list[str]:
    """Every PromQL expression of a dashboard JSON model: its panels' targets and variables."""
    found = [
        target["expr"]
        for panel in model.get("panels", [])
        for target in panel.get("targets", [])
        if "expr" in target
    ]
    for variable in model.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable["query"]
            found.append(query if isinstance(query, str) else query.get("query", ""))
    return found
