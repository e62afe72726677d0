"""TrainingPipeline: stages that hand a model on only when a gate passes."""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import Field, model_validator

from trainyard.api.base import API_VERSION, ApiModel
from trainyard.api.common import ModelSource, ObjectMeta
from trainyard.api.gate import Criterion, CriterionResult, Evaluation, criteria_problems
from trainyard.api.inference import InferenceServerSpec
from trainyard.api.rules import nested_error
from trainyard.api.status import Condition
from trainyard.api.training_run import TrainingRunSpec


class StageGate(ApiModel):
    """The gate after a stage."""

    criteria: list[Criterion] = Field(min_length=1)
    """What the stage's model must show to move on; advisory criteria never block."""
    require: Literal["all", "any"] = "all"
    """all: every blocking criterion must pass; any: one passing blocking criterion is enough."""
    evaluation: Evaluation | None = None
    """Evaluation Job run on the stage's model first."""
    manual_approval: bool = False
    """Wait for a person's approval after the criteria pass."""

    @model_validator(mode="after")
    def _criteria_fit_the_evaluation(self) -> StageGate:
        problems = criteria_problems(self.criteria, self.evaluation)
        if problems:
            raise nested_error(problems)
        return self


class Stage(ApiModel):
    """One step of the pipeline."""

    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=40)
    """Stage name; the stage's TrainingRun is PIPELINE-NAME."""
    run: TrainingRunSpec
    """The stage's training; model.source may be run://previous (the previous stage's promoted model)."""
    gate: StageGate | None = None
    """Criteria before the next stage starts; none lets it start as soon as this one succeeds."""


class ServeTemplate(InferenceServerSpec):
    """An InferenceServer for the pipeline's newest promoted model (model left out: the
    pipeline sets it, and rolls the server when a later stage is promoted)."""

    model: ModelSource | None = None  # type: ignore[assignment]
    """Set by the pipeline: the newest promoted model."""


class TrainingPipelineSpec(ApiModel):
    """Desired state of a TrainingPipeline."""

    stages: list[Stage] = Field(min_length=1, max_length=20)
    """Stages in order."""
    serve: ServeTemplate | None = None
    """Serve the newest promoted model (InferenceServer PIPELINE-serve), rolled on each promotion."""

    @model_validator(mode="after")
    def _names(self) -> TrainingPipelineSpec:
        names = [s.name for s in self.stages]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise nested_error(
                [("stages", f"stage names must be unique; repeated: {', '.join(duplicates)}")]
            )
        if self.stages[0].run.model.source == "run://previous":
            raise nested_error(
                [
                    (
                        "stages[0].run.model.source",
                        "the first stage has no previous stage: give its model a source",
                    )
                ]
            )
        return self


class PipelineCondition(StrEnum):
    """The condition types the operator sets on a TrainingPipeline (the CRD lists exactly these)."""

    VALID = "Valid"
    PAUSED = "Paused"
    SPEC_APPLIED = "SpecApplied"
    RETRIED = "Retried"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


PIPELINE_CONDITION_MEANINGS: dict[PipelineCondition, str] = {
    PipelineCondition.VALID: "the spec passed validation",
    PipelineCondition.PAUSED: "a gate waits for a person (approval, or an inconclusive verdict); the message says who must act",
    PipelineCondition.SPEC_APPLIED: "False: a stage edited after it started keeps the spec it started with (retry it to apply)",
    PipelineCondition.RETRIED: "the last trainyard.dev/retry annotation was acted on (False: refused, and why)",
    PipelineCondition.SUCCEEDED: "every stage was promoted",
    PipelineCondition.FAILED: "a stage's run failed or its gate rejected it; the message names the stage and criterion",
}
RETRY_ANNOTATION = "trainyard.dev/retry"
"""`kubectl annotate trainingpipeline P trainyard.dev/retry=STAGE --overwrite` reruns a failed
or rejected stage (a new value, e.g. STAGE#2, retries it again); promoted stages never rerun."""


class ProvenanceStatus(ApiModel):
    """Where a promoted stage's provenance.json is, and whether it was written."""

    uri: str | None = None
    """Where it goes: beside the promoted model."""
    job: str | None = None
    """The Job writing it (with the stage's image and storage credentials)."""
    written: bool | None = None
    """True once written; False when it could not be (the message says why); unset while writing."""
    message: str | None = None
    """What happens, or why it was not written."""


class StageStatus(ApiModel):
    """Where one stage stands."""

    name: str
    """Stage name."""
    phase: Literal["Pending", "Running", "Gating", "Promoted", "Failed", "Rejected"]
    """Stage state."""
    run: str | None = None
    """Its TrainingRun."""
    gate: str | None = None
    """Its PromotionGate."""
    input_model: str | None = None
    """The model the stage trained from (the previous stage's promoted model, resolved)."""
    model: str | None = None
    """URI of the promoted model."""
    verdict: str | None = None
    """Its gate's verdict."""
    started_at: str | None = None
    """When the stage's run was created."""
    finished_at: str | None = None
    """When the stage's run finished."""
    dataset: str | None = None
    """The training data the stage read (its source URI, with a revision where it names one)."""
    spec_hash: str | None = None
    """A hash of the stage as it started (run and gate)."""
    approved_by: str | None = None
    """Who approved the stage's gate, where it asked for a person."""
    image: str | None = None
    """The image the stage's run trained in."""
    gate_results: list[CriterionResult] | None = None
    """Each criterion of the stage's gate, judged."""
    provenance: ProvenanceStatus | None = None
    """provenance.json beside the promoted model (a promoted stage hands its model on once it is settled)."""
    message: str | None = None
    """Why the stage is in its phase."""


class TrainingPipelineStatus(ApiModel):
    """Observed state of a TrainingPipeline."""

    model_config = ApiModel.model_config | {"extra": "allow"}

    phase: Literal["Pending", "Running", "Paused", "Succeeded", "Failed", "Invalid"] | None = None
    """Pipeline state."""
    message: str | None = None
    """Why the pipeline is in its phase, and what to do."""
    last_retry: str | None = None
    """The trainyard.dev/retry annotation value last acted on."""
    serving: dict[str, str] | None = None
    """The InferenceServer serving the newest promoted model: server, model."""
    current_stage: str | None = None
    """The stage running or being gated."""
    stages: list[StageStatus] | None = None
    """Every stage started so far."""
    conditions: list[Condition] | None = Field(
        default=None,
        description="; ".join(f"{t}: {m}" for t, m in PIPELINE_CONDITION_MEANINGS.items()) + ".",
    )
    observed_generation: int | None = None
    """metadata.generation this status describes."""


class TrainingPipeline(ApiModel):
    """Ordered training stages with promotion gates between them."""

    api_version: Literal["trainyard.dev/v1alpha1"] = API_VERSION
    """trainyard.dev/v1alpha1."""
    kind: Literal["TrainingPipeline"] = "TrainingPipeline"
    """TrainingPipeline."""
    metadata: ObjectMeta
    """Standard object metadata."""
    spec: TrainingPipelineSpec
    """Desired state."""
    status: TrainingPipelineStatus | None = None
    """Observed state, written by the operator."""
