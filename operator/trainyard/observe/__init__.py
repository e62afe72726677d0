"""Dashboards and alert rules for Trainyard, as code.

`dashboards.py` builds the Grafana dashboards with Grafana's own
`grafana-foundation-sdk` (typed builders for the dashboard schema); `alerts.py` builds
the Prometheus alert rules. `python -m trainyard.observe` writes both into the chart
(charts/trainyard/dashboards/*.json, charts/trainyard/rules/trainyard.rules.yaml);
`--check` fails when the checked-in files are stale. Nothing here talks to a cluster:
text in, text out.

The training pod's metric names come from the pod contract (`trainyard.api.contract.Metric`);
the operator's are those of its `OperatorMetrics`, vLLM's its own. tests/observe checks
every name a query reads against the real registries and vLLM's sources. The target labels
(`job`, `namespace`, `run`, `pipeline`, `attempt`, `component`) are those the chart's
PodMonitors and ServiceMonitor give the scraped series (`labels.py`).
"""
