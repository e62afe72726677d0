"""Metrics: the real /metrics endpoint scraped over HTTP, the progress file, Prometheus."""

from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request

import pytest
import transformers
from prometheus_client.parser import text_string_to_metric_families
from transformers import TrainerControl, TrainerState, TrainingArguments

from trainyard.workloads.checkpoint import CheckpointSync, UploadResult
from trainyard.workloads.metrics import CompletionLog, MetricsCallback, TrainingMetrics
from trainyard.workloads.storage import S3Store

# Log dicts as transformers' Trainer.log and TRL 1.16's trainers hand them to on_log.
SFT_LOG = {
    "loss": 2.5,
    "grad_norm": 1.25,
    "learning_rate": 4e-5,
    "entropy": 3.1,
    "num_tokens": 1000.0,
    "mean_token_accuracy": 0.25,
    "epoch": 0.5,
}
GRPO_LOG = {
    "loss": 0.0125,
    "grad_norm": 0.5,
    "learning_rate": 1e-6,
    "num_tokens": 3000.0,
    "completions/mean_length": 42.0,
    "rewards/format_reward/mean": 0.75,
    "rewards/format_reward/std": 0.25,
    "rewards/accuracy_reward/mean": 0.5,
    "rewards/accuracy_reward/std": 0.5,
    "reward": 1.25,
    "reward_std": 0.625,
    "frac_reward_zero_std": 0.0,
    "kl": 0.03125,
    "entropy": 2.0,
    "clip_ratio/region_mean": None,  # TRL logs None when every value was NaN
    "epoch": 1.0,
}


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """GET /metrics and index samples by (name, sorted labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@pytest.fixture
def metrics(tmp_path):
    metrics = TrainingMetrics(progress_path=tmp_path / "status" / "progress.json")
    metrics.serve(0, addr="127.0.0.1")
    yield metrics
    metrics.shutdown()


def run_callback(metrics, logs_by_step: dict[int, dict], max_steps: int = 10):
    callback = MetricsCallback(metrics)
    args = TrainingArguments(output_dir="unused", report_to=[])
    state = TrainerState(max_steps=max_steps)
    callback.on_train_begin(args, state, TrainerControl())
    for step, logs in logs_by_step.items():
        state.global_step = step
        state.epoch = logs.get("epoch")
        callback.on_log(args, state, TrainerControl(), logs=dict(logs))
    return callback, args, state


def test_sft_log_reaches_endpoint_and_progress_file(metrics):
    run_callback(metrics, {5: SFT_LOG}, max_steps=20)

    samples = scrape(metrics.port)
    assert samples[("trainyard_step", ())] == 5
    assert samples[("trainyard_total_steps", ())] == 20
    assert samples[("trainyard_epoch", ())] == 0.5
    assert samples[("trainyard_loss", ())] == 2.5
    assert samples[("trainyard_learning_rate", ())] == 4e-5
    assert samples[("trainyard_grad_norm", ())] == 1.25
    assert samples[("trainyard_train_log", (("key", "mean_token_accuracy"),))] == 0.25
    # Not logged by SFT: unknown, not zero.
    assert math.isnan(samples[("trainyard_reward_mean", ())])

    progress = json.loads(metrics.progress_path.read_text())
    assert progress["phase"] == "Training"
    assert (progress["step"], progress["totalSteps"], progress["epoch"]) == (5, 20, 0.5)
    assert (progress["loss"], progress["learningRate"], progress["gradNorm"]) == (2.5, 4e-5, 1.25)
    assert progress["rewardMean"] is None and progress["updatedAt"]
    assert progress["metricsPort"] == metrics.port


def test_grpo_log_reaches_endpoint_and_progress_file(metrics):
    run_callback(metrics, {1: {**GRPO_LOG, "num_tokens": 1000.0}, 2: GRPO_LOG})

    samples = scrape(metrics.port)
    assert samples[("trainyard_reward_mean", ())] == 1.25
    assert samples[("trainyard_reward_std", ())] == 0.625
    assert samples[("trainyard_kl", ())] == 0.03125
    assert samples[("trainyard_completion_length", ())] == 42.0
    for name, mean, std in [("format_reward", 0.75, 0.25), ("accuracy_reward", 0.5, 0.5)]:
        assert samples[("trainyard_reward_component_mean", (("component", name),))] == mean
        assert samples[("trainyard_reward_component_std", (("component", name),))] == std
    assert samples[("trainyard_tokens_per_second", ())] > 0
    assert ("trainyard_train_log", (("key", "clip_ratio/region_mean"),)) not in samples

    progress = json.loads(metrics.progress_path.read_text())
    assert progress["rewardMean"] == 1.25 and progress["rewardStd"] == 0.625
    assert progress["kl"] == 0.03125 and progress["completionLength"] == 42.0
    assert progress["rewards"] == {
        "format_reward": {"mean": 0.75, "std": 0.25},
        "accuracy_reward": {"mean": 0.5, "std": 0.5},
    }
    assert progress["tokensPerSecond"] == samples[("trainyard_tokens_per_second", ())]


def test_operator_reads_the_same_numbers_from_endpoint_and_progress_file(metrics):
    progress = pytest.importorskip("trainyard.operator.progress")
    run_callback(metrics, {1: {**GRPO_LOG, "num_tokens": 100.0}, 3: GRPO_LOG}, max_steps=12)
    metrics.record_checkpoint_upload(UploadResult("step-3", 3, files=2, bytes=10, seconds=0.5))
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics.port}/metrics") as response:
        from_endpoint = progress.parse_metrics_text(response.read().decode())
    from_file = progress.parse_progress_json(metrics.progress_path.read_text())

    assert from_endpoint == from_file
    assert (from_endpoint.step, from_endpoint.total_steps, from_endpoint.checkpoint_step) == (
        3,
        12,
        3,
    )
    assert (from_endpoint.reward_mean, from_endpoint.kl, from_endpoint.loss) == (
        1.25,
        0.03125,
        0.0125,
    )
    assert from_endpoint.tokens_per_second > 0


def test_tokens_per_second_is_the_slope_of_tokens_seen():
    metrics = TrainingMetrics()
    metrics.record_log({"num_tokens": 1000.0}, step=1, now=100.0)
    assert metrics.summary["tokensPerSecond"] is None
    metrics.record_log({"num_tokens": 5000.0}, step=2, now=102.0)
    assert metrics.summary["tokensPerSecond"] == 2000.0
    metrics.record_log({"num_input_tokens_seen": 9000}, step=3, now=104.0)
    assert metrics.summary["tokensPerSecond"] == 2000.0
    metrics.record_log({"train_tokens_per_second": 1234.5, "train_runtime": 9.0}, step=3)
    assert metrics.summary["tokensPerSecond"] == 1234.5


def test_other_ranks_do_not_report(metrics):
    callback = MetricsCallback(metrics)
    args = TrainingArguments(output_dir="unused", report_to=[])
    state = TrainerState(global_step=7, max_steps=9, is_world_process_zero=False)
    callback.on_log(args, state, TrainerControl(), logs=dict(SFT_LOG))
    assert scrape(metrics.port)[("trainyard_step", ())] == 0
    progress = json.loads(metrics.progress_path.read_text())
    assert (progress["phase"], progress["step"], progress["loss"]) == ("Initializing", 0, None)


def test_train_end_sets_phase(metrics):
    callback, args, state = run_callback(metrics, {10: SFT_LOG})
    callback.on_train_end(args, state, TrainerControl())
    progress = json.loads(metrics.progress_path.read_text())
    assert (progress["phase"], progress["step"]) == ("Trained", 10)


def test_checkpoint_uploads_are_measured(metrics, s3_endpoint, s3_bucket, tmp_path):
    model = transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(
            vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, intermediate_size=32,
        )
    )  # fmt: skip
    sync = CheckpointSync(
        S3Store(s3_bucket, "m", endpoint=s3_endpoint), on_upload=metrics.record_checkpoint_upload
    )
    for step in (3, 6):
        model.save_pretrained(tmp_path / f"checkpoint-{step}")
        sync.submit(tmp_path / f"checkpoint-{step}", step)
    results = sync.wait()

    samples = scrape(metrics.port)
    total = sum(r.bytes for r in results)
    assert samples[("trainyard_checkpoint_last_step", ())] == 6
    assert samples[("trainyard_checkpoint_upload_bytes_total", ())] == total
    assert samples[("trainyard_checkpoint_upload_seconds_count", ())] == 2
    assert samples[("trainyard_checkpoint_upload_seconds_sum", ())] == pytest.approx(
        sum(r.seconds for r in results)
    )
    assert samples[("trainyard_checkpoint_upload_failures_total", ())] == 0
    checkpoint = json.loads(metrics.progress_path.read_text())["checkpoint"]
    assert checkpoint["lastStep"] == 6 and checkpoint["uploadBytes"] == total
    assert checkpoint["uploads"] == 2


def test_completion_log_samples_steps(tmp_path):
    log = CompletionLog(tmp_path / "completions.jsonl", sample_every=2, max_rows=2)
    rewards = {"format": [1.0, 0.0, 0.5], "accuracy": [float("nan"), None, 1]}
    assert log.record(1, ["p1", "p2", "p3"], ["c1", "c2", "c3"], rewards) == 0
    assert log.record(2, ["p1", "p2", "p3"], ["c1", "c2", "c3"], rewards) == 2
    chat = [[{"role": "user", "content": "hi"}]]
    assert log.record(4, chat, [[{"role": "assistant", "content": "yo"}]], {"f": [0.25]}) == 1
    lines = [json.loads(line) for line in (tmp_path / "completions.jsonl").read_text().splitlines()]
    assert lines == [
        {
            "step": 2,
            "prompt": "p1",
            "completion": "c1",
            "rewards": {"format": 1.0, "accuracy": None},
        },
        {
            "step": 2,
            "prompt": "p2",
            "completion": "c2",
            "rewards": {"format": 0.0, "accuracy": None},
        },
        {
            "step": 4,
            "prompt": [{"role": "user", "content": "hi"}],
            "completion": [{"role": "assistant", "content": "yo"}],
            "rewards": {"f": 0.25},
        },
    ]


def test_completion_log_refuses_bad_sampling(tmp_path):
    with pytest.raises(ValueError, match="sampleEvery must be at least 1"):
        CompletionLog(tmp_path / "c.jsonl", sample_every=0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def query_prometheus(port: int, expr: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as response:
        body = json.loads(response.read())
    assert body["status"] == "success"
    return body["data"]["result"]


def test_real_prometheus_scrapes_the_endpoint(metrics, tmp_path):
    if shutil.which("prometheus") is None:
        pytest.fail("no prometheus binary: install Debian's (apt-get install -y prometheus)")
    run_callback(metrics, {4: GRPO_LOG}, max_steps=8)
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: trainyard\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{metrics.port}']}}]\n"
    )
    process = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        found: dict[str, float] = {}
        while time.monotonic() < deadline and len(found) < 3:
            time.sleep(0.5)
            try:
                for expr in ("trainyard_step", "trainyard_reward_mean", "trainyard_total_steps"):
                    if result := query_prometheus(port, expr):
                        found[expr] = float(result[0]["value"][1])
            except OSError:
                continue  # not listening yet
        assert found == {
            "trainyard_step": 4,
            "trainyard_reward_mean": 1.25,
            "trainyard_total_steps": 8,
        }
        [component] = query_prometheus(
            port, 'trainyard_reward_component_mean{component="format_reward"}'
        )
        assert float(component["value"][1]) == 0.75
        assert component["metric"]["job"] == "trainyard"
    finally:
        process.terminate()
        process.wait(timeout=30)
