"""The evaluation suites over one model: rows in, metrics and per-example records out.

`evaluate_rows` is the whole computation for one model; it takes a `complete` function
(prompts → completions) so the scoring can be checked with a fixed predictor as well as
a real model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from trainyard.api.gate import Evaluation
from trainyard.api.verdict import MetricSamples
from trainyard.workloads.evaluate import scoring

GENERATING_SUITES = ("accuracy", "refusal_rate", "reward")


@dataclass
class SuiteOutput:
    """Metrics, their per-example values, and one record per example."""

    metrics: dict[str, float] = field(default_factory=dict)
    samples: dict[str, MetricSamples] = field(default_factory=dict)
    examples: list[dict[str, Any]] = field(default_factory=list)

    def add(self, name: str, samples: MetricSamples) -> None:
        self.samples[name] = samples
        self.metrics[name] = samples.value()


def example_ids(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The `id` column where rows have one (so a baseline pairs by it), else the row number."""
    return [str(row["id"]) if row.get("id") is not None else str(i) for i, row in enumerate(rows)]


def needs_generation(evaluation: Evaluation) -> bool:
    return bool(set(evaluation.suite) & set(GENERATING_SUITES) or evaluation.metrics)


def evaluate_rows(
    rows: list[dict[str, Any]],
    evaluation: Evaluation,
    *,
    complete: Callable[[list[Any]], list[str]] | None = None,
    losses: Callable[[list[tuple[str, str]]], list[tuple[float, int]]] | None = None,
    render: Callable[..., str] | None = None,
    rewards: tuple[Sequence[Any], Sequence[float]] | None = None,
    user_metrics: dict[str, Callable[..., Any]] | None = None,
) -> SuiteOutput:
    """Every suite of `evaluation` on these rows.

    `complete(prompts)` returns one completion per prompt (text or chat messages);
    `losses(segments)` returns (summed NLL, tokens) per (context, full text);
    `rewards` is (reward functions, weights) from the rewards library.
    """
    out = SuiteOutput()
    ids = example_ids(rows)
    out.examples = [{"id": example_id} for example_id in ids]
    suite = set(evaluation.suite)

    if "perplexity" in suite:
        if losses is None:
            raise ValueError("the perplexity suite needs a model to score tokens with")
        segments = []
        for i, row in enumerate(rows):
            try:
                segments.append(scoring.loss_segments(row, render))
            except scoring.RowError as error:
                raise scoring.RowError(f"row {ids[i]}: {error}") from None
        scored = losses(segments)
        values = [nll / n if n else None for nll, n in scored]
        weights = [float(n) for _, n in scored]
        out.add("eval_loss", MetricSamples(ids=ids, values=values, weights=weights))
        out.add(
            "perplexity",
            MetricSamples(ids=ids, values=values, weights=weights, aggregate="exp-mean"),
        )
        for record, (nll, n) in zip(out.examples, scored, strict=True):
            record.update(loss=nll / n if n else None, tokens=n)

    if not needs_generation(evaluation):
        return out
    if complete is None:
        raise ValueError(
            "the accuracy, refusal_rate and reward suites need a model to generate with"
        )
    prompts = [scoring.row_prompt(row) for row in rows]
    missing = [ids[i] for i, p in enumerate(prompts) if p is None]
    if missing:
        raise scoring.RowError(
            f"rows {', '.join(missing[:5])}{'…' if len(missing) > 5 else ''} have no prompt; "
            "generation suites need prompt, messages, question or instruction columns"
        )
    completions = complete(prompts)
    for record, prompt, completion in zip(out.examples, prompts, completions, strict=True):
        record.update(prompt=prompt, completion=completion)

    if "accuracy" in suite:
        _accuracy(rows, ids, completions, evaluation, out)
    if "refusal_rate" in suite:
        _refusal(rows, ids, completions, evaluation, out)
    if "reward" in suite:
        _reward(rows, ids, prompts, completions, rewards, out)
    for name, function in (user_metrics or {}).items():
        columns = _columns(rows)
        values = scoring.checked_values(
            function(completions=completions, prompts=prompts, **columns), len(rows), name
        )
        out.add(name, MetricSamples(ids=ids, values=values))
        for record, value in zip(out.examples, values, strict=True):
            record.setdefault("metrics", {})[name] = value
    return out


def _columns(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    names = {key for row in rows for key in row}
    names -= {"prompt", "completion", "completions", "prompts"}
    return {name: [row.get(name) for row in rows] for name in sorted(names)}


def _accuracy(rows, ids, completions, evaluation: Evaluation, out: SuiteOutput) -> None:
    options = evaluation.accuracy
    values: list[float | None] = []
    for i, (row, completion) in enumerate(zip(rows, completions, strict=True)):
        answer = scoring.row_answer(row)
        if answer is None:
            values.append(None)
            continue
        match = scoring.resolve_match(options.match, answer, row)
        choices = row.get("choices")
        predicted = scoring.extract_answer(completion, match, options.pattern, choices)
        correct = scoring.answers_match(
            completion,
            answer,
            match,
            pattern=options.pattern,
            choices=choices,
            ignore_case=options.ignore_case,
        )
        values.append(1.0 if correct else 0.0)
        out.examples[i].update(
            answer=scoring.gold_answer(answer, match, choices), predicted=predicted, correct=correct
        )
    if all(v is None for v in values):
        raise scoring.RowError(
            "accuracy needs a labelled answer: an answer, label, output or completion column, "
            "or chat messages ending with the assistant's answer"
        )
    out.add("accuracy", MetricSamples(ids=ids, values=values))


def _refusal(rows, ids, completions, evaluation: Evaluation, out: SuiteOutput) -> None:
    patterns = evaluation.refusal_patterns or scoring.DEFAULT_REFUSAL_PATTERNS
    must: list[float | None] = []
    must_not: list[float | None] = []
    for i, (row, completion) in enumerate(zip(rows, completions, strict=True)):
        should = scoring.should_refuse(row, i)
        refused = scoring.is_refusal(completion, patterns)
        must.append(float(refused) if should else None)
        must_not.append(None if should else float(refused))
        out.examples[i].update(should_refuse=should, refused=refused)
    out.add("refusal_rate", MetricSamples(ids=ids, values=must))
    out.add("over_refusal_rate", MetricSamples(ids=ids, values=must_not))


def _reward(rows, ids, prompts, completions, rewards, out: SuiteOutput) -> None:
    from trainyard.workloads.rewards import score_rewards

    if not rewards or not rewards[0]:
        raise ValueError(
            "the reward suite needs reward functions: the judged run's rewards (grpo/rloo "
            "rewards) or --rewards FILE"
        )
    functions, weights = rewards
    # TRL hands chat completions as a list of messages when the prompts are chat.
    as_trl = [
        [{"role": "assistant", "content": c}] if isinstance(p, list) else c
        for p, c in zip(prompts, completions, strict=True)
    ]
    columns = _columns(rows)
    columns["prompts"] = prompts
    per_function = score_rewards(functions, as_trl, **columns)
    # The weighted sum as TRL (and rewards.combined_reward) computes it, without scoring
    # twice: a None or NaN adds nothing; no applicable reward leaves the example out.
    total_values: list[float | None] = []
    for i in range(len(rows)):
        parts = [
            weight * scores[i]
            for weight, scores in zip(weights, per_function.values(), strict=True)
            if scores[i] is not None and not math.isnan(scores[i])
        ]
        total_values.append(sum(parts) if parts else None)
    out.add("reward_mean", MetricSamples(ids=ids, values=total_values))
    out.metrics["reward"] = out.metrics["reward_mean"]
    for name, scores in per_function.items():
        values = [None if s is None or math.isnan(s) else float(s) for s in scores]
        out.add(f"rewards/{name}/mean", MetricSamples(ids=ids, values=values))
        function = next(f for f in functions if f.__name__ == name)
        if getattr(getattr(function, "function", None), "__name__", "") == "code_execution_reward":
            passed = [None if v is None else float(v >= 1.0) for v in values]
            out.add(f"rewards/{name}/pass_rate", MetricSamples(ids=ids, values=passed))
    for i, record in enumerate(out.examples):
        record["reward"] = total_values[i]
        record["rewards"] = {name: scores[i] for name, scores in per_function.items()}
