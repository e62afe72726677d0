"""Operator latency: apply → Job created for 200 TrainingRuns, against the framework floor;
event → status for the same runs; writes by a standby replica.

Both contestants run as their own process against the same Kubernetes API emulation
(tests/operator/apiserver.py: kmock over HTTP on 127.0.0.1, served from this process):

- floor: `benchmarks/operator_floor.py`, a bare kopf handler making the same API calls
  (status patch, ConfigMap, Service, Job) from a pre-rendered template;
- trainyard: `trainyard operator`, validating, rendering, reconciling, watching children.

200 runs are created as fast as a client can post them; a run's latency is from its
POST arriving at the API server to its Job's POST arriving. Then, with the operator's
resync at 10 minutes, each run's pods start, one worker of half the runs fails and the
other half's Jobs complete: event → status is from that write to the operator's
reaction (the new attempt's Job posted, or the run's status patched to Succeeded).
Then the operator is given 800 more runs and its resident memory is sampled while it
watches all 1,000. Last, two operator replicas with kopf peering take 200 runs through
the same steps; every write is counted by the replica that made it (User-Agent).

    python benchmarks/operator_latency.py                 # 200 runs, 1,000 for memory
    python benchmarks/operator_latency.py --runs 100 --watch-runs 500

Goals: apply → Job p50 and p99 ≤ 1.1× the floor, ≥ 100 runs/s, ≤ 300 MB resident with
1,000 runs; event → status p99 < 1 s (before the event-driven runtime: up to the resync
period, 30 s by default); writes by the standby replica: 0.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "operator"))

from apiserver import TrainyardApiServer, running_api_server  # noqa: E402

NAMESPACE = "bench"
RUNS_PATH = f"/apis/trainyard.dev/v1alpha1/namespaces/{NAMESPACE}/trainingruns"


def run_document(index: int) -> dict:
    return {
        "apiVersion": "trainyard.dev/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": f"run-{index:04d}", "namespace": NAMESPACE},
        "spec": {
            "method": "sft",
            "model": {"source": "hf://sshleifer/tiny-gpt2"},
            "dataset": {"source": "s3://data/train.jsonl"},
            "distributed": {"nodes": 2, "gpusPerNode": 1},
        },
    }


@dataclass
class Result:
    name: str
    latencies: list[float]
    seconds: float
    cpu_seconds: float

    @property
    def p50(self) -> float:
        return statistics.median(self.latencies)

    @property
    def p99(self) -> float:
        return (
            statistics.quantiles(self.latencies, n=100)[98]
            if len(self.latencies) > 1
            else self.latencies[0]
        )

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.seconds


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process: a cost that does not depend on the machine's load."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start(command: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


async def wait_for(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def post_runs(api: TrainyardApiServer, first: int, count: int, concurrency: int) -> None:
    limit = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(str(api.url)) as session:

        async def post(index: int) -> None:
            async with limit, session.post(RUNS_PATH, json=run_document(index)) as response:
                if response.status != 201:
                    raise SystemExit(
                        f"creating run {index}: {response.status} {await response.text()}"
                    )

        await asyncio.gather(*(post(i) for i in range(first, first + count)))


def jobs_created(api: TrainyardApiServer) -> int:
    return sum(
        1
        for r in api.records
        if r.verb == "create" and r.status == 201 and r.path.endswith("/jobs")
    )


def latencies(api: TrainyardApiServer) -> tuple[list[float], float]:
    applied = {
        r.name: r.at
        for r in api.records
        if r.verb == "create" and r.status == 201 and r.path.endswith("/trainingruns")
    }
    jobs = {
        r.name.removesuffix("-attempt-0"): r.at
        for r in api.records
        if r.verb == "create" and r.status == 201 and r.path.endswith("/jobs")
    }
    values = [jobs[name] - at for name, at in applied.items() if name in jobs]
    return values, max(jobs.values()) - min(applied.values())


JOBS_PATH = f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs"
PODS_RID, JOBS_RID = "v1/pods", "batch/v1/jobs"


def pod_document(job: dict, index: int) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{job['metadata']['name']}-{index}",
            "namespace": NAMESPACE,
            "labels": {
                **(job["spec"]["template"]["metadata"].get("labels") or {}),
                "batch.kubernetes.io/job-completion-index": str(index),
            },
            "ownerReferences": [
                {
                    "apiVersion": "batch/v1",
                    "kind": "Job",
                    "name": job["metadata"]["name"],
                    "uid": job["metadata"]["uid"],
                    "controller": True,
                }
            ],
        },
        "spec": {"containers": [{"name": "trainer", "image": "x"}]},
        "status": {"phase": "Running", "podIP": "127.0.0.9"},
    }


async def event_to_status(api: TrainyardApiServer, runs: int) -> tuple[list[float], list[float]]:
    """(completion → Succeeded, worker failure → new attempt's Job) latencies in seconds."""
    loop = asyncio.get_running_loop()
    names = [run_document(i)["metadata"]["name"] for i in range(runs)]
    for name in names:  # every gang runs
        job = api.get(JOBS_RID, NAMESPACE, f"{name}-attempt-0")
        for index in range(2):
            await api.put_object(PODS_RID, pod_document(job, index))
    await asyncio.sleep(2.0)  # the runs are Running; their status writes are done
    events: dict[str, tuple[str, float]] = {}
    for number, name in enumerate(names):
        if number % 2:
            await api.patch_object(
                PODS_RID,
                NAMESPACE,
                f"{name}-attempt-0-1",
                {
                    "status": {
                        "phase": "Failed",
                        "containerStatuses": [
                            {
                                "name": "trainer",
                                "state": {"terminated": {"exitCode": 1, "reason": "Error"}},
                            }
                        ],
                    }
                },
                status=True,
            )
            events[name] = ("restart", loop.time())
        else:
            await api.patch_object(
                JOBS_RID,
                NAMESPACE,
                f"{name}-attempt-0",
                {
                    "status": {
                        "succeeded": 2,
                        "conditions": [{"type": "Complete", "status": "True"}],
                    }
                },
                status=True,
            )
            events[name] = ("success", loop.time())
        await asyncio.sleep(0.005)  # 200 events/s, a busy cluster's pace

    def reacted() -> dict[str, float]:
        seen: dict[str, float] = {}
        for r in api.records:
            if r.verb == "create" and r.status == 201 and r.path == JOBS_PATH:
                name = (r.name or "").removesuffix("-attempt-1")
                if r.name and r.name.endswith("-attempt-1") and name in events:
                    seen.setdefault(name, r.at)
            elif r.verb == "patch" and r.path.endswith("/status") and "/trainingruns/" in r.path:
                name = r.path.split("/")[-2]
                kind, at = events.get(name, ("", 0.0))
                if kind == "success" and r.at >= at:
                    seen.setdefault(name, r.at)
        return seen

    await wait_for(lambda: len(reacted()) >= len(events), 120, "every run to react")
    seen = reacted()
    success = [seen[n] - at for n, (kind, at) in events.items() if kind == "success"]
    restart = [seen[n] - at for n, (kind, at) in events.items() if kind == "restart"]
    return success, restart


async def measure(
    name: str, command: list[str], args: argparse.Namespace, *, watch_runs: int = 0
) -> tuple[Result, list[float]]:
    async with running_api_server() as api:
        await api.put_object(
            "v1/namespaces",
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
        )
        url = str(api.url).rstrip("/")
        log = Path(args.logs) / f"{name}.log"
        process = start([*command, "--server", url], log)
        memory: list[float] = []
        try:
            await wait_for(
                lambda: api.count("watch", r"/trainingruns$") > 0, 60, f"{name} to watch"
            )
            await asyncio.sleep(1.0)  # let the other watches settle
            cpu_before = cpu_seconds(process.pid)
            await post_runs(api, 0, args.runs, args.concurrency)
            await wait_for(lambda: jobs_created(api) >= args.runs, 300, f"{name}: {args.runs} jobs")
            values, seconds = latencies(api)
            await asyncio.sleep(0.5)  # kopf's own bookkeeping patches after the last Job
            cpu = cpu_seconds(process.pid) - cpu_before
            if watch_runs:
                EVENTS.extend([await event_to_status(api, args.runs)])
                await post_runs(api, args.runs, watch_runs - args.runs, args.concurrency)
                await wait_for(
                    lambda: jobs_created(api) >= watch_runs, 600, f"{name}: {watch_runs} jobs"
                )
                for _ in range(int(args.memory_seconds / 0.5)):  # resyncs included
                    memory.append(rss_mb(process.pid))
                    await asyncio.sleep(0.5)
        finally:
            stop(process)
    return Result(name, values, seconds, cpu), memory


EVENTS: list[tuple[list[float], list[float]]] = []


def quantile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


async def standby_writes(args: argparse.Namespace, operator_cmd: list[str]) -> dict[str, int]:
    """Two replicas with kopf peering, 100 runs taken through creation and completion:
    writes at the API server by each replica's runtime, and by kopf (peering keep-alive)."""
    async with running_api_server() as api:
        await api.put_object(
            "v1/namespaces",
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
        )
        api.declare("zalando.org/v1/kopfpeerings", "KopfPeering", namespaced=True, status=False)
        await api.put_object(
            "zalando.org/v1/kopfpeerings",
            {
                "apiVersion": "zalando.org/v1",
                "kind": "KopfPeering",
                "metadata": {"name": "trainyard", "namespace": NAMESPACE},
            },
        )
        url = str(api.url).rstrip("/")
        replicas = []
        for identity, priority in (("replica-a", "200"), ("replica-b", "100")):
            command = [c for c in operator_cmd if c != "--standalone"]
            env_command = ["env", f"POD_ID={identity}", *command, "--priority", priority]
            replicas.append(
                start([*env_command, "--server", url], Path(args.logs) / f"{identity}.log")
            )
            await wait_for(
                lambda identity=identity: (
                    identity
                    in (
                        (api.get("zalando.org/v1/kopfpeerings", NAMESPACE, "trainyard") or {}).get(
                            "status"
                        )
                        or {}
                    )
                ),
                60,
                f"{identity} to join the peering",
            )
        try:
            await asyncio.sleep(2.0)
            await post_runs(api, 0, 100, args.concurrency)
            await wait_for(lambda: jobs_created(api) >= 100, 120, "100 jobs")
            await event_to_status(api, 100)
            await asyncio.sleep(1.0)
        finally:
            for process in replicas:
                stop(process)
        counts: dict[str, int] = {}
        for r in api.writes():
            who = r.agent.split(" ")[0] if r.agent else "?"
            if who.startswith("trainyard-operator/"):
                who = who.removeprefix("trainyard-operator/")
            elif who.startswith("kopf/"):
                who = "kopf (peering keep-alive, both replicas)"
            counts[who] = counts.get(who, 0) + 1
        return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--watch-runs", type=int, default=1000)
    parser.add_argument(
        "--concurrency", type=int, default=20, help="parallel POSTs of the applying client"
    )
    parser.add_argument(
        "--resync-seconds",
        type=float,
        default=600.0,
        help="the operator's resync period (events, not the resync, must drive it)",
    )
    parser.add_argument(
        "--memory-seconds", type=float, default=15.0, help="how long memory is sampled"
    )
    parser.add_argument("--logs", default="/tmp", help="where the operators' logs go")
    parser.add_argument("--skip-peering", action="store_true", help="no two-replica part")
    parser.add_argument(
        "--rounds", type=int, default=3, help="paired rounds (the median ratio is reported)"
    )
    args = parser.parse_args()

    floor_cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "operator_floor.py"),
        "--namespace",
        NAMESPACE,
    ]
    operator_cmd = [
        sys.executable,
        "-c",
        "import sys; from trainyard.cli.operator_cmd import operator_command; sys.exit(operator_command(sys.argv[1:]))",
        "-n",
        NAMESPACE,
        "--standalone",
        "--metrics-port",
        "-1",
        "--resync-seconds",
        str(args.resync_seconds),
        # rank 0 by its pod IP (the fake pods' 127.0.0.9: nothing listens, refused at once)
        "--run-metrics-url",
        "http://{pod_ip}:{port}/metrics",
    ]
    rounds: list[tuple[Result, Result]] = []
    memory: list[float] = []
    for index in range(args.rounds):
        # Alternate who goes first, so a machine that slows down or warms up over the
        # benchmark does not favour one side; memory is sampled in the last round only.
        last = index == args.rounds - 1
        order = ["floor", "trainyard"] if index % 2 == 0 else ["trainyard", "floor"]
        results: dict[str, Result] = {}
        for name in order:
            if name == "floor":
                results[name], _ = asyncio.run(measure("floor", floor_cmd, args))
            else:
                results[name], sampled = asyncio.run(
                    measure(
                        "trainyard", operator_cmd, args, watch_runs=args.watch_runs if last else 0
                    )
                )
                memory = sampled or memory
        rounds.append((results["floor"], results["trainyard"]))

    print(
        f"apply → Job created, {args.runs} TrainingRuns posted {args.concurrency} at a time "
        f"(same API emulation, same machine), {args.rounds} rounds, sides alternating"
    )
    print(f"{'':16}{'p50 ms':>10}{'p99 ms':>10}{'runs/s':>10}{'CPU ms/run':>12}")
    ratios: list[tuple[float, float, float, float]] = []
    for index, (floor, operator) in enumerate(rounds, 1):
        for result in (floor, operator):
            print(
                f"{f'{result.name} #{index}':16}{result.p50 * 1000:>10.1f}{result.p99 * 1000:>10.1f}"
                f"{result.rate:>10.1f}{result.cpu_seconds / args.runs * 1000:>12.2f}"
            )
        ratios.append(
            (
                operator.p50 / floor.p50,
                operator.p99 / floor.p99,
                floor.rate / operator.rate,
                operator.cpu_seconds / floor.cpu_seconds,
            )
        )
    for index, ratio in enumerate(ratios, 1):
        print(
            f"{f'ratio #{index}':16}"
            + "".join(f"{r:>9.2f}×" for r in ratio[:3])
            + f"{ratio[3]:>11.2f}×"
        )
    median = [statistics.median(r[i] for r in ratios) for i in range(4)]
    print(
        f"{'median ratio':16}" + "".join(f"{r:>9.2f}×" for r in median[:3]) + f"{median[3]:>11.2f}×"
        "  (trainyard / floor; runs/s: floor / trainyard). Goal: p50 and p99 ≤ 1.1×"
    )
    rates = [operator.rate for _, operator in rounds]
    print(f"trainyard runs/s: min {min(rates):.0f} (goal ≥ 100)")
    print(f"load average while measuring: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    if memory:
        print(
            f"trainyard operator resident memory watching {args.watch_runs} runs: "
            f"max {max(memory):.0f} MB, last {memory[-1]:.0f} MB (goal ≤ 300 MB)"
        )
    for success, restart in EVENTS:
        print(
            f"event → status, resync {args.resync_seconds:.0f} s: Job Complete → Succeeded "
            f"p50 {statistics.median(success) * 1000:.0f} ms p99 {quantile(success, 99) * 1000:.0f} ms; "
            f"worker Failed → new attempt's Job p50 {statistics.median(restart) * 1000:.0f} ms "
            f"p99 {quantile(restart, 99) * 1000:.0f} ms (goal p99 < 1 s; before: up to the resync, 30 s)"
        )
    if not args.skip_peering:
        counts = asyncio.run(standby_writes(args, operator_cmd))
        print(
            "two replicas with kopf peering, 100 runs created, started, completed or restarted; "
            "writes at the API server by who made them: "
            + ", ".join(f"{who}: {n}" for who, n in sorted(counts.items()))
            + f" — standby (replica-b): {counts.get('replica-b', 0)} (goal 0)"
        )


if __name__ == "__main__":
    main()
