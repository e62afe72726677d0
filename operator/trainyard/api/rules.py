"""Cross-field rules, written once and enforced twice.

Each rule carries a CEL expression (the API server evaluates it through the CRD's
`x-kubernetes-validations`) and the same check in Python (the operator and `trainyard
validate` evaluate it), with one message, so both places say the same thing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic_core import PydanticCustomError


@dataclass(frozen=True)
class Rule:
    """A rule over one object: `check(obj)` is true exactly when `cel` is."""

    name: str
    cel: str
    message: str
    field: str
    check: Callable[[Any], bool]

    def to_crd(self) -> dict[str, str]:
        """The rule as an `x-kubernetes-validations` entry."""
        return {"rule": self.cel, "message": self.message, "fieldPath": "." + self.field}


class RuleViolation(ValueError):
    """A rule that failed, with the field it is about (relative to the checked object)."""


def check_rules(obj: Any, rules: tuple[Rule, ...]) -> None:
    """Raise a validation error naming every rule the object breaks."""
    broken = [rule for rule in rules if not rule.check(obj)]
    if broken:
        raise nested_error([(rule.field, rule.message) for rule in broken])


def nested_error(problems: list[tuple[str, str]]) -> PydanticCustomError:
    """An error that stands for several problems, each at a path below the failing object.

    The error formatter (`trainyard.api.validation`) expands it into one line a problem.
    """
    return PydanticCustomError(
        "nested",
        "{messages}",
        {"messages": "; ".join(f"{path}: {msg}" for path, msg in problems), "problems": problems},
    )
