"""Builders: each named spec becomes the children it must, and every child is valid Kubernetes.

The table is in builder_cases.py; the examples in examples/ (pipeline stages included)
go through the same checks. Schemas are Kubernetes' own OpenAPI schemas, shipped
offline with kubernetes-validate, checked strictly (unknown fields are errors).
"""

from __future__ import annotations

import json
import re

import kubernetes_validate
import pytest
import yaml

from tests.api.resources import run
from tests.operator.builder_cases import ABSENT, CASES, UID, Case, example_runs, get, grpo, view
from trainyard.api import TrainingRun, parse_resource
from trainyard.operator.builders import UnrenderableRun, names, render_children

# The oldest Kubernetes with everything the Job uses GA (podFailurePolicy: 1.31), and the newest.
KUBERNETES_VERSIONS = ("1.31", kubernetes_validate.latest_version())
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def rendered() -> list[tuple[str, TrainingRun, dict, list[dict]]]:
    """(id, run, render options, children) for every table case and every example."""
    out = []
    for case in CASES:
        training_run = case.training_run()
        out.append(
            (
                case.id,
                training_run,
                case.render,
                render_children(training_run, uid=UID, **case.render),
            )
        )
    for label, training_run in example_runs():
        out.append((f"example:{label}", training_run, {}, render_children(training_run, uid=UID)))
    return out


RENDERED = rendered()
ALL = [pytest.param(r, c, id=i) for i, r, _, c in RENDERED]
ALL_WITH_OPTIONS = [pytest.param(r, o, c, id=i) for i, r, o, c in RENDERED]
MANIFESTS = [
    pytest.param(child, id=f"{i}:{child['kind']}/{child['metadata']['name']}")
    for i, _, _, children in RENDERED
    for child in children
]


# ---------------------------------------------------------------- the table


def shown(value):
    return "<absent>" if value is ABSENT else value


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_case_renders_expected_fields(case: Case):
    children = view(render_children(case.training_run(), uid=UID, **case.render))
    got = {path: shown(get(children, path)) for path in case.expect}
    assert got == {path: shown(want) for path, want in case.expect.items()}


def test_examples_cover_both_vllm_modes_and_plain_runs():
    """The example specs exercise what the table does: a server, colocate, and no vLLM."""
    modes = {
        (r.spec.rollout.vllm.mode if r.spec.rollout and r.spec.rollout.vllm else None)
        for _, r in example_runs()
    }
    assert modes == {"server", "colocate", None}


# ---------------------------------------------------------------- every manifest


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("manifest", MANIFESTS)
def test_manifest_matches_kubernetes_openapi_schema(manifest: dict, version: str):
    kubernetes_validate.validate(manifest, version, strict=True)


def test_schema_check_rejects_a_misspelled_field():
    """The schema check above can fail: a Job with a typo is refused, a wrong type too."""
    children = render_children(parse_resource(run("sft").doc), uid=UID)
    job = next(c for c in children if c["kind"] == "Job")
    typo = json.loads(json.dumps(job))
    typo["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, KUBERNETES_VERSIONS[-1], strict=True)
    wrong_type = json.loads(json.dumps(job))
    wrong_type["spec"]["parallelism"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong_type, KUBERNETES_VERSIONS[-1], strict=True)


@pytest.mark.parametrize(("training_run", "children"), ALL)
def test_every_child_is_owned_by_the_run(training_run: TrainingRun, children: list[dict]):
    for child in children:
        assert child["metadata"]["ownerReferences"] == [
            {
                "apiVersion": "trainyard.dev/v1alpha1",
                "kind": "TrainingRun",
                "name": training_run.metadata.name,
                "uid": UID,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        assert child["metadata"].get("namespace") == training_run.metadata.namespace


@pytest.mark.parametrize(("training_run", "children"), ALL)
def test_names_and_labels_fit_kubernetes_limits(training_run: TrainingRun, children: list[dict]):
    for child in children:
        name = child["metadata"]["name"]
        assert len(name) <= 63 and DNS_LABEL.match(name), name
        if child["kind"] == "Service":
            assert DNS1035_LABEL.match(name), name
        for key, value in child["metadata"]["labels"].items():
            assert len(value) <= 63 and LABEL_VALUE.match(value), (key, value)
        if child["kind"] == "Job":
            last_index = child["spec"]["completions"] - 1
            hostname = f"{name}-{last_index}"
            assert len(hostname) <= 63 and DNS_LABEL.match(hostname), hostname
    assert len({(c["kind"], c["metadata"]["name"]) for c in children}) == len(children)


@pytest.mark.parametrize(("training_run", "options", "children"), ALL_WITH_OPTIONS)
def test_rendering_is_deterministic_and_shares_no_objects(
    training_run: TrainingRun, options: dict, children: list[dict]
):
    again = render_children(training_run, uid=UID, **options)
    assert json.dumps(again) == json.dumps(children)
    # No sub-object appears twice: a shared dict would be an alias in YAML and a hazard for
    # anyone who edits one child in place.
    assert "&id" not in yaml.safe_dump_all(children)


@pytest.mark.parametrize(("training_run", "children"), ALL)
def test_pods_run_under_the_restricted_security_standard(
    training_run: TrainingRun, children: list[dict]
):
    for child in children:
        if child["kind"] not in ("Job", "Deployment"):
            continue
        pod = child["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"] == {"drop": ["ALL"]}
            assert context["runAsNonRoot"] is True
            assert "privileged" not in context
        assert {v["name"]: v["emptyDir"] for v in pod["volumes"] if "emptyDir" in v}["dshm"][
            "medium"
        ] == "Memory"
        for container in pod["containers"]:
            for variable in container.get("env", []):
                if re.search(r"SECRET|ACCESS_KEY|TOKEN|PASSWORD", variable["name"]):
                    assert "value" not in variable, variable


@pytest.mark.parametrize(("training_run", "children"), ALL)
def test_selectors_and_references_meet(training_run: TrainingRun, children: list[dict]):
    """Services select the pods they front; pods mount the ConfigMap and use the Service as subdomain."""
    by_role = view(children)
    job_pod = by_role["job"]["spec"]["template"]
    workers = by_role["workers"]
    assert workers["spec"]["selector"].items() <= job_pod["metadata"]["labels"].items()
    assert job_pod["spec"]["subdomain"] == workers["metadata"]["name"]
    master = by_role["job_opts"]["--master-addr"]
    assert master == f"{by_role['job']['metadata']['name']}-0.{workers['metadata']['name']}"
    config_volumes = [
        v["configMap"]["name"] for v in job_pod["spec"]["volumes"] if "configMap" in v
    ]
    assert config_volumes == [by_role["config"]["metadata"]["name"]]
    if "vllm" in by_role:
        deployment, service = by_role["vllm"], by_role["vllm_service"]
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
        assert service["spec"]["selector"].items() <= pod_labels.items()
        url = by_role["trainer_json"]["vllm_server_base_url"]
        assert url.startswith(f"http://{service['metadata']['name']}")
        assert url.endswith(f":{service['spec']['ports'][0]['port']}")
    # A worker Service selector must not also select the rollout server's pods.
    if "vllm" in by_role:
        vllm_labels = by_role["vllm"]["spec"]["template"]["metadata"]["labels"]
        assert not workers["spec"]["selector"].items() <= vllm_labels.items()


@pytest.mark.parametrize(("training_run", "children"), ALL)
def test_run_json_is_the_run_the_workload_parses(training_run: TrainingRun, children: list[dict]):
    document = view(children)["run_json"]
    parsed = parse_resource(document)
    assert parsed.spec == training_run.spec
    assert parsed.metadata.name == training_run.metadata.name
    assert set(document["metadata"]) <= {"name", "namespace", "labels"}


# ---------------------------------------------------------------- specs that cannot run


@pytest.mark.parametrize(
    ("doc", "field", "says"),
    [
        pytest.param(
            grpo("server").set("spec.model.source", "builtin://tiny-qwen2"),
            "spec.model.source",
            "builtin models exist only inside trainer processes",
            id="builtin-model-on-server",
        ),
        pytest.param(
            grpo("colocate", tensorParallelSize=2).set("spec.distributed.gpusPerNode", 3),
            "spec.rollout.vllm.tensorParallelSize",
            "does not divide the 3 training processes",
            id="colocate-tp-not-dividing",
        ),
        pytest.param(
            grpo("colocate", dataParallelSize=2),
            "spec.rollout.vllm.dataParallelSize",
            "only applies to mode server",
            id="colocate-data-parallel",
        ),
        pytest.param(
            grpo("server")
            .set("spec.model.source", "run://sft-stage/latest")
            .set("spec.checkpoint", {"uri": "s3://ckpt/grpo-run"}),
            "spec.model.source",
            "latest is only known at run time",
            id="run-latest-on-server",
        ),
        pytest.param(
            grpo("server").set("spec.model.source", "run://sft-stage"),
            "spec.model.source",
            "set checkpoint.uri",
            id="run-model-without-checkpoint-uri",
        ),
        pytest.param(
            grpo("server").set("spec.tokenizer", {"source": "builtin://tokenizer"}),
            "spec.tokenizer.source",
            "cannot be loaded by a vLLM rollout server",
            id="builtin-tokenizer-on-server",
        ),
    ],
)
def test_unrenderable_spec_names_the_field(doc, field: str, says: str):
    with pytest.raises(UnrenderableRun) as raised:
        render_children(parse_resource(doc.doc), uid=UID)
    assert raised.value.field == field
    assert str(raised.value).startswith(f"{field}: ")
    assert says in str(raised.value)


def test_render_refuses_missing_uid_and_negative_attempt():
    training_run = parse_resource(run("sft").doc)
    with pytest.raises(ValueError, match="uid"):
        render_children(training_run, uid="")
    with pytest.raises(ValueError, match="restart_attempt"):
        render_children(training_run, uid=UID, restart_attempt=-1)


# ---------------------------------------------------------------- names


@pytest.mark.parametrize(
    ("run_name", "suffix", "expected"),
    [
        pytest.param("sprint-stories-grpo", "workers", "sprint-stories-grpo-workers", id="fits"),
        pytest.param(
            "a" * 56, "workers", "a" * 46 + "-workers-" + names.short_hash("a" * 56), id="too-long"
        ),
        pytest.param(
            "7b-sft", "workers", "r-7b-sft-workers-" + names.short_hash("7b-sft"), id="digit-first"
        ),
        pytest.param(
            "v1.2-sft", "config", "v1-2-sft-config-" + names.short_hash("v1.2-sft"), id="dotted"
        ),
    ],
)
def test_child_name(run_name: str, suffix: str, expected: str):
    assert names.child_name(run_name, suffix) == expected
    assert len(expected) <= 63


def test_long_names_stay_distinct_and_within_limits():
    first, second = "x" * 200 + "-one", "x" * 200 + "-two"
    for make in (
        lambda run: names.config_map_name(run, 0),
        names.workers_service_name,
        names.rollout_server_name,
    ):
        assert make(first) != make(second)
        assert len(make(first)) <= 63 and DNS1035_LABEL.match(make(first))
    assert names.worker_job_name(first, 0) != names.worker_job_name(second, 0)
    assert names.worker_job_name(first, 0) != names.worker_job_name(first, 1)
    assert names.config_map_name(first, 0) != names.config_map_name(first, 1)
    assert len(names.worker_job_name(first, 99)) <= names.JOB_NAME_MAX
    assert names.run_label_value(first) != names.run_label_value(second)
    assert len(names.run_label_value(first)) <= 63 and LABEL_VALUE.match(
        names.run_label_value(first)
    )
    assert names.run_label_value("short.run") == "short.run"
