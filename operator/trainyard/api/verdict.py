"""A promotion gate's verdict: one pure function from criteria and evaluation results.

`judge` is what the PromotionGate controller and `trainyard run` call alike. It reads
`EvalResults` (the `eval.json` the evaluation workload writes beside a checkpoint, or a
run's final metrics as a plain mapping), compares every criterion, and returns a
`GateVerdict` whose fields are the gate's status fields.

The semantics follow Argo Rollouts' analysis runs: a criterion is Passed, Failed or
Inconclusive; any blocking failure fails the gate, otherwise any inconclusive criterion
makes it Inconclusive (neither promoted nor rejected: a person decides by annotation),
and advisory criteria (Argo's dry-run metrics) are reported but never count. A
criterion with `confidence: c` passes only when the one-sided percentile-bootstrap
bound at level c of its margin clears the threshold, and fails only when the opposite
bound misses it; with a baseline the resampling is paired (the same examples are drawn
for both models), so shared noise cancels.

>>> from trainyard.api.gate import PromotionGateSpec
>>> spec = PromotionGateSpec.model_validate({"run": "sft", "criteria": ["eval_loss <= 1.8"]})
>>> now = datetime(2026, 1, 1, tzinfo=UTC)
>>> judge(spec, {"eval_loss": 1.5}, now=now).verdict
'Passed'
>>> judge(spec, {"loss": 1.5}, now=now).message
'eval_loss <= 1.8: eval_loss was not reported (reported: loss)'
"""

from __future__ import annotations

import math
import random
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

from pydantic import Field

from trainyard.api.base import ApiModel
from trainyard.api.gate import Criterion, CriterionResult, PersonDecision, PromotionGateStatus

EVAL_RESULTS_FILE = "eval.json"
"""Name of the evaluation's results beside the checkpoint; written last, so its presence
means the examples file and the report beside it are complete."""
EXAMPLES_FILE = "eval-examples.jsonl"
REPORT_FILE = "eval-report.md"
EVAL_DIR = "eval"
"""The folder inside a checkpoint where its evaluation goes (deleted with the checkpoint)."""
APPROVED_BY_ANNOTATION = "trainyard.dev/approved-by"
REJECTED_BY_ANNOTATION = "trainyard.dev/rejected-by"
DEFAULT_RESAMPLES = 2000

# Reasons (one CamelCase word each) the verdict gives.
CRITERIA_MET = "CriteriaMet"
CRITERION_FAILED = "CriterionFailed"
METRIC_MISSING = "MetricMissing"
INCONCLUSIVE = "Inconclusive"
AWAITING_APPROVAL = "AwaitingApproval"
APPROVED = "Approved"
REJECTED = "Rejected"


def eval_output_uri(checkpoint_uri: str, gate: str | None = None) -> str:
    """Where the evaluation of a checkpoint (s3:// or file://) writes its results; a
    gate's own folder, so two gates with different suites never overwrite each other.

    >>> eval_output_uri("s3://ckpt/runs/sft/final/")
    's3://ckpt/runs/sft/final/eval'
    >>> eval_output_uri("s3://ckpt/runs/sft/final", "sft-release")
    's3://ckpt/runs/sft/final/eval/sft-release'
    """
    base = f"{checkpoint_uri.rstrip('/')}/{EVAL_DIR}"
    return f"{base}/{gate}" if gate else base


def eval_results_uri(checkpoint_uri: str, gate: str | None = None) -> str:
    """The eval.json of a checkpoint's evaluation, which a gate reads.

    >>> eval_results_uri("s3://ckpt/runs/sft/final", "sft-release")
    's3://ckpt/runs/sft/final/eval/sft-release/eval.json'
    """
    return f"{eval_output_uri(checkpoint_uri, gate)}/{EVAL_RESULTS_FILE}"


def with_run_metrics(results: EvalResults, run_metrics: Mapping[str, float]) -> EvalResults:
    """The evaluation's results with the run's final metrics beside them (the evaluation's
    value wins where both have one), so one gate can ask for the training's eval_loss
    and the evaluation's accuracy.

    >>> with_run_metrics(EvalResults(model="m", metrics={"accuracy": 0.7}), {"loss": 1.2}).metrics
    {'loss': 1.2, 'accuracy': 0.7}
    """
    return results.model_copy(update={"metrics": {**run_metrics, **results.metrics}})


class MetricSamples(ApiModel):
    """Per-example values behind one metric, for confidence bounds and paired comparison.

    The metric is `sum(w * v) / sum(w)` over the examples whose value is a number (a
    None or NaN value, e.g. a reward that does not apply, is left out), and
    `exp` of that for `aggregate: exp-mean` (perplexity from per-example losses weighted
    by their token counts).
    """

    ids: list[str]
    """Example ids, shared between the candidate and the baseline for pairing."""
    values: list[float | None]
    """One value per example."""
    weights: list[float] | None = None
    """Weight per example (token counts for eval_loss); equal weights when left out."""
    aggregate: Literal["mean", "exp-mean"] = "mean"
    """How values become the metric."""

    def value(self, indexes: Sequence[int] | None = None) -> float:
        """The metric over all examples, or over these (possibly repeated) indexes.

        >>> MetricSamples(ids=["a", "b"], values=[2.0, 4.0], weights=[1.0, 3.0]).value()
        3.5
        >>> MetricSamples(ids=["a", "b"], values=[1.0, None]).value([0, 1, 0])
        1.0
        """
        picked = range(len(self.values)) if indexes is None else indexes
        weights = self.weights
        total = weight = 0.0
        for i in picked:
            v = self.values[i]
            if v is None or math.isnan(v):
                continue
            w = 1.0 if weights is None else weights[i]
            total += w * v
            weight += w
        if weight == 0:
            return math.nan
        mean = total / weight
        return math.exp(mean) if self.aggregate == "exp-mean" else mean


class EvalResults(ApiModel):
    """`eval.json`: what one evaluation measured on one model (and its baseline)."""

    model_config = ApiModel.model_config | {"extra": "allow"}

    model: str
    """URI of the model evaluated."""
    metrics: dict[str, float]
    """Metric name → value (NaN where a metric could not be computed)."""
    samples: dict[str, MetricSamples] = Field(default_factory=dict)
    """Per-example values of each metric that has them."""
    baseline: EvalResults | None = None
    """The baseline model evaluated on the same examples in the same job."""
    dataset: str | None = None
    """The evaluation data."""
    examples: int | None = None
    """Records evaluated."""
    suite: list[str] = Field(default_factory=list)
    """Suites computed."""
    seed: int | None = None
    """Seed of generation (and of the gate's bootstrap)."""
    generation: dict[str, Any] | None = None
    """Generation settings (maxNewTokens, temperature, topP, batchSize); None without generation."""
    backend: str | None = None
    """What generated the completions: transformers, vllm, or none."""
    created_at: str | None = None
    """When the evaluation finished (RFC 3339)."""
    seconds: float | None = None
    """How long it took."""
    examples_file: str | None = None
    """The per-example records beside eval.json."""
    report_file: str | None = None
    """The Markdown report beside eval.json."""


class DecisionLike(Protocol):
    by: str
    at: datetime


@dataclass(frozen=True)
class Decision:
    """A person's approval or rejection, with when the operator first saw it."""

    by: str
    at: datetime

    def to_status(self) -> PersonDecision:
        return PersonDecision(by=self.by, at=_rfc3339(self.at))


class GateLike(Protocol):
    """What `judge` reads of a gate (PromotionGateSpec, or a pipeline's StageGate)."""

    criteria: list[Criterion]
    manual_approval: bool


@dataclass
class GateVerdict:
    """The outcome of `judge`, field for field the gate's status."""

    verdict: Literal["AwaitingApproval", "Inconclusive", "Passed", "Failed"]
    reason: str
    message: str
    results: list[CriterionResult]
    awaiting_since: datetime | None = None
    decided_at: datetime | None = None
    approval: Decision | None = None
    rejection: Decision | None = None
    criteria_outcome: Literal["Passed", "Failed", "Inconclusive"] = "Passed"
    """What the criteria alone said, before approvals."""
    notes: list[str] = field(default_factory=list)

    @property
    def decided(self) -> bool:
        return self.verdict in ("Passed", "Failed")

    def apply(self, status: PromotionGateStatus | None = None) -> PromotionGateStatus:
        """The status with this verdict's fields written over it (an earlier decision
        time is kept)."""
        status = status or PromotionGateStatus()
        decided_at = status.decided_at if status.decided_at and self.decided else None
        return status.model_copy(
            update={
                "verdict": self.verdict,
                "reason": self.reason,
                "message": self.message,
                "results": self.results,
                "awaiting_since": _rfc3339(self.awaiting_since) if self.awaiting_since else None,
                "decided_at": decided_at
                or (_rfc3339(self.decided_at) if self.decided_at else None),
                "approval": self.approval.to_status() if self.approval else None,
                "rejection": self.rejection.to_status() if self.rejection else None,
            }
        )


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _number(value: float) -> str:
    return f"{value:.4g}"


def _signed(value: float) -> str:
    return f"{value:+.4g}"


def quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of sorted values (numpy's default method).

    >>> quantile([1.0, 2.0, 3.0, 4.0], 0.5)
    2.5
    """
    position = (len(sorted_values) - 1) * q
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def margin_of(criterion: Criterion, observed: float, threshold: float) -> float | None:
    """How far an observed value clears the threshold: positive when it holds.

    >>> margin_of(Criterion.model_validate("eval_loss <= 1.8"), 1.5, 1.8)
    0.30000000000000004
    """
    if criterion.op in (">", ">="):
        return observed - threshold
    if criterion.op in ("<", "<="):
        return threshold - observed
    return None


def bootstrap_margin(
    criterion: Criterion,
    candidate: MetricSamples,
    baseline: MetricSamples | None,
    *,
    confidence: float,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> tuple[float, float, int]:
    """(lower, upper, examples): the percentile-bootstrap bounds of the margin at
    `confidence` each side, resampling examples (paired by id with the baseline)."""
    if baseline is None:
        cand, base = candidate, None
    else:
        where = {example_id: i for i, example_id in enumerate(baseline.ids)}
        shared = [(i, where[e]) for i, e in enumerate(candidate.ids) if e in where]
        cand = candidate.model_copy(update=_pick(candidate, [i for i, _ in shared]))
        base = baseline.model_copy(update=_pick(baseline, [j for _, j in shared]))
    n = len(cand.values)
    if n == 0:
        return math.nan, math.nan, 0
    rng = random.Random(seed)
    candidate_parts = _contributions(cand)
    baseline_parts = _contributions(base) if base is not None else None
    margins = []
    for _ in range(resamples):
        indexes = _draw(rng, n)
        observed = _resampled(cand, candidate_parts, indexes)
        threshold = criterion.threshold(
            _resampled(base, baseline_parts, indexes) if base is not None else None
        )
        if threshold is None or math.isnan(observed) or math.isnan(threshold):
            continue
        margins.append(margin_of(criterion, observed, threshold))
    if not margins:
        return math.nan, math.nan, n
    margins.sort()
    return quantile(margins, 1 - confidence), quantile(margins, confidence), n


def _draw(rng: random.Random, n: int) -> list[int]:
    """n indexes drawn uniformly with replacement from range(n), the same on every
    machine for one seed: 32 random bits each, reduced modulo n (a bias below n / 2**32),
    unpacked in one call.

    >>> _draw(random.Random(0), 5) == _draw(random.Random(0), 5)
    True
    """
    raw = rng.getrandbits(32 * n).to_bytes(4 * n, "little")
    return [word % n for word in struct.unpack(f"<{n}I", raw)]


def _contributions(samples: MetricSamples) -> tuple[list[float], list[float] | None]:
    """Per example: (weight × value, weight), zero for a value left out; a resample's
    metric is then two sums over its indexes (`MetricSamples.value`, but in C loops)."""
    if samples.weights is None and all(v is not None and not math.isnan(v) for v in samples.values):
        return [float(v) for v in samples.values], None
    weighted, weights = [], []
    for i, v in enumerate(samples.values):
        w = 1.0 if samples.weights is None else samples.weights[i]
        if v is None or math.isnan(v):
            weighted.append(0.0)
            weights.append(0.0)
        else:
            weighted.append(w * v)
            weights.append(w)
    return weighted, weights


def _resampled(
    samples: MetricSamples, parts: tuple[list[float], list[float] | None], indexes: list[int]
) -> float:
    weighted, weights = parts
    # Equal weights and nothing left out (accuracy, rates): the weight is the count.
    weight = len(indexes) if weights is None else sum(map(weights.__getitem__, indexes))
    if weight == 0:
        return math.nan
    mean = sum(map(weighted.__getitem__, indexes)) / weight
    return math.exp(mean) if samples.aggregate == "exp-mean" else mean


def _pick(samples: MetricSamples, indexes: list[int]) -> dict[str, Any]:
    return {
        "ids": [samples.ids[i] for i in indexes],
        "values": [samples.values[i] for i in indexes],
        "weights": None if samples.weights is None else [samples.weights[i] for i in indexes],
    }


def _metrics_of(results: EvalResults | Mapping[str, float] | None) -> Mapping[str, float]:
    if results is None:
        return {}
    return results.metrics if isinstance(results, EvalResults) else results


def _samples_of(results: EvalResults | Mapping[str, float] | None) -> Mapping[str, MetricSamples]:
    return results.samples if isinstance(results, EvalResults) else {}


def judge_criterion(
    criterion: Criterion,
    results: EvalResults | Mapping[str, float],
    baseline: EvalResults | Mapping[str, float] | None = None,
    *,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> CriterionResult:
    """One criterion against the observed values (and the baseline's)."""
    metrics = _metrics_of(results)
    base_metrics = _metrics_of(baseline)
    name = criterion.metric
    common = {
        "criterion": criterion.text,
        "metric": name,
        "confidence": criterion.confidence,
        "advisory": criterion.advisory,
    }

    def failed(message: str, **fields: Any) -> CriterionResult:
        return CriterionResult(**common, **fields, result="Failed", message=message)

    observed = metrics.get(name)
    if observed is None:
        reported = ", ".join(sorted(metrics)) or "nothing"
        return failed(f"{name} was not reported (reported: {reported})")
    observed = float(observed)
    if math.isnan(observed):
        return failed(f"{name} is NaN", observed=None)
    base_value = None
    if criterion.baseline is not None:
        if baseline is None:
            return failed(f"{name}: no baseline was evaluated", observed=observed)
        base_value = base_metrics.get(name)
        if base_value is None:
            reported = ", ".join(sorted(base_metrics)) or "nothing"
            return failed(
                f"the baseline did not report {name} (reported: {reported})", observed=observed
            )
        base_value = float(base_value)
        if math.isnan(base_value):
            return failed(f"the baseline's {name} is NaN", observed=observed)
    threshold = criterion.threshold(base_value)
    assert threshold is not None
    margin = margin_of(criterion, observed, threshold)
    point = {
        "observed": observed,
        "threshold": threshold,
        "baseline": base_value,
        "margin": margin,
    }
    seen = f"observed {_number(observed)}" + (
        f", baseline {_number(base_value)}" if base_value is not None else ""
    )
    if margin is not None:
        seen += f", margin {_signed(margin)}"

    if criterion.confidence is None:
        held = criterion.holds(observed, threshold)
        return CriterionResult(
            **common,
            **point,
            result="Passed" if held else "Failed",
            message=f"{seen}: {'held' if held else 'missed'}",
        )

    candidate_samples = _samples_of(results).get(name)
    if candidate_samples is None:
        return failed(
            f"{name}: a {criterion.confidence:g} confidence bound needs per-example values, "
            "and none were recorded for it",
            **point,
        )
    baseline_samples = None
    if criterion.baseline is not None:
        baseline_samples = _samples_of(baseline).get(name)
        if baseline_samples is None:
            return failed(
                f"{name}: the paired bound needs the baseline's per-example values, "
                "and none were recorded",
                **point,
            )
    lower, upper, n = bootstrap_margin(
        criterion,
        candidate_samples,
        baseline_samples,
        confidence=criterion.confidence,
        resamples=resamples,
        seed=seed,
    )
    if math.isnan(lower):
        return failed(f"{name}: no examples to bound (paired examples: {n})", samples=n, **point)
    strict = criterion.op in ("<", ">")
    passed = lower > 0 if strict else lower >= 0
    missed = upper <= 0 if strict else upper < 0
    level = f"{criterion.confidence * 100:g}%"
    interval = f"{seen} [{_signed(lower)}, {_signed(upper)}] at {level}, {n} examples"
    if passed:
        outcome, verdict = "Passed", "the bound clears the threshold"
    elif missed:
        outcome, verdict = "Failed", "the bound misses the threshold"
    else:
        outcome, verdict = "Inconclusive", "the interval straddles the threshold"
    return CriterionResult(
        **common,
        **point,
        margin_lower=lower,
        margin_upper=upper,
        samples=n,
        result=outcome,
        message=f"{interval}: {verdict}",
    )


def judge(
    gate: GateLike,
    results: EvalResults | Mapping[str, float],
    baseline: EvalResults | Mapping[str, float] | None = None,
    *,
    now: datetime,
    approval: DecisionLike | None = None,
    rejection: DecisionLike | None = None,
    awaiting_since: datetime | None = None,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> GateVerdict:
    """The gate's verdict on these results.

    `baseline` defaults to `results.baseline`. `awaiting_since` is the time an earlier
    call returned (the criteria first met or inconclusive); an `approval` counts only
    when first seen after it, so a person approves what they have seen. A `rejection`
    fails the gate whenever it is given.
    """
    if baseline is None and isinstance(results, EvalResults):
        baseline = results.baseline
    judged = [
        judge_criterion(c, results, baseline, resamples=resamples, seed=seed + i)
        for i, c in enumerate(gate.criteria)
    ]
    blocking = [r for r in judged if not r.advisory]
    require = getattr(gate, "require", "all")
    outcomes = {r.result for r in blocking}
    if require == "any" and blocking:
        outcome = (
            "Passed"
            if "Passed" in outcomes
            else ("Inconclusive" if "Inconclusive" in outcomes else "Failed")
        )
    else:
        outcome = (
            "Failed"
            if "Failed" in outcomes
            else ("Inconclusive" if "Inconclusive" in outcomes else "Passed")
        )
    summary = _summary(judged, outcome, require)
    reject = Decision(rejection.by, rejection.at) if rejection else None
    seen = Decision(approval.by, approval.at) if approval else None
    # Both annotations are recorded as seen, so the next call knows when they appeared.
    common = {
        "results": judged,
        "criteria_outcome": outcome,
        "rejection": reject,
        "approval": seen,
    }

    if reject is not None:
        return GateVerdict(
            "Failed",
            REJECTED,
            f"rejected by {reject.by} at {_rfc3339(reject.at)}; {summary}",
            decided_at=now,
            **common,
        )
    if outcome == "Failed":
        missing = any(
            r.result == "Failed" and r.observed is None and not r.advisory for r in judged
        )
        return GateVerdict(
            "Failed",
            METRIC_MISSING if missing else CRITERION_FAILED,
            summary,
            decided_at=now,
            **common,
        )
    if outcome == "Passed" and not gate.manual_approval:
        return GateVerdict("Passed", CRITERIA_MET, summary, decided_at=now, **common)

    since = awaiting_since or now
    if seen is not None and seen.at > since:
        how = "criteria met" if outcome == "Passed" else "criteria inconclusive"
        return GateVerdict(
            "Passed",
            APPROVED,
            f"approved by {seen.by} at {_rfc3339(seen.at)} ({how}); {summary}",
            awaiting_since=since,
            decided_at=now,
            **common,
        )
    waiting = (
        f"waiting for the annotation {APPROVED_BY_ANNOTATION}: NAME "
        f"(or {REJECTED_BY_ANNOTATION}: NAME)"
    )
    if approval is not None:
        waiting = (
            f"the approval by {approval.by} (seen {_rfc3339(approval.at)}) came before the "
            f"criteria were judged at {_rfc3339(since)} and does not count; remove and set "
            f"{APPROVED_BY_ANNOTATION} again to approve what they show"
        )
    verdict, reason = (
        ("AwaitingApproval", AWAITING_APPROVAL)
        if outcome == "Passed"
        else ("Inconclusive", INCONCLUSIVE)
    )
    return GateVerdict(verdict, reason, f"{summary}; {waiting}", awaiting_since=since, **common)


def _summary(judged: list[CriterionResult], outcome: str, require: str) -> str:
    """The criteria that decided, one clause each: the failures when it failed, the
    inconclusive ones when inconclusive, a count when they passed."""
    blocking = [r for r in judged if not r.advisory]
    if outcome == "Passed":
        held = sum(r.result == "Passed" for r in blocking)
        text = f"{held} of {len(blocking)} criteria passed" + (
            " (any one suffices)" if require == "any" else ""
        )
        deciding = []
    else:
        deciding = [r for r in blocking if r.result == outcome]
        text = ""
    parts = [f"{r.criterion}: {r.message}" for r in deciding]
    advisory = [r for r in judged if r.advisory and r.result != "Passed"]
    parts += [f"{r.criterion}: {r.result.lower()}, {r.message}" for r in advisory]
    return "; ".join([text, *parts] if text else parts)


def seen_decisions(
    annotations: Mapping[str, str] | None, status: PromotionGateStatus | None, now: datetime
) -> tuple[Decision | None, Decision | None]:
    """(approval, rejection) from the gate's annotations, each with the time it was first
    seen: the time recorded in the status while the annotation names the same person,
    else now. A removed annotation is forgotten, so setting it again is a new approval.

    >>> t0, t1 = datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 2, tzinfo=UTC)
    >>> first, _ = seen_decisions({APPROVED_BY_ANNOTATION: "ann"}, None, t0)
    >>> status = PromotionGateStatus(approval=first.to_status())
    >>> seen_decisions({APPROVED_BY_ANNOTATION: "ann"}, status, t1)[0].at == t0
    True
    >>> seen_decisions({APPROVED_BY_ANNOTATION: "bo"}, status, t1)[0].at == t1
    True
    """
    annotations = annotations or {}

    def one(key: str, recorded: PersonDecision | None) -> Decision | None:
        by = (annotations.get(key) or "").strip()
        if not by:
            return None
        if recorded is not None and recorded.by == by:
            return Decision(by, datetime.fromisoformat(recorded.at.replace("Z", "+00:00")))
        return Decision(by, now)

    return (
        one(APPROVED_BY_ANNOTATION, status.approval if status else None),
        one(REJECTED_BY_ANNOTATION, status.rejection if status else None),
    )


def awaiting_since_of(status: PromotionGateStatus | None) -> datetime | None:
    """The waiting time an earlier verdict recorded, for the next call of `judge`."""
    if status is None or not status.awaiting_since:
        return None
    return datetime.fromisoformat(status.awaiting_since.replace("Z", "+00:00"))
