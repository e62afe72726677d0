"""The evaluation workload and local gates on real tiny models, on CPU.

A model whose output distribution is set by hand gives perplexity a known answer; a
model trained in the test goes through every suite and a gate with `trainyard run`,
in subprocesses exactly as a user's shell runs them.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from trainyard.api.gate import EvaluationTask, PromotionGateStatus
from trainyard.api.verdict import EvalResults
from trainyard.workloads import builtin
from trainyard.workloads.evaluate.runner import TaskError, read_results, run_task
from trainyard.workloads.evaluate.scoring import RowError

REPO = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.slow


def trainyard(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="200", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "trainyard.cli.main", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# ------------------------------------------------------------------ known answer


@pytest.fixture(scope="module")
def uniform_model(tmp_path_factory) -> Path:
    """The tiny model with its (tied) embedding zeroed: every logit is 0, so each next
    token has probability 1/V and the perplexity of any text is exactly V."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = builtin.model_path("tiny-qwen2")
    model = AutoModelForCausalLM.from_pretrained(source)
    with torch.no_grad():
        model.get_output_embeddings().weight.zero_()
    target = tmp_path_factory.mktemp("uniform")
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(source).save_pretrained(target)
    return target


def task(model: str, output: Path, **evaluation) -> EvaluationTask:
    return EvaluationTask.model_validate(
        {"model": {"source": model}, "output": f"file://{output}", "evaluation": evaluation}
    )


def test_perplexity_of_a_uniform_model_is_its_vocabulary_size(uniform_model, tmp_path):
    vocabulary = json.loads((uniform_model / "config.json").read_text())["vocab_size"]
    evaluated = run_task(
        task(
            f"file://{uniform_model}",
            tmp_path / "out",
            suite=["perplexity"],
            dataset="builtin://datasets/text",
            maxSamples=8,
        ),
        log=lambda message: None,
    )
    metrics = evaluated.results.metrics
    assert metrics["perplexity"] == pytest.approx(vocabulary, rel=1e-4)
    assert metrics["eval_loss"] == pytest.approx(math.log(vocabulary), rel=1e-5)
    # Token-weighted: every example's weight is its number of scored tokens.
    samples = evaluated.results.samples["eval_loss"]
    assert samples.weights == [float(e["tokens"]) for e in evaluated.examples]
    assert len(set(samples.weights)) > 1


def test_a_failed_evaluation_leaves_no_eval_json_behind(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "eval.json").write_text('{"model": "old", "metrics": {"accuracy": 1.0}}')
    data = write_jsonl(tmp_path / "unlabelled.jsonl", [{"prompt": "2+2?"}])
    with pytest.raises(RowError, match="accuracy needs a labelled answer"):
        run_task(
            task("builtin://tiny-qwen2", out, suite=["accuracy"], dataset=f"file://{data}"),
            log=lambda message: None,
        )
    assert not (out / "eval.json").exists()
    assert read_results(f"file://{out}") is None


def test_a_hub_model_needs_an_output(tmp_path):
    evaluation = {"suite": ["perplexity"], "dataset": "builtin://datasets/text"}
    no_output = EvaluationTask.model_validate(
        {"model": {"source": "builtin://tiny-qwen2"}, "evaluation": evaluation}
    )
    with pytest.raises(TaskError, match="set output"):
        run_task(no_output, log=lambda message: None)


# ------------------------------------------------------------------ trained, gated

RUN = {
    "apiVersion": "trainyard.dev/v1alpha1",
    "kind": "TrainingRun",
    "metadata": {"name": "tiny-sft"},
    "spec": {
        "method": "sft",
        "model": {"source": "builtin://tiny-qwen2"},
        "dataset": {"source": "builtin://datasets/chat", "format": "chat"},
        "training": {
            "maxSteps": 6,
            "learningRate": 3.0e-3,
            "perDeviceBatchSize": 8,
            "loggingSteps": 2,
            "precision": "fp32",
        },
        "sft": {"assistantOnlyLoss": True},
    },
}


def gate(name: str, criteria: list, evaluation: dict | None = None, **spec) -> dict:
    body = {"run": "tiny-sft", "criteria": criteria, **spec}
    if evaluation:
        body["evaluation"] = evaluation
    return {
        "apiVersion": "trainyard.dev/v1alpha1",
        "kind": "PromotionGate",
        "metadata": {"name": name},
        "spec": body,
    }


@pytest.fixture(scope="module")
def gated_run(tmp_path_factory):
    """`trainyard run` of a file with a TrainingRun and a gate that evaluates every
    suite (perplexity, accuracy, refusal, a user metric) against the untrained base."""
    root = tmp_path_factory.mktemp("gated")
    rows = builtin.build_dataset_rows("chat")[:12]
    for i, row in enumerate(rows):
        row["id"] = f"chat-{i}"
        row["should_refuse"] = i % 3 == 0
    data = write_jsonl(root / "eval.jsonl", rows)
    evaluation = {
        "suite": ["perplexity", "accuracy", "refusal_rate"],
        "dataset": f"file://{data}",
        "baseline": {"source": "builtin://tiny-qwen2"},
        "generation": {"maxNewTokens": 8, "batchSize": 6},
        "metrics": [{"name": "polite", "python": "tests.gates.metric_fixtures:says_please"}],
    }
    criteria = [
        # Six steps on this very data: the loss must have gone down, and surely so.
        "eval_loss <= baseline",
        {"metric": "eval_loss", "op": "<", "baseline": {}, "confidence": 0.9},
        "loss <= 100",  # the run's own final training loss, beside the evaluation's
        {"metric": "accuracy", "op": ">=", "value": 0.9, "advisory": True},
    ]
    spec_file = root / "gated.yaml"
    spec_file.write_text(
        yaml.safe_dump_all([RUN, gate("tiny-release", criteria, evaluation)], sort_keys=False)
    )
    out = root / "run"
    result = trainyard("run", str(spec_file), "--output", str(out), cwd=root)
    return root, out, result


def test_the_gate_in_a_run_file_is_judged_after_training(gated_run):
    root, out, result = gated_run
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PromotionGate/tiny-release: Passed (CriteriaMet)" in result.stdout
    status = PromotionGateStatus.model_validate(
        json.loads((out / "gate-tiny-release.json").read_text())
    )
    assert status.verdict == "Passed"
    final = out / "checkpoints" / "final"
    assert status.model == f"file://{final.resolve()}"
    assert status.promoted_model == status.model
    assert status.baseline_model == "builtin://tiny-qwen2"
    by_criterion = {r.criterion: r for r in status.results}
    confident = by_criterion["eval_loss < baseline (90% confidence)"]
    assert confident.result == "Passed" and 0 < confident.margin_lower <= confident.margin
    assert by_criterion["loss <= 100"].observed > 0
    assert by_criterion["accuracy >= 0.9 (advisory)"].advisory


def test_every_suite_is_written_beside_the_checkpoint_eval_json_last(gated_run):
    _, out, _ = gated_run
    where = out / "checkpoints" / "final" / "eval" / "tiny-release"
    results = EvalResults.model_validate(json.loads((where / "eval.json").read_text()))
    expected = {
        "eval_loss",
        "perplexity",
        "accuracy",
        "refusal_rate",
        "over_refusal_rate",
        "polite",
    }
    assert expected <= set(results.metrics)
    assert expected <= set(results.baseline.metrics)
    assert results.metrics["eval_loss"] < results.baseline.metrics["eval_loss"]
    assert results.metrics["perplexity"] == pytest.approx(math.exp(results.metrics["eval_loss"]))
    assert 0 <= results.metrics["refusal_rate"] <= 1
    assert results.samples["refusal_rate"].values.count(None) == 8  # 4 of 12 must be refused
    assert results.seed == 0 and results.backend == "transformers"
    assert results.examples == 12 and results.examples_file == "eval-examples.jsonl"
    assert results.generation == {
        "maxNewTokens": 8,
        "temperature": 0.0,
        "topP": 1.0,
        "batchSize": 6,
    }

    examples = [
        json.loads(line) for line in (where / "eval-examples.jsonl").read_text().splitlines()
    ]
    assert [e["model"] for e in examples] == ["candidate"] * 12 + ["baseline"] * 12
    assert {"id", "prompt", "completion", "answer", "correct", "refused", "loss", "tokens"} <= set(
        examples[0]
    )
    assert examples[0]["id"] == "chat-0"

    report = (where / "eval-report.md").read_text()
    assert "| metric | candidate | baseline | change |" in report and "| polite |" in report
    assert (where / "eval-metrics.png").read_bytes()[:8] == PNG_MAGIC
    written_last = (where / "eval.json").stat().st_mtime_ns
    assert all(written_last >= p.stat().st_mtime_ns for p in where.iterdir())


def test_the_same_gate_file_gives_the_same_verdict_on_the_run_directory(gated_run):
    root, out, _ = gated_run
    documents = list(yaml.safe_load_all((root / "gated.yaml").read_text()))
    gate_file = root / "gate-only.yaml"
    gate_file.write_text(yaml.safe_dump(documents[1]))
    first = json.loads((out / "gate-tiny-release.json").read_text())
    result = trainyard("run", str(gate_file), "--output", str(out), cwd=root)
    assert result.returncode == 0, result.stdout + result.stderr
    again = json.loads((out / "gate-tiny-release.json").read_text())
    assert again["verdict"] == first["verdict"] == "Passed"
    assert [r["margin"] for r in again["results"]] == [r["margin"] for r in first["results"]]


def test_a_failing_gate_names_the_criterion_and_exits_1(gated_run):
    root, out, _ = gated_run
    gate_file = root / "strict.yaml"
    gate_file.write_text(yaml.safe_dump(gate("too-strict", ["loss <= 0.001", "step >= 1"])))
    result = trainyard("run", str(gate_file), "--output", str(out), cwd=root)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "PromotionGate/too-strict: Failed (CriterionFailed)" in result.stdout
    assert "loss <= 0.001: observed" in result.stdout and "missed" in result.stdout


def test_manual_approval_counts_only_after_the_gate_awaits_it(gated_run):
    root, out, _ = gated_run
    gate_file = root / "manual.yaml"
    gate_file.write_text(yaml.safe_dump(gate("manual", ["loss <= 100"], manualApproval=True)))
    (out / "gate-manual.json").unlink(missing_ok=True)
    # Approving before the gate has shown its criteria to anyone does not count…
    early = trainyard("run", str(gate_file), "--output", str(out), "--approve", "alice", cwd=root)
    assert early.returncode == 3, early.stdout + early.stderr
    assert "the approval by alice" in early.stdout and "does not count" in early.stdout
    # …approving after it awaits approval does.
    late = trainyard("run", str(gate_file), "--output", str(out), "--approve", "alice", cwd=root)
    assert late.returncode == 0, late.stdout + late.stderr
    status = json.loads((out / "gate-manual.json").read_text())
    assert (status["verdict"], status["reason"], status["approval"]["by"]) == (
        "Passed",
        "Approved",
        "alice",
    )
    rejected = trainyard("run", str(gate_file), "--output", str(out), "--reject", "bob", cwd=root)
    assert rejected.returncode == 1
    assert json.loads((out / "gate-manual.json").read_text())["rejection"]["by"] == "bob"


def test_a_bad_gate_is_refused_before_training(tmp_path):
    spec_file = tmp_path / "bad.yaml"
    spec_file.write_text(yaml.safe_dump_all([RUN, gate("bad", ["eval_loss <= baseline * 1.02"])]))
    result = trainyard("run", str(spec_file), "--output", str(tmp_path / "never"), cwd=tmp_path)
    assert result.returncode == 1
    assert "PromotionGate/bad): invalid" in result.stdout
    assert "set evaluation.baseline" in result.stdout
    assert not (tmp_path / "never").exists()


# ------------------------------------------------------------------ trainyard evaluate


def test_trainyard_evaluate_rewards_with_a_runs_reward_spec(tmp_path):
    grpo = {
        "apiVersion": "trainyard.dev/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": "g"},
        "spec": {
            "method": "grpo",
            "model": {"source": "builtin://tiny-qwen2"},
            "dataset": {"source": "builtin://datasets/prompts"},
            "grpo": {
                "numGenerations": 2,
                "rewards": [
                    {"name": "short", "builtin": "length", "args": {"max": 3}},
                    {
                        "name": "number",
                        "builtin": "regex",
                        "args": {"pattern": r"\d"},
                        "weight": 0.5,
                    },
                ],
            },
        },
    }
    run_file = tmp_path / "grpo.yaml"
    run_file.write_text(yaml.safe_dump(grpo))
    out = tmp_path / "eval"
    result = trainyard(
        "evaluate", "builtin://tiny-qwen2",
        "--suite", "reward,accuracy", "--dataset", "builtin://datasets/prompts",
        "--max-samples", "6", "--max-new-tokens", "6", "--rewards", str(run_file),
        "--metric", "polite=tests.gates.metric_fixtures:says_please", "--output", str(out),
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    results = EvalResults.model_validate(json.loads((out / "eval.json").read_text()))
    assert {
        "reward_mean",
        "rewards/short/mean",
        "rewards/number/mean",
        "accuracy",
        "polite",
    } <= set(results.metrics)
    assert "rewards/short/mean" in result.stdout and f"results: file://{out}" in result.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["--suite", "perplexity,bleu"], "evaluation.suite[1]: 'bleu' is not allowed"),
        (["--suite", "reward"], "reward needs the judged run's rewards"),
        (
            ["--suite", "accuracy", "--metric", "nonsense"],
            "--metric 'nonsense': expected NAME=module:function",
        ),
    ],
    ids=["unknown-suite", "reward-without-rewards", "bad-metric"],
)
def test_trainyard_evaluate_names_bad_options(tmp_path, args, message):
    result = trainyard(
        "evaluate", "builtin://tiny-qwen2", "--dataset", "builtin://datasets/prompts",
        "--output", str(tmp_path / "out"), *args, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1
    assert message in result.stdout + result.stderr


def test_an_inconclusive_gate_evaluates_more_samples_where_asked(tmp_path):
    # Per-example scores 0.1 … 1.0 with mean 0.6: on 6 records the 95% interval of the
    # mean straddles 0.5; on 60 it clears it.
    pattern = [0.1, 0.9, 0.2, 1.0, 0.6, 0.8]
    rows = [{"id": f"r{i}", "prompt": f"Say {i}.", "value": pattern[i % 6]} for i in range(60)]
    data = write_jsonl(tmp_path / "scores.jsonl", rows)
    spec = gate(
        "more",
        [{"metric": "score", "op": ">=", "value": 0.5, "confidence": 0.95}],
        {
            "dataset": f"file://{data}",
            "maxSamples": 6,
            "moreSamples": 60,
            "generation": {"maxNewTokens": 1, "batchSize": 30},
            "metrics": [{"name": "score", "python": "tests.gates.metric_fixtures:column_value"}],
        },
    )
    del spec["spec"]["run"]
    spec["spec"]["model"] = {"source": "builtin://tiny-qwen2"}
    gate_file = tmp_path / "more.yaml"
    gate_file.write_text(yaml.safe_dump(spec))
    result = trainyard("run", str(gate_file), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "inconclusive on 6 records: evaluating again on up to 60" in result.stdout
    status = json.loads((tmp_path / "runs" / "gate-more" / "gate-more.json").read_text())
    assert (status["verdict"], status["evaluationAttempts"]) == ("Passed", 2)
    assert status["results"][0]["samples"] == 60
    assert status["results"][0]["marginLower"] > 0
