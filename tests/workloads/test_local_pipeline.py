"""`trainyard run PIPELINE.yaml`: stages in order on this machine, gates judged between them,
resumed by running the same command again. Real trainings (--tiny: two steps a stage)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.quickstart import EXAMPLE, quickstart, sft_files, trainyard_command  # noqa: F401
from trainyard.workloads.local import run_command

pytestmark = pytest.mark.slow


LORA = {"r": 4, "alpha": 8}


def pipeline_file(
    tmp_path: Path, *, sft_gate: dict, dpo_gate: dict | None = None, dpo_lora: bool = False
) -> Path:
    """sft (LoRA) → dpo (the full model, or with dpo_lora a new adapter stacked on sft's)."""

    def stage(name: str, method: str, source: str, fmt: str, gate: dict | None, lora) -> dict:
        body = {
            "name": name,
            "run": {
                "method": method,
                "model": {"source": source},
                "dataset": {"source": f"builtin://datasets/{fmt}", "format": fmt},
                "checkpoint": {"uri": f"s3://ckpt/local/{name}"},
            },
        }
        if lora:
            body["run"]["peft"] = LORA
        if gate is not None:
            body["gate"] = gate
        return body

    document = {
        "apiVersion": "trainyard.dev/v1alpha1",
        "kind": "TrainingPipeline",
        "metadata": {"name": "local"},
        "spec": {
            "stages": [
                stage("sft", "sft", "builtin://tiny-qwen2", "chat", sft_gate, True),
                stage("dpo", "dpo", "run://previous", "preference", dpo_gate, dpo_lora),
            ]
        },
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def state(output: Path) -> dict:
    return json.loads((output / "pipeline.json").read_text())


def generates(model) -> None:
    """The model answers a prompt (its weights load and run)."""
    import torch

    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=2, do_sample=False)
    assert out.shape[1] == 5


def test_stages_chain_through_their_gates_and_a_rerun_trains_nothing_again(tmp_path):
    path = pipeline_file(tmp_path, sft_gate={"criteria": ["loss <= 100"]})
    output = tmp_path / "out"
    assert run_command([str(path), "--tiny", "--output", str(output)]) == 0
    stages = state(output)
    assert [stages[s]["phase"] for s in ("sft", "dpo")] == ["Promoted", "Promoted"]
    sft_final = (output / "sft" / "checkpoints" / "final").resolve().as_uri()
    assert stages["dpo"]["inputModel"] == sft_final
    dpo_run = json.loads((output / "dpo" / "run.json").read_text())
    assert dpo_run["spec"]["model"]["source"] == sft_final
    assert json.loads((output / "sft" / "gate-local-sft-gate.json").read_text())["verdict"] == (
        "Passed"
    )
    # every promoted model can be traced back to the data and decisions that made it
    from trainyard.cli.lineage import chain

    dpo_final = (output / "dpo" / "checkpoints" / "final").resolve().as_uri()
    records = chain(dpo_final)
    assert [r.get("stage") for r in records] == ["dpo", "sft", None]
    assert records[0]["inputModel"] == sft_final and records[0]["gate"] is None
    dataset = records[1]["dataset"]
    assert dataset["source"].startswith("file://")  # --tiny's built-in data, written out
    assert dataset["fingerprint"]["contentSha256"].startswith("sha256:")
    assert records[1]["gate"]["verdict"] == "Passed" and records[1]["specHash"]
    assert records[0]["inputModelFingerprint"] == records[1]["modelFingerprint"]
    assert records[1]["startedAt"] <= records[1]["finishedAt"] <= records[0]["startedAt"]
    assert records[2] == {"model": "builtin://tiny-qwen2", "origin": True}
    assert records[2] == {"model": "builtin://tiny-qwen2", "origin": True}
    # LoRA → full model: sft's adapter was merged into its base, dpo trained all of it
    from transformers import AutoModelForCausalLM

    sft_dir, dpo_dir = (output / s / "checkpoints" / "final" for s in ("sft", "dpo"))
    assert (sft_dir / "adapter_config.json").is_file()
    recorded = json.loads((sft_dir / "trainyard-base.json").read_text())
    assert recorded["source"] == "builtin://tiny-qwen2", "another machine finds the base"
    assert not (dpo_dir / "adapter_config.json").exists() and not (dpo_dir / "base").exists()
    generates(AutoModelForCausalLM.from_pretrained(dpo_dir))
    # one plot of the whole pipeline: dpo's curves follow sft's on the same step axis
    from trainyard.api import parse_resource
    from trainyard.workloads.local_pipeline import plot_pipeline

    assert (output / "curves.png").stat().st_size > 1000
    pipeline = parse_resource(yaml.safe_load(path.read_text()))
    drawn = plot_pipeline(pipeline, stages, output, tmp_path / "again.png")
    losses = {curve: (first, last) for panel, curve, first, last in drawn if panel == "loss"}
    assert losses["sft: train loss"][1] < losses["dpo: train loss"][0]
    logs = {s: (output / s / "train.log").stat().st_mtime_ns for s in ("sft", "dpo")}
    assert run_command([str(path), "--tiny", "--output", str(output)]) == 0
    assert {s: (output / s / "train.log").stat().st_mtime_ns for s in logs} == logs, (
        "promoted stages are not trained again"
    )


def test_a_rejected_gate_stops_the_pipeline_and_a_person_answers_a_waiting_one(tmp_path, capsys):
    rejected = pipeline_file(tmp_path, sft_gate={"criteria": ["loss <= 0.0001"]})
    output = tmp_path / "rejected"
    assert run_command([str(rejected), "--tiny", "--output", str(output)]) == 1
    assert state(output)["sft"]["phase"] == "Rejected"
    assert not (output / "dpo").exists(), "the next stage never started"

    waiting = pipeline_file(
        tmp_path, sft_gate={"criteria": ["loss <= 100"], "manualApproval": True}, dpo_lora=True
    )
    output = tmp_path / "waiting"
    capsys.readouterr()
    assert run_command([str(waiting), "--tiny", "--output", str(output)]) == 3, (
        "stdin is no terminal and nobody passed --approve: the pipeline pauses"
    )
    assert "--approve NAME" in capsys.readouterr().out.replace("\n", "")
    assert state(output)["sft"]["phase"] == "Gating"
    trained = (output / "sft" / "train.log").stat().st_mtime_ns
    code = run_command([str(waiting), "--tiny", "--output", str(output), "--approve", "alice"])
    assert code == 0
    assert (output / "sft" / "train.log").stat().st_mtime_ns == trained, "judged, not retrained"
    assert state(output)["dpo"]["phase"] == "Promoted"
    # LoRA → LoRA: dpo's adapter is stacked on sft's (merged into its base); that merged
    # base is saved with the adapter, so the adapter loads anywhere and vLLM can serve it
    # (base/ as the model, the adapter by name)
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    dpo_dir = output / "dpo" / "checkpoints" / "final"
    assert (dpo_dir / "adapter_config.json").is_file()
    assert (dpo_dir / "base" / "config.json").is_file()
    stacked = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(dpo_dir / "base"), dpo_dir
    )
    generates(stacked)
    generates(AutoPeftModelForCausalLM.from_pretrained(dpo_dir))
    record = json.loads((dpo_dir / "provenance.json").read_text())
    assert record["stackedOn"] == (dpo_dir / "base").as_uri()


@pytest.mark.parametrize(
    ("typed", "decision"),
    [
        ("a\nalice\n", ("--approve", "alice")),
        ("r\n\n", ("--reject", "runner")),
        ("\n", None),
    ],
    ids=["approve as a name", "reject as the login name", "decide later"],
)
def test_a_waiting_gate_is_answered_at_a_terminal(typed, decision, monkeypatch, tmp_path):
    """A real terminal (a pseudo-terminal) on stdin: the person is asked; a pipe is not."""
    import io
    import os

    from trainyard.api import parse_resource
    from trainyard.workloads import local_pipeline

    path = pipeline_file(tmp_path, sft_gate={"criteria": ["loss <= 1"], "manualApproval": True})
    pipeline = parse_resource(yaml.safe_load(path.read_text()))
    stage = pipeline.spec.stages[0]
    monkeypatch.setattr("getpass.getuser", lambda: "runner")
    leader, follower = os.openpty()
    os.write(leader, typed.encode())
    with open(follower, encoding="utf-8") as terminal, io.StringIO() as shown:
        monkeypatch.setattr("sys.stdin", terminal)
        monkeypatch.setattr("sys.stdout", shown)
        assert local_pipeline._ask(stage, pipeline) == decision
        assert "gate local-sft-gate waits for a person" in shown.getvalue()
    os.close(leader)
    monkeypatch.setattr("sys.stdin", io.StringIO(typed))
    assert local_pipeline._ask(stage, pipeline) is None, "no terminal: nobody is asked"


def test_the_quickstart_resumes_after_an_interrupt_and_promotes_every_stage(quickstart):  # noqa: F811
    """examples/quickstart-pipeline.yaml through the `trainyard` command (tests/quickstart.py):
    Ctrl-C while dpo trains stops the pipeline with sft promoted; the same command on the
    same --output resumes without training sft again, every gate passes and says why, and
    the final model traces back to the built-in model and every dataset."""
    out = quickstart.directory
    stopped = quickstart.before_resume
    assert quickstart.interrupted.returncode != 0, quickstart.interrupted.output[-3000:]
    assert "interrupted at step" in quickstart.interrupted.output
    assert quickstart.interrupted.returncode == 130  # 128 + SIGINT, as a shell says
    resume = f"`trainyard run {EXAMPLE} --output {out}` resumes the pipeline"
    assert resume in quickstart.interrupted.output
    assert stopped["sft"]["phase"] == "Promoted", stopped
    assert stopped["dpo"]["phase"] == "Failed", stopped
    assert "grpo" not in stopped, "the pipeline stopped at the interrupted stage"

    resumed = quickstart.resumed
    assert resumed.returncode == 0, resumed.output[-4000:]
    assert "sft: promoted earlier, not trained again" in resumed.output
    assert "trainyard run quickstart-pipeline-sft" not in resumed.output
    assert sft_files(out) == quickstart.sft_files_before_resume, "sft trained again"
    final = quickstart.state
    assert final["sft"] == stopped["sft"]
    assert {s: final[s]["phase"] for s in final} == dict.fromkeys(
        ("sft", "dpo", "grpo"), "Promoted"
    )
    printed = " ".join((quickstart.interrupted.output + resumed.output).split())
    for stage, criterion in (
        ("sft", "loss <= 6"),
        ("dpo", "loss <= 0.75"),
        ("grpo", "reward_mean >= 0"),
    ):
        gate = json.loads((out / stage / f"gate-quickstart-pipeline-{stage}-gate.json").read_text())
        assert gate["verdict"] == "Passed", gate
        (result,) = gate["results"]
        assert (result["criterion"], result["result"]) == (criterion, "Passed"), result
        # the verdict and its reason, as the terminal showed them
        assert f"PromotionGate/quickstart-pipeline-{stage}-gate: Passed (CriteriaMet)" in printed
        assert f"│ {criterion} │" in printed
    assert (out / "curves.png").stat().st_size > 0

    chain, model = [], quickstart.final_model().as_uri()
    while model.startswith("file://"):
        record = json.loads((Path(model.removeprefix("file://")) / "provenance.json").read_text())
        assert record["model"] == model and record["gate"]["verdict"] == "Passed", record
        assert record["modelFingerprint"]["manifestSha256"].startswith("sha256:"), record
        chain.append((record["stage"], record["dataset"]["source"], record["inputModel"]))
        model = record["inputModel"]
    assert chain == [
        ("grpo", "builtin://datasets/prompts", final["dpo"]["model"]),
        ("dpo", "builtin://datasets/preference", final["sft"]["model"]),
        ("sft", "builtin://datasets/chat", "builtin://tiny-qwen2"),
    ]
    lineage = subprocess.run(
        [trainyard_command(), "lineage", str(quickstart.final_model())],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    for line in (
        "data builtin://datasets/prompts",
        "data builtin://datasets/preference",
        "data builtin://datasets/chat",
        "from builtin://tiny-qwen2",
        "loss <= 0.75: Passed",
    ):
        assert line in lineage, lineage
