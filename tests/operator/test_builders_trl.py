"""What the builders hand to torch and TRL is accepted by torch and TRL themselves.

* The worker command parses with torchrun's own parser (`torch.distributed.run`), with
  `$(JOB_COMPLETION_INDEX)` expanded the way the kubelet does it.
* `trainer.json` (the TRL options only the operator can decide: the vLLM connection or
  the colocate settings) builds a real `GRPOConfig` / `RLOOConfig`, so every key is a TRL
  option under its TRL name and the values pass TRL's own checks.
"""

from __future__ import annotations

import re

import pytest
from torch.distributed.run import get_args_parser

from tests.operator.builder_cases import CASES, UID, example_runs, view
from trainyard.api import TrainingRun
from trainyard.operator.builders import render_children

RUNS = [(c.id, c.training_run(), c.render) for c in CASES] + [
    (f"example:{label}", run, {}) for label, run in example_runs()
]


def kubelet_expand(arg: str, env: dict[str, str]) -> str:
    """`$(VAR)` expansion of container args, as the kubelet does it."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), arg)


@pytest.mark.parametrize(("run", "options"), [pytest.param(r, o, id=i) for i, r, o in RUNS])
def test_worker_command_parses_with_torchrun(run: TrainingRun, options: dict):
    children = view(render_children(run, uid=UID, **options))
    job, container = children["job"], children["job_container"]
    assert container["command"] == ["torchrun"]
    assert "JOB_COMPLETION_INDEX" in children["job_env"]
    nodes = job["spec"]["completions"]
    for index in {0, nodes - 1}:
        argv = [kubelet_expand(a, {"JOB_COMPLETION_INDEX": str(index)}) for a in container["args"]]
        parsed = get_args_parser().parse_args(argv)
        assert int(parsed.nnodes) == run.spec.distributed.nodes == nodes
        assert int(parsed.nproc_per_node) == max(run.spec.distributed.gpus_per_node, 1)
        assert parsed.node_rank == index
        assert (
            parsed.master_addr
            == f"{job['metadata']['name']}-0.{children['workers']['metadata']['name']}"
        )
        assert parsed.master_port == children["workers"]["spec"]["ports"][0]["port"]
        assert parsed.module is True
        assert parsed.training_script == "trainyard.workloads.train"
        mount = next(m for m in container["volumeMounts"] if m["name"] == "run-config")
        assert parsed.training_script_args == [f"{mount['mountPath']}/run.json"]


ONLINE_RL = [pytest.param(r, o, id=i) for i, r, o in RUNS if r.spec.method in ("grpo", "rloo")]


@pytest.mark.parametrize(("run", "options"), ONLINE_RL)
def test_trainer_json_builds_a_trl_config(run: TrainingRun, options: dict, tmp_path):
    from trl import GRPOConfig, RLOOConfig

    trainer_options = view(render_children(run, uid=UID, **options))["trainer_json"]
    config_class = GRPOConfig if run.spec.method == "grpo" else RLOOConfig
    online = run.spec.online_rl
    config = config_class(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=online.num_generations,
        num_generations=online.num_generations,
        **trainer_options,
    )
    for key, value in trainer_options.items():
        assert getattr(config, key) == value
    vllm = run.spec.rollout.vllm if run.spec.rollout else None
    assert config.use_vllm is (vllm is not None)
    if vllm is not None:
        assert config.vllm_mode == vllm.mode
        if vllm.mode == "colocate":
            assert config.vllm_tensor_parallel_size == vllm.tensor_parallel_size
            expected_memory = (
                vllm.gpu_memory_utilization
                if "gpu_memory_utilization" in vllm.model_fields_set
                else 0.3
            )
            assert config.vllm_gpu_memory_utilization == expected_memory
        else:
            assert config.vllm_server_base_url.endswith(":8000")
