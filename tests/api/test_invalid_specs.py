"""Bad specs and the exact lines `trainyard validate` prints for them.

Each case starts from a valid resource (tests/api/resources.py) and breaks one thing.
`api_server` says whether the API server must refuse the same document through the
CRD (schema or CEL rule): a check only Python can make (a regular expression that does
not compile, the arguments of a built-in reward) is marked False.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.api.resources import Doc, gate, pipeline, run, server
from tests.api.schemas import api_server_errors
from trainyard.api import validate_resource
from trainyard.cli.main import main

SPEC_FIELDS = (
    "method, model, tokenizer, dataset, peft, training, sft, dpo, kto, reward, grpo, rloo, "
    "pretrain, rollout, distributed, checkpoint, storage, metrics, resources, scheduling, "
    "image, imagePullPolicy, env, runPolicy, suspend"
)
SOURCES = (
    "hf://org/name[@revision], s3://bucket/key, file://path, builtin://NAME, "
    "run://RUN[/step-N|final|latest]"
)
SECRET_ENV = (
    "spec.env: credentials must not be written in a spec: take variables named like "
    "secrets from a Secret with valueFrom.secretKeyRef"
)


def case(id: str, doc: Doc, *lines: str, api_server: bool = True):
    return pytest.param(doc.doc, list(lines), api_server, id=id)


CASES = [
    # Unknown fields, with a did-you-mean where one is close.
    case(
        "unknown-top-level-spec-field",
        run().set("spec.learningRate", 1e-5),
        f"spec.learningRate: unknown field; allowed: {SPEC_FIELDS}",
    ),
    case(
        "unknown-metadata-field",
        run().set("metadata.lables", {"team": "ml"}),
        "metadata.lables: unknown field; did you mean 'labels'?",
        # CRD schemas may not describe metadata; the API server's strict field
        # validation (kubectl's default) refuses it without a CRD rule.
        api_server=False,
    ),
    case(
        "unknown-nested-field",
        run().set("spec.training.learningRat", 1e-5),
        "spec.training.learningRat: unknown field; did you mean 'learningRate'?",
    ),
    case(
        "unknown-field-in-list-item",
        run("grpo").set("spec.grpo.rewards[0].wieght", 1),
        "spec.grpo.rewards[0].wieght: unknown field; did you mean 'weight'?",
    ),
    case(
        "unknown-reward-arg",
        run("grpo").set("spec.grpo.rewards[0].args.maxx", 100),
        "spec.grpo.rewards[0].args.maxx: unknown field; did you mean 'max'?",
        api_server=False,
    ),
    case(
        "unknown-field-in-pipeline-stage",
        pipeline().set("spec.stages[1].run.trainig", {}),
        "spec.stages[1].run.trainig: unknown field; did you mean 'training'?",
    ),
    case(
        "unknown-field-in-inference-server",
        server().set("spec.vllm.tensorParalelSize", 2),
        "spec.vllm.tensorParalelSize: unknown field; did you mean 'tensorParallelSize'?",
    ),
    # Enums.
    case(
        "unknown-method",
        run().set("spec.method", "ppo"),
        "spec.method: 'ppo' is not allowed; allowed: "
        "'sft', 'dpo', 'kto', 'reward', 'grpo', 'rloo' or 'pretrain'",
    ),
    case(
        "unknown-precision",
        run().set("spec.training.precision", "fp8"),
        "spec.training.precision: 'fp8' is not allowed; allowed: 'bf16', 'fp16' or 'fp32'",
    ),
    case(
        "unknown-dpo-loss-type",
        run("dpo").set("spec.dpo.lossType", "ipo2"),
        "spec.dpo.lossType: 'ipo2' is not allowed; allowed: 'sigmoid', 'hinge', 'ipo', "
        "'exo_pair', 'nca_pair', 'robust', 'bco_pair', 'sppo_hard', 'aot', 'aot_unpaired', "
        "'apo_zero', 'apo_down', 'discopop' or 'sigmoid_norm'",
    ),
    case(
        "zero-stage-4",
        run().set("spec.distributed.deepspeed.zeroStage", 4),
        "spec.distributed.deepspeed.zeroStage: 4 is not allowed; allowed: 0, 1, 2 or 3",
    ),
    case(
        "unknown-criterion-operator",
        gate().set("spec.criteria", [{"metric": "accuracy", "op": "=>", "value": 0.6}]),
        "spec.criteria[0].op: '=>' is not allowed; allowed: '<', '<=', '>', '>=', '==' or '!='",
        # Criteria are free-form in the CRD (text or object form, see gate.Criterion): only
        # the operator's admission check parses them.
        api_server=False,
    ),
    # Numbers out of range and wrong types.
    case(
        "learning-rate-zero",
        run().set("spec.training.learningRate", 0),
        "spec.training.learningRate: must be greater than 0; got 0",
    ),
    case(
        "lora-dropout-above-one",
        run().set("spec.peft", {"dropout": 1.5}),
        "spec.peft.dropout: must be less than 1; got 1.5",
    ),
    case(
        "zero-nodes",
        run().set("spec.distributed.nodes", 0),
        "spec.distributed.nodes: must be greater than or equal to 1; got 0",
    ),
    case(
        "eval-split-above-one",
        run().set("spec.dataset.evalSplit", 1.5),
        "spec.dataset.evalSplit: must be less than 1; got 1.5",
    ),
    case(
        "epochs-not-a-number",
        run().set("spec.training.epochs", "ten"),
        "spec.training.epochs: must be a valid number; got 'ten'",
    ),
    case(
        "quantity-neither-int-nor-string",
        run().set("spec.resources", {"requests": {"cpu": [1]}}),
        "spec.resources.requests.cpu: must be a valid integer or a valid string; got [1]",
    ),
    # Missing required fields.
    case("missing-model", run().drop("spec.model"), "spec.model: required field is missing"),
    case(
        "missing-dataset-source",
        run().drop("spec.dataset.source"),
        "spec.dataset.source: required field is missing",
    ),
    case(
        "dataset-config-on-a-file",
        run().set("spec.dataset.config", "main"),
        "spec.dataset.config: config names a subset of a hub dataset: it applies to hf:// "
        "sources only",
    ),
    case("missing-spec", run().drop("spec"), "spec: required field is missing"),
    # Sources and credentials.
    case(
        "source-with-unknown-scheme",
        run().set("spec.model.source", "ftp://models/qwen"),
        f"spec.model.source: 'ftp://models/qwen' is not a source URI; allowed: {SOURCES}",
    ),
    case(
        "source-without-scheme",
        run().set("spec.model.source", "Qwen/Qwen2.5-0.5B"),
        f"spec.model.source: 'Qwen/Qwen2.5-0.5B' is not a source URI; allowed: {SOURCES}",
    ),
    case(
        "credentials-in-source-uri",
        run().set("spec.dataset.source", "s3://AKIAEXAMPLE:wJalrXUt@datasets/train.jsonl"),
        "spec.dataset.source: credentials must not be written in a source URI; put them in a "
        "Secret and reference it from storage.s3.credentialsSecret",
    ),
    case(
        "credentials-in-s3-endpoint",
        run().set("spec.storage.s3.endpoint", "http://minio:minio123@minio.storage.svc:9000"),
        "spec.storage.s3.endpoint: credentials must not be written in the endpoint; "
        "use credentialsSecret",
    ),
    case(
        "literal-secret-env",
        run().set("spec.env", [{"name": "HF_TOKEN", "value": "hf_abcdef"}]),
        SECRET_ENV,
    ),
    case(
        "literal-secret-env-lower-case",
        run().set("spec.env", [{"name": "wandb_api_key", "value": "abc"}]),
        SECRET_ENV,
    ),
    case(
        "env-value-and-value-from",
        run().set(
            "spec.env",
            [{"name": "X", "value": "1", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}],
        ),
        "spec.env: an env variable takes value or valueFrom, not both",
    ),
    # Cross-field rules.
    case(
        "grpo-batch-not-divisible",
        run("grpo").set("spec.grpo.numGenerations", 3),
        "spec.grpo.numGenerations: the generation batch (perDeviceBatchSize × "
        "gradientAccumulationSteps × nodes × gpusPerNode) must be a multiple of "
        "grpo.numGenerations",
    ),
    case(
        "rloo-batch-not-divisible",
        run("rloo").set("spec.training.perDeviceBatchSize", 6).set("spec.rloo.numGenerations", 4),
        "spec.rloo.numGenerations: the generation batch (perDeviceBatchSize × "
        "gradientAccumulationSteps × nodes × gpusPerNode) must be a multiple of "
        "rloo.numGenerations",
    ),
    case(
        "dpo-block-on-sft",
        run().set("spec.dpo", {"beta": 0.1}),
        "spec.dpo: dpo options only apply to method dpo",
    ),
    case(
        "grpo-block-on-rloo",
        run("rloo").set("spec.grpo", {"numGenerations": 4}),
        "spec.grpo: grpo options only apply to method grpo",
    ),
    case(
        "rollout-on-sft",
        run().set("spec.rollout", {"vllm": {"mode": "server"}}),
        "spec.rollout: rollout only applies to methods grpo and rloo",
    ),
    case(
        "grpo-without-rewards",
        run("grpo").set("spec.grpo.rewards", []),
        "spec.method: grpo and rloo need at least one reward or a rewardModel",
    ),
    case(
        "early-stopping-without-eval-data",
        run().set("spec.training.earlyStopping", {"patience": 2}),
        "spec.training.earlyStopping: earlyStopping needs evaluation data: set "
        "dataset.evalSource or dataset.evalSplit",
    ),
    case(
        "quantization-without-peft",
        run().set("spec.model.quantization", {"bits": 4}),
        "spec.model.quantization: a quantized base model can only be trained through an "
        "adapter: set peft (QLoRA)",
    ),
    case(
        "quantization-with-zero3",
        run()
        .set("spec.model.quantization", {"bits": 4})
        .set("spec.peft", {"r": 8})
        .set("spec.distributed.deepspeed", {"zeroStage": 3}),
        "spec.distributed.deepspeed.zeroStage: a quantized base model cannot be sharded with "
        "ZeRO-3; use zeroStage 2 or less",
    ),
    case(
        "offload-param-without-zero3",
        run().set("spec.distributed.deepspeed", {"zeroStage": 2, "offloadParam": "cpu"}),
        "spec.distributed.deepspeed.offloadParam: offloadParam needs zeroStage 3",
    ),
    case(
        "several-rules-at-once",
        run()
        .set("spec.rollout", {"vllm": {}})
        .set("spec.distributed.deepspeed", {"zeroStage": 1, "offloadParam": "nvme"}),
        "spec.rollout: rollout only applies to methods grpo and rloo",
        "spec.distributed.deepspeed.offloadParam: offloadParam needs zeroStage 3",
    ),
    # Rewards.
    case(
        "reward-builtin-and-python",
        run("grpo").set("spec.grpo.rewards[0].python", "my_rewards:score"),
        "spec.grpo.rewards[0].builtin: set exactly one of builtin or python",
    ),
    case(
        "reward-neither-builtin-nor-python",
        run("grpo").drop("spec.grpo.rewards[0].builtin"),
        "spec.grpo.rewards[0].builtin: set exactly one of builtin or python",
    ),
    case(
        "unknown-builtin-reward",
        run("grpo").set("spec.grpo.rewards[0].builtin", "lenght"),
        "spec.grpo.rewards[0].builtin: 'lenght' is not allowed; allowed: 'regex', "
        "'clause_presence', 'length', 'reference_similarity', 'count_match', "
        "'redundancy_penalty', 'extraneous_content_penalty' or 'code_execution'",
    ),
    case(
        "reward-regex-does-not-compile",
        run("grpo").set(
            "spec.grpo.rewards[0]", {"name": "fmt", "builtin": "regex", "args": {"pattern": "(["}}
        ),
        "spec.grpo.rewards[0].args.pattern: '([' is not a valid regular expression: "
        "unterminated character set at position 1",
        api_server=False,
    ),
    case(
        "reward-length-min-above-max",
        run("grpo").set("spec.grpo.rewards[0].args", {"min": 50, "max": 10}),
        "spec.grpo.rewards[0].args: min (50) must not be greater than max (10)",
        api_server=False,
    ),
    case(
        "reward-length-without-max",
        run("grpo").set("spec.grpo.rewards[0].args", {"min": 5}),
        "spec.grpo.rewards[0].args.max: required field is missing",
        api_server=False,
    ),
    case(
        "reward-python-not-module-function",
        run("grpo").set("spec.grpo.rewards[0]", {"name": "mine", "python": "my rewards"}),
        r"spec.grpo.rewards[0].python: 'my rewards' does not match the pattern "
        r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
    ),
    case(
        "duplicate-reward-names",
        run("grpo").set(
            "spec.grpo.rewards",
            [{"name": "fmt", "builtin": "length", "args": {"max": 9}}] * 2,
        ),
        "spec.grpo.rewards: reward names must be unique; repeated: fmt",
        api_server=False,
    ),
    # Gates.
    case(
        "gate-with-run-and-model",
        gate().set("spec.model", {"source": "s3://checkpoints/x/step-100"}),
        "spec.run: set exactly one of run or model",
    ),
    case(
        "gate-without-run-or-model",
        gate().drop("spec.run"),
        "spec.run: set exactly one of run or model",
    ),
    case(
        "criterion-text-does-not-parse",
        gate().set("spec.criteria", ["eval_loss is low"]),
        "spec.criteria[0]: 'eval_loss is low' is not a criterion; write METRIC OP NUMBER, "
        "e.g. 'eval_loss <= 1.8' (OP one of <, <=, >, >=, ==, !=)",
        api_server=False,
    ),
    # Pipelines.
    case(
        "duplicate-stage-names",
        pipeline().set("spec.stages[1].name", "sft"),
        "spec.stages: stage names must be unique; repeated: sft",
        api_server=False,
    ),
    case(
        "first-stage-model-is-previous",
        pipeline().set("spec.stages[0].run.model.source", "run://previous"),
        "spec.stages[0].run.model.source: the first stage has no previous stage: give its "
        "model a source",
        api_server=False,
    ),
    case(
        "rule-inside-a-pipeline-stage",
        pipeline().set("spec.stages[1].run.rollout", {"vllm": {}}),
        "spec.stages[1].run.rollout: rollout only applies to methods grpo and rloo",
    ),
    # The document itself.
    # training.extra: TRL's own names, checked against the installed TRL config class.
    case(
        "extra-option-typo",
        run("grpo").set("spec.training.extra", {"use_ligerkernel": True}),
        "spec.training.extra.use_ligerkernel: not an option of TRL GRPOConfig (method grpo); "
        "did you mean 'use_liger_kernel', 'liger_kernel_config'?",
        api_server=False,
    ),
    case(
        "extra-option-trainyard-models",
        run().set("spec.training.extra", {"num_train_epochs": 3, "torch_compile": True}),
        "spec.training.extra.num_train_epochs: Trainyard sets num_train_epochs from "
        "training.epochs; set that field instead",
        api_server=False,
    ),
    case(
        "extra-option-wrong-type",
        run("grpo").set("spec.training.extra", {"torch_compile": "yes"}),
        "spec.training.extra.torch_compile: must be a boolean (the type of torch_compile in "
        "TRL GRPOConfig); got 'yes'",
        api_server=False,
    ),
    case(
        "sync-ref-model-with-lora",
        run("grpo")
        .set("spec.grpo.syncRefModel", True)
        .set("spec.grpo.beta", 0.04)
        .set("spec.peft", {"r": 8}),
        "spec.grpo.syncRefModel: syncRefModel cannot be used with peft: with a LoRA adapter TRL "
        "keeps no separate reference model (it disables the adapter to get the reference's "
        "log-probs), so there is nothing to sync; set syncRefModel false, or train all weights "
        "(no peft)",
    ),
    case(
        "prompt-template-not-a-column",
        run("grpo").set("spec.grpo.prompt", {"template": "Goal: {0}"}),
        "spec.grpo.prompt.template: {0} is not a column name; a template names dataset columns "
        "as {column} (letters, digits, _), and literal braces are written {{ and }}",
        api_server=False,
    ),
    case(
        "wrong-api-version",
        run().set("apiVersion", "trainyard.dev/v1"),
        "apiVersion: 'trainyard.dev/v1' is not served; allowed: trainyard.dev/v1alpha1",
        api_server=False,
    ),
    case(
        "unknown-kind",
        run().set("kind", "TrainingJob"),
        "kind: 'TrainingJob' is not a Trainyard kind; allowed: TrainingRun, PromotionGate, "
        "TrainingPipeline, InferenceServer",
        api_server=False,
    ),
    case(
        "document-is-a-list",
        Doc(["method: sft"]),
        "(document): expected a mapping with apiVersion, kind, metadata and spec; got list",
        api_server=False,
    ),
    case(
        "bad-resource-name",
        run().set("metadata.name", "Bad_Name"),
        "metadata.name: 'Bad_Name' does not match the pattern ^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        api_server=False,  # the API server checks names itself, not through the CRD
    ),
]


@pytest.mark.parametrize(("document", "lines", "api_server"), CASES)
def test_validate_resource_names_the_problem(document, lines, api_server):
    assert validate_resource(document) == lines


@pytest.mark.parametrize(("document", "lines", "api_server"), CASES)
def test_validate_command_prints_the_problem(document, lines, api_server, tmp_path, capsys):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    assert main(["validate", str(path)]) == 1
    label = str(path)
    if isinstance(document, dict) and document.get("kind") and document.get("metadata"):
        label += f" ({document['kind']}/{document['metadata']['name']})"
    assert capsys.readouterr().out.splitlines() == [f"{label}: invalid"] + [
        f"  {line}" for line in lines
    ]


@pytest.mark.parametrize(
    ("document", "lines"),
    [pytest.param(*p.values[:2], id=p.id) for p in CASES if p.values[2]],
)
def test_api_server_refuses_it_too(document, lines):
    assert api_server_errors(document) != []


@pytest.mark.parametrize(
    "start",
    [run("sft"), run("dpo"), run("grpo"), run("rloo"), gate(), pipeline(), server()],
    ids=["sft", "dpo", "grpo", "rloo", "gate", "pipeline", "server"],
)
def test_starting_points_are_valid_everywhere(start):
    """Each case breaks one thing of a document that both checkers accept."""
    assert (validate_resource(start.doc), api_server_errors(start.doc)) == ([], [])


def test_there_are_at_least_25_cases():
    assert len(CASES) >= 25


def test_multi_document_file_reports_every_bad_document(tmp_path, capsys):
    documents = [
        run().doc,
        run().set("spec.method", "ppo").doc,
        gate().drop("spec.run").doc,
        server().doc,
        run("grpo").set("spec.grpo.numGenerations", 3).set("metadata.name", "g").doc,
    ]
    path = tmp_path / "all.yaml"
    path.write_text(yaml.safe_dump_all(documents, sort_keys=False))
    assert main(["validate", str(path)]) == 1
    assert capsys.readouterr().out.splitlines() == [
        f"{path} (TrainingRun/sft-run): ok",
        f"{path}#1 (TrainingRun/sft-run): invalid",
        "  spec.method: 'ppo' is not allowed; allowed: "
        "'sft', 'dpo', 'kto', 'reward', 'grpo', 'rloo' or 'pretrain'",
        f"{path}#2 (PromotionGate/release): invalid",
        "  spec.run: set exactly one of run or model",
        f"{path}#3 (InferenceServer/chat): ok",
        f"{path}#4 (TrainingRun/g): invalid",
        "  spec.grpo.numGenerations: the generation batch (perDeviceBatchSize × "
        "gradientAccumulationSteps × nodes × gpusPerNode) must be a multiple of "
        "grpo.numGenerations",
    ]


def test_every_file_is_checked_even_after_a_bad_one(tmp_path, capsys):
    bad, good = tmp_path / "bad.yaml", tmp_path / "good.yaml"
    bad.write_text(yaml.safe_dump(run().drop("spec.model").doc))
    good.write_text(yaml.safe_dump(gate().doc))
    assert main(["validate", str(bad), str(good)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == f"{good} (PromotionGate/release): ok"


@pytest.mark.parametrize(
    ("text", "where"),
    [
        pytest.param("kind: TrainingRun\nspec: [1, 2\n", "3:1", id="unclosed-flow-sequence"),
        pytest.param("spec:\n  method: sft\n    model: x\n", "3:10", id="bad-indentation"),
        pytest.param("a: 'unterminated\n", "2:1", id="unterminated-quote"),
    ],
)
def test_invalid_yaml_names_file_line_and_column(text, where, tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    assert main(["validate", str(path)]) == 1
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith(f"{path}:{where}: not valid YAML: ")


def test_missing_file_is_reported(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    assert main(["validate", str(missing)]) == 1
    assert capsys.readouterr().out.splitlines() == [
        f"{missing}: cannot read: No such file or directory"
    ]


def test_empty_file_is_reported(tmp_path, capsys):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing here\n")
    assert main(["validate", str(empty)]) == 1
    assert capsys.readouterr().out.splitlines() == [f"{empty}: no documents"]


def test_a_valid_spec_prints_ok(tmp_path, capsys):
    path = Path(tmp_path / "ok.yaml")
    path.write_text(yaml.safe_dump(run("grpo").doc))
    assert main(["validate", str(path)]) == 0
    assert capsys.readouterr().out.splitlines() == [f"{path} (TrainingRun/grpo-run): ok"]


LEAKED = "s3://AKIAEXAMPLE:wJalrXUt@bucket/key"


@pytest.mark.parametrize(
    ("document", "path"),
    [
        pytest.param(run().set("spec.model.source", LEAKED).doc, "spec.model.source", id="model"),
        pytest.param(
            run().set("spec.tokenizer.source", LEAKED).doc, "spec.tokenizer.source", id="tokenizer"
        ),
        pytest.param(
            run().set("spec.dataset.evalSource", LEAKED).doc,
            "spec.dataset.evalSource",
            id="eval-source",
        ),
        pytest.param(
            run("grpo").set("spec.grpo.rewardModel.source", LEAKED).doc,
            "spec.grpo.rewardModel.source",
            id="reward-model",
        ),
        pytest.param(
            run().set("spec.checkpoint.uri", LEAKED).doc, "spec.checkpoint.uri", id="checkpoint"
        ),
        pytest.param(
            gate().drop("spec.run").set("spec.model.source", LEAKED).doc,
            "spec.model.source",
            id="gate-model",
        ),
        pytest.param(
            gate().set("spec.evaluation", {"suite": ["accuracy"], "dataset": LEAKED}).doc,
            "spec.evaluation.dataset",
            id="gate-evaluation-dataset",
        ),
        pytest.param(
            server().set("spec.adapters", [{"name": "a", "source": LEAKED}]).doc,
            "spec.adapters[0].source",
            id="server-adapter",
        ),
        pytest.param(
            server().set("spec.env", [{"name": "HF_TOKEN", "value": "hf_abc"}]).doc,
            "spec.env",
            id="server-env",
        ),
    ],
)
def test_credentials_are_refused_anywhere_in_a_spec(document, path):
    """Issue 2: no literal credentials anywhere in a spec, only Secret references."""
    problems = validate_resource(document)
    assert [p for p in problems if p.startswith(f"{path}: ") and "credentials" in p], problems


@pytest.mark.parametrize(
    "document",
    [
        pytest.param(run().set("spec.training.perDeviceBatchSize", "16").doc, id="int-as-string"),
        pytest.param(run().set("spec.training.perDeviceBatchSize", True).doc, id="int-as-bool"),
        pytest.param(run().set("spec.training.epochs", "10").doc, id="number-as-string"),
        pytest.param(run().set("spec.suspend", "yes").doc, id="bool-as-string"),
        pytest.param(
            run().set("spec.distributed.deepspeed.zeroStage", "2").doc, id="enum-int-as-string"
        ),
    ],
)
def test_models_refuse_what_the_crd_schema_refuses(document):
    """`trainyard validate` must not pass a spec that `kubectl apply` then rejects."""
    assert api_server_errors(document) != []
    assert validate_resource(document) != []
