"""Status parts every resource shares (Kubernetes API conventions)."""

from __future__ import annotations

from typing import Literal

from trainyard.api.base import ApiModel


class Condition(ApiModel):
    """One aspect of the observed state (`metav1.Condition`)."""

    type: str
    """CamelCase adjective or past tense: Valid, Running, Succeeded, Failed, Stalled…"""
    status: Literal["True", "False", "Unknown"]
    """Whether the condition holds."""
    reason: str
    """One CamelCase word saying why."""
    message: str = ""
    """For humans: what happened and what to do."""
    last_transition_time: str
    """When status last changed (RFC 3339)."""
    observed_generation: int | None = None
    """metadata.generation the condition was computed from."""
