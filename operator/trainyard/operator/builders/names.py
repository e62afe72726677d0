"""Deterministic names of a TrainingRun's children, and the label value naming the run.

A run name may be 253 characters long and contain dots; most child names may not. Pod
hostnames, Service names and label values must be DNS labels (at most 63 characters,
lowercase alphanumerics and '-'; a Service name must also start with a letter). A name
that fits is used as is, so `kubectl get` shows what a person expects; one that does
not is cut and given a hash of the full name, so two long runs never share a child.

>>> child_name("sprint-stories-grpo", "workers")
'sprint-stories-grpo-workers'
>>> len(child_name("a" * 100, "workers"))
63
>>> child_name("a" * 100, "workers") == child_name("a" * 100, "workers")
True
>>> child_name("7b.sft", "workers")
'r-7b-sft-workers-98cb1fcd'
"""

from __future__ import annotations

import hashlib
import re

DNS_LABEL_MAX = 63
# An indexed Job's pods get hostname `<job-name>-<index>`, which must itself be a DNS
# label; runs have at most 1024 nodes, so four digits and a dash are kept free.
JOB_NAME_MAX = DNS_LABEL_MAX - len("-1023")
HASH_LENGTH = 8

_NOT_LABEL = re.compile(r"[^a-z0-9-]+")


def short_hash(text: str) -> str:
    """Eight hex digits of the SHA-256 of `text`: stable across processes and releases."""
    return hashlib.sha256(text.encode()).hexdigest()[:HASH_LENGTH]


def child_name(run_name: str, suffix: str, max_length: int = DNS_LABEL_MAX) -> str:
    """`<run>-<suffix>` as a DNS label that starts with a letter, at most `max_length` long.

    The name is the plain concatenation when that already fits; otherwise the run part is
    cleaned (dots become dashes), cut, and followed by a hash of the original run name.
    """
    plain = f"{run_name}-{suffix}"
    if len(plain) <= max_length and _is_dns1035_label(plain):
        return plain
    cleaned = _NOT_LABEL.sub("-", run_name.lower()).strip("-")
    if not cleaned or not cleaned[0].isalpha():
        cleaned = f"r-{cleaned}".rstrip("-")
    tail = f"-{suffix}-{short_hash(run_name)}"
    head = cleaned[: max_length - len(tail)].rstrip("-")
    return f"{head}{tail}"


def run_label_value(run_name: str) -> str:
    """The value of the `trainyard.dev/run` label: the run name when it is a valid label value."""
    if len(run_name) <= DNS_LABEL_MAX:
        return run_name
    tail = f"-{short_hash(run_name)}"
    return run_name[: DNS_LABEL_MAX - len(tail)].rstrip("-.") + tail


def config_map_name(run_name: str, restart_attempt: int) -> str:
    """The ConfigMap holding the run config an attempt's pods read. One per attempt, like
    the Job: a spec edited while the run is suspended (or before a restart) is rendered
    afresh for the next attempt, while a running attempt keeps the config it started with."""
    return child_name(run_name, f"config-{restart_attempt}")


def workers_service_name(run_name: str) -> str:
    """The headless Service that gives worker pods their DNS names (torchrun rendezvous)."""
    return child_name(run_name, "workers")


def worker_job_name(run_name: str, restart_attempt: int) -> str:
    """The indexed Job of one attempt. Each gang restart gets a new Job, so a new attempt
    never waits for the old Job's pods to finish terminating under the same name."""
    return child_name(run_name, f"attempt-{restart_attempt}", JOB_NAME_MAX)


def rollout_server_name(run_name: str) -> str:
    """The vLLM rollout server's Deployment and Service (GRPO/RLOO in server mode)."""
    return child_name(run_name, "vllm")


def _is_dns1035_label(name: str) -> bool:
    return bool(re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name))
