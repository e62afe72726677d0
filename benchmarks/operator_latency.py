"""Operator latency: apply → Job created for 200 TrainingRuns, against the framework floor.

Both contestants run as their own process against the same Kubernetes API emulation
(tests/operator/apiserver.py: kmock over HTTP on 127.0.0.1, served from this process):

- floor: `benchmarks/operator_floor.py`, a bare kopf handler making the same API calls
  (status patch, ConfigMap, Service, Job) from a pre-rendered template;
- trainyard: `trainyard operator`, validating, rendering, reconciling, watching children.

200 runs are created as fast as a client can post them; a run's latency is from its
POST arriving at the API server to its Job's POST arriving. Then the operator is given
800 more runs and its resident memory is sampled while it watches all 1,000.

    python benchmarks/operator_latency.py                 # 200 runs, 1,000 for memory
    python benchmarks/operator_latency.py --runs 100 --watch-runs 500

Goals: p50 and p99 ≤ 1.2× the floor, ≥ 50 runs/s, ≤ 300 MB resident with 1,000 runs.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--watch-runs", type=int, default=1000)
    parser.add_argument(
        "--concurrency", type=int, default=20, help="parallel POSTs of the applying client"
    )
    parser.add_argument(
        "--resync-seconds", type=float, default=10.0, help="the operator's resync period"
    )
    parser.add_argument(
        "--memory-seconds", type=float, default=15.0, help="how long memory is sampled"
    )
    parser.add_argument("--logs", default="/tmp", help="where the operators' logs go")
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
        "  (trainyard / floor; runs/s: floor / trainyard). Goal: p50 and p99 ≤ 1.2×"
    )
    rates = [operator.rate for _, operator in rounds]
    print(f"trainyard runs/s: min {min(rates):.0f} (goal ≥ 50)")
    print(f"load average while measuring: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    if memory:
        print(
            f"trainyard operator resident memory watching {args.watch_runs} runs: "
            f"max {max(memory):.0f} MB, last {memory[-1]:.0f} MB (goal ≤ 300 MB)"
        )


if __name__ == "__main__":
    main()
