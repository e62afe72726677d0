"""Every TrainingRun in examples/ runs with `trainyard run FILE --tiny`, offline, on CPU.

Two tables, so the suite stays cheap: every example's `--tiny` spec goes through the
workload's own start-up in this process (sources resolved, data set loaded and shaped
for the method, rewards built: a second or two each); and the examples with a code path
of their own (code-execution rewards in a sandbox, DeepSpeed ZeRO-3 with packing,
preference training from a `run://` model) train one step end to end through the real
runner and workload, as a user's shell runs them. The hub is switched off
(HF_HUB_OFFLINE) and S3 has no credentials, so anything that still reached for the
network would fail here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from trainyard.api import parse_resource
from trainyard.workloads.local import run_command
from trainyard.workloads.local_spec import TINY_DATA_DIR, LocalOptions, localize, tiny

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


def kinds(path: Path) -> set[str]:
    return {d.get("kind") for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict)}


TRAINING_RUNS = [p for p in EXAMPLES if "TrainingRun" in kinds(p)]
# Kinds of the other files: pipelines (stages that are TrainingRuns), inference servers
# (vLLM on a GPU) and gates; every file holding a TrainingRun is in the tables below.
OTHER_KINDS = {"TrainingPipeline", "InferenceServer", "PromotionGate"}

TRAINED_END_TO_END = ["grpo-code-execution", "pretrain-packing", "dpo-ipo"]


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)


def test_every_example_is_a_training_run_here_or_of_another_kind():
    others = {p.name: kinds(p) for p in EXAMPLES if p not in TRAINING_RUNS}
    assert all(found and found <= OTHER_KINDS for found in others.values()), others
    assert len(TRAINING_RUNS) >= 10


@pytest.mark.parametrize("example", TRAINING_RUNS, ids=lambda p: p.stem)
def test_example_starts_with_tiny_offline(example, tmp_path, offline):
    """The workload's start-up on the `--tiny` spec: what `trainyard run --tiny` trains."""
    from trainyard.workloads.methods.common import Environment
    from trainyard.workloads.train import build_context

    document = next(
        d for d in yaml.safe_load_all(example.read_text()) if d.get("kind") == "TrainingRun"
    )
    shrunk, data = tiny(document, tmp_path)
    local = localize(shrunk.document, LocalOptions(output_dir=tmp_path, cuda=False))
    run = parse_resource(local.document)
    (tmp_path / TINY_DATA_DIR).mkdir()
    for name, rows in data.files.items():
        (tmp_path / TINY_DATA_DIR / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    ctx = build_context(run, tmp_path, Environment(cuda=False))
    # The mixture-of-experts tiny model where LoRA targets expert weights.
    assert run.spec.model.source in ("builtin://tiny-qwen2", "builtin://tiny-qwen3-moe")
    assert len(ctx.train_dataset) > 0
    if run.spec.method in ("grpo", "rloo"):
        rl = run.spec.online_rl
        assert len(ctx.reward_funcs) == len(rl.rewards) + (rl.reward_model is not None)
    if run.spec.dataset.eval_source or run.spec.dataset.eval_split:
        assert ctx.eval_dataset is not None and len(ctx.eval_dataset) > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", TRAINED_END_TO_END)
def test_example_trains_with_tiny_offline(name, tmp_path, offline, monkeypatch, capsys):
    example = REPO / "examples" / f"{name}.yaml"
    monkeypatch.setenv("COLUMNS", "200")
    out = tmp_path / "out"
    options = ["--set", "training.maxSteps=1"]
    if name == "grpo-code-execution":  # the completions log of its one step
        options += ["--set", "grpo.logCompletionsEvery=1"]
    code = run_command([str(example), "--tiny", "--output", str(out), *options])
    printed = capsys.readouterr().out
    log = (out / "train.log").read_text() if (out / "train.log").exists() else ""
    assert code == 0, printed + log[-5000:]
    assert "(--tiny)" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 1, summary
    run = json.loads((out / "run.json").read_text())
    assert run["spec"]["model"]["source"] == "builtin://tiny-qwen2"
    assert run["spec"]["dataset"]["source"].startswith(f"file://{(out / 'tiny-data').resolve()}")
    assert (out / "checkpoints" / "final" / "manifest.json").is_file()
    if name == "grpo-code-execution":
        # isolation service: trainyard run started the sandbox server on this machine,
        # and the completions log says what each stage did to each completion.
        assert "programs run in the sandbox service http://127.0.0.1:" in log, log[-3000:]
        lines = [json.loads(x) for x in (out / "completions.jsonl").read_text().splitlines()]
        assert lines and all(
            [s["name"] for s in line["extra"]["passes-tests/stages"]][:1] in ([], ["compile"])
            for line in lines
        ), lines[0]
    if name != "pretrain-packing":  # TRL's trainers write a model card; transformers' not
        card = (out / "README.md").read_text()
        assert "fine-tuned version of `builtin://tiny-qwen2`" in card and "[None]" not in card
