"""Conditions and phase: computed whole, compared, written once when they changed.

Conditions are a list keyed by `type` (Kubernetes API conventions): setting a
condition to the status it already has keeps its `lastTransitionTime`, so the time
says when the state changed, not when the operator last looked.
"""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

from trainyard.api.training_run import TERMINAL_PHASES, RunPhase

PHASES = tuple(RunPhase)
__all__ = ["PHASES", "TERMINAL_PHASES"]

# Keys other writers may keep in status (kopf's own state when not in annotations).
FOREIGN_KEYS = frozenset({"kopf"})


def format_time(moment: datetime) -> str:
    """RFC 3339 in UTC with seconds, as the API server writes times."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def seconds_left(since: datetime | None, limit_seconds: int | None, now: datetime) -> float | None:
    """Seconds before `limit_seconds` have passed since `since` (≤ 0: passed), or None
    without a limit or a start: the clock of TTLs and deadlines."""
    if limit_seconds is None or since is None:
        return None
    return limit_seconds - (now - since).total_seconds()


def find_condition(conditions: list[dict[str, Any]] | None, type_: str) -> dict[str, Any] | None:
    return next((c for c in conditions or [] if c.get("type") == type_), None)


def is_condition_true(conditions: list[dict[str, Any]] | None, type_: str) -> bool:
    condition = find_condition(conditions, type_)
    return condition is not None and condition.get("status") == "True"


def set_condition(
    conditions: list[dict[str, Any]] | None,
    type_: str,
    status: bool | str,
    reason: str,
    message: str,
    *,
    now: datetime,
    generation: int | None,
) -> list[dict[str, Any]]:
    """A new list with the condition of `type_` set; other conditions keep their order."""
    status_text = status if isinstance(status, str) else ("True" if status else "False")
    previous = find_condition(conditions, type_)
    transition = (
        previous["lastTransitionTime"]
        if previous is not None
        and previous.get("status") == status_text
        and previous.get("lastTransitionTime")
        else format_time(now)
    )
    condition = {
        "type": type_,
        "status": status_text,
        "reason": reason,
        "message": message,
        "lastTransitionTime": transition,
    }
    if generation is not None:
        condition["observedGeneration"] = generation
    result = [c for c in conditions or [] if c.get("type") != type_]
    index = next((i for i, c in enumerate(conditions or []) if c.get("type") == type_), len(result))
    result.insert(index, condition)
    return result


def own_status(status: dict[str, Any] | None) -> dict[str, Any]:
    """The part of a status the operator computes (a deep copy)."""
    return {k: copy.deepcopy(v) for k, v in (status or {}).items() if k not in FOREIGN_KEYS}


def status_patch(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any] | None:
    """A merge patch turning `old` into `new`, or None when nothing changed.

    Keys dropped from `new` are sent as null so a merge patch removes them.
    """
    old_own = own_status(old)
    if old_own == new:
        return None
    patch: dict[str, Any] = {k: v for k, v in new.items() if old_own.get(k) != v}
    for key in old_own.keys() - new.keys():
        patch[key] = None
    return patch


class StatusDraft:
    """A status being computed by a reconcile: a copy of the observed one, with the
    generation and clock every condition it sets needs. Every controller builds its
    status through one of these and hands `data` to `status_patch`."""

    def __init__(self, old: dict[str, Any] | None, generation: int | None, now: datetime):
        self.data = own_status(old)
        self.generation = generation
        self.now = now

    def condition(self, type_: str, status: bool, reason: str, message: str) -> None:
        self.data["conditions"] = set_condition(
            self.data.get("conditions"),
            type_,
            status,
            reason,
            message,
            now=self.now,
            generation=self.generation,
        )

    def clear(self, type_: str, reason: str, message: str) -> None:
        """Set a condition False only where it was set before (no noise on new objects)."""
        if find_condition(self.data.get("conditions"), type_) is not None:
            self.condition(type_, False, reason, message)
