"""The controller runtime against the API emulation over HTTP (real kopf, real HTTP).

Resync is 10 minutes here (conftest): every transition below is driven by a watch event
or by a reconcile's own requeue.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses

import pytest
from operator_fakes import JOBS, NAMESPACE, RUNS, OperatorThread, eventually, training_run

pytestmark = pytest.mark.timeout(90)

PEERINGS = "zalando.org/v1/kopfpeerings"


def total_reconciles(metrics) -> float:
    return sum(
        metrics.reconciles.labels(result=result)._value.get()
        for result in ("converged", "changed", "invalid", "conflict", "error")
    )


async def test_a_job_completion_reaches_the_run_through_its_watch_event(
    api, kubelet, start_operator
):
    async with start_operator():
        await api.put_object(RUNS, training_run("evented"))
        job = await eventually(lambda: api.get(JOBS, NAMESPACE, "evented-attempt-0"))
        await kubelet.start_pods(job)
        await eventually(lambda: kubelet.status("evented").get("phase") == "Running")
        loop = asyncio.get_running_loop()
        started = loop.time()
        await kubelet.complete_job(job)
        await eventually(lambda: kubelet.status("evented").get("phase") == "Succeeded", timeout=5)
        assert loop.time() - started < 5, "far below the 10-minute resync"


async def test_a_burst_of_child_events_is_coalesced(api, kubelet, start_operator):
    async with start_operator() as metrics:
        await api.put_object(RUNS, training_run("noisy"))
        job = await eventually(lambda: api.get(JOBS, NAMESPACE, "noisy-attempt-0"))
        await kubelet.start_pods(job)
        await eventually(lambda: kubelet.status("noisy").get("phase") == "Running")
        await asyncio.sleep(0.5)
        before = total_reconciles(metrics)
        for index in range(100):  # e.g. the Job controller updating its counters
            await api.patch_object(
                JOBS, NAMESPACE, "noisy-attempt-0", {"metadata": {"annotations": {"n": str(index)}}}
            )
        await asyncio.sleep(1.5)
        reconciles = total_reconciles(metrics) - before
        # progress requeues (every 0.3 s) add a few; 100 events must not mean 100 reconciles
        assert 1 <= reconciles <= 30, reconciles


async def test_a_deleted_run_is_forgotten_whatever_the_propagation(api, kubelet, start_operator):
    async with start_operator() as metrics:
        for name in ("gone-background", "gone-foreground"):
            await api.put_object(RUNS, training_run(name))
            job = await eventually(lambda name=name: api.get(JOBS, NAMESPACE, f"{name}-attempt-0"))
            await kubelet.start_pods(job)
        await eventually(lambda: metrics.runs.labels(phase="Running")._value.get() == 2)
        assert "finalizers" not in kubelet.run("gone-background")["metadata"]
        await api.delete_object(RUNS, NAMESPACE, "gone-background")
        await eventually(lambda: metrics.runs.labels(phase="Running")._value.get() == 1)
        # foreground: the API server keeps the run (deletionTimestamp, a finalizer) until
        # its dependents are gone; the operator forgets it when the object finally goes
        api._delete(RUNS, NAMESPACE, "gone-foreground", propagation="Foreground")
        await eventually(lambda: metrics.runs.labels(phase="Running")._value.get() == 0)
        assert sum(metrics.runs.labels(phase=p)._value.get() for p in ("Pending", "Running")) == 0


async def test_a_finished_run_that_kept_its_server_loses_it_after_a_restart(
    api, kubelet, start_operator
):
    """The operator died between the Succeeded status write and the Deployment delete."""
    import yaml
    from operator_fakes import DEPLOYMENTS
    from test_integration import Path

    run = yaml.safe_load(
        (Path(__file__).resolve().parents[2] / "examples" / "grpo-run.yaml").read_text()
    )
    run["metadata"]["namespace"] = NAMESPACE
    name = run["metadata"]["name"]
    outage = api.faults.fail("delete", r"/deployments/", 503, times=10_000)
    async with start_operator():
        await api.put_object(RUNS, run)
        job = await eventually(lambda: api.get(JOBS, NAMESPACE, f"{name}-attempt-0"))
        await kubelet.start_pods(job)
        await kubelet.complete_job(job)
        await eventually(lambda: kubelet.status(name).get("phase") == "Succeeded")
        await eventually(lambda: outage.served >= 7)
    assert api.get(DEPLOYMENTS, NAMESPACE, f"{name}-vllm") is not None
    outage.times = outage.served  # recovered; a new operator process starts
    async with start_operator():
        await eventually(lambda: api.get(DEPLOYMENTS, NAMESPACE, f"{name}-vllm") is None)
    assert kubelet.status(name)["phase"] == "Succeeded"
    assert kubelet.jobs(name), "a completed Job holds no GPUs and stays for its logs"


async def test_only_the_active_replica_writes_and_the_standby_takes_over(
    api, kubelet, start_operator, operator_config
):
    api.declare(PEERINGS, "KopfPeering", namespaced=True, status=False)
    await api.put_object(
        PEERINGS,
        {
            "apiVersion": "zalando.org/v1",
            "kind": "KopfPeering",
            "metadata": {"name": "trainyard", "namespace": NAMESPACE},
        },
    )
    active = dataclasses.replace(
        operator_config, standalone=False, priority=200, identity="replica-active"
    )
    standby = dataclasses.replace(
        operator_config, standalone=False, priority=100, identity="replica-standby"
    )

    def ours(identity: str, since: int = 0):
        agent = f"trainyard-operator/{identity}"
        return [r for r in api.writes(since=since) if r.agent == agent]

    async with contextlib.AsyncExitStack() as standby_stack:
        active_stack = contextlib.AsyncExitStack()
        active_metrics = await active_stack.enter_async_context(OperatorThread(active))
        await eventually(lambda: active_metrics.leader._value.get() == 1)
        standby_metrics = await standby_stack.enter_async_context(OperatorThread(standby))
        await eventually(
            lambda: (
                "replica-standby"
                in ((api.get(PEERINGS, NAMESPACE, "trainyard") or {}).get("status") or {})
            )
        )
        await asyncio.sleep(0.5)
        assert standby_metrics.leader._value.get() == 0
        await api.put_object(RUNS, training_run("shared"))
        job = await eventually(lambda: api.get(JOBS, NAMESPACE, "shared-attempt-0"))
        pods = await kubelet.start_pods(job)
        await eventually(lambda: kubelet.status("shared").get("phase") == "Running")
        assert ours("replica-active"), "the active replica did the work"
        assert ours("replica-standby") == [], "the standby wrote nothing"

        loop = asyncio.get_running_loop()
        stopped = loop.time()
        await active_stack.aclose()  # the active replica goes away (a rollout, a drain)
        await eventually(lambda: standby_metrics.leader._value.get() == 1, timeout=10)
        took_over = loop.time() - stopped
        mark = len(api.records)
        await kubelet.fail_pod(pods[0], exit_code=1)
        await eventually(lambda: api.get(JOBS, NAMESPACE, "shared-attempt-1"))
        assert ours("replica-standby", since=mark), "the new active replica restarted the gang"
        await eventually(lambda: api.get(JOBS, NAMESPACE, "shared-attempt-0") is None)
        assert [j["metadata"]["name"] for j in kubelet.jobs("shared")] == ["shared-attempt-1"]
    assert took_over < 10


async def test_a_kind_not_served_is_an_empty_synced_cache_until_its_crd_arrives(api):
    """An optional CRD (kopf's peering group that is not installed, say): the informer says
    synced with nothing in it, lists again on its own clock without counting a watch
    restart, and sees the objects once the kind is served."""
    from trainyard.operator import k8s

    restarts: list[None] = []
    seen: list[str] = []
    configuration = await k8s.load_configuration(str(api.url).rstrip("/"))
    async with k8s.KubeClient(configuration) as client:
        informer = k8s.Informer(
            client,
            "ZalandoKopfPeering",
            NAMESPACE,
            None,
            lambda _kind, obj: obj,
            backoff=0.05,
            absent_relist=0.1,
            on_change=lambda _kind, entry, added: seen.append(entry["metadata"]["name"]),
            on_restart=lambda: restarts.append(None),
        )
        task = asyncio.create_task(informer.run())
        try:
            await asyncio.wait_for(informer.synced.wait(), 10)
            assert informer.all() == []
            lists = api.count("list", "/apis/zalando.org/v1/namespaces/")
            await eventually(
                lambda: api.count("list", "/apis/zalando.org/v1/namespaces/") >= lists + 3, 10
            )
            assert restarts == [], "waiting for a CRD is not a watch restart"

            api.declare(PEERINGS, "KopfPeering", status=False)
            peering = {
                "apiVersion": "zalando.org/v1",
                "kind": "KopfPeering",
                "metadata": {"name": "trainyard", "namespace": NAMESPACE},
            }
            await api.put_object(PEERINGS, peering)
            await eventually(lambda: seen == ["trainyard"], 10)
            assert [o["metadata"]["name"] for o in informer.all()] == ["trainyard"]
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
