"""Faults, as kopf's own tests make them: conflicts, throttling, dead watches, an operator restart."""

from __future__ import annotations

import asyncio

import pytest
from operator_fakes import CONFIGMAPS, JOBS, NAMESPACE, RUNS, SERVICES, eventually, training_run

pytestmark = pytest.mark.timeout(60)

STATUS_PATH = r"/trainingruns/[^/]+/status$"
JOB_POSTS = r"/apis/batch/v1/namespaces/ml/jobs$"


def child_names(api, run):
    return sorted(
        (obj["kind"], obj["metadata"]["name"])
        for rid in (CONFIGMAPS, SERVICES, JOBS)
        for obj in api.objects(rid, NAMESPACE, f"trainyard.dev/run={run}")
    )


async def test_conflict_on_the_status_write_is_retried_without_duplicates(
    api, kubelet, start_operator
):
    conflict = api.faults.fail("patch", STATUS_PATH, 409)
    async with start_operator() as metrics:
        await api.put_object(RUNS, training_run("contended"))
        await eventually(lambda: kubelet.status("contended").get("phase") == "Pending")
        await eventually(lambda: len(child_names(api, "contended")) == 3)
        assert conflict.served == 1
        assert child_names(api, "contended") == [
            ("ConfigMap", "contended-config-0"),
            ("Job", "contended-attempt-0"),
            ("Service", "contended-workers"),
        ]
        assert api.count("create", JOB_POSTS) == 1, (
            "the conflicted reconcile stopped before its creates"
        )
        assert metrics.reconciles.labels(result="conflict")._value.get() >= 1


async def test_throttling_and_unavailable_bursts_are_retried(api, kubelet, start_operator):
    throttled = api.faults.fail("create", JOB_POSTS, 429, times=3, retry_after=0)
    unavailable = api.faults.fail("patch", STATUS_PATH, 503, times=3)
    async with start_operator() as metrics:
        await api.put_object(RUNS, training_run("bursty"))
        await eventually(lambda: api.get(JOBS, NAMESPACE, "bursty-attempt-0"))
        await eventually(lambda: kubelet.status("bursty").get("phase") == "Pending")
        assert (throttled.served, unavailable.served) == (3, 3)
        posts = [r.status for r in api.records if r.verb == "create" and r.path.endswith("/jobs")]
        assert posts[:4] == [429, 429, 429, 201] and set(posts[4:]) <= {409}
        assert [j["metadata"]["name"] for j in kubelet.jobs("bursty")] == ["bursty-attempt-0"]
        assert metrics.api_errors.labels(verb="create", code="429")._value.get() == 3
        assert metrics.api_errors.labels(verb="patch", code="503")._value.get() == 3


async def test_watch_ending_with_410_gone_is_relisted(api, kubelet, start_operator):
    async with start_operator():
        await api.put_object(RUNS, training_run("before"))
        await eventually(lambda: kubelet.jobs("before"))
        lists = api.count("list", r"/trainingruns$")
        api.faults.watch_gone["trainyard.dev/v1alpha1/trainingruns"] = (
            2  # the next two re-watches fail too
        )
        api.expire_watches()
        await api.put_object(RUNS, training_run("after"))
        await eventually(lambda: kubelet.jobs("after"))
        await eventually(lambda: api.faults.watch_gone["trainyard.dev/v1alpha1/trainingruns"] == 0)
        await eventually(
            lambda: api.count("list", r"/trainingruns$") >= lists + 2
        )  # 410 Gone → list again
        assert len(kubelet.jobs("before")) == 1 and len(kubelet.jobs("after")) == 1


async def test_silent_watch_stream_is_noticed_and_reopened(
    api, kubelet, start_operator, operator_config
):
    operator_config.watch_client_timeout = 1.0  # a stream silent this long is considered dead
    operator_config.watch_server_timeout = 30.0
    async with start_operator(operator_config):
        await asyncio.sleep(0.2)
        api.faults.silent_until = asyncio.get_running_loop().time() + 0.5
        watches = api.count("watch", r"/trainingruns$")
        await api.put_object(RUNS, training_run("unheard"))
        await eventually(lambda: kubelet.jobs("unheard"), timeout=10)
        assert api.faults.dropped >= 1, "the open stream swallowed the event"
        assert api.count("watch", r"/trainingruns$") > watches, (
            "it arrived through a re-opened watch"
        )
        assert len(kubelet.jobs("unheard")) == 1


async def test_failing_reconcile_is_retried_with_backoff_and_resumed_after_a_restart(
    api, kubelet, start_operator
):
    outage = api.faults.fail("create", JOB_POSTS, 503, times=10_000)
    async with start_operator() as metrics:
        await api.put_object(RUNS, training_run("interrupted"))
        # each reconcile's client retries 7 times, then the queue retries the reconcile
        await eventually(lambda: metrics.reconciles.labels(result="error")._value.get() >= 3)
        failures = [r.at for r in api.records if r.verb == "create" and r.path.endswith("/jobs")]
        gaps = [b - a for a, b in zip(failures[6::7], failures[7::7], strict=False)]
        # each retry waited at least its backoff (0.1 s, then 0.2 s): lower bounds only, so a
        # loaded machine can only make the gaps longer, never fail the test
        assert len(gaps) >= 2 and gaps[0] >= 0.09 and gaps[1] >= 0.18, (
            f"backoff between reconciles grows: {gaps}"
        )
    # the run itself was never written to by kopf (no progress annotations, no finalizer)
    assert not any(
        k.startswith("trainyard.dev/")
        for k in kubelet.run("interrupted")["metadata"].get("annotations") or {}
    )
    assert child_names(api, "interrupted") == [
        ("ConfigMap", "interrupted-config-0"),
        ("Service", "interrupted-workers"),
    ]

    outage.times = outage.served  # the API server recovers
    configmap_posts = api.count("create", r"/configmaps$")
    async with start_operator():
        await eventually(lambda: kubelet.jobs("interrupted"))
        await eventually(lambda: kubelet.status("interrupted").get("phase") == "Pending")
    assert child_names(api, "interrupted") == [
        ("ConfigMap", "interrupted-config-0"),
        ("Job", "interrupted-attempt-0"),
        ("Service", "interrupted-workers"),
    ]
    assert api.count("create", r"/configmaps$") == configmap_posts, (
        "children seen in the index are not posted again"
    )


async def test_second_reconcile_of_a_converged_run_makes_no_writes(
    api, kubelet, start_operator, operator_config
):
    async with start_operator() as metrics:
        await api.put_object(RUNS, training_run("steady"))
        job = await eventually(lambda: api.get(JOBS, NAMESPACE, "steady-attempt-0"))
        await kubelet.start_pods(job, pod_ip="127.0.0.1")
        await eventually(lambda: kubelet.status("steady").get("phase") == "Running")
        await asyncio.sleep(0.5)  # the last status write's own watch event comes back
        converged = metrics.reconciles.labels(result="converged")._value.get()
        mark = len(api.records)
        # a Running run is requeued every progress period: each of those reconciles reads
        # the watch-fed indexes and writes nothing
        await asyncio.sleep(operator_config.progress_seconds * 6)
        assert metrics.reconciles.labels(result="converged")._value.get() >= converged + 3
        assert api.writes(since=mark) == []
        non_watch = [r for r in api.records[mark:] if r.verb != "watch"]
        assert non_watch == [], "a converged reconcile reads from the watch-fed indexes"
    async with start_operator() as metrics:  # a restarted operator resumes and writes nothing
        mark = len(api.records)
        await eventually(lambda: metrics.reconciles.labels(result="converged")._value.get() >= 3)
        assert api.writes(since=mark) == []


async def test_child_watches_recover_from_410_gone_and_silence(
    api, kubelet, start_operator, operator_config
):
    operator_config.watch_client_timeout = 1.0
    async with start_operator():
        await api.put_object(RUNS, training_run("watched"))
        job = await eventually(lambda: api.get(JOBS, NAMESPACE, "watched-attempt-0"))
        pods = await kubelet.start_pods(job)
        await eventually(lambda: kubelet.status("watched").get("phase") == "Running")

        pod_lists = api.count("list", r"/namespaces/ml/pods$")
        api.faults.watch_gone["v1/pods"] = 1  # the re-watch is refused too
        api.expire_watches("v1/pods")
        await eventually(lambda: api.count("list", r"/namespaces/ml/pods$") >= pod_lists + 1)

        api.faults.silent_until = asyncio.get_running_loop().time() + 0.5
        await kubelet.fail_pod(pods[0], exit_code=1)
        await eventually(lambda: api.get(JOBS, NAMESPACE, "watched-attempt-1"), timeout=15)
        assert api.faults.dropped >= 1, (
            "the failure reached the operator only through a re-opened watch"
        )
        assert kubelet.status("watched")["restarts"] == 1
