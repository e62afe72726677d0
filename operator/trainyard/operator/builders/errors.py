"""The one error builders raise: a valid spec that cannot become manifests."""

from __future__ import annotations


class UnrenderableRun(ValueError):
    """A spec the API accepts but the builders cannot turn into children.

    The message reads like an API problem, `spec.path: what is wrong; what is allowed`,
    so the reconcile code can put it in a `Valid=False` condition unchanged.
    """

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem
