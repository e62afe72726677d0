"""Every CEL rule of the generated CRDs, evaluated with cel-python, agrees with its Python twin.

The object a rule sees is the one the API server would evaluate: the parsed spec with
its defaults (`model_dump(by_alias=True, exclude_none=True, mode="json")`), and — as a
second opinion — the raw document with only the CRD schema's own defaults applied
(`apply_defaults`), which is what the API server really has. Both must give the same
answer as `Rule.check` on the model.

cel-python evaluates `matches()` with google-re2 (`re2.search`), the engine and the
partial-match semantics Kubernetes uses, so `(?i)` flags behave the same.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.api.resources import Doc, gate, run, server
from tests.api.schemas import apply_defaults, evaluate_cel, load_crds, openapi_schema, walk
from trainyard.api import ApiModel
from trainyard.api.rules import Rule


def _models_with_rules() -> list[type[ApiModel]]:
    found, todo = [], [ApiModel]
    while todo:
        model = todo.pop()
        todo.extend(model.__subclasses__())
        if model.__dict__.get("rules"):
            found.append(model)
    return found


RULES: dict[str, tuple[type[ApiModel], Rule]] = {}
for _model in sorted(_models_with_rules(), key=lambda m: m.__name__ != "TrainingRunSpec"):
    for _rule in _model.rules:
        # A rule shared by several specs (the env rules) is exercised on the first
        # model that has it; the fixtures are written for that model.
        RULES.setdefault(_rule.name, (_model, _rule))


def _crd_rules() -> list[tuple[str, str, dict[str, Any], dict[str, Any]]]:
    """(kind, schema path, schema node, rule) for every x-kubernetes-validations entry."""
    return [
        (kind, path, node, rule)
        for kind, crd in load_crds().items()
        for path, node in walk(openapi_schema(crd))
        for rule in node.get("x-kubernetes-validations", [])
    ]


def spec(method: str = "sft") -> Doc:
    """A TrainingRun spec (what a spec-level rule's `self` is)."""
    return Doc(run(method).doc["spec"])


def reward(**fields: Any) -> Doc:
    return Doc({"name": "fmt", **fields})


LENGTH_ARGS = {"min": 1, "max": 50}
DEEPSPEED = "distributed.deepspeed"

# rule name → (passing self, failing self); more passing/failing fixtures in EXTRA.
FIXTURES: dict[str, tuple[Doc, Doc]] = {
    **{
        f"{block}-block-needs-method": (
            spec(block).set(block, {}) if block not in ("grpo", "rloo") else spec(block),
            spec("sft" if block != "sft" else "dpo").set(block, {}),
        )
        for block in ("sft", "dpo", "kto", "reward", "grpo", "rloo", "pretrain")
    },
    "online-rl-needs-rewards": (
        spec("rloo"),
        spec("grpo").set("grpo.rewards", []),
    ),
    "grpo-generation-batch-divisible": (
        spec("grpo").set("training.perDeviceBatchSize", 3).set("distributed.nodes", 4),
        spec("grpo").set("training.perDeviceBatchSize", 6),
    ),
    "rloo-generation-batch-divisible": (
        spec("rloo").set("training.perDeviceBatchSize", 4).set("rloo.numGenerations", 4),
        spec("rloo").set("training.perDeviceBatchSize", 6).set("rloo.numGenerations", 4),
    ),
    **{
        f"{m}-sync-ref-model-not-with-peft": (
            spec(m).set(f"{m}.syncRefModel", True).set(f"{m}.beta", 0.1),
            spec(m).set(f"{m}.syncRefModel", True).set(f"{m}.beta", 0.1).set("peft", {"r": 4}),
        )
        for m in ("grpo", "rloo", "dpo")
    },
    "grpo-sync-ref-model-needs-beta": (
        spec("grpo").set("grpo.syncRefModel", True).set("grpo.beta", 0.04),
        spec("grpo").set("grpo.syncRefModel", True),
    ),
    "rloo-sync-ref-model-needs-beta": (
        spec("rloo").set("rloo.syncRefModel", True),
        spec("rloo").set("rloo.syncRefModel", True).set("rloo.beta", 0.0),
    ),
    "dpo-sync-ref-model-not-precomputed": (
        spec("dpo").set("dpo.syncRefModel", True),
        spec("dpo").set("dpo.syncRefModel", True).set("dpo.precomputeRefLogProbs", True),
    ),
    "lora-targets-something": (
        Doc({"targetModules": [], "targetParameters": ["mlp.experts.down_proj"], "dropout": 0}),
        Doc({"targetModules": []}),
    ),
    "lora-target-parameters-without-dropout": (
        Doc({"targetParameters": ["mlp.experts.down_proj"], "dropout": 0.0}),
        Doc({"targetParameters": ["mlp.experts.down_proj"]}),
    ),
    "model-config-needs-random-init": (
        Doc(
            {
                "source": "hf://Qwen/Qwen2.5-0.5B",
                "init": "random",
                "config": {"num_hidden_layers": 2},
            }
        ),
        Doc({"source": "hf://Qwen/Qwen2.5-0.5B", "config": {"num_hidden_layers": 2}}),
    ),
    "rollout-needs-online-rl": (
        spec("grpo").set("rollout.vllm.mode", "colocate"),
        spec("dpo").set("rollout.vllm.mode", "server"),
    ),
    "early-stopping-needs-eval": (
        spec().set("training.earlyStopping", {}).set("dataset.evalSplit", 0.1),
        spec().set("training.earlyStopping", {"patience": 2}),
    ),
    "quantized-base-not-zero3": (
        spec().set("model.quantization.bits", 4).set("peft", {}).set(DEEPSPEED, {"zeroStage": 2}),
        spec().set("model.quantization.bits", 8).set("peft", {}).set(DEEPSPEED, {"zeroStage": 3}),
    ),
    "quantization-needs-lora": (
        spec().set("model.quantization.bits", 4).set("peft", {"r": 8}),
        spec().set("model.quantization.bits", 4),
    ),
    "config-needs-hub-dataset": (
        Doc({"source": "hf://openai/gsm8k", "config": "main"}),
        Doc({"source": "s3://data/train.jsonl", "config": "main"}),
    ),
    "param-offload-needs-zero3": (
        spec().set(DEEPSPEED, {"zeroStage": 3, "offloadParam": "cpu"}),
        spec().set(DEEPSPEED, {"zeroStage": 2, "offloadParam": "nvme"}),
    ),
    "oom-floor-within-batch": (
        spec()
        .set("training.perDeviceBatchSize", 4)
        .set("runPolicy.oomRecovery", {"minPerDeviceBatchSize": 4}),
        spec()
        .set("training.perDeviceBatchSize", 2)
        .set("runPolicy.oomRecovery", {"minPerDeviceBatchSize": 4}),
    ),
    "no-literal-credentials": (
        spec().set(
            "env",
            [
                {"name": "HF_HOME", "value": "/cache"},
                {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "t"}}},
            ],
        ),
        spec().set("env", [{"name": "HF_HOME", "value": "/c"}, {"name": "HF_TOKEN", "value": "x"}]),
    ),
    "env-value-or-value-from": (
        spec().set("env", [{"name": "A", "value": "1"}]),
        spec().set(
            "env",
            [{"name": "A", "value": "1", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}],
        ),
    ),
    "builtin-or-python": (
        reward(builtin="length", args=LENGTH_ARGS),
        reward(builtin="length", python="my_rewards:score", args=LENGTH_ARGS),
    ),
    "run-or-model": (
        Doc(gate().doc["spec"]),
        Doc(gate().doc["spec"]).set("model.source", "s3://checkpoints/x"),
    ),
}

# More fixtures where a rule has edges worth pinning down: (rule, self, expected).
EXTRA: list[tuple[str, Doc, bool]] = [
    ("builtin-or-python", reward(python="my_rewards:score"), True),
    ("builtin-or-python", reward(), False),
    ("run-or-model", Doc(gate().doc["spec"]).drop("run"), False),
    ("run-or-model", Doc(gate().doc["spec"]).drop("run").set("model.source", "run://a"), True),
    ("online-rl-needs-rewards", spec("grpo").drop("grpo.rewards"), False),
    ("online-rl-needs-rewards", spec("grpo").drop("grpo"), False),
    (
        "online-rl-needs-rewards",
        spec("grpo").set("grpo.rewards", []).set("grpo.rewardModel.source", "run://rm"),
        True,
    ),
    # gpusPerNode 0 (CPU) counts as one process per node.
    ("grpo-generation-batch-divisible", spec("grpo").set("distributed.gpusPerNode", 0), True),
    (
        "grpo-generation-batch-divisible",
        spec("grpo").set("training.perDeviceBatchSize", 2).set("distributed.gpusPerNode", 2),
        True,
    ),
    (
        "grpo-generation-batch-divisible",
        spec("grpo").set("training.perDeviceBatchSize", 2).set("distributed.gpusPerNode", 0),
        False,
    ),
    # Defaults matter: grpo numGenerations 8 against the default batch of 8 × 1.
    (
        "grpo-generation-batch-divisible",
        spec("grpo").drop("training").drop("grpo.numGenerations"),
        True,
    ),
    ("rollout-needs-online-rl", spec("rloo").set("rollout.vllm", {}), True),
    (
        "early-stopping-needs-eval",
        spec().set("training.earlyStopping", {}).set("dataset.evalSource", "s3://d/eval.jsonl"),
        True,
    ),
    ("param-offload-needs-zero3", spec().set(DEEPSPEED, {"zeroStage": 3}), True),
    ("param-offload-needs-zero3", spec().set(DEEPSPEED, {"offloadParam": "cpu"}), False),
    # Defaults matter: a bare oomRecovery floors at 1.
    ("oom-floor-within-batch", spec().set("runPolicy.oomRecovery", {}), True),
    (
        "oom-floor-within-batch",
        spec().set("runPolicy.oomRecovery", {"minPerDeviceBatchSize": 99}),
        False,
    ),
    # Secret-looking names are matched case-insensitively anywhere in the name.
    ("no-literal-credentials", spec().set("env", [{"name": "my_api_key", "value": "k"}]), False),
    ("no-literal-credentials", spec().set("env", [{"name": "DB_PASSWORD", "value": "p"}]), False),
    (
        "no-literal-credentials",
        spec().set("env", [{"name": "AWS_SECRET_ACCESS_KEY", "value": "s"}]),
        False,
    ),
    # Not a secret: tokenizers' switch, set in most training images. Words, not substrings.
    (
        "no-literal-credentials",
        spec().set("env", [{"name": "TOKENIZERS_PARALLELISM", "value": "false"}]),
        True,
    ),
    ("no-literal-credentials", spec().set("env", [{"name": "NCCL_DEBUG", "value": "INFO"}]), True),
]


def _unchecked(model: type[ApiModel]) -> type[ApiModel]:
    """The model without its own rules, so a fixture that breaks one can still be built."""
    return type(f"Unchecked{model.__name__}", (model,), {"rules": ()})


def _rule_node(rule: Rule) -> dict[str, Any]:
    """The first CRD schema node that carries the rule (its defaults apply to `self`)."""
    for _, _, node, crd_rule in _crd_rules():
        if crd_rule["rule"] == rule.cel:
            return node
    raise AssertionError(f"rule {rule.name} is in no CRD")


def _verdicts(rule_name: str, fixture: Doc) -> tuple[bool, bool, bool]:
    """(Python check, CEL on the model's dump, CEL on the CRD-defaulted document)."""
    model, rule = RULES[rule_name]
    instance = _unchecked(model).model_validate(fixture.doc)
    dumped = instance.model_dump(by_alias=True, exclude_none=True, mode="json")
    crd_defaulted = apply_defaults(_rule_node(rule), fixture.doc)
    return (
        rule.check(instance),
        evaluate_cel(rule.cel, dumped),
        evaluate_cel(rule.cel, crd_defaulted),
    )


CASES = [
    pytest.param(name, doc, expected, id=f"{name}-{'passes' if expected else 'fails'}")
    for name, (passing, failing) in FIXTURES.items()
    for doc, expected in ((passing, True), (failing, False))
] + [
    pytest.param(name, doc, expected, id=f"{name}-extra{i}-{'passes' if expected else 'fails'}")
    for i, (name, doc, expected) in enumerate(EXTRA)
]


@pytest.mark.parametrize(("rule_name", "fixture", "expected"), CASES)
def test_cel_and_python_agree(rule_name, fixture, expected):
    assert _verdicts(rule_name, fixture) == (expected, expected, expected)


@pytest.mark.parametrize("rule_name", sorted(FIXTURES))
def test_failing_fixture_is_refused_with_the_rules_message(rule_name):
    model, rule = RULES[rule_name]
    with pytest.raises(ValueError, match=re.escape(rule.message)):
        model.model_validate(FIXTURES[rule_name][1].doc)


def test_every_python_rule_has_fixtures():
    assert sorted(RULES) == sorted(FIXTURES)


def test_every_crd_rule_is_a_python_rule_or_the_transition_rule():
    """A rule added to a CRD without fixtures here fails this test."""
    python_cel = {rule.cel for _, rule in RULES.values()}
    unknown = [
        f"{kind} {path}: {rule['rule']}"
        for kind, path, _, rule in _crd_rules()
        if rule["rule"] not in python_cel and rule["rule"] != TRANSITION_RULE
    ]
    assert unknown == []


def test_every_python_rule_is_in_a_crd():
    in_crds = {rule["rule"] for _, _, _, rule in _crd_rules()}
    assert [name for name, (_, rule) in RULES.items() if rule.cel not in in_crds] == []


@pytest.mark.parametrize(
    ("kind", "path", "node", "rule"),
    [
        pytest.param(*r, id=f"{r[0]}{r[1]}:{r[3].get('fieldPath', r[3]['rule'][:20])}")
        for r in _crd_rules()
    ],
)
def test_rule_field_path_names_a_field_of_its_node(kind, path, node, rule):
    """The API server refuses a CRD whose fieldPath does not resolve in the schema."""
    current = node
    for part in rule.get("fieldPath", "").split(".")[1:]:
        current = current.get("properties", {}).get(part)
        assert current is not None, f"{rule['fieldPath']} is not a field below {path or 'root'}"


# The root rule of TrainingRun: what a run trains cannot change once it has started.
(TRANSITION_RULE,) = [
    rule["rule"] for _, path, _, rule in _crd_rules() if path == "" and "oldSelf" in rule["rule"]
]


def _stored(phase: str | None, doc: Doc | None = None) -> dict[str, Any]:
    obj = (doc or run("grpo")).doc
    return {**obj, "status": {"phase": phase}} if phase else obj


TRANSITIONS = [
    ("no-status-change-method", None, run("grpo").set("spec.method", "rloo"), True),
    ("pending-change-model", "Pending", run("grpo").set("spec.model.source", "hf://a/b"), True),
    ("invalid-change-dataset", "Invalid", run("grpo").set("spec.dataset.source", "s3://x/y"), True),
    (
        "running-change-learning-rate",
        "Running",
        run("grpo").set("spec.training.learningRate", 1e-4),
        True,
    ),
    ("running-change-rewards", "Running", run("grpo").set("spec.grpo.beta", 0.1), True),
    ("running-suspend", "Running", run("grpo").set("spec.suspend", True), True),
    ("running-unchanged", "Running", run("grpo"), True),
    ("running-change-method", "Running", run("grpo").set("spec.method", "rloo"), False),
    ("running-change-model", "Running", run("grpo").set("spec.model.source", "hf://a/b"), False),
    (
        "running-change-dataset-field",
        "Running",
        run("grpo").set("spec.dataset.promptField", "q"),
        False,
    ),
    ("running-add-peft", "Running", run("grpo").set("spec.peft", {"r": 8}), False),
    ("running-change-nodes", "Running", run("grpo").set("spec.distributed.nodes", 2), False),
    (
        "succeeded-change-model",
        "Succeeded",
        run("grpo").set("spec.model.source", "hf://a/b"),
        False,
    ),
    (
        "failed-change-distributed",
        "Failed",
        run("grpo").set("spec.distributed.gpusPerNode", 8),
        False,
    ),
]


@pytest.mark.parametrize(
    ("old_phase", "new", "allowed"),
    [pytest.param(p, n, a, id=i) for i, p, n, a in TRANSITIONS],
)
def test_transition_rule_freezes_a_started_run(old_phase, new, allowed):
    """No Python twin: only the API server enforces this; these fixtures are its spec."""
    schema = openapi_schema(load_crds()["TrainingRun"])
    old = apply_defaults(schema, _stored(old_phase))
    new = apply_defaults(schema, _stored(old_phase, new))
    assert evaluate_cel(TRANSITION_RULE, new, old) is allowed


def test_transition_rule_lets_peft_be_removed_only_before_start():
    schema = openapi_schema(load_crds()["TrainingRun"])
    with_peft = run("grpo").set("spec.peft", {"r": 8})
    old = apply_defaults(schema, _stored("Running", with_peft))
    new = apply_defaults(schema, _stored("Running"))
    assert evaluate_cel(TRANSITION_RULE, new, old) is False
    old_pending = apply_defaults(schema, _stored("Pending", with_peft))
    assert evaluate_cel(TRANSITION_RULE, new, old_pending) is True


def test_inference_server_and_pipeline_carry_rules_where_their_parts_have_them():
    """Rules of nested parts travel with them into every CRD that embeds them."""
    kinds_by_rule: dict[str, set[str]] = {}
    for kind, _, _, rule in _crd_rules():
        kinds_by_rule.setdefault(rule["rule"], set()).add(kind)
    assert kinds_by_rule[RULES["grpo-generation-batch-divisible"][1].cel] == {
        "TrainingRun",
        "TrainingPipeline",
    }
    assert kinds_by_rule[RULES["builtin-or-python"][1].cel] == {"TrainingRun", "TrainingPipeline"}
    assert server().doc["kind"] not in kinds_by_rule[RULES["run-or-model"][1].cel]
