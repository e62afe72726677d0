"""Pure builders: a TrainingRun in, the Kubernetes manifests of its children out.

Nothing here talks to the API server: every function takes the parsed run (and the
few facts only the cluster knows, such as the run's uid) and returns plain dicts ready
to be applied. Same input, same output, byte for byte.

The interface the reconcile code uses::

    render_children(run, *, uid, image=None, restart_attempt=0, suspend=False,
                    vllm_image=None) -> list[dict]

in apply order (ConfigMap, workers Service, [vLLM Service, vLLM Deployment], Job). It
raises `UnrenderableRun` (a ValueError whose message reads `spec.field: problem`) for a
spec the API accepts but that cannot run, e.g. a builtin:// model with a vLLM server.

Children and their names (all in the run's namespace, from `names`):

| child | name | labels (besides app.kubernetes.io/*) |
|---|---|---|
| ConfigMap (run.json, trainer.json) | `<run>-config-<attempt>` | trainyard.dev/run, component=config |
| headless Service (rendezvous) | `<run>-workers` | trainyard.dev/run, component=rendezvous |
| indexed Job, attempt N | `<run>-attempt-<N>` | + trainyard.dev/attempt=N, kueue.x-k8s.io/queue-name |
| vLLM Deployment + Service (server mode) | `<run>-vllm` | component=rollout-server |

`<run>` is the run name when the result is a valid DNS label of at most 63 characters
(58 for the Job, whose pods add `-<index>` for their hostnames); otherwise the name is
cut and hashed (`names.child_name`). `trainyard.dev/run` holds `names.run_label_value`
of the run name: list a run's children with that label selector. Every child carries a
controller owner reference to the run, so deleting the run deletes them.

What a worker pod gets (the workload's side of the contract): `/etc/trainyard/run.json`
(the run) and `/etc/trainyard/trainer.json` (TRL options only the operator decides: the
vLLM connection or colocate settings, under TRL's names, to apply over the options
derived from run.json); the environment of the pod contract (`trainyard.api.contract.Env`):
TRAINYARD_RUN_CONFIG, TRAINYARD_TRAINER_OPTIONS, TRAINYARD_RUN_NAME,
TRAINYARD_RUN_NAMESPACE, TRAINYARD_RESTART_ATTEMPT, TRAINYARD_OUTPUT_DIR (an emptyDir),
TRAINYARD_CACHE / HF_HOME / HOME (the cache emptyDir), TRAINYARD_RUNS_URI (the parent
of checkpoint.uri, where `run://` sources resolve), TRAINYARD_VLLM_URL (server mode),
AWS_* for storage.s3, then spec.env.

What the reconcile code decides, not the builders: which attempt is current
(`restart_attempt`, from status), whether the Job is suspended (`suspend`, from
spec.suspend; a run with a Kueue queue is always created suspended, and Kueue then
unsuspends it, so compare children by name, not by whole spec), deleting an old
attempt's Job, and TTL clean-up.
"""

from __future__ import annotations

from trainyard.api import TrainingRun
from trainyard.operator.builders import names
from trainyard.operator.builders.config_map import render_config_map
from trainyard.operator.builders.errors import UnrenderableRun
from trainyard.operator.builders.job import DEFAULT_TRAINER_IMAGE, render_worker_job
from trainyard.operator.builders.service import render_workers_service
from trainyard.operator.builders.vllm import (
    DEFAULT_VLLM_IMAGE,
    needs_rollout_server,
    render_rollout_deployment,
    render_rollout_service,
)

__all__ = [
    "DEFAULT_TRAINER_IMAGE",
    "DEFAULT_VLLM_IMAGE",
    "UnrenderableRun",
    "child_names",
    "names",
    "render_children",
    "render_config_map",
    "render_rollout_deployment",
    "render_rollout_service",
    "render_worker_job",
    "render_workers_service",
]


def render_children(
    run: TrainingRun,
    *,
    uid: str,
    image: str | None = None,
    restart_attempt: int = 0,
    suspend: bool = False,
    vllm_image: str | None = None,
) -> list[dict]:
    """Every child of the run, in the order they should be applied.

    `uid` is the run's metadata.uid (for owner references); `image` and `vllm_image`
    are the operator's default images, used where the spec names none.
    """
    if restart_attempt < 0:
        raise ValueError(f"restart_attempt must be >= 0, got {restart_attempt}")
    children = [
        render_config_map(run, uid=uid, restart_attempt=restart_attempt),
        render_workers_service(run, uid=uid),
    ]
    if needs_rollout_server(run):
        children.append(render_rollout_service(run, uid=uid))
        children.append(render_rollout_deployment(run, uid=uid, image=vllm_image))
    children.append(
        render_worker_job(
            run, uid=uid, image=image, restart_attempt=restart_attempt, suspend=suspend
        )
    )
    return children


def child_names(run: TrainingRun, *, restart_attempt: int = 0) -> set[tuple[str, str]]:
    """(kind, name) of every child `render_children` makes for this attempt, without
    rendering them: what a converged run is checked against.

    >>> from trainyard.api import parse_resource
    >>> run = parse_resource({"apiVersion": "trainyard.dev/v1alpha1", "kind": "TrainingRun",
    ...     "metadata": {"name": "demo"}, "spec": {"method": "sft",
    ...     "model": {"source": "hf://org/m"}, "dataset": {"source": "s3://b/d.jsonl"}}})
    >>> sorted(child_names(run, restart_attempt=1))
    [('ConfigMap', 'demo-config-1'), ('Job', 'demo-attempt-1'), ('Service', 'demo-workers')]
    """
    name = run.metadata.name
    kinds = {
        ("ConfigMap", names.config_map_name(name, restart_attempt)),
        ("Service", names.workers_service_name(name)),
        ("Job", names.worker_job_name(name, restart_attempt)),
    }
    if needs_rollout_server(run):
        kinds |= {
            ("Service", names.rollout_server_name(name)),
            ("Deployment", names.rollout_server_name(name)),
        }
    return kinds
