"""The verdict function, table by table: operators, all/any, missing and NaN metrics,
baselines, confidence bounds, advisory criteria, approval before and after."""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime, timedelta

import pytest

from trainyard.api.gate import Criterion, PromotionGateSpec, PromotionGateStatus
from trainyard.api.verdict import (
    Decision,
    EvalResults,
    MetricSamples,
    awaiting_since_of,
    bootstrap_margin,
    judge,
    judge_criterion,
    seen_decisions,
)

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


def gate(*criteria, require="all", manual=False, baseline=False) -> PromotionGateSpec:
    spec = {"run": "sft", "criteria": list(criteria), "require": require, "manualApproval": manual}
    if baseline or any(isinstance(c, dict) and "confidence" in c for c in criteria):
        spec["evaluation"] = {"suite": ["accuracy"], "dataset": "builtin://datasets/alpaca"}
        if baseline:
            spec["evaluation"]["baseline"] = {"source": "builtin://tiny-qwen2"}
    return PromotionGateSpec.model_validate(spec)


def bernoulli(ids_prefix: str, hits: list[int]) -> MetricSamples:
    return MetricSamples(ids=[f"{ids_prefix}{i}" for i in range(len(hits))], values=hits)


# ------------------------------------------------------------------ operators

OPERATOR_CASES = [
    ("lt-holds", "loss < 2", 1.9, "Passed"),
    ("lt-equal-misses", "loss < 2", 2.0, "Failed"),
    ("le-equal-holds", "loss <= 2", 2.0, "Passed"),
    ("le-misses", "loss <= 2", 2.1, "Failed"),
    ("gt-holds", "acc > 0.5", 0.51, "Passed"),
    ("gt-equal-misses", "acc > 0.5", 0.5, "Failed"),
    ("ge-equal-holds", "acc >= 0.5", 0.5, "Passed"),
    ("ge-misses", "acc >= 0.5", 0.49, "Failed"),
    ("eq-holds", "steps == 10", 10.0, "Passed"),
    ("eq-misses", "steps == 10", 9.0, "Failed"),
    ("ne-holds", "steps != 0", 3.0, "Passed"),
    ("ne-misses", "steps != 0", 0.0, "Failed"),
    ("negative-threshold", "reward_mean >= -0.5", -0.25, "Passed"),
    ("exponent-threshold", "kl <= 1e-2", 0.02, "Failed"),
]


@pytest.mark.parametrize(
    "criterion,observed,expected",
    [c[1:] for c in OPERATOR_CASES],
    ids=[c[0] for c in OPERATOR_CASES],
)
def test_every_operator(criterion, observed, expected):
    metric = criterion.split()[0]
    verdict = judge(gate(criterion), {metric: observed}, now=NOW)
    assert verdict.verdict == expected
    assert verdict.results[0].observed == observed
    assert verdict.decided_at == NOW


def test_margin_says_by_how_much_in_the_good_direction():
    verdict = judge(
        gate("eval_loss <= 1.8", "accuracy >= 0.6"), {"eval_loss": 1.5, "accuracy": 0.5}, now=NOW
    )
    loss, accuracy = verdict.results
    assert loss.margin == pytest.approx(0.3) and loss.result == "Passed"
    assert accuracy.margin == pytest.approx(-0.1) and accuracy.result == "Failed"
    assert verdict.reason == "CriterionFailed"
    assert verdict.message == "accuracy >= 0.6: observed 0.5, margin -0.1: missed"


# ------------------------------------------------------------------ all / any

ALL_ANY_CASES = [
    ("all-both-hold", "all", (1.0, 0.9), "Passed"),
    ("all-one-fails", "all", (3.0, 0.9), "Failed"),
    ("any-one-holds", "any", (3.0, 0.9), "Passed"),
    ("any-none-holds", "any", (3.0, 0.1), "Failed"),
    ("any-missing-one-other-holds", "any", (None, 0.9), "Passed"),
]


@pytest.mark.parametrize(
    "require,values,expected", [c[1:] for c in ALL_ANY_CASES], ids=[c[0] for c in ALL_ANY_CASES]
)
def test_all_and_any(require, values, expected):
    metrics = {
        k: v for k, v in zip(("eval_loss", "accuracy"), values, strict=True) if v is not None
    }
    verdict = judge(gate("eval_loss <= 2", "accuracy >= 0.5", require=require), metrics, now=NOW)
    assert verdict.verdict == expected


# ------------------------------------------------------------------ missing, NaN


def test_a_missing_metric_fails_naming_it_and_what_was_reported():
    verdict = judge(gate("refusal_rate >= 0.95"), {"eval_loss": 1.0, "accuracy": 0.7}, now=NOW)
    assert (verdict.verdict, verdict.reason) == ("Failed", "MetricMissing")
    assert verdict.message == (
        "refusal_rate >= 0.95: refusal_rate was not reported (reported: accuracy, eval_loss)"
    )
    assert verdict.results[0].observed is None


def test_a_nan_metric_fails_naming_it():
    verdict = judge(gate("eval_loss <= 2"), {"eval_loss": math.nan}, now=NOW)
    assert (verdict.verdict, verdict.reason) == ("Failed", "MetricMissing")
    assert "eval_loss is NaN" in verdict.message


def test_nothing_reported_at_all():
    verdict = judge(gate("eval_loss <= 2"), {}, now=NOW)
    assert verdict.message == "eval_loss <= 2: eval_loss was not reported (reported: nothing)"


# ------------------------------------------------------------------ baseline

BASELINE_CASES = [
    ("within-2-percent", "eval_loss <= baseline * 1.02", 2.03, 2.0, "Passed", 2.04),
    ("worse-than-2-percent", "eval_loss <= baseline * 1.02", 2.05, 2.0, "Failed", 2.04),
    ("offset-below", "accuracy >= baseline - 0.01", 0.695, 0.70, "Passed", 0.69),
    ("must-improve", "accuracy > baseline", 0.70, 0.70, "Failed", 0.70),
    ("scale-and-offset", "reward_mean >= baseline * 0.5 + 0.1", 0.31, 0.4, "Passed", 0.3),
]


@pytest.mark.parametrize(
    "criterion,observed,base,expected,threshold",
    [c[1:] for c in BASELINE_CASES],
    ids=[c[0] for c in BASELINE_CASES],
)
def test_baseline_relative(criterion, observed, base, expected, threshold):
    metric = criterion.split()[0]
    verdict = judge(gate(criterion, baseline=True), {metric: observed}, {metric: base}, now=NOW)
    assert verdict.verdict == expected
    assert verdict.results[0].threshold == pytest.approx(threshold)
    assert verdict.results[0].baseline == base


def test_baseline_comes_from_the_eval_json_when_not_given():
    results = EvalResults(
        model="file:///c",
        metrics={"eval_loss": 2.0},
        baseline=EvalResults(model="file:///b", metrics={"eval_loss": 1.0}),
    )
    verdict = judge(gate("eval_loss <= baseline * 1.5", baseline=True), results, now=NOW)
    assert verdict.verdict == "Failed"
    assert verdict.results[0].threshold == 1.5


@pytest.mark.parametrize(
    "base,message",
    [
        (None, "eval_loss: no baseline was evaluated"),
        ({"accuracy": 0.5}, "the baseline did not report eval_loss (reported: accuracy)"),
        ({"eval_loss": math.nan}, "the baseline's eval_loss is NaN"),
    ],
    ids=["no-baseline", "baseline-missing-metric", "baseline-nan"],
)
def test_baseline_problems_fail_naming_them(base, message):
    verdict = judge(gate("eval_loss <= baseline", baseline=True), {"eval_loss": 1.0}, base, now=NOW)
    assert verdict.verdict == "Failed"
    assert message in verdict.message


def test_a_baseline_criterion_without_a_baseline_model_is_refused_in_the_spec():
    with pytest.raises(ValueError, match=r"criteria\.0|criteria\[0\]"):
        PromotionGateSpec.model_validate({"run": "a", "criteria": ["eval_loss <= baseline * 1.02"]})


# ------------------------------------------------------------------ confidence


def confident(op: str, value: float, confidence: float = 0.95, **extra) -> dict:
    return {"metric": "accuracy", "op": op, "value": value, "confidence": confidence, **extra}


def accuracy_results(hits: list[int]) -> EvalResults:
    samples = bernoulli("q", hits)
    return EvalResults(
        model="m", metrics={"accuracy": samples.value()}, samples={"accuracy": samples}
    )


def hits(rate: float, n: int, seed: int = 7) -> list[int]:
    """Exactly round(rate * n) hits among n, in a shuffled order."""
    ones = round(rate * n)
    data = [1] * ones + [0] * (n - ones)
    random.Random(seed).shuffle(data)
    return data


CONFIDENCE_CASES = [
    # 0.8 on 400 examples: the 95% interval is about ±0.033.
    ("clears", confident(">=", 0.70), 0.8, 400, "Passed"),
    ("misses-clearly", confident(">=", 0.90), 0.8, 400, "Failed"),
    ("straddles", confident(">=", 0.80), 0.8, 400, "Inconclusive"),
    # The point estimate passes but 40 examples cannot show it: never promote on noise.
    ("point-passes-but-noisy", confident(">=", 0.75), 0.8, 40, "Inconclusive"),
    ("upper-side-clears", confident("<=", 0.9), 0.8, 400, "Passed"),
]


@pytest.mark.parametrize(
    "criterion,rate,n,expected",
    [c[1:] for c in CONFIDENCE_CASES],
    ids=[c[0] for c in CONFIDENCE_CASES],
)
def test_confidence_criteria(criterion, rate, n, expected):
    results = accuracy_results(hits(rate, n))
    verdict = judge(gate(criterion), results, now=NOW)
    result = verdict.results[0]
    assert result.result == expected, result.message
    assert result.margin_lower <= result.margin <= result.margin_upper
    assert result.samples == n
    assert verdict.verdict == expected


def test_bootstrap_bound_matches_the_normal_approximation_on_a_large_sample():
    # A Bernoulli(0.7) sample of 2000: the one-sided 95% bounds of the mean are
    # p ± 1.645 * sqrt(p (1 - p) / n) to within bootstrap noise.
    data = hits(0.7, 2000, seed=3)
    p = sum(data) / len(data)
    half = 1.6449 * math.sqrt(p * (1 - p) / len(data))
    criterion = Criterion.model_validate(confident(">=", 0.0))
    lower, upper, n = bootstrap_margin(
        criterion, bernoulli("q", data), None, confidence=0.95, resamples=4000
    )
    assert n == 2000
    assert lower == pytest.approx(p - half, abs=0.004)
    assert upper == pytest.approx(p + half, abs=0.004)


def test_pairing_with_the_baseline_cancels_shared_noise():
    # Per-example scores vary a lot (hard and easy prompts), but the candidate beats the
    # baseline by 0.02 on every single example: paired, that is certain; compared as two
    # independent samples, it would be lost in the spread.
    rng = random.Random(5)
    base_values = [rng.uniform(0, 1) for _ in range(200)]
    ids = [f"e{i}" for i in range(200)]
    base = MetricSamples(ids=ids, values=base_values)
    cand = MetricSamples(ids=ids, values=[v + 0.02 for v in base_values])
    criterion = Criterion.model_validate(
        {"metric": "reward_mean", "op": ">", "baseline": {"scale": 1.0}, "confidence": 0.95}
    )
    lower, upper, _ = bootstrap_margin(criterion, cand, base, confidence=0.95)
    assert lower == pytest.approx(0.02) and upper == pytest.approx(0.02)
    shuffled = MetricSamples(ids=ids, values=rng.sample(base_values, len(base_values)))
    unpaired_lower, unpaired_upper, _ = bootstrap_margin(criterion, cand, shuffled, confidence=0.95)
    assert unpaired_lower < 0 < unpaired_upper


def test_pairing_uses_only_examples_both_models_have():
    base = MetricSamples(ids=["a", "b", "c"], values=[0.0, 0.0, 0.0])
    cand = MetricSamples(ids=["c", "d"], values=[1.0, 5.0])
    criterion = Criterion.model_validate(
        {"metric": "m", "op": ">=", "baseline": {}, "confidence": 0.9}
    )
    lower, upper, n = bootstrap_margin(criterion, cand, base, confidence=0.9)
    assert (lower, upper, n) == (1.0, 1.0, 1)


def test_token_weighted_perplexity_samples():
    # Two examples: 1 token at loss 2.0, 3 tokens at loss 1.0: eval_loss 1.25, perplexity e^1.25.
    loss = MetricSamples(ids=["a", "b"], values=[2.0, 1.0], weights=[1.0, 3.0])
    ppl = loss.model_copy(update={"aggregate": "exp-mean"})
    assert loss.value() == pytest.approx(1.25)
    assert ppl.value() == pytest.approx(math.exp(1.25))


def test_confidence_without_per_example_values_fails_saying_so():
    verdict = judge(gate(confident(">=", 0.5)), {"accuracy": 0.9}, now=NOW)
    assert verdict.verdict == "Failed"
    assert "needs per-example values" in verdict.message


@pytest.mark.parametrize("op", ["==", "!="])
def test_confidence_needs_a_side(op):
    with pytest.raises(ValueError, match="confidence"):
        Criterion.model_validate(confident(op, 0.5))


def test_confidence_in_the_spec_needs_an_evaluation():
    with pytest.raises(ValueError, match="per-example values: set evaluation"):
        PromotionGateSpec.model_validate({"run": "a", "criteria": [confident(">=", 0.5)]})


# ------------------------------------------------------------------ advisory


def test_advisory_criteria_report_but_do_not_block():
    spec = gate("eval_loss <= 2", {"metric": "kl", "op": "<=", "value": 0.1, "advisory": True})
    verdict = judge(spec, {"eval_loss": 1.0, "kl": 0.5}, now=NOW)
    assert verdict.verdict == "Passed"
    assert [r.result for r in verdict.results] == ["Passed", "Failed"]
    assert "kl <= 0.1 (advisory): failed" in verdict.message


def test_a_missing_advisory_metric_does_not_block_either():
    spec = gate("eval_loss <= 2", {"metric": "kl", "op": "<=", "value": 0.1, "advisory": True})
    assert judge(spec, {"eval_loss": 1.0}, now=NOW).verdict == "Passed"


def test_an_inconclusive_advisory_criterion_does_not_hold_the_gate():
    spec = gate("eval_loss <= 2", confident(">=", 0.8, advisory=True))
    results = accuracy_results(hits(0.8, 400))
    results.metrics["eval_loss"] = 1.0
    assert judge(spec, results, now=NOW).verdict == "Passed"


# ------------------------------------------------------------------ approval

EARLY = NOW - timedelta(minutes=5)
LATE = NOW + timedelta(minutes=5)
APPROVAL_CASES = [
    # name, metrics, awaiting_since, approval, rejection, verdict, reason
    (
        "no-approval-yet",
        {"eval_loss": 1.0},
        None,
        None,
        None,
        "AwaitingApproval",
        "AwaitingApproval",
    ),
    (
        "approved-after",
        {"eval_loss": 1.0},
        NOW,
        Decision("alice", LATE),
        None,
        "Passed",
        "Approved",
    ),
    (
        "approved-before-counts-not",
        {"eval_loss": 1.0},
        NOW,
        Decision("alice", EARLY),
        None,
        "AwaitingApproval",
        "AwaitingApproval",
    ),
    (
        "approved-in-the-same-look",
        {"eval_loss": 1.0},
        None,
        Decision("alice", NOW),
        None,
        "AwaitingApproval",
        "AwaitingApproval",
    ),
    ("rejected", {"eval_loss": 1.0}, NOW, None, Decision("bob", LATE), "Failed", "Rejected"),
    (
        "rejection-wins-over-approval",
        {"eval_loss": 1.0},
        NOW,
        Decision("alice", LATE),
        Decision("bob", LATE),
        "Failed",
        "Rejected",
    ),
    (
        "failed-criteria-need-no-approval",
        {"eval_loss": 3.0},
        None,
        Decision("alice", LATE),
        None,
        "Failed",
        "CriterionFailed",
    ),
]


@pytest.mark.parametrize(
    "metrics,since,approval,rejection,expected,reason",
    [c[1:] for c in APPROVAL_CASES],
    ids=[c[0] for c in APPROVAL_CASES],
)
def test_manual_approval(metrics, since, approval, rejection, expected, reason):
    verdict = judge(
        gate("eval_loss <= 2", manual=True),
        metrics,
        now=NOW,
        approval=approval,
        rejection=rejection,
        awaiting_since=since,
    )
    assert (verdict.verdict, verdict.reason) == (expected, reason), verdict.message
    if expected == "AwaitingApproval":
        assert verdict.awaiting_since == (since or NOW)
        assert verdict.decided_at is None


def test_an_early_approval_is_explained():
    verdict = judge(
        gate("eval_loss <= 2", manual=True),
        {"eval_loss": 1.0},
        now=NOW,
        approval=Decision("alice", EARLY),
        awaiting_since=NOW,
    )
    assert (
        "the approval by alice (seen 2026-11-29T11:55:00Z) came before the criteria"
        in verdict.message
    )


def test_an_inconclusive_gate_waits_and_a_person_can_approve_it():
    spec = gate(confident(">=", 0.8))
    results = accuracy_results(hits(0.8, 400))
    waiting = judge(spec, results, now=NOW)
    assert (waiting.verdict, waiting.awaiting_since) == ("Inconclusive", NOW)
    assert "trainyard.dev/approved-by" in waiting.message
    approved = judge(spec, results, now=LATE, approval=Decision("carol", LATE), awaiting_since=NOW)
    assert (approved.verdict, approved.reason) == ("Passed", "Approved")
    assert "criteria inconclusive" in approved.message
    rejected = judge(spec, results, now=LATE, rejection=Decision("dan", LATE), awaiting_since=NOW)
    assert rejected.verdict == "Failed"


def test_verdict_writes_the_status_fields():
    verdict = judge(
        gate("eval_loss <= 2", manual=True),
        {"eval_loss": 1.0},
        now=LATE,
        approval=Decision("alice", LATE),
        awaiting_since=NOW,
    )
    status = verdict.apply(
        PromotionGateStatus(model="file:///m", decided_at="2026-01-01T00:00:00Z")
    )
    doc = status.to_yaml_dict()
    assert doc["verdict"] == "Passed" and doc["reason"] == "Approved"
    assert doc["approval"] == {"by": "alice", "at": "2026-11-29T12:05:00Z"}
    assert doc["awaitingSince"] == "2026-11-29T12:00:00Z"
    assert doc["decidedAt"] == "2026-01-01T00:00:00Z"  # the first decision time is kept
    assert doc["model"] == "file:///m"
    assert doc["results"][0]["criterion"] == "eval_loss <= 2"
    PromotionGateStatus.model_validate(doc)


def test_judging_is_pure_and_repeatable():
    spec = gate(confident(">=", 0.78))
    results = accuracy_results(hits(0.8, 300))
    first = judge(spec, results, now=NOW)
    second = judge(spec, results, now=NOW)
    assert first == second


def test_one_criterion_on_its_own():
    result = judge_criterion(Criterion.model_validate("perplexity <= 12"), {"perplexity": 11.0})
    assert (result.result, result.margin) == ("Passed", 1.0)


# ------------------------------------------------------------------ criterion text

TEXT_CASES = [
    ("eval_loss <= 1.8", {"metric": "eval_loss", "op": "<=", "value": 1.8}),
    (
        "eval_loss<=baseline*1.02",
        {"metric": "eval_loss", "op": "<=", "baseline": {"scale": 1.02, "offset": 0.0}},
    ),
    (
        "accuracy >= baseline - 0.01",
        {"metric": "accuracy", "op": ">=", "baseline": {"scale": 1.0, "offset": -0.01}},
    ),
    ("rewards/format/mean > .5", {"metric": "rewards/format/mean", "op": ">", "value": 0.5}),
]


@pytest.mark.parametrize("text,fields", TEXT_CASES, ids=[c[0] for c in TEXT_CASES])
def test_criterion_text(text, fields):
    criterion = Criterion.model_validate(text)
    assert criterion.model_dump(include=set(fields)) == fields


def test_a_misspelt_baseline_says_how_to_write_it():
    with pytest.raises(ValueError, match=r"METRIC OP baseline \[\* FACTOR\]"):
        Criterion.model_validate("eval_loss <= baseline x 2")


# ------------------------------------------------------------------ annotations over time


def test_an_approval_set_before_the_criteria_passed_never_counts_until_set_again():
    """The controller's loop: annotations read each reconcile, first-seen times kept in
    status, the verdict written back."""
    spec = gate("eval_loss <= 2", manual=True)
    approved = {"trainyard.dev/approved-by": "alice"}
    status = None
    # t0: alice approves while the evaluation still runs (nothing to judge yet).
    t0 = NOW
    approval, _ = seen_decisions(approved, status, t0)
    status = PromotionGateStatus(approval=approval.to_status())
    # t1: results arrive; the criteria pass; her approval predates them.
    t1 = NOW + timedelta(minutes=1)
    approval, rejection = seen_decisions(approved, status, t1)
    verdict = judge(spec, {"eval_loss": 1.0}, now=t1, approval=approval, rejection=rejection)
    assert verdict.verdict == "AwaitingApproval"
    status = verdict.apply(status)
    # t2: still the same annotation: still does not count.
    t2 = NOW + timedelta(minutes=2)
    approval, _ = seen_decisions(approved, status, t2)
    verdict = judge(
        spec,
        {"eval_loss": 1.0},
        now=t2,
        approval=approval,
        awaiting_since=awaiting_since_of(status),
    )
    assert verdict.verdict == "AwaitingApproval"
    status = verdict.apply(status)
    # t3: she removes it; t4: sets it again, after seeing the results: it counts.
    t3, t4 = NOW + timedelta(minutes=3), NOW + timedelta(minutes=4)
    approval, _ = seen_decisions({}, status, t3)
    status = judge(
        spec,
        {"eval_loss": 1.0},
        now=t3,
        approval=approval,
        awaiting_since=awaiting_since_of(status),
    ).apply(status)
    approval, _ = seen_decisions(approved, status, t4)
    verdict = judge(
        spec,
        {"eval_loss": 1.0},
        now=t4,
        approval=approval,
        awaiting_since=awaiting_since_of(status),
    )
    assert (verdict.verdict, verdict.reason) == ("Passed", "Approved")
    status = verdict.apply(status)
    assert status.approval.model_dump() == {"by": "alice", "at": "2026-11-29T12:04:00Z"}
    assert status.awaiting_since == "2026-11-29T12:01:00Z"
    assert status.decided_at == "2026-11-29T12:04:00Z"


def test_a_rejection_annotation_rejects():
    rejection = seen_decisions({"trainyard.dev/rejected-by": "bob"}, None, NOW)[1]
    verdict = judge(
        gate("eval_loss <= 2", manual=True), {"eval_loss": 1.0}, now=NOW, rejection=rejection
    )
    assert (verdict.verdict, verdict.reason) == ("Failed", "Rejected")
    assert verdict.apply().rejection.by == "bob"


def test_a_gate_of_only_advisory_criteria_is_refused():
    with pytest.raises(ValueError, match="every criterion is advisory"):
        PromotionGateSpec.model_validate(
            {"run": "a", "criteria": [{"metric": "kl", "op": "<=", "value": 1, "advisory": True}]}
        )
