"""The Trainyard API: resources of group ``trainyard.dev``, version ``v1alpha1``.

Pure pydantic models: no Kubernetes client, no torch. The operator, the CLI and the
training workloads all read resources through these classes.
"""

from trainyard.api.base import API_VERSION, GROUP, VERSION, ApiModel
from trainyard.api.gate import Criterion, PromotionGate, PromotionGateSpec
from trainyard.api.inference import InferenceServer, InferenceServerSpec
from trainyard.api.pipeline import Stage, TrainingPipeline, TrainingPipelineSpec
from trainyard.api.status import Condition
from trainyard.api.training_run import (
    METHODS,
    TrainingRun,
    TrainingRunSpec,
    TrainingRunStatus,
)
from trainyard.api.validation import KINDS, InvalidResource, parse_resource, validate_resource

__all__ = [
    "API_VERSION",
    "GROUP",
    "KINDS",
    "METHODS",
    "VERSION",
    "ApiModel",
    "Condition",
    "Criterion",
    "InferenceServer",
    "InferenceServerSpec",
    "InvalidResource",
    "PromotionGate",
    "PromotionGateSpec",
    "Stage",
    "TrainingPipeline",
    "TrainingPipelineSpec",
    "TrainingRun",
    "TrainingRunSpec",
    "TrainingRunStatus",
    "parse_resource",
    "validate_resource",
]
