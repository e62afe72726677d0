"""The real operator (kopf) against the API emulation over HTTP; the test plays kubelet and Job controller."""

from __future__ import annotations

import pytest
from operator_fakes import CONFIGMAPS, JOBS, NAMESPACE, PODS, RUNS, SERVICES, eventually, training_run

from trainyard.operator import reasons

pytestmark = pytest.mark.timeout(60)


async def test_run_goes_from_created_to_succeeded_with_progress(api, kubelet, start_operator, rank0_metrics):
    run = training_run("demo", metrics={"port": rank0_metrics.port})
    async with start_operator():
        await api.put_object(RUNS, run)
        jobs = await eventually(lambda: kubelet.jobs("demo"))
        assert [j["metadata"]["name"] for j in jobs] == ["demo-attempt-0"]
        assert api.get(CONFIGMAPS, NAMESPACE, "demo-config") is not None
        assert api.get(SERVICES, NAMESPACE, "demo-workers") is not None
        assert (await eventually(lambda: kubelet.status("demo").get("phase")))== "Pending"

        rank0_metrics.values = {"trainyard_step": 5, "trainyard_total_steps": 20, "trainyard_loss": 2.5, "trainyard_epoch": 0.25, "trainyard_checkpoint_last_step": 0}
        await kubelet.start_pods(jobs[0])
        await eventually(lambda: kubelet.status("demo").get("phase") == "Running")
        progress = await eventually(lambda: kubelet.status("demo").get("progress"))
        assert progress["step"] == 5 and progress["totalSteps"] == 20 and progress["loss"] == 2.5
        assert kubelet.condition("demo", "Running")["reason"] == reasons.PODS_RUNNING

        rank0_metrics.values.update(trainyard_step=10, trainyard_loss=1.5, trainyard_checkpoint_last_step=10)
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
