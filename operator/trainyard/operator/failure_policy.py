"""What a failed or disrupted worker means for the gang: restart it, or give up.

A training gang is all-or-nothing (one lost rank stalls every other rank in its
collectives), so any disruption restarts the whole gang from the latest complete
checkpoint. Preemptions and node loss are not the run's fault: they are counted in
`status.preemptions` and never use the `maxRestarts` budget. Failures of the run
itself (OOM, non-zero exit) do. The counters live in the run's status, so neither
deleting children nor restarting the operator resets them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from trainyard.api.contract import is_oom_termination
from trainyard.operator import reasons
from trainyard.operator.outcome import Outcome

Kind = Literal["preemption", "failure"]

# pod condition DisruptionTarget reasons (Kubernetes pod disruption conditions)
DISRUPTION_REASONS: dict[str, tuple[Kind, str]] = {
    "PreemptionByScheduler": ("preemption", reasons.PREEMPTED),
    "PreemptionByKubeScheduler": ("preemption", reasons.PREEMPTED),
    "EvictionByEvictionAPI": ("preemption", reasons.EVICTED),
    "DeletionByTaintManager": ("preemption", reasons.NODE_LOST),
    "TerminationByKubelet": ("preemption", reasons.NODE_LOST),
    "DeletionByPodGC": ("preemption", reasons.NODE_LOST),
}
# pod.status.reason set by the node lifecycle / kubelet
POD_REASONS: dict[str, tuple[Kind, str]] = {
    "NodeLost": ("preemption", reasons.NODE_LOST),
    "NodeShutdown": ("preemption", reasons.NODE_LOST),
    "Terminated": ("preemption", reasons.NODE_LOST),
    "Evicted": ("preemption", reasons.EVICTED),
    "UnexpectedAdmissionError": ("preemption", reasons.NODE_LOST),
}


@dataclass(frozen=True)
class Disruption:
    """Why the current attempt cannot go on."""

    kind: Kind
    reason: str
    message: str


def _disruption_condition(pod: dict[str, Any]) -> Disruption | None:
    for condition in pod.get("status", {}).get("conditions") or []:
        if condition.get("type") == "DisruptionTarget" and condition.get("status") == "True":
            kind, reason = DISRUPTION_REASONS.get(
                condition.get("reason", ""), ("preemption", reasons.PREEMPTED)
            )
            return Disruption(
                kind,
                reason,
                f"pod {_name(pod)}: {condition.get('reason')} {condition.get('message', '')}".strip(),
            )
    return None


def _pod_reason(pod: dict[str, Any]) -> Disruption | None:
    status = pod.get("status", {})
    if status.get("reason") in POD_REASONS:
        kind, reason = POD_REASONS[status["reason"]]
        return Disruption(
            kind,
            reason,
            f"pod {_name(pod)}: {status['reason']} {status.get('message', '')}".strip(),
        )
    return None


def _terminated(pod: dict[str, Any]) -> Iterable[tuple[str, dict[str, Any]]]:
    for container in pod.get("status", {}).get("containerStatuses") or []:
        state = container.get("state", {}).get("terminated") or container.get("lastState", {}).get(
            "terminated"
        )
        if state:
            yield container.get("name", "?"), state


def _cuda_out_of_memory(pod: dict[str, Any]) -> Disruption | None:
    """The worker said it ran out of GPU memory: its termination message (torchrun exits 1
    whatever its ranks did) or, when the container runs the worker itself, its exit status."""
    for name, state in _terminated(pod):
        message = (state.get("message") or "").strip()
        if is_oom_termination(message, state.get("exitCode")):
            said = message.splitlines()[0] if message else f"exit code {state.get('exitCode')}"
            return Disruption(
                "failure",
                reasons.CUDA_OUT_OF_MEMORY,
                f"pod {_name(pod)}: container {name} ran out of GPU memory ({said})",
            )
    return None


def _oom_killed(pod: dict[str, Any]) -> Disruption | None:
    for name, state in _terminated(pod):
        if state.get("reason") == "OOMKilled":
            return Disruption(
                "failure",
                reasons.OOM_KILLED,
                f"pod {_name(pod)}: container {name} was OOMKilled; raise resources.limits.memory or lower the batch size",
            )
    return None


def _non_zero_exit(pod: dict[str, Any]) -> Disruption | None:
    if pod.get("status", {}).get("phase") != "Failed":
        return None
    for name, state in _terminated(pod):
        if state.get("exitCode", 0) != 0:
            return Disruption(
                "failure",
                reasons.NON_ZERO_EXIT,
                f"pod {_name(pod)}: container {name} exited with code {state['exitCode']}",
            )
    return None


def _pod_failed(pod: dict[str, Any]) -> Disruption | None:
    if pod.get("status", {}).get("phase") == "Failed":
        return Disruption("failure", reasons.POD_FAILED, f"pod {_name(pod)} failed")
    return None


# First matching rule wins: a preempted pod also exits non-zero (137), and that exit is
# not the run's fault.
POD_RULES: tuple[Callable[[dict[str, Any]], Disruption | None], ...] = (
    _disruption_condition,
    _pod_reason,
    _cuda_out_of_memory,
    _oom_killed,
    _non_zero_exit,
    _pod_failed,
)


def _name(pod: dict[str, Any]) -> str:
    return pod.get("metadata", {}).get("name", "?")


def classify_pod(pod: dict[str, Any]) -> Disruption | None:
    """The disruption a pod shows, or None when it is healthy (or still starting)."""
    for rule in POD_RULES:
        if (found := rule(pod)) is not None:
            return found
    return None


def job_condition(job: dict[str, Any] | None, type_: str) -> dict[str, Any] | None:
    for condition in (job or {}).get("status", {}).get("conditions") or []:
        if condition.get("type") == type_ and condition.get("status") == "True":
            return condition
    return None


def classify_attempt(job: dict[str, Any] | None, pods: list[dict[str, Any]]) -> Disruption | None:
    """The disruption of the current attempt: preemption beats failure, pods beat the Job,
    and among failures GPU out-of-memory beats the rest (the other ranks of the gang fail
    because that one did)."""
    found = [d for pod in pods if (d := classify_pod(pod)) is not None]
    preemptions = [d for d in found if d.kind == "preemption"]
    if preemptions:
        return preemptions[0]
    found.sort(key=lambda d: d.reason != reasons.CUDA_OUT_OF_MEMORY)
    if found:
        return found[0]
    if (failed := job_condition(job, "Failed")) is not None:
        if failed.get("reason") == "PodFailurePolicy" and "DisruptionTarget" in failed.get(
            "message", ""
        ):
            return Disruption(
                "preemption",
                reasons.PREEMPTED,
                f"job {(job or {}).get('metadata', {}).get('name')}: {failed.get('message', '')}",
            )
        return Disruption(
            "failure",
            reasons.JOB_FAILED,
            f"job {(job or {}).get('metadata', {}).get('name')}: {failed.get('reason', '')} {failed.get('message', '')}".strip(),
        )
    return None


@dataclass(frozen=True)
class Decision:
    """What to do about a disruption, with the counters after it."""

    restart: bool
    restarts: int
    preemptions: int
    reason: str
    message: str


def decide(
    disruption: Disruption, *, restarts: int, preemptions: int, max_restarts: int
) -> Decision:
    """Restart the gang within the budget; a preemption always restarts and costs nothing."""
    if disruption.kind == "preemption":
        return Decision(True, restarts, preemptions + 1, disruption.reason, disruption.message)
    if restarts < max_restarts:
        return Decision(
            True,
            restarts + 1,
            preemptions,
            disruption.reason,
            f"{disruption.message} (restart {restarts + 1} of {max_restarts})",
        )
    return Decision(
        False,
        restarts,
        preemptions,
        reasons.RESTART_BUDGET_EXHAUSTED,
        f"{disruption.message}; the restart budget is used up ({restarts} of runPolicy.maxRestarts={max_restarts})",
    )


def outcome(
    disruption: Disruption | None, *, restarts: int, preemptions: int, max_restarts: int
) -> Outcome | None:
    """The gang's fate after a disruption: a restart within the budget, or failure."""
    if disruption is None:
        return None
    decision = decide(
        disruption, restarts=restarts, preemptions=preemptions, max_restarts=max_restarts
    )
    return Outcome(
        "restart" if decision.restart else "fail",
        decision.reason,
        decision.message,
        counters=(decision.restarts, decision.preemptions),
    )
