"""The children of an InferenceServer: a vLLM OpenAI-compatible Deployment and its Service.

Pure: an InferenceServer (and the few facts only the cluster knows: its uid, where its
`run://` sources lie, the operator's default image) in, plain manifests out.

| child | name | labels (besides app.kubernetes.io/*) |
|---|---|---|
| Deployment (vLLM, `vllm serve`) | `<server>-server` | trainyard.dev/server, component=inference-server |
| ClusterIP Service, port spec.port | `<server>-server` | same |

Where the model and adapters come from (the pod contract's source URIs):

* `hf://org/name[@rev]`: the hub id (and `--revision`); vLLM downloads it into the cache
  volume, a LoRA adapter too.
* `s3://bucket/prefix`: the base model is streamed by vLLM's Run:ai streamer
  (`--load-format runai_streamer`: weights go from S3 to the GPU without a copy on
  disk; the image needs vLLM's `runai` extra). A LoRA adapter cannot be streamed: an
  init container (the AWS CLI) copies it into the `adapters` volume before vLLM starts.
* `file://path`: a path inside the image (or a volume the image mounts).
* `run://RUN[/step-N|final]`: the checkpoint of a TrainingRun, under that run's own
  `checkpoint.uri` (the reconcile looks it up and passes `resolved`); then as above.

Rolling updates keep the old model serving until the new one is ready: `maxUnavailable:
0`, `maxSurge: 1` (one spare replica's GPUs during a rollout). A change of the rendered
Deployment (a new model, new flags) changes its `trainyard.dev/spec-hash` annotation,
which is how the reconcile knows to replace it; `trainyard.dev/model-revision` on the
pod template changes when a `run://` model's run is re-run under the same name, so the
pods restart onto the new weights.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from collections.abc import Mapping

from trainyard.api import contract
from trainyard.api.inference import InferenceServer
from trainyard.operator.builders import labels, names, pod_settings
from trainyard.operator.builders.errors import UnrenderableRun
from trainyard.operator.builders.owner import owner_reference
from trainyard.operator.builders.vllm import (
    DEFAULT_VLLM_IMAGE,
    HEALTH_PATH,
    STARTUP_PROBE_FAILURES,
    STARTUP_PROBE_PERIOD,
)

SERVER_LABEL = "trainyard.dev/server"
INFERENCE_SERVER = "inference-server"  # app.kubernetes.io/component
SPEC_HASH_ANNOTATION = "trainyard.dev/spec-hash"
MODEL_REVISION_ANNOTATION = "trainyard.dev/model-revision"
# Pinned: the AWS CLI v2 reads AWS_ENDPOINT_URL (S3-compatible stores) since 2.13.
FETCH_IMAGE = "amazon/aws-cli:2.22.35"
ADAPTERS_VOLUME = "adapters"
ADAPTERS_DIR = "/var/lib/trainyard/adapters"
# `vllm serve --max-lora-rank` takes only these (vLLM 0.31's argparse choices).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# A model of tens of GB may download for long; the startup probe allows 30 minutes, the
# Deployment reports ProgressDeadlineExceeded after an hour.
PROGRESS_DEADLINE_SECONDS = 3600


def server_name(name: str) -> str:
    """The Deployment's and the Service's name."""
    return names.child_name(name, "server")


def server_label_value(name: str) -> str:
    """The value of `trainyard.dev/server` on every child (names longer than a label are hashed)."""
    return names.run_label_value(name)


def service_url(server: InferenceServer) -> str:
    """Where clients in the cluster reach the OpenAI API (append /v1)."""
    host = server_name(server.metadata.name)
    if server.metadata.namespace:
        host = f"{host}.{server.metadata.namespace}.svc"
    return f"http://{host}:{server.spec.port}"


def served_model_name(server: InferenceServer) -> str:
    """The name clients ask for the base model: spec.servedModelName, else the server's
    name, else (when an adapter already has the server's name) `<name>-base`.

    vLLM looks a request's model up among the base names first, so an adapter named like
    the base model could never be reached.
    """
    adapters = {a.name for a in server.spec.adapters or []}
    explicit = server.spec.served_model_name
    if explicit is not None:
        if explicit in adapters:
            raise UnrenderableRun(
                "spec.servedModelName",
                f"{explicit!r} is also an adapter's name; vLLM would answer every request for "
                "it with the base model: give the base model or the adapter another name",
            )
        return explicit
    name = server.metadata.name
    return f"{name}-base" if name in adapters else name


def selector_labels(server: InferenceServer) -> dict[str, str]:
    return {
        SERVER_LABEL: server_label_value(server.metadata.name),
        labels.COMPONENT_LABEL: INFERENCE_SERVER,
    }


def child_labels(server: InferenceServer) -> dict[str, str]:
    return {
        **(server.metadata.labels or {}),
        "app.kubernetes.io/name": "trainyard",
        "app.kubernetes.io/instance": server_label_value(server.metadata.name),
        "app.kubernetes.io/part-of": "trainyard",
        "app.kubernetes.io/managed-by": labels.MANAGED_BY,
        **selector_labels(server),
    }


def _metadata(server: InferenceServer, uid: str) -> dict:
    metadata: dict = {"name": server_name(server.metadata.name)}
    if server.metadata.namespace:
        metadata["namespace"] = server.metadata.namespace
    metadata["labels"] = child_labels(server)
    metadata["ownerReferences"] = [owner_reference(server.kind, server.metadata.name, uid)]
    return metadata


# --------------------------------------------------------------------------- sources


def run_sources(server: InferenceServer) -> list[tuple[str, str]]:
    """(field path, URI) of every `run://` source: what the reconcile must resolve."""
    sources = [("spec.model.source", server.spec.model.source)]
    sources += [
        (f"spec.adapters[{i}].source", a.source) for i, a in enumerate(server.spec.adapters or [])
    ]
    return [(field, uri) for field, uri in sources if uri.startswith("run://")]


def _storage_uri(field: str, uri: str, resolved: Mapping[str, str]) -> str:
    """A source with `run://` replaced by where that checkpoint lies."""
    if not uri.startswith("run://"):
        return uri
    if uri not in resolved:
        raise UnrenderableRun(field, f"{uri!r} is not resolved yet (its TrainingRun is unknown)")
    return resolved[uri]


def _local_path(uri: str) -> str:
    return "/" + contract.parse_source(uri).path.lstrip("/")


def model_args(server: InferenceServer, resolved: Mapping[str, str]) -> tuple[str, list[str]]:
    """The model argument of `vllm serve` and the options that come with it."""
    model = server.spec.model
    uri = _storage_uri("spec.model.source", model.source, resolved)
    parsed = contract.parse_source(uri)
    if parsed.scheme == "hf":
        revision = model.revision or parsed.revision
        return parsed.path, (["--revision", revision] if revision else [])
    if parsed.scheme == "s3":
        return uri, ["--load-format", "runai_streamer"]
    if parsed.scheme == "file":
        return _local_path(uri), []
    raise UnrenderableRun(
        "spec.model.source",
        f"{model.source!r} cannot be served by vLLM (builtin models exist only inside trainer "
        "processes); allowed: hf://, s3://, file://, run://",
    )


def adapter_paths(server: InferenceServer, resolved: Mapping[str, str]) -> list[tuple[str, str]]:
    """(name, what vLLM loads) of every adapter: a hub id, a path in the image, or the
    directory the fetch init container fills."""
    out = []
    for index, adapter in enumerate(server.spec.adapters or []):
        field = f"spec.adapters[{index}].source"
        uri = _storage_uri(field, adapter.source, resolved)
        parsed = contract.parse_source(uri)
        if parsed.scheme == "hf":
            if parsed.revision:
                raise UnrenderableRun(
                    field, f"{adapter.source!r}: vLLM loads hub adapters at their main revision"
                )
            out.append((adapter.name, parsed.path))
        elif parsed.scheme == "s3":
            out.append((adapter.name, f"{ADAPTERS_DIR}/{adapter.name}"))
        elif parsed.scheme == "file":
            out.append((adapter.name, _local_path(uri)))
        else:
            raise UnrenderableRun(field, f"{adapter.source!r} cannot be loaded by vLLM")
    return out


def server_args(server: InferenceServer, resolved: Mapping[str, str] | None = None) -> list[str]:
    """Arguments after `vllm serve`."""
    resolved = resolved or {}
    spec, vllm = server.spec, server.spec.vllm
    if spec.gpus > 0 and vllm.tensor_parallel_size > spec.gpus:
        raise UnrenderableRun(
            "spec.vllm.tensorParallelSize",
            f"{vllm.tensor_parallel_size} is more than the {spec.gpus} GPUs of a replica "
            "(spec.gpus); tensor parallelism splits one replica over that many GPUs",
        )
    model, model_options = model_args(server, resolved)
    dtype = vllm.dtype if vllm.dtype != "auto" else spec.model.dtype
    args = [
        model,
        "--host", "0.0.0.0",
        "--port", str(spec.port),
        "--served-model-name", served_model_name(server),
        "--tensor-parallel-size", str(vllm.tensor_parallel_size),
        "--gpu-memory-utilization", str(vllm.gpu_memory_utilization),
        "--dtype", dtype,
        *model_options,
    ]  # fmt: skip
    if vllm.max_model_len is not None:
        args += ["--max-model-len", str(vllm.max_model_len)]
    if spec.model.trust_remote_code:
        args.append("--trust-remote-code")
    adapters = adapter_paths(server, resolved)
    if adapters and vllm.max_lora_rank not in VLLM_LORA_RANKS:
        allowed = ", ".join(map(str, VLLM_LORA_RANKS))
        raise UnrenderableRun(
            "spec.vllm.maxLoraRank",
            f"{vllm.max_lora_rank} is not a rank vLLM serves adapters at; allowed: {allowed} "
            "(the next one up from your adapters' rank)",
        )
    if adapters:
        args += ["--enable-lora", "--max-lora-rank", str(vllm.max_lora_rank)]
        args += ["--max-loras", str(len(adapters))]
        args += ["--lora-modules", *(f"{name}={path}" for name, path in adapters)]
    return args + list(vllm.extra_args or [])


# --------------------------------------------------------------------------- manifests


def _s3_env(server: InferenceServer) -> list[dict]:
    """S3 settings as boto3, the AWS CLI and vLLM's Run:ai streamer read them."""
    env = pod_settings.s3_env(server)  # type: ignore[arg-type]  # reads spec.storage only
    s3 = server.spec.storage.s3 if server.spec.storage else None
    if s3 is not None and s3.endpoint:
        # S3-compatible stores (MinIO…) are usually path-style; the streamer defaults to
        # virtual-host addressing, and asks the EC2 metadata service for credentials.
        if s3.addressing_style != "virtual":
            env.append({"name": "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING", "value": "0"})
        env.append({"name": "AWS_EC2_METADATA_DISABLED", "value": "true"})
    return env


def _fetch_containers(server: InferenceServer, resolved: Mapping[str, str]) -> list[dict]:
    """One init container per S3 adapter: copy it into the adapters volume."""
    containers = []
    for index, adapter in enumerate(server.spec.adapters or []):
        uri = _storage_uri(f"spec.adapters[{index}].source", adapter.source, resolved)
        if not uri.startswith("s3://"):
            continue
        target = f"{ADAPTERS_DIR}/{adapter.name}"
        containers.append(
            {
                "name": f"fetch-adapter-{index}",
                "image": FETCH_IMAGE,
                "command": ["sh", "-c"],
                "args": [
                    f"aws s3 cp --recursive --no-progress {shlex.quote(uri.rstrip('/') + '/')} "
                    f"{shlex.quote(target)}"
                ],
                "env": pod_settings.merge_env(
                    [{"name": "HOME", "value": f"{pod_settings.CACHE_DIR}/home"}],
                    _s3_env(server),
                ),
                "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}},
                "securityContext": pod_settings.container_security_context(),
                "volumeMounts": [
                    {"name": ADAPTERS_VOLUME, "mountPath": ADAPTERS_DIR},
                    {"name": pod_settings.CACHE_VOLUME, "mountPath": pod_settings.CACHE_DIR},
                ],
            }
        )
    return containers


def _health_probe(period: int, failures: int) -> dict:
    return {
        "httpGet": {"path": HEALTH_PATH, "port": "http"},
        "periodSeconds": period,
        "timeoutSeconds": 5,
        "failureThreshold": failures,
    }


def render_server_deployment(
    server: InferenceServer,
    *,
    uid: str,
    resolved: Mapping[str, str] | None = None,
    image: str | None = None,
    model_revision: str | None = None,
) -> dict:
    """The vLLM Deployment. `resolved` maps each `run://` source to its storage URI;
    `model_revision` names the exact weights behind a `run://` model (the run's uid)."""
    resolved = resolved or {}
    spec = server.spec
    args = server_args(server, resolved)
    metadata = _metadata(server, uid)
    pod_labels = child_labels(server)
    queue = spec.scheduling.queue if spec.scheduling else None
    if queue:
        # Kueue admits Deployments through its pod integration, which reads this label.
        metadata["labels"][labels.KUEUE_QUEUE_LABEL] = queue
        pod_labels[labels.KUEUE_QUEUE_LABEL] = queue
    streams_s3 = "runai_streamer" in args
    init_containers = _fetch_containers(server, resolved)
    container = {
        "name": "vllm",
        "image": spec.image or image or DEFAULT_VLLM_IMAGE,
        "command": ["vllm", "serve"],
        "args": args,
        "env": pod_settings.merge_env(
            pod_settings.cache_env(),
            _s3_env(server) if streams_s3 else [],
            pod_settings.user_env(server),  # type: ignore[arg-type]  # reads spec.env only
        ),
        # vLLM serves the OpenAI API and its Prometheus /metrics on this one port.
        "ports": [{"name": "http", "containerPort": spec.port, "protocol": "TCP"}],
        "resources": pod_settings.container_resources(spec.resources, spec.gpus),
        "startupProbe": _health_probe(STARTUP_PROBE_PERIOD, STARTUP_PROBE_FAILURES),
        "readinessProbe": _health_probe(10, 3),
        # A wedged engine answers /health with an error: restart it, but only after a
        # minute, so a long request burst does not kill a healthy server.
        "livenessProbe": _health_probe(20, 3),
        "securityContext": pod_settings.container_security_context(),
        "volumeMounts": [
            *pod_settings.volume_mounts(),
            *([{"name": ADAPTERS_VOLUME, "mountPath": ADAPTERS_DIR}] if init_containers else []),
        ],
    }
    template_metadata: dict = {"labels": pod_labels}
    if model_revision:
        template_metadata["annotations"] = {MODEL_REVISION_ANNOTATION: model_revision}
    pod_spec: dict = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": pod_settings.pod_security_context(),
        **pod_settings.scheduling_fields(server),  # type: ignore[arg-type]  # spec.scheduling
    }
    if init_containers:
        pod_spec["initContainers"] = init_containers
    pod_spec["containers"] = [container]
    pod_spec["volumes"] = [
        *pod_settings.volumes(spec.resources),
        *([{"name": ADAPTERS_VOLUME, "emptyDir": {}}] if init_containers else []),
    ]
    return with_spec_hash(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": metadata,
            "spec": {
                "replicas": spec.replicas,
                "selector": {"matchLabels": selector_labels(server)},
                "strategy": {
                    "type": "RollingUpdate",
                    "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
                },
                "progressDeadlineSeconds": PROGRESS_DEADLINE_SECONDS,
                "template": {"metadata": template_metadata, "spec": pod_spec},
            },
        }
    )


def render_server_service(server: InferenceServer, *, uid: str) -> dict:
    """The ClusterIP Service clients reach the ready replicas through."""
    return with_spec_hash(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": _metadata(server, uid),
            "spec": {
                "type": "ClusterIP",
                "selector": selector_labels(server),
                "ports": [
                    {
                        "name": "http",
                        "port": server.spec.port,
                        "targetPort": "http",
                        "protocol": "TCP",
                    }
                ],
            },
        }
    )


def render_server_children(
    server: InferenceServer,
    *,
    uid: str,
    resolved: Mapping[str, str] | None = None,
    image: str | None = None,
    model_revision: str | None = None,
) -> list[dict]:
    """The Service and the Deployment, in apply order."""
    return [
        render_server_service(server, uid=uid),
        render_server_deployment(
            server, uid=uid, resolved=resolved, image=image, model_revision=model_revision
        ),
    ]


def spec_hash(manifest: dict) -> str:
    """Sixteen hex digits of the manifest as rendered (without its own hash annotation)."""
    meta = dict(manifest.get("metadata") or {})
    annotations = {
        k: v for k, v in (meta.get("annotations") or {}).items() if k != SPEC_HASH_ANNOTATION
    }
    meta.pop("annotations", None)
    if annotations:
        meta["annotations"] = annotations
    text = json.dumps({**manifest, "metadata": meta}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def with_spec_hash(manifest: dict) -> dict:
    """The manifest with its `trainyard.dev/spec-hash` annotation set."""
    digest = spec_hash(manifest)
    manifest["metadata"].setdefault("annotations", {})[SPEC_HASH_ANNOTATION] = digest
    return manifest
