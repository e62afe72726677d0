"""Evaluation and verdict costs, side by side.

1. Generation: the evaluation workload's batched transformers generation of the same
   prompts at batch size 1 and at `--batch-size`, on the built-in tiny model (CPU).
   Greedy decoding, `--new-tokens` tokens, the same completions either way.
2. Verdict: the gate's bootstrap (2000 resamples, paired with a baseline) as `judge`
   computes it (per-example contributions summed over indexes drawn from one
   getrandbits call) against the straightforward version (`random.choices` and
   `MetricSamples.value` per resample), at several sample sizes.

    python benchmarks/evaluation.py
    python benchmarks/evaluation.py --prompts 128 --batch-size 32 --sizes 1000,5000

Goals: batched generation ≥ 3× the prompts/s of batch size 1; the judge's bootstrap
≥ 1.5× the straightforward one (an operator judges in its reconcile loop).
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time
from types import SimpleNamespace

from trainyard.api.gate import Criterion
from trainyard.api.verdict import DEFAULT_RESAMPLES, MetricSamples, bootstrap_margin, quantile


def generation(prompts: int, batch_size: int, new_tokens: int, repeats: int) -> None:
    from trainyard.workloads.builtin import build_dataset_rows
    from trainyard.workloads.evaluate import model as models

    loaded = models.load_model("builtin://tiny-qwen2")
    rows = build_dataset_rows("prompts")
    texts = [rows[i % len(rows)]["prompt"] for i in range(prompts)]
    rendered = [models.render_prompt(loaded, [{"role": "user", "content": t}]) for t in texts]
    print(f"generation: {prompts} prompts, {new_tokens} new tokens, greedy, tiny-qwen2 on CPU")
    print(f"{'batch':>6} {'seconds':>9} {'prompts/s':>10}")
    rates = {}
    for size in (1, batch_size):
        settings = SimpleNamespace(
            max_new_tokens=new_tokens, temperature=0.0, top_p=1.0, batch_size=size
        )
        models.generate(loaded, rendered[:size], settings, seed=0)  # warm-up
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            models.generate(loaded, rendered, settings, seed=0)
            times.append(time.perf_counter() - started)
        seconds = statistics.median(times)
        rates[size] = prompts / seconds
        print(f"{size:>6} {seconds:>9.2f} {rates[size]:>10.1f}")
    print(f"batched / batch 1: {rates[batch_size] / rates[1]:.1f}×  (goal ≥ 3×)\n")


def straightforward_bootstrap(
    criterion: Criterion, cand: MetricSamples, base: MetricSamples, confidence: float, seed: int
) -> tuple[float, float]:
    rng = random.Random(seed)
    n = len(cand.values)
    margins = []
    for _ in range(DEFAULT_RESAMPLES):
        indexes = rng.choices(range(n), k=n)
        observed = cand.value(indexes)
        threshold = criterion.threshold(base.value(indexes))
        margins.append(observed - threshold)
    margins.sort()
    return quantile(margins, 1 - confidence), quantile(margins, confidence)


def verdict(sizes: list[int], repeats: int) -> None:
    criterion = Criterion.model_validate(
        {"metric": "accuracy", "op": ">=", "baseline": {"offset": -0.01}, "confidence": 0.95}
    )
    print(f"verdict: paired bootstrap, {DEFAULT_RESAMPLES} resamples, 0/1 per-example values")
    print(
        f"{'examples':>8} {'judge s':>9} {'choices s':>10} {'ratio':>6}  bounds (judge | choices)"
    )
    for n in sizes:
        rng = random.Random(n)
        ids = [str(i) for i in range(n)]
        base = MetricSamples(ids=ids, values=[float(rng.random() < 0.70) for _ in ids])
        cand = MetricSamples(ids=ids, values=[float(rng.random() < 0.72) for _ in ids])
        ours, theirs = [], []
        for _ in range(repeats):
            started = time.perf_counter()
            lower, upper, _ = bootstrap_margin(criterion, cand, base, confidence=0.95)
            ours.append(time.perf_counter() - started)
            started = time.perf_counter()
            ref_lower, ref_upper = straightforward_bootstrap(criterion, cand, base, 0.95, 0)
            theirs.append(time.perf_counter() - started)
        a, b = statistics.median(ours), statistics.median(theirs)
        print(
            f"{n:>8} {a:>9.3f} {b:>10.3f} {b / a:>5.1f}×  "
            f"[{lower:+.3f}, {upper:+.3f}] | [{ref_lower:+.3f}, {ref_upper:+.3f}]"
        )
        assert not math.isnan(lower)
    print("goal: ratio ≥ 1.5×; bounds agree to bootstrap noise (different random streams)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--sizes", default="200,1000,5000")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    generation(args.prompts, args.batch_size, args.new_tokens, args.repeats)
    verdict([int(s) for s in args.sizes.split(",")], args.repeats)


if __name__ == "__main__":
    main()
