"""Reconcile one InferenceServer: observed state in, a plan and the new status out.

Pure and level-triggered, like the TrainingRun's reconcile. The decisions, in order:

1. A spec that does not parse, or cannot be rendered, is `Invalid` (condition Valid=False
   with the field path); the children are left alone, so a bad edit never takes down
   a server that serves.
2. `run://` sources are resolved through the TrainingRun they name (observed): under
   that run's `checkpoint.uri`. A run that does not exist or has not finished (for its
   final model) makes the server `Pending`; a failed run (or one without
   `checkpoint.uri`) makes it `Failed`. Either way an existing Deployment keeps serving
   the model it has.
3. The Service and Deployment are rendered; a missing one is created, one whose
   `trainyard.dev/spec-hash` differs from the rendering is replaced (same name, new
   template: the Deployment rolls, `maxUnavailable: 0` keeps the old model serving).
4. Status from the Deployment's status: `Ready` once every replica is updated and
   available (only counted after the Deployment controller has seen the new template:
   `status.rollout.sinceGeneration`), `Progressing` meanwhile, `Failed` when the
   Deployment reports ProgressDeadlineExceeded. `status.model` names the model the
   available replicas serve; it changes only when a rollout has finished.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from trainyard.api import InvalidResource, contract, parse_resource
from trainyard.api.inference import (
    InferenceServer,
    ServerCondition,
    ServerPhase,
    ServerReason,
)
from trainyard.api.training_run import RunPhase
from trainyard.operator.builders.errors import UnrenderableRun
from trainyard.operator.builders.inference import (
    SPEC_HASH_ANNOTATION,
    render_server_children,
    run_sources,
    served_model_name,
    service_url,
)
from trainyard.operator.plan import Plan, is_owned, user_document
from trainyard.operator.status import StatusDraft, status_patch


@dataclass(frozen=True)
class ServerObserved:
    """Everything the server's reconcile looks at, read by the I/O layer."""

    server: dict[str, Any]
    children: list[dict[str, Any]] = field(default_factory=list)
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    """The TrainingRuns the server's run:// sources name, by name (absent: not found)."""
    now: datetime | None = None
    image: str | None = None
    """The operator's default vLLM image."""


class _Status(StatusDraft):
    """An InferenceServer's status being computed."""

    def set(self, key: str, value: Any) -> None:
        """Set a field, or drop it for None (a merge patch then removes it)."""
        if value is None:
            self.data.pop(key, None)
        else:
            self.data[key] = value


@dataclass(frozen=True)
class _Sources:
    """run:// sources resolved, or why they cannot be yet."""

    resolved: dict[str, str]
    model_revision: str | None = None
    waiting: str | None = None
    failed: str | None = None


def reconcile(observed: ServerObserved) -> Plan:
    """The plan that moves the server toward its spec, and the status that tells the truth."""
    body = observed.server
    meta = body.get("metadata") or {}
    now = observed.now or datetime.now().astimezone()
    old_status = body.get("status")
    status = _Status(old_status, meta.get("generation"), now)
    try:
        server = parse_resource(user_document(body))
    except InvalidResource as invalid:
        return _invalid(status, old_status, invalid.problems)
    assert isinstance(server, InferenceServer)
    try:
        return _reconcile_valid(observed, server, status)
    except UnrenderableRun as error:
        fresh = _Status(old_status, meta.get("generation"), now)
        return _invalid(fresh, old_status, [str(error)])


def _invalid(status: _Status, old_status: dict[str, Any] | None, problems: list[str]) -> Plan:
    message = "; ".join(problems)
    status.condition(ServerCondition.VALID, False, ServerReason.INVALID_SPEC, message)
    status.data["phase"] = ServerPhase.INVALID
    status.data["message"] = f"fix the spec: {message}"
    status.data["observedGeneration"] = status.generation
    return Plan(status_patch=status_patch(old_status, status.data), status=status.data)


def resolve_sources(server: InferenceServer, runs: dict[str, dict[str, Any]]) -> _Sources:
    """Each run:// source as the storage URI of that run's checkpoint (see module docstring)."""
    resolved: dict[str, str] = {}
    revision = None
    for field_path, uri in run_sources(server):
        try:
            reference = contract.parse_run_reference(uri)
        except contract.SourceURIError as error:
            raise UnrenderableRun(field_path, str(error)) from None
        if reference.is_latest:
            raise UnrenderableRun(
                field_path,
                f"{uri!r}: the newest checkpoint is only known by looking at storage; serve "
                "run://RUN (its final model) or run://RUN/step-N",
            )
        run = runs.get(reference.run)
        if run is None:
            return _Sources(resolved, waiting=f"TrainingRun {reference.run} does not exist")
        phase = (run.get("status") or {}).get("phase")
        if phase == RunPhase.FAILED:
            return _Sources(
                resolved, failed=f"TrainingRun {reference.run} failed: it has no model to serve"
            )
        root = ((run.get("spec") or {}).get("checkpoint") or {}).get("uri")
        if not root:
            return _Sources(
                resolved,
                failed=f"TrainingRun {reference.run} has no checkpoint.uri: its model is "
                "not kept anywhere a server can load it from",
            )
        if reference.checkpoint == contract.CHECKPOINT_FINAL and phase != RunPhase.SUCCEEDED:
            return _Sources(
                resolved,
                waiting=f"TrainingRun {reference.run} has not finished (phase {phase or 'none'})",
            )
        resolved[uri] = f"{root.rstrip('/')}/{reference.checkpoint}"
        if field_path == "spec.model.source":
            revision = (run.get("metadata") or {}).get("uid")
    return _Sources(resolved, model_revision=revision)


def _reconcile_valid(observed: ServerObserved, server: InferenceServer, status: _Status) -> Plan:
    body = observed.server
    meta = body.get("metadata") or {}
    uid = meta.get("uid", "")
    old_status = body.get("status")
    spec = server.spec
    sources = resolve_sources(server, observed.runs)
    status.condition(ServerCondition.VALID, True, ServerReason.SPEC_VALID, "the spec is valid")
    status.data["observedGeneration"] = meta.get("generation")
    status.data["url"] = service_url(server)
    status.data["servedModelName"] = served_model_name(server)
    status.data["replicas"] = spec.replicas

    ours = {
        (c.get("kind"), c["metadata"]["name"]): c for c in observed.children if is_owned(c, uid)
    }
    creates: list[dict[str, Any]] = []
    updates: list[dict[str, Any]] = []
    desired_hash = None
    if sources.waiting is None and sources.failed is None:
        desired = render_server_children(
            server,
            uid=uid,
            resolved=sources.resolved,
            image=observed.image,
            model_revision=sources.model_revision,
        )
        for manifest in desired:
            existing = ours.get((manifest["kind"], manifest["metadata"]["name"]))
            if existing is None:
                creates.append(manifest)
            elif _hash(existing) != _hash(manifest):
                updates.append(manifest)
        deployment_manifest = desired[-1]
        desired_hash = _hash(deployment_manifest)
        deployment = ours.get(("Deployment", deployment_manifest["metadata"]["name"]))
        if any(m["kind"] == "Deployment" for m in creates + updates):
            since = None
            if deployment is not None:
                since = int((deployment.get("status") or {}).get("observedGeneration") or 0)
            rollout: dict[str, Any] = {"templateHash": desired_hash, "model": spec.model.source}
            if since is not None:
                rollout["sinceGeneration"] = since
            status.data["rollout"] = rollout
            rolling = True
        else:
            rolling = False
    else:
        deployment = next((c for (kind, _), c in ours.items() if kind == "Deployment"), None)
        rolling = False

    _take_readiness(status, server, deployment, desired_hash, rolling, sources)
    return Plan(
        status_patch=status_patch(old_status, status.data),
        creates=tuple(creates),
        updates=tuple(updates),
        status=status.data,
    )


def _hash(manifest: dict[str, Any]) -> str | None:
    return ((manifest.get("metadata") or {}).get("annotations") or {}).get(SPEC_HASH_ANNOTATION)


def _rolled_out(
    deployment: dict[str, Any], replicas: int, rollout: dict[str, Any] | None, desired_hash: str
) -> bool:
    """Whether every replica runs the desired template and is available, as the
    Deployment controller reports it after having seen that template."""
    observed = deployment.get("status") or {}
    since = (
        (rollout or {}).get("sinceGeneration")
        if (rollout or {}).get("templateHash") == desired_hash
        else None
    )
    if since is not None and int(observed.get("observedGeneration") or 0) <= since:
        return False  # the status still describes the template before ours
    updated = int(observed.get("updatedReplicas") or 0)
    available = int(observed.get("availableReplicas") or 0)
    total = int(observed.get("replicas") or 0)
    return updated >= replicas and available >= replicas and total <= updated


def _deadline_exceeded(deployment: dict[str, Any]) -> bool:
    return any(
        c.get("type") == "Progressing"
        and c.get("status") == "False"
        and c.get("reason") == ServerReason.PROGRESS_DEADLINE_EXCEEDED
        for c in (deployment.get("status") or {}).get("conditions") or []
    )


def _take_readiness(
    status: _Status,
    server: InferenceServer,
    deployment: dict[str, Any] | None,
    desired_hash: str | None,
    rolling: bool,
    sources: _Sources,
) -> None:
    replicas = server.spec.replicas
    observed = (deployment or {}).get("status") or {}
    available = int(observed.get("availableReplicas") or 0)
    status.data["readyReplicas"] = int(observed.get("readyReplicas") or 0)
    status.data["updatedReplicas"] = int(observed.get("updatedReplicas") or 0)
    status.data["ready"] = available > 0
    if deployment is None:
        status.set("model", None)
        status.set("adapters", None)

    current = (
        deployment is not None
        and not rolling
        and desired_hash is not None
        and _hash(deployment) == desired_hash
    )
    if current and _rolled_out(deployment, replicas, status.data.get("rollout"), desired_hash):
        status.data["model"] = server.spec.model.source
        status.set("adapters", [a.name for a in server.spec.adapters or []] or None)
        status.set("rollout", None)
        phase, message = (
            ServerPhase.READY,
            f"serving {server.spec.model.source} on {replicas} replicas"
            if replicas
            else "scaled to zero replicas",
        )
    elif sources.failed is not None:
        phase, message = ServerPhase.FAILED, sources.failed
    elif sources.waiting is not None:
        phase, message = ServerPhase.PENDING, f"waiting for the model: {sources.waiting}"
    elif current and _deadline_exceeded(deployment):  # type: ignore[arg-type]
        phase, message = (
            ServerPhase.FAILED,
            "the Deployment made no progress within its deadline: "
            "kubectl describe the server's pods (image, GPUs, model download)",
        )
    else:
        target = (status.data.get("rollout") or {}).get("model", server.spec.model.source)
        phase, message = (
            ServerPhase.PROGRESSING,
            f"rolling out {target}: {status.data['updatedReplicas']} of {replicas} replicas "
            f"updated, {available} available",
        )
    if deployment is not None and status.data.get("model") and sources.waiting is not None:
        message += f"; still serving {status.data['model']}"
    status.data["phase"] = phase
    status.data["message"] = message

    serving = status.data.get("model")
    if replicas == 0:
        status.condition(
            ServerCondition.READY, False, ServerReason.SCALED_TO_ZERO, "spec.replicas is 0"
        )
    elif available > 0:
        status.condition(
            ServerCondition.READY,
            True,
            ServerReason.REPLICAS_AVAILABLE,
            f"{available} of {replicas} replicas available"
            + (f", serving {serving}" if serving else ""),
        )
    elif phase == ServerPhase.PROGRESSING:
        status.condition(
            ServerCondition.READY,
            False,
            ServerReason.ROLLING_OUT,
            f"no replica available; {message}",
        )
    elif phase in (ServerPhase.PENDING, ServerPhase.FAILED) and deployment is None:
        reason = (
            ServerReason.WAITING_FOR_MODEL
            if phase == ServerPhase.PENDING
            else ServerReason.MODEL_UNAVAILABLE
        )
        status.condition(ServerCondition.READY, False, reason, message)
    else:
        status.condition(ServerCondition.READY, False, ServerReason.NO_REPLICA_AVAILABLE, message)
