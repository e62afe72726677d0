"""The real operator (kopf) against the API emulation over HTTP; the test plays kubelet and Job controller."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from operator_fakes import (
    CONFIGMAPS,
    DEPLOYMENTS,
    JOBS,
    NAMESPACE,
    PODS,
    RUNS,
    SERVICES,
    eventually,
    training_run,
)

from trainyard.operator import reasons

pytestmark = pytest.mark.timeout(60)


async def test_run_goes_from_created_to_succeeded_with_progress(
    api, kubelet, start_operator, rank0_metrics
):
    run = training_run("demo", metrics={"port": rank0_metrics.port})
    async with start_operator():
        await api.put_object(RUNS, run)
        jobs = await eventually(lambda: kubelet.jobs("demo"))
        assert [j["metadata"]["name"] for j in jobs] == ["demo-attempt-0"]
        assert api.get(CONFIGMAPS, NAMESPACE, "demo-config-0") is not None
        assert api.get(SERVICES, NAMESPACE, "demo-workers") is not None
        assert (await eventually(lambda: kubelet.status("demo").get("phase"))) == "Pending"

        rank0_metrics.values = {
            "trainyard_step": 5,
            "trainyard_total_steps": 20,
            "trainyard_loss": 2.5,
            "trainyard_epoch": 0.25,
            "trainyard_checkpoint_last_step": 0,
        }
        await kubelet.start_pods(jobs[0])
        await eventually(lambda: kubelet.status("demo").get("phase") == "Running")
        progress = await eventually(lambda: kubelet.status("demo").get("progress"))
        assert progress["step"] == 5 and progress["totalSteps"] == 20 and progress["loss"] == 2.5
        assert kubelet.condition("demo", "Running")["reason"] == reasons.PODS_RUNNING

        rank0_metrics.values.update(
            trainyard_step=10, trainyard_loss=1.5, trainyard_checkpoint_last_step=10
        )
        await eventually(lambda: (kubelet.status("demo").get("progress") or {}).get("step") == 10)
        status = kubelet.status("demo")
        assert status["progress"]["loss"] == 1.5
        assert status["checkpoints"] == {"latestStep": 10, "latestUri": "s3://ckpt/demo/step-10"}
        assert status["progress"]["etaSeconds"] >= 0

        await kubelet.complete_job(kubelet.jobs("demo")[0])
        await eventually(lambda: kubelet.status("demo").get("phase") == "Succeeded")
        status = kubelet.status("demo")
        assert status["completionTime"] and status["startTime"]
        assert kubelet.condition("demo", "Succeeded")["status"] == "True"
        assert len(api.objects(PODS, NAMESPACE)) == 2


async def _running(api, kubelet, name, attempt=0):
    job = await eventually(
        lambda: next(
            (j for j in kubelet.jobs(name) if j["metadata"]["name"] == f"{name}-attempt-{attempt}"),
            None,
        )
    )
    pods = await kubelet.start_pods(job)
    await eventually(lambda: kubelet.status(name).get("phase") == "Running")
    return job, pods


async def test_failed_worker_restarts_the_whole_gang_from_the_checkpoint(
    api, kubelet, start_operator, rank0_metrics
):
    async with start_operator() as metrics:
        await api.put_object(RUNS, training_run("crash", metrics={"port": rank0_metrics.port}))
        rank0_metrics.values = {"trainyard_step": 30, "trainyard_checkpoint_last_step": 20}
        job, pods = await _running(api, kubelet, "crash")
        await eventually(lambda: kubelet.status("crash").get("checkpoints"))

        await kubelet.fail_pod(pods[1], reason="OOMKilled", exit_code=137)
        new_job = await eventually(lambda: api.get(JOBS, NAMESPACE, "crash-attempt-1"))
        await eventually(lambda: api.get(JOBS, NAMESPACE, "crash-attempt-0") is None)
        assert not kubelet.pods(job), "the old attempt's pods go with their Job"
        status = kubelet.status("crash")
        assert (status["restarts"], status["preemptions"], status["restartAttempt"]) == (1, 0, 1)
        assert status["phase"] == "Restarting"
        running = kubelet.condition("crash", "Running")
        assert (
            running["reason"] == reasons.OOM_KILLED and "checkpoint step 20" in running["message"]
        )

        await kubelet.start_pods(new_job)
        await eventually(lambda: kubelet.status("crash").get("phase") == "Running")
        assert [j["metadata"]["name"] for j in kubelet.jobs("crash")] == ["crash-attempt-1"]
        assert metrics.restarts.labels(reason=reasons.OOM_KILLED)._value.get() == 1


async def test_preemption_restarts_without_using_the_budget(api, kubelet, start_operator):
    async with start_operator():
        await api.put_object(RUNS, training_run("preempted", runPolicy={"maxRestarts": 0}))
        job, pods = await _running(api, kubelet, "preempted")
        await kubelet.fail_pod(
            pods[0], reason="Error", exit_code=137, disruption="PreemptionByScheduler"
        )
        await eventually(lambda: api.get(JOBS, NAMESPACE, "preempted-attempt-1"))
        status = kubelet.status("preempted")
        assert (status["restarts"], status["preemptions"]) == (0, 1)
        assert kubelet.condition("preempted", "Running")["reason"] == reasons.PREEMPTED
        assert kubelet.condition("preempted", "Failed") is None


async def test_exhausted_restart_budget_fails_the_run_and_frees_the_gpus(
    api, kubelet, start_operator
):
    async with start_operator():
        await api.put_object(RUNS, training_run("doomed", runPolicy={"maxRestarts": 1}))
        _, pods = await _running(api, kubelet, "doomed", attempt=0)
        await kubelet.fail_pod(pods[0], exit_code=1)
        _, pods = await _running(api, kubelet, "doomed", attempt=1)
        await kubelet.fail_pod(pods[1], exit_code=3)
        await eventually(lambda: kubelet.status("doomed").get("phase") == "Failed")
        failed = kubelet.condition("doomed", "Failed")
        assert failed["reason"] == reasons.RESTART_BUDGET_EXHAUSTED
        assert "exited with code 3" in failed["message"] and "maxRestarts=1" in failed["message"]
        await eventually(lambda: not kubelet.jobs("doomed"))
        # terminal stays terminal: nothing is recreated on later resyncs
        await asyncio.sleep(0.6)
        assert not kubelet.jobs("doomed") and kubelet.status("doomed")["phase"] == "Failed"


async def test_active_deadline_fails_a_running_run_on_its_own_requeue(api, kubelet, start_operator):
    # No event arrives after the pods run, and the resync is 10 minutes away: the reconcile
    # asked to be requeued when the deadline passes.
    async with start_operator():
        await api.put_object(RUNS, training_run("slow", runPolicy={"activeDeadlineSeconds": 1}))
        await _running(api, kubelet, "slow")
        await eventually(lambda: kubelet.status("slow").get("phase") == "Failed")
        failed = kubelet.condition("slow", "Failed")
        assert failed["reason"] == reasons.DEADLINE_EXCEEDED
        assert "activeDeadlineSeconds=1" in failed["message"]
        await eventually(lambda: not kubelet.jobs("slow"))
        assert kubelet.status("slow")["restarts"] == 0


async def test_suspend_deletes_the_pods_and_resume_starts_a_new_attempt(
    api, kubelet, start_operator
):
    async with start_operator():
        await api.put_object(RUNS, training_run("pausable"))
        job, _ = await _running(api, kubelet, "pausable")
        await api.patch_object(RUNS, NAMESPACE, "pausable", {"spec": {"suspend": True}})
        await eventually(lambda: kubelet.status("pausable").get("phase") == "Suspended")
        await eventually(lambda: not kubelet.jobs("pausable"))
        assert not kubelet.pods(job)
        assert api.get(CONFIGMAPS, NAMESPACE, "pausable-config-0") is not None
        assert kubelet.condition("pausable", "Suspended")["status"] == "True"

        # Edited while suspended: the resumed attempt's config carries the edit.
        await api.patch_object(
            RUNS, NAMESPACE, "pausable", {"spec": {"training": {"learningRate": 2.0e-5}}}
        )
        await eventually(
            lambda: (kubelet.condition("pausable", "SpecApplied") or {}).get("status") == "False"
        )
        await api.patch_object(RUNS, NAMESPACE, "pausable", {"spec": {"suspend": False}})
        await eventually(lambda: api.get(JOBS, NAMESPACE, "pausable-attempt-1"))
        config = await eventually(lambda: api.get(CONFIGMAPS, NAMESPACE, "pausable-config-1"))
        assert '"learningRate": 2e-05' in config["data"]["run.json"]
        await eventually(lambda: api.get(CONFIGMAPS, NAMESPACE, "pausable-config-0") is None)
        await eventually(
            lambda: (kubelet.condition("pausable", "SpecApplied") or {}).get("status") == "True"
        )
        status = kubelet.status("pausable")
        assert (status["restarts"], status["preemptions"]) == (0, 0)
        assert kubelet.condition("pausable", "Suspended")["reason"] == reasons.RESUMED


async def test_invalid_spec_gets_the_validate_message_and_no_children(api, kubelet, start_operator):
    from trainyard.api import validate_resource

    bad = training_run("broken", method="grpo")  # grpo without rewards
    bad["spec"]["training"] = {"learningRate": -1}
    expected = validate_resource(bad)
    assert expected, "the fixture must be invalid"
    async with start_operator() as metrics:
        await api.put_object(RUNS, bad)
        await eventually(lambda: kubelet.status("broken").get("phase") == "Invalid")
        valid = kubelet.condition("broken", "Valid")
        assert valid["status"] == "False" and valid["reason"] == reasons.INVALID_SPEC
        assert valid["message"] == "; ".join(expected)
        # kopf writes nothing to the run (no finalizer, no annotations), and neither do
        # later reconciles: a label edit is an event, it reconciles, and changes nothing
        assert "finalizers" not in kubelet.run("broken")["metadata"]
        converged = metrics.reconciles.labels(result="converged")._value.get()
        mark = len(api.records)
        await api.patch_object(RUNS, NAMESPACE, "broken", {"metadata": {"labels": {"x": "y"}}})
        await eventually(
            lambda: metrics.reconciles.labels(result="converged")._value.get() > converged
        )
        await asyncio.sleep(0.5)  # no retry storm
        assert api.writes(since=mark) == []
        assert (
            not kubelet.jobs("broken") and api.get(CONFIGMAPS, NAMESPACE, "broken-config-0") is None
        )


async def test_deleting_the_run_deletes_its_children(api, kubelet, start_operator):
    async with start_operator():
        await api.put_object(RUNS, training_run("short-lived"))
        job, _ = await _running(api, kubelet, "short-lived")
        await api.delete_object(RUNS, NAMESPACE, "short-lived")
        assert api.get(RUNS, NAMESPACE, "short-lived") is None
        assert not kubelet.jobs("short-lived") and not kubelet.pods(job)
        assert api.objects(CONFIGMAPS, NAMESPACE, "trainyard.dev/run=short-lived") == []
        assert api.objects(SERVICES, NAMESPACE, "trainyard.dev/run=short-lived") == []


async def test_finished_run_children_are_cleaned_up_after_the_ttl(api, kubelet, start_operator):
    async with start_operator():
        await api.put_object(RUNS, training_run("tidy", runPolicy={"ttlSecondsAfterFinished": 1}))
        job, _ = await _running(api, kubelet, "tidy")
        await kubelet.complete_job(job)
        await eventually(lambda: kubelet.status("tidy").get("phase") == "Succeeded")
        assert kubelet.jobs("tidy"), "children stay until the TTL passes"
        await eventually(
            lambda: (
                not kubelet.jobs("tidy")
                and not api.objects(SERVICES, NAMESPACE, "trainyard.dev/run=tidy")
            ),
            timeout=5,
        )
        assert kubelet.status("tidy")["phase"] == "Succeeded"
        assert kubelet.condition("tidy", "CleanedUp")["reason"] == reasons.TTL_EXPIRED


async def test_grpo_rollout_server_comes_and_goes_with_the_gang(api, kubelet, start_operator):
    import yaml

    run = yaml.safe_load(
        (Path(__file__).resolve().parents[2] / "examples" / "grpo-run.yaml").read_text()
    )
    run["metadata"]["namespace"] = NAMESPACE
    name = run["metadata"]["name"]
    async with start_operator():
        await api.put_object(RUNS, run)
        deployment = await eventually(lambda: api.get(DEPLOYMENTS, NAMESPACE, f"{name}-vllm"))
        # Created in one batch, concurrently: the Service may land just after the Deployment.
        await eventually(lambda: api.get(SERVICES, NAMESPACE, f"{name}-vllm"))
        assert (
            deployment["metadata"]["ownerReferences"][0]["uid"]
            == kubelet.run(name)["metadata"]["uid"]
        )
        await api.patch_object(RUNS, NAMESPACE, name, {"spec": {"suspend": True}})
        await eventually(lambda: api.get(DEPLOYMENTS, NAMESPACE, f"{name}-vllm") is None)
        assert api.get(SERVICES, NAMESPACE, f"{name}-vllm") is not None, (
            "Services hold no GPUs and stay"
        )
        await api.patch_object(RUNS, NAMESPACE, name, {"spec": {"suspend": False}})
        await eventually(lambda: api.get(DEPLOYMENTS, NAMESPACE, f"{name}-vllm"))
        job = await eventually(lambda: api.get(JOBS, NAMESPACE, f"{name}-attempt-1"))
        await kubelet.start_pods(job)
        await kubelet.complete_job(job)
        await eventually(lambda: kubelet.status(name).get("phase") == "Succeeded")
        await eventually(lambda: api.get(DEPLOYMENTS, NAMESPACE, f"{name}-vllm") is None)
