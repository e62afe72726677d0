"""PromotionGate: criteria a run's metrics must meet before its model moves on."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, model_validator

from trainyard.api.base import API_VERSION, ApiModel
from trainyard.api.common import ModelSource, ObjectMeta, Resources, source_uri
from trainyard.api.rules import Rule
from trainyard.api.status import Condition

Operator = Literal["<", "<=", ">", ">=", "==", "!="]
_CRITERION = re.compile(
    r"^\s*([A-Za-z_][\w./-]*)\s*(<=|>=|==|!=|<|>)\s*(-?[\d.]+(?:[eE][-+]?\d+)?)\s*$"
)


class Criterion(ApiModel):
    """One comparison on a metric, e.g. eval_loss <= 1.8."""

    metric: str = Field(pattern=r"^[A-Za-z_][\w./-]*$")
    """Metric name as the run or evaluation reports it (eval_loss, perplexity, accuracy, refusal_rate, reward_mean…)."""
    op: Operator
    """Comparison."""
    value: float
    """Threshold."""

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: Any, handler: Any) -> dict[str, Any]:
        # Text ("eval_loss <= 1.8") or an object: a structural CRD schema cannot say
        # "string or object", so the API server keeps the item as written and the
        # operator checks it (same message as `trainyard validate`).
        return {
            "description": "METRIC OP NUMBER as text (e.g. 'eval_loss <= 1.8'), or {metric, op, value}.",
            "x-kubernetes-preserve-unknown-fields": True,
        }

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, data: Any) -> Any:
        if isinstance(data, str):
            match = _CRITERION.match(data)
            if not match:
                raise ValueError(
                    f"{data!r} is not a criterion; write METRIC OP NUMBER, e.g. 'eval_loss <= 1.8' "
                    "(OP one of <, <=, >, >=, ==, !=)"
                )
            return {"metric": match[1], "op": match[2], "value": float(match[3])}
        return data

    def holds(self, observed: float) -> bool:
        """Whether an observed value meets the criterion.

        >>> Criterion(metric="eval_loss", op="<=", value=1.8).holds(1.5)
        True
        """
        return {
            "<": observed < self.value,
            "<=": observed <= self.value,
            ">": observed > self.value,
            ">=": observed >= self.value,
            "==": observed == self.value,
            "!=": observed != self.value,
        }[self.op]


class Evaluation(ApiModel):
    """An evaluation Job the gate runs on the candidate model before judging."""

    suite: list[Literal["perplexity", "accuracy", "refusal_rate", "reward"]] = Field(min_length=1)
    """Metrics the evaluation computes."""
    dataset: source_uri("hf", "s3", "file", "builtin")
    """Evaluation data (hf://, s3://, file://, builtin://)."""
    max_samples: int | None = Field(default=None, ge=1)
    """Evaluate at most this many records."""
    image: str | None = None
    """Evaluation image; the trainer image when left out."""
    resources: Resources | None = None
    """Resources of the evaluation pod."""


class PromotionGateSpec(ApiModel):
    """Desired state of a PromotionGate."""

    run: str | None = Field(default=None, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    """TrainingRun whose final metrics and model are judged."""
    model: ModelSource | None = None
    """A model or checkpoint judged instead of a run's."""
    criteria: list[Criterion] = Field(min_length=1)
    """All must hold for the gate to pass."""
    evaluation: Evaluation | None = None
    """Run an evaluation Job first and judge its metrics."""
    manual_approval: bool = False
    """After the criteria pass, wait for annotation trainyard.dev/approved=true."""

    rules = (
        Rule(
            name="run-or-model",
            cel="has(self.run) != has(self.model)",
            message="set exactly one of run or model",
            field="run",
            check=lambda g: (g.run is None) != (g.model is None),
        ),
    )


class CriterionResult(ApiModel):
    """The observed value of one criterion."""

    criterion: str
    """The criterion as text."""
    observed: float | None = None
    """Value observed; missing when the metric was not reported."""
    passed: bool
    """Whether it held."""


class PromotionGateStatus(ApiModel):
    """Observed state of a PromotionGate."""

    model_config = ApiModel.model_config | {"extra": "allow"}

    verdict: Literal["Pending", "Evaluating", "AwaitingApproval", "Passed", "Failed"] | None = None
    """The gate's decision."""
    results: list[CriterionResult] | None = None
    """Each criterion with its observed value."""
    promoted_model: str | None = None
    """URI of the model that passed."""
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
