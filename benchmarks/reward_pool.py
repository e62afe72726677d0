"""Code-execution reward throughput: the process pool vs serial scoring of the same batch.

A GRPO batch of 64 completions (small Python programs for 8 tasks: correct, wrong, not
compiling, slow) is scored by `code_execution_reward` with two stages (py_compile, then
the task's test suite), once in the calling process (`workers=0`) and once with a pool
of `--workers` processes. Same batch, same sandbox (strict isolation where available),
same limits. A pool(1) column separates the pool's two gains: pool workers isolate
themselves once (namespaces are made per worker, not per stage) and run in parallel.
The pools are started before timing, as in training, where they live for the whole run;
their start-up is printed separately. Under strict isolation a service(k) column scores
the same batch through the sandbox server (isolation service) with k workers.

    python benchmarks/reward_pool.py                 # 64 completions, 2 workers, 3 repeats
    python benchmarks/reward_pool.py --completions 128 --workers 4 --repeats 5

Goal: pool ≥ 1.8× the serial throughput on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from trainyard.workloads.rewards import code_execution_reward
from trainyard.workloads.rewards.code_execution import local_sandbox_server
from trainyard.workloads.rewards.sandbox import SandboxUnavailable, require_isolation

STAGES = [
    {"name": "compile", "command": ["{python}", "-m", "py_compile", "{file}"], "weight": 0.2},
    {"name": "tests", "command": ["{python}", "{file}"], "weight": 0.8},
]

# (correct solution, wrong solution, test suite); each suite does a little real work.
TASKS = [
    (
        "def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
        "def fib(n):\n    return n\n",
        "assert [fib(i) for i in range(10)] == [0, 1, 1, 2, 3, 5, 8, 13, 21, 34]\n"
        "assert fib(300) % 1000 == fib(300) % 1000\n",
    ),
    (
        "def primes(n):\n    sieve = [True] * (n + 1)\n    out = []\n    for i in range(2, n + 1):\n"
        "        if sieve[i]:\n            out.append(i)\n            for j in range(i * i, n + 1, i):\n"
        "                sieve[j] = False\n    return out\n",
        "def primes(n):\n    return [i for i in range(2, n + 1) if i % 2]\n",
        "assert primes(30) == [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]\nassert len(primes(100000)) == 9592\n",
    ),
    (
        "def is_palindrome(s):\n    t = ''.join(c.lower() for c in s if c.isalnum())\n    return t == t[::-1]\n",
        "def is_palindrome(s):\n    return s == s[::-1]\n",
        "assert is_palindrome('A man, a plan, a canal: Panama')\nassert not is_palindrome('abc')\n",
    ),
    (
        "def merge_sort(xs):\n    if len(xs) <= 1:\n        return list(xs)\n    m = len(xs) // 2\n"
        "    a, b = merge_sort(xs[:m]), merge_sort(xs[m:])\n    out = []\n    while a and b:\n"
        "        out.append(a.pop(0) if a[0] <= b[0] else b.pop(0))\n    return out + a + b\n",
        "def merge_sort(xs):\n    return xs\n",
        "import random\nrandom.seed(0)\nxs = [random.randint(0, 999) for _ in range(3000)]\n"
        "assert merge_sort(xs) == sorted(xs)\n",
    ),
    (
        "def word_count(text):\n    counts = {}\n    for w in text.lower().split():\n"
        "        counts[w] = counts.get(w, 0) + 1\n    return counts\n",
        "def word_count(text):\n    return {w: 1 for w in text.split()}\n",
        "assert word_count('a b A c b a') == {'a': 3, 'b': 2, 'c': 1}\n",
    ),
    (
        "def gcd(a, b):\n    while b:\n        a, b = b, a % b\n    return a\n",
        "def gcd(a, b):\n    return min(a, b)\n",
        "assert gcd(12, 18) == 6\nassert gcd(17, 5) == 1\nassert all(gcd(i, i * 7) == i for i in range(1, 5000))\n",
    ),
    (
        "def flatten(xs):\n    out = []\n    for x in xs:\n"
        "        out.extend(flatten(x) if isinstance(x, list) else [x])\n    return out\n",
        "def flatten(xs):\n    return [x for x in xs if not isinstance(x, list)]\n",
        "assert flatten([1, [2, [3, [4]]], 5]) == [1, 2, 3, 4, 5]\n",
    ),
    (
        "def rle(s):\n    out = []\n    for c in s:\n        if out and out[-1][0] == c:\n"
        "            out[-1][1] += 1\n        else:\n            out.append([c, 1])\n"
        "    return ''.join(f'{c}{n}' for c, n in out)\n",
        "def rle(s):\n    return s\n",
        "assert rle('aaabccdddd') == 'a3b1c2d4'\nassert rle('x' * 100000) == 'x100000'\n",
    ),
]


def build_batch(size: int) -> tuple[list[str], list[str]]:
    """`size` completions cycling through the tasks: 1/2 correct, 1/4 wrong, 1/8 not
    compiling, 1/8 correct but slow (a busy loop before the answer)."""
    completions, tests = [], []
    for i in range(size):
        correct, wrong, suite = TASKS[i % len(TASKS)]
        kind = (i // len(TASKS)) % 8
        if kind < 4:
            code = correct
        elif kind < 6:
            code = wrong
        elif kind == 6:
            code = correct.replace("):", ")", 1)
        else:
            code = "for _ in range(300000):\n    pass\n" + correct
        completions.append(f"Here is my solution:\n```python\n{code}```\n")
        tests.append(suite)
    return completions, tests


def score(
    completions: list[str], tests: list[str], workers: int, isolation: str, url: str | None = None
) -> tuple[float, list]:
    started = time.perf_counter()
    scores = code_execution_reward(
        completions,
        stages=STAGES,
        test_field="tests",
        tests=tests,
        workers=workers,
        isolation="service" if url else isolation,
        service_url=url,
        timeout_seconds=10,
    )
    return time.perf_counter() - started, scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--completions", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--isolation", choices=["auto", "strict", "rlimits"], default="auto")
    options = parser.parse_args()

    isolation = options.isolation
    if isolation == "auto":
        try:
            require_isolation("strict")
            isolation = "strict"
        except SandboxUnavailable:
            isolation = "rlimits"
    completions, tests = build_batch(options.completions)

    # Start the pools (spawned workers import the rewards) before timing, as in training.
    pool_start = {}
    for workers in (1, options.workers):
        started = time.perf_counter()
        score(completions[:2], tests[:2], workers, isolation)
        pool_start[workers] = time.perf_counter() - started

    columns = {"serial": 0, "pool(1)": 1, f"pool({options.workers})": options.workers}
    # isolation service: the same pool in the sandbox server (127.0.0.1, JSON over HTTP),
    # what a trainer under the restricted Pod Security Standard uses.
    urls: dict[str, str] = {}
    if isolation == "strict":
        name = f"service({options.workers})"
        columns[name] = options.workers
        urls[name] = local_sandbox_server(options.workers)
        started = time.perf_counter()
        score(completions[:2], tests[:2], options.workers, isolation, urls[name])
        pool_start["service"] = time.perf_counter() - started
    times: dict[str, list[float]] = {name: [] for name in columns}
    reference = None
    for _ in range(options.repeats):
        for name, workers in columns.items():  # interleaved, so load changes hit all alike
            seconds, scores = score(completions, tests, workers, isolation, urls.get(name))
            times[name].append(seconds)
            assert reference is None or scores == reference, "every mode must score identically"
            reference = scores

    median = {name: statistics.median(values) for name, values in times.items()}
    n = options.completions
    cpus = len(os.sched_getaffinity(0))
    load = os.getloadavg()[0]
    print(
        f"code-execution reward: {n} completions, 2 stages, isolation={isolation}, "
        f"{cpus} CPUs (load average {load:.1f}), median of {options.repeats}"
    )
    print(
        f"mean score {statistics.mean(reference):.3f} (1.0 correct, 0.2 wrong, 0.0 not compiling)"
    )
    print(
        "serial: in the calling process (strict: namespaces made per stage); "
        "pool(k): k spawned workers (strict: namespaces made once per worker)"
    )
    print(f"{'':22}" + "".join(f"{name:>12}" for name in columns))
    print(f"{'seconds per batch':22}" + "".join(f"{median[c]:12.2f}" for c in columns))
    print(f"{'completions / s':22}" + "".join(f"{n / median[c]:12.1f}" for c in columns))
    print(f"{'ms per completion':22}" + "".join(f"{1000 * median[c] / n:12.1f}" for c in columns))
    pool = f"pool({options.workers})"
    print(
        f"{pool} vs serial: {median['serial'] / median[pool]:.2f}x (goal >= 1.8x on 2 cores); "
        f"{pool} vs pool(1): {median['pool(1)'] / median[pool]:.2f}x; "
        f"pool start-up once per run: {pool_start[options.workers]:.2f}s"
    )
    service = f"service({options.workers})"
    if service in median:
        print(
            f"{service} vs {pool}: {median[pool] / median[service]:.2f}x "
            "(the sandbox service's HTTP round trip and JSON against the in-process pool)"
        )


if __name__ == "__main__":
    main()
