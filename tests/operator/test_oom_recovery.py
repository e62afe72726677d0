"""runPolicy.oomRecovery: a worker out of GPU memory restarts the gang with a smaller batch.

The policy's table first (pure), then the real operator against the API emulation over
HTTP, the test playing kubelet: a pod whose container terminated with the worker's
`CudaOutOfMemory: …` termination message gets a new attempt whose rendered run.json has
the halved batch, the status says so, and at the floor the run fails saying why.
"""

from __future__ import annotations

import json

import pytest
from operator_fakes import CONFIGMAPS, JOBS, NAMESPACE, PODS, RUNS, eventually, training_run

from trainyard.api import parse_resource
from trainyard.api.contract import OOM_EXIT_CODE, OOM_REASON
from trainyard.api.training_run import OOMRecovery
from trainyard.operator import failure_policy, oom_recovery, reasons

pytestmark = pytest.mark.timeout(60)

OOM_MESSAGE = (
    f"{OOM_REASON}: rank 1 at step 12 with perDeviceBatchSize 8: CUDA out of memory. "
    "Tried to allocate 2.00 GiB"
)


def terminated(exit_code: int, message: str | None = None, name: str = "p") -> dict:
    state = {"exitCode": exit_code, "reason": "Error"}
    if message is not None:
        state["message"] = message
    return {
        "metadata": {"name": name},
        "status": {
            "phase": "Failed",
            "containerStatuses": [{"name": "trainer", "state": {"terminated": state}}],
        },
    }


@pytest.mark.parametrize(
    ("pod", "reason"),
    [
        pytest.param(terminated(1, OOM_MESSAGE), reasons.CUDA_OUT_OF_MEMORY, id="torchrun-message"),
        pytest.param(terminated(OOM_EXIT_CODE), reasons.CUDA_OUT_OF_MEMORY, id="exit-code"),
        pytest.param(terminated(1, "Traceback: CudaOutOfMemory"), reasons.NON_ZERO_EXIT, id="not-first-word"),
        pytest.param(terminated(1), reasons.NON_ZERO_EXIT, id="plain-crash"),
    ],
)  # fmt: skip
def test_a_pod_says_cuda_out_of_memory_by_message_or_exit_code(pod, reason):
    assert failure_policy.classify_pod(pod).reason == reason


def test_the_rank_out_of_memory_names_the_gangs_failure():
    """The other ranks fail because one ran out of memory; that one is the reason."""
    pods = [terminated(143, name="rank0"), terminated(1, OOM_MESSAGE, name="rank1")]
    found = failure_policy.classify_attempt(None, pods)
    assert found.reason == reasons.CUDA_OUT_OF_MEMORY and "rank1" in found.message


def spec(per_device: int = 8, oom: dict | None = None):
    """A run's spec with this batch and runPolicy.oomRecovery (none when None)."""
    policy = {"maxRestarts": 3} | ({"oomRecovery": oom} if oom is not None else {})
    doc = training_run("r", training={"perDeviceBatchSize": per_device}, runPolicy=policy)
    return parse_resource(doc).spec


OOM = failure_policy.Disruption("failure", reasons.CUDA_OUT_OF_MEMORY, "pod p: out of memory")


@pytest.mark.parametrize(
    ("case", "per_device", "recorded", "restarts", "action", "reason", "status"),
    [
        ("halves and doubles", 8, None, 0, "restart", reasons.CUDA_OUT_OF_MEMORY,
         {"recoveries": 1, "perDeviceBatchSize": 4, "gradientAccumulationSteps": 2}),
        ("again from the recorded batch", 8,
         {"recoveries": 1, "perDeviceBatchSize": 4, "gradientAccumulationSteps": 2}, 1,
         "restart", reasons.CUDA_OUT_OF_MEMORY,
         {"recoveries": 2, "perDeviceBatchSize": 2, "gradientAccumulationSteps": 4}),
        ("odd batch keeps the effective batch", 6, None, 0, "restart",
         reasons.CUDA_OUT_OF_MEMORY,
         {"recoveries": 1, "perDeviceBatchSize": 3, "gradientAccumulationSteps": 2}),
        ("at the floor", 2, None, 0, "fail", reasons.OUT_OF_MEMORY_AT_MINIMUM_BATCH, None),
        ("budget used up", 8, None, 3, "fail", reasons.RESTART_BUDGET_EXHAUSTED, None),
    ],
)  # fmt: skip
def test_recovery_table(case, per_device, recorded, restarts, action, reason, status):
    run_spec = spec(per_device, {"minPerDeviceBatchSize": 2})
    recovery = oom_recovery.recover(
        OOM,
        settings=run_spec.run_policy.oom_recovery,
        spec=run_spec,
        recorded=recorded,
        restarts=restarts,
        preemptions=0,
        max_restarts=3,
    )
    assert (recovery.outcome.action, recovery.outcome.reason, recovery.status) == (
        action,
        reason,
        status,
    ), case
    if action == "restart":
        assert recovery.outcome.counters == (restarts + 1, 0)  # within the restart budget


def test_without_recovery_an_oom_is_a_plain_failure_that_says_how_to_recover():
    run_spec = spec()
    recovery = oom_recovery.recover(
        OOM, settings=None, spec=run_spec, recorded=None, restarts=0, preemptions=0, max_restarts=3
    )
    assert (recovery.outcome.action, recovery.status) == ("restart", None)
    assert "runPolicy.oomRecovery" in recovery.outcome.message
    assert "perDeviceBatchSize 8" in recovery.outcome.message
    disabled = spec(oom={"enabled": False})
    assert (
        oom_recovery.recover(
            OOM,
            settings=disabled.run_policy.oom_recovery,
            spec=disabled,
            recorded=None,
            restarts=0,
            preemptions=0,
            max_restarts=3,
        ).status
        is None
    )


def test_next_batch_never_goes_below_the_floor():
    for floor in range(1, 9):
        for per_device in range(floor, 33):
            smaller = OOMRecovery(min_per_device_batch_size=floor).next_batch(per_device, 3)
            if smaller is not None:
                assert floor <= smaller[0] <= per_device // 2
                assert smaller[0] * smaller[1] == per_device * 3  # the same effective batch


def test_grpo_that_evaluates_keeps_whole_prompt_groups_per_batch():
    """TRL's GRPO evaluation batch is the per-device batch; over all processes it must
    hold whole groups of numGenerations completions, so recovery skips batches that don't."""
    doc = training_run(
        "g",
        method="grpo",
        dataset={"source": "s3://data/prompts.jsonl", "evalSplit": 0.1},
        training={"perDeviceBatchSize": 8},
        grpo={
            "numGenerations": 4,
            "rewards": [{"name": "r", "builtin": "regex", "args": {"pattern": "a"}}],
        },
    )
    grpo = parse_resource(doc).spec  # 2 nodes × 1 GPU
    recovery = OOMRecovery()
    assert recovery.next_batch(8, 1, grpo) == (4, 2)
    assert recovery.next_batch(4, 2, grpo) == (2, 4)
    assert recovery.next_batch(2, 4, grpo) is None  # 1 × 2 processes holds half a group
    without_eval = grpo.model_copy(
        update={"dataset": grpo.dataset.model_copy(update={"eval_split": None})}
    )
    assert recovery.next_batch(2, 4, without_eval) == (1, 8)


def rendered_training(api, run: str, attempt: int) -> dict:
    config = api.get(CONFIGMAPS, NAMESPACE, f"{run}-config-{attempt}")
    return json.loads(config["data"]["run.json"])["spec"]["training"]


async def out_of_memory(api, pod: dict, message: str = OOM_MESSAGE) -> None:
    """What the kubelet reports for a worker that wrote its termination message and whose
    torchrun exited 1."""
    state = {"exitCode": 1, "reason": "Error", "message": message}
    await api.patch_object(
        PODS,
        NAMESPACE,
        pod["metadata"]["name"],
        {
            "status": {
                "phase": "Failed",
                "containerStatuses": [{"name": "trainer", "state": {"terminated": state}}],
            }
        },
        status=True,
    )


async def test_an_oom_pod_restarts_with_half_the_batch_and_fails_at_the_floor(
    api, kubelet, start_operator
):
    run = training_run(
        "oom",
        training={"perDeviceBatchSize": 4, "gradientAccumulationSteps": 2},
        runPolicy={"maxRestarts": 3, "oomRecovery": {"minPerDeviceBatchSize": 2}},
    )
    async with start_operator() as metrics:
        await api.put_object(RUNS, run)
        job = await eventually(lambda: api.get(JOBS, NAMESPACE, "oom-attempt-0"))
        assert rendered_training(api, "oom", 0)["perDeviceBatchSize"] == 4
        pods = await kubelet.start_pods(job)
        await eventually(lambda: kubelet.status("oom").get("phase") == "Running")

        await out_of_memory(api, pods[1])
        job = await eventually(lambda: api.get(JOBS, NAMESPACE, "oom-attempt-1"))
        await eventually(lambda: api.get(CONFIGMAPS, NAMESPACE, "oom-config-1"))
        training = rendered_training(api, "oom", 1)
        assert (training["perDeviceBatchSize"], training["gradientAccumulationSteps"]) == (2, 4)
        status = kubelet.status("oom")
        assert status["oomRecovery"] == {
            "recoveries": 1,
            "perDeviceBatchSize": 2,
            "gradientAccumulationSteps": 4,
        }
        assert status["restarts"] == 1
        running = kubelet.condition("oom", "Running")
        assert running["reason"] == reasons.CUDA_OUT_OF_MEMORY
        assert "perDeviceBatchSize 2 × gradientAccumulationSteps 4" in running["message"]
        # the author's spec is not rewritten: only the attempt's config is smaller
        assert kubelet.run("oom")["spec"]["training"]["perDeviceBatchSize"] == 4
        assert metrics.restarts.labels(reason=reasons.CUDA_OUT_OF_MEMORY)._value.get() == 1

        pods = await kubelet.start_pods(job)
        await eventually(lambda: kubelet.status("oom").get("phase") == "Running")
        await out_of_memory(api, pods[0])
        await eventually(lambda: kubelet.status("oom").get("phase") == "Failed")
        failed = kubelet.condition("oom", "Failed")
        assert failed["reason"] == reasons.OUT_OF_MEMORY_AT_MINIMUM_BATCH
        assert "minPerDeviceBatchSize=2" in failed["message"]
        assert "perDeviceBatchSize 2 × gradientAccumulationSteps 4" in failed["message"]
        assert kubelet.status("oom")["restarts"] == 1  # the failed try was not a restart
        await eventually(lambda: not kubelet.jobs("oom"))


def test_the_recovered_batch_outlives_the_children_and_yields_to_a_smaller_spec():
    """Children deleted (or the operator restarted): the next config still has the
    recovered batch from status; an author who lowers the spec below it takes over."""
    from test_reconcile import World

    def config_training(world: World) -> dict:
        plan = world.reconcile()
        config = next(m for m in plan.creates if m["kind"] == "ConfigMap")
        return json.loads(config["data"]["run.json"])["spec"]["training"]

    recovered = {"recoveries": 1, "perDeviceBatchSize": 4, "gradientAccumulationSteps": 2}
    world = World(training={"perDeviceBatchSize": 8}).with_status(
        restartAttempt=1, oomRecovery=recovered
    )
    training = config_training(world)
    assert (training["perDeviceBatchSize"], training["gradientAccumulationSteps"]) == (4, 2)

    world = World(training={"perDeviceBatchSize": 2}).with_status(
        restartAttempt=1, oomRecovery=recovered
    )
    training = config_training(world)
    assert (training["perDeviceBatchSize"], training["gradientAccumulationSteps"]) == (2, 1)
