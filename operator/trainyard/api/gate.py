"""PromotionGate: criteria a run's metrics must meet before its model moves on."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, model_validator

from trainyard.api.base import API_VERSION, ApiModel
from trainyard.api.common import ModelSource, ObjectMeta, Resources, Storage, source_uri
from trainyard.api.rules import Rule, nested_error
from trainyard.api.status import Condition
from trainyard.api.training_run import RewardSpec, TrainingRunSpec

Operator = Literal["<", "<=", ">", ">=", "==", "!="]
_NUMBER = r"-?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|-?\.\d+(?:[eE][-+]?\d+)?"
_CRITERION = re.compile(
    rf"^\s*(?P<metric>[A-Za-z_][\w./-]*)\s*(?P<op><=|>=|==|!=|<|>)\s*"
    rf"(?:(?P<value>{_NUMBER})"
    rf"|baseline(?:\s*\*\s*(?P<scale>{_NUMBER}))?(?:\s*(?P<sign>[-+])\s*(?P<offset>\d+(?:\.\d*)?(?:[eE][-+]?\d+)?))?)"
    r"\s*$"
)
BOUNDED_OPS = ("<", "<=", ">", ">=")
"""Operators a confidence bound applies to: `==` and `!=` have no side to be confident of."""


class BaselineThreshold(ApiModel):
    """A threshold taken from the baseline model's value: baseline × scale + offset."""

    scale: float = 1.0
    """Factor on the baseline's value (eval_loss <= baseline * 1.02 is scale 1.02)."""
    offset: float = 0.0
    """Added after scaling (accuracy >= baseline - 0.01 is offset -0.01)."""


class Criterion(ApiModel):
    """One comparison on a metric: `eval_loss <= 1.8`, `eval_loss <= baseline * 1.02`,
    or an object with a confidence level (`{metric: accuracy, op: '>=', value: 0.6,
    confidence: 0.95}`) or `advisory: true`."""

    metric: str = Field(pattern=r"^[A-Za-z_][\w./-]*$")
    """Metric name as the run or evaluation reports it (eval_loss, perplexity, accuracy, refusal_rate, reward_mean…)."""
    op: Operator
    """Comparison."""
    value: float | None = None
    """Fixed threshold; leave out when the threshold comes from the baseline."""
    baseline: BaselineThreshold | None = None
    """Threshold relative to the baseline model evaluated in the same job (evaluation.baseline)."""
    confidence: float | None = Field(default=None, gt=0.5, lt=1)
    """Pass only when the bootstrap bound at this level clears the threshold; Inconclusive while the interval straddles it."""
    advisory: bool = False
    """Reported, never blocking."""

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: Any, handler: Any) -> dict[str, Any]:
        # Text ("eval_loss <= 1.8") or an object: a structural CRD schema cannot say
        # "string or object", so the API server keeps the item as written and the
        # operator checks it (same message as `trainyard validate`).
        return {
            "description": (
                "METRIC OP NUMBER or METRIC OP baseline [* FACTOR] [+|- OFFSET] as text "
                "(e.g. 'eval_loss <= 1.8', 'eval_loss <= baseline * 1.02'), or "
                "{metric, op, value | baseline: {scale, offset}, confidence, advisory}."
            ),
            "x-kubernetes-preserve-unknown-fields": True,
        }

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, data: Any) -> Any:
        if isinstance(data, str):
            match = _CRITERION.match(data)
            if not match:
                if "baseline" in data:
                    raise ValueError(
                        f"{data!r} is not a criterion; write METRIC OP baseline [* FACTOR] "
                        "[+|- OFFSET], e.g. 'eval_loss <= baseline * 1.02' "
                        "(OP one of <, <=, >, >=, ==, !=)"
                    )
                raise ValueError(
                    f"{data!r} is not a criterion; write METRIC OP NUMBER, e.g. 'eval_loss <= 1.8' "
                    "(OP one of <, <=, >, >=, ==, !=)"
                )
            parsed: dict[str, Any] = {"metric": match["metric"], "op": match["op"]}
            if match["value"] is not None:
                parsed["value"] = float(match["value"])
            else:
                offset = float(match["offset"] or 0) * (-1 if match["sign"] == "-" else 1)
                parsed["baseline"] = {"scale": float(match["scale"] or 1), "offset": offset}
            return parsed
        return data

    @model_validator(mode="after")
    def _threshold(self) -> Criterion:
        problems = []
        if (self.value is None) == (self.baseline is None):
            problems.append(("value", "set exactly one of value or baseline"))
        if self.confidence is not None and self.op not in BOUNDED_OPS:
            problems.append(
                (
                    "confidence",
                    f"a confidence bound needs one of {', '.join(BOUNDED_OPS)}, not {self.op}",
                )
            )
        if problems:
            raise nested_error(problems)
        return self

    @property
    def text(self) -> str:
        """The criterion as a person writes it.

        >>> Criterion.model_validate("eval_loss <= baseline * 1.02").text
        'eval_loss <= baseline * 1.02'
        >>> Criterion.model_validate("accuracy >= baseline - 0.01").text
        'accuracy >= baseline - 0.01'
        >>> Criterion(metric="accuracy", op=">=", value=0.6, confidence=0.95).text
        'accuracy >= 0.6 (95% confidence)'
        """
        if self.baseline is None:
            threshold = f"{self.value:g}"
        else:
            threshold = "baseline"
            if self.baseline.scale != 1:
                threshold += f" * {self.baseline.scale:g}"
            if self.baseline.offset:
                sign = "-" if self.baseline.offset < 0 else "+"
                threshold += f" {sign} {abs(self.baseline.offset):g}"
        text = f"{self.metric} {self.op} {threshold}"
        notes = []
        if self.confidence is not None:
            notes.append(f"{self.confidence * 100:g}% confidence")
        if self.advisory:
            notes.append("advisory")
        return text + (f" ({', '.join(notes)})" if notes else "")

    def threshold(self, baseline: float | None = None) -> float | None:
        """The value compared against: fixed, or from the baseline's (None without one).

        >>> Criterion.model_validate("eval_loss <= baseline * 1.5 + 0.1").threshold(2.0)
        3.1
        """
        if self.baseline is None:
            return self.value
        if baseline is None:
            return None
        return baseline * self.baseline.scale + self.baseline.offset

    def holds(self, observed: float, threshold: float | None = None) -> bool:
        """Whether an observed value meets the criterion.

        >>> Criterion(metric="eval_loss", op="<=", value=1.8).holds(1.5)
        True
        """
        limit = self.value if threshold is None else threshold
        return {
            "<": observed < limit,
            "<=": observed <= limit,
            ">": observed > limit,
            ">=": observed >= limit,
            "==": observed == limit,
            "!=": observed != limit,
        }[self.op]


EVALUATION_SUITES = ("perplexity", "accuracy", "refusal_rate", "reward")
"""What an evaluation can compute: perplexity gives eval_loss and perplexity; refusal_rate
gives refusal_rate and over_refusal_rate; reward gives reward_mean and one
reward/NAME per component, scored with the judged run's own reward spec."""


class Generation(ApiModel):
    """How completions are generated for accuracy, refusal and reward suites; recorded in eval.json."""

    max_new_tokens: int = Field(default=128, ge=1, le=32768)
    """Tokens generated per prompt at most (`max_new_tokens`)."""
    temperature: float = Field(default=0.0, ge=0)
    """0 is greedy decoding (the default, so a verdict is reproducible)."""
    top_p: float = Field(default=1.0, gt=0, le=1)
    """Nucleus sampling (`top_p`); used when temperature > 0."""
    batch_size: int = Field(default=16, ge=1, le=4096)
    """Prompts generated together."""


class AccuracyOptions(ApiModel):
    """How a completion is compared with the labelled answer."""

    match: Literal["auto", "exact", "choice", "regex", "final-answer"] = "auto"
    """exact (whole answer), choice (option letter), regex (first group of pattern), final-answer (number after ####, GSM8K), auto (by the row)."""
    pattern: str | None = None
    """Regular expression for match: regex; its first group (if any) is the answer."""
    ignore_case: bool = True
    """Compare answers case-insensitively."""


class UserMetric(ApiModel):
    """A metric computed by your own function."""

    name: str = Field(pattern=r"^[A-Za-z_][\w./-]*$")
    """Metric name criteria refer to."""
    python: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
    """module:function(completions, prompts, **columns) -> list[float | None]; the metric is the mean."""


class Evaluation(ApiModel):
    """An evaluation Job the gate runs on the candidate model before judging."""

    suite: list[Literal[EVALUATION_SUITES]] = Field(default_factory=list)  # type: ignore[valid-type]
    """Metrics the evaluation computes (with metrics, at least one of the two)."""
    dataset: source_uri("hf", "s3", "file", "builtin")
    """Evaluation data (hf://, s3://, file://, builtin://)."""
    max_samples: int | None = Field(default=None, ge=1)
    """Evaluate at most this many records."""
    more_samples: int | None = Field(default=None, ge=1)
    """When a confidence criterion is Inconclusive, evaluate once more on up to this many records before asking a person."""
    baseline: ModelSource | None = None
    """A model evaluated on the same records (e.g. the stage's input model) for baseline criteria."""
    seed: int = 0
    """Seed of sampling and of the bootstrap; recorded in eval.json."""
    generation: Generation = Field(default_factory=Generation)
    """Generation settings; recorded in eval.json."""
    accuracy: AccuracyOptions = Field(default_factory=AccuracyOptions)
    """How answers are matched."""
    refusal_patterns: list[str] | None = None
    """Regular expressions that mark a refusal; common refusal phrases when left out."""
    metrics: list[UserMetric] = Field(default_factory=list, max_length=32)
    """Your own metrics."""
    image: str | None = None
    """Evaluation image; the trainer image when left out."""
    resources: Resources | None = None
    """Resources of the evaluation pod."""

    @model_validator(mode="after")
    def _computes_something(self) -> Evaluation:
        if not (self.suite or self.metrics):
            raise nested_error(
                [("suite", "set suite or metrics: the evaluation would compute nothing")]
            )
        return self


class EvaluationTask(ApiModel):
    """What the evaluation workload reads (`python -m trainyard.workloads.evaluate TASK.json`):
    written by the gate controller into the evaluation Job's ConfigMap, and by `trainyard
    evaluate` and `trainyard run` on one machine. Not part of any CRD."""

    model: ModelSource
    """The candidate model or checkpoint (run:// resolved by the workload)."""
    evaluation: Evaluation
    """What to compute, on which data, with which settings."""
    output: str | None = Field(default=None, pattern=r"^(s3|file)://\S+$")
    """Where eval.json, the examples and the report go (s3:// or file://); beside the
    model's checkpoint (CHECKPOINT/eval) when left out."""
    rewards: list[RewardSpec] = Field(default_factory=list)
    """The judged run's reward spec, for the reward suite."""
    strip_thinking: bool = False
    """Drop <think>…</think> before scoring rewards, as the run did."""
    storage: Storage | None = None
    """Object storage settings (the run's)."""
    checkpoint_uri: str | None = None
    """The judged run's checkpoint.uri, where run:// references are resolved from."""


def evaluation_task(
    evaluation: Evaluation, *, model: ModelSource, output: str, run: TrainingRunSpec | None = None
) -> EvaluationTask:
    """The evaluation pod's input for a gate's evaluation of `model`, with the judged
    run's rewards, storage and checkpoint root (what the controller and `trainyard run`
    both hand the workload).

    >>> task = evaluation_task(
    ...     Evaluation(suite=["perplexity"], dataset="builtin://datasets/text"),
    ...     model=ModelSource(source="s3://ckpt/sft/final"),
    ...     output="s3://ckpt/sft/final/eval/release",
    ... )
    >>> task.to_yaml_dict()["output"]
    's3://ckpt/sft/final/eval/release'
    """
    online = (run.grpo or run.rloo) if run is not None else None
    return EvaluationTask(
        model=model,
        evaluation=evaluation,
        output=output,
        rewards=list(online.rewards) if online is not None else [],
        strip_thinking=online.strip_thinking if online is not None else False,
        storage=run.storage if run is not None else None,
        checkpoint_uri=run.checkpoint.uri if run is not None and run.checkpoint else None,
    )


class PromotionGateSpec(ApiModel):
    """Desired state of a PromotionGate."""

    run: str | None = Field(default=None, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    """TrainingRun whose final metrics and model are judged."""
    model: ModelSource | None = None
    """A model or checkpoint judged instead of a run's."""
    criteria: list[Criterion] = Field(min_length=1)
    """What the model must show; advisory criteria are reported but never block."""
    require: Literal["all", "any"] = "all"
    """all: every blocking criterion must pass; any: one passing blocking criterion is enough."""
    evaluation: Evaluation | None = None
    """Run an evaluation Job first and judge its metrics."""
    manual_approval: bool = False
    """After the criteria pass, wait for annotation trainyard.dev/approved-by: NAME (rejected-by rejects)."""

    rules = (
        Rule(
            name="run-or-model",
            cel="has(self.run) != has(self.model)",
            message="set exactly one of run or model",
            field="run",
            check=lambda g: (g.run is None) != (g.model is None),
        ),
    )

    @model_validator(mode="after")
    def _baseline_criteria(self) -> PromotionGateSpec:
        problems = criteria_problems(self.criteria, self.evaluation)
        if problems:
            raise nested_error(problems)
        return self


def criteria_problems(
    criteria: list[Criterion], evaluation: Evaluation | None
) -> list[tuple[str, str]]:
    """What a gate asks that cannot work: only advisory criteria, a baseline threshold
    without a baseline model, a confidence bound without per-example values."""
    problems = []
    if criteria and all(c.advisory for c in criteria):
        problems.append(
            (
                "criteria",
                "every criterion is advisory, so the gate would pass anything: make one blocking",
            )
        )
    for i, criterion in enumerate(criteria):
        if criterion.baseline is not None and (evaluation is None or evaluation.baseline is None):
            problems.append(
                (
                    f"criteria[{i}]",
                    f"{criterion.text!r} compares with a baseline: set evaluation.baseline "
                    "(the model evaluated beside the candidate)",
                )
            )
        if criterion.confidence is not None and evaluation is None:
            problems.append(
                (
                    f"criteria[{i}].confidence",
                    "a confidence bound needs per-example values: set evaluation "
                    "(a run's final metrics are single numbers)",
                )
            )
    return problems


Verdict = Literal[
    "Pending", "Evaluating", "AwaitingApproval", "Inconclusive", "Passed", "Failed", "Invalid"
]
"""Invalid: the operator cannot act on the spec (status.message lists what to fix)."""
VERDICTS: tuple[str, ...] = Verdict.__args__  # type: ignore[attr-defined]
CriterionOutcome = Literal["Passed", "Failed", "Inconclusive"]


class CriterionResult(ApiModel):
    """One criterion judged: what was observed, against what, by how much, how sure."""

    criterion: str
    """The criterion as text."""
    metric: str
    """The metric judged."""
    result: CriterionOutcome
    """Passed, Failed, or Inconclusive (its confidence interval straddles the threshold)."""
    observed: float | None = None
    """Value observed; missing when the metric was not reported."""
    threshold: float | None = None
    """Value compared against (from the baseline for baseline-relative criteria)."""
    baseline: float | None = None
    """The baseline model's value of the metric."""
    margin: float | None = None
    """How far the observed value clears the threshold; negative when it misses."""
    margin_lower: float | None = None
    """Lower confidence bound of the margin (confidence criteria)."""
    margin_upper: float | None = None
    """Upper confidence bound of the margin (confidence criteria)."""
    confidence: float | None = None
    """Confidence level of the bounds."""
    samples: int | None = None
    """Examples behind the value (paired examples when compared with the baseline)."""
    advisory: bool = False
    """Reported only; does not block."""
    message: str = ""
    """Why, for humans."""


class PersonDecision(ApiModel):
    """An approval or rejection given by annotation."""

    by: str
    """Who (the annotation's value)."""
    at: str
    """When the operator first saw it (RFC 3339)."""


class PromotionGateStatus(ApiModel):
    """Observed state of a PromotionGate."""

    model_config = ApiModel.model_config | {"extra": "allow"}

    verdict: Verdict | None = None
    """The gate's decision."""
    reason: str | None = None
    """One CamelCase word saying why (CriteriaMet, CriterionFailed, MetricMissing, Inconclusive, Approved, Rejected…)."""
    message: str | None = None
    """The decision for humans: which criteria held or failed, and by how much."""
    results: list[CriterionResult] | None = None
    """Each criterion with its observed value, threshold, margin and bounds."""
    model: str | None = None
    """URI of the model judged."""
    baseline_model: str | None = None
    """URI of the baseline model evaluated beside it."""
    promoted_model: str | None = None
    """URI of the model that passed."""
    evaluation_job: str | None = None
    """The evaluation Job."""
    evaluation_attempts: int | None = None
    """Evaluation Jobs started so far."""
    eval_results: str | None = None
    """URI of the eval.json the verdict was reached on."""
    report: str | None = None
    """URI of the evaluation's Markdown report."""
    awaiting_since: str | None = None
    """When the criteria first passed or became inconclusive; only approvals given later count."""
    approval: PersonDecision | None = None
    """The trainyard.dev/approved-by annotation as first seen (it counts when seen after awaitingSince)."""
    rejection: PersonDecision | None = None
    """The trainyard.dev/rejected-by annotation as first seen (it rejects)."""
    decided_at: str | None = None
    """When the gate reached Passed or Failed."""
    conditions: list[Condition] | None = None
    """Valid, Evaluated, Passed."""
    observed_generation: int | None = None
    """metadata.generation this status describes."""


class PromotionGate(ApiModel):
    """Criteria on metrics of a run or checkpoint, with optional evaluation and approval."""

    api_version: Literal["trainyard.dev/v1alpha1"] = API_VERSION
    """trainyard.dev/v1alpha1."""
    kind: Literal["PromotionGate"] = "PromotionGate"
    """PromotionGate."""
    metadata: ObjectMeta
    """Standard object metadata."""
    spec: PromotionGateSpec
    """Desired state."""
    status: PromotionGateStatus | None = None
    """Observed state, written by the operator."""
