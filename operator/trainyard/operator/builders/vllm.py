"""The vLLM rollout server of a GRPO/RLOO run, and the trainer options that reach it.

How TRL 1.16 wants its rollout server (read from its source, not guessed):

* `trl vllm-serve` is deprecated (removal in TRL 2.0). It now parses its own
  `ScriptArguments` and `os.execve`s vLLM's own server
  (`trl/scripts/vllm_serve.py`, `build_command` and `main`)::

      VLLM_SERVER_DEV_MODE=1 vllm serve MODEL --host 0.0.0.0 --port 8000 \\
          --tensor-parallel-size T --data-parallel-size D --gpu-memory-utilization G \\
          --dtype auto --kv-cache-dtype auto --model-impl vllm --uvicorn-log-level info \\
          [--revision R] [--max-model-len N] [--[no-]enable-prefix-caching] \\
          [--enforce-eager] [--trust-remote-code] \\
          [--enable-scale-out]        # only when vLLM >= 0.30, for multimodal endpoints
          --weight-transfer-config '{"backend": "nccl"}' \\
          --logprobs-mode processed_logprobs --max-logprobs -1

  `VLLM_SERVER_DEV_MODE=1` mounts the development endpoints the client needs
  (`/server_info`, `/init_weight_transfer_engine`, `/start_weight_update`,
  `/update_weights`, `/finish_weight_update`, `/get_world_size`, `/reset_prefix_cache`).
  `--weight-transfer-config {"backend": "nccl"}` starts vLLM's NCCL weight-transfer
  engine that receives the trainer's weights; `--logprobs-mode processed_logprobs`
  makes returned logprobs reflect temperature (importance-sampling correction);
  `--max-logprobs -1` lifts the cap of 20 logprobs per token. We render the same
  command, run directly (`vllm serve`, not `trl vllm-serve`), so the server image needs
  vLLM only, not TRL. `--enable-scale-out` is left out: it only adds multimodal
  endpoints, and it is an unknown flag to vLLM before 0.30 while TRL 1.16 accepts vLLM
  0.22-0.31 (a custom `rollout.vllm.image` may be any of those).
  TRL's docs for `data_parallel_size` warn that values above 1 error out for dense
  models (vLLM PR #30739): the value is passed through, vLLM has the last word.

* The client (`trl/generation/vllm_client.py`, built by `trl/generation/vllm_generation.py`
  when `GRPOConfig(use_vllm=True, vllm_mode="server")`) runs on the main process
  (global rank 0) only. It reads `vllm_server_base_url` (else
  `http://{vllm_server_host}:{vllm_server_port}`, default port 8000), polls
  `GET {base}/health` until `vllm_server_timeout` seconds (default 240) pass, reads
  `/v1/models`, `/server_info` and `/get_world_size`, then generates through
  `/v1/completions` and `/v1/chat/completions`. For weight sync it opens an NCCL group in
  which the **trainer is the master** at its own pod IP and `vllm_group_port` (default
  51216): the vLLM workers connect to the trainer, so rank 0's pod must accept
  connections on that port. Weight sync needs CUDA on both sides. The first generation
  pushes the trainer's weights (LoRA merged in), so the server only needs a model of the
  same architecture and tokenizer to start with.

* Colocate mode (`vllm_mode="colocate"`): every training process runs its own vLLM
  engine in-process (`distributed_executor_backend="external_launcher"`) on the training
  GPUs; no server. Its options are `vllm_gpu_memory_utilization` (TRL default 0.3,
  leaving the rest to training), `vllm_tensor_parallel_size` (must divide the number of
  training processes), `vllm_max_model_length`, `vllm_enable_sleep_mode`.

What this module renders for `rollout.vllm.mode: server`: a Deployment with one replica
(TRL's client and its NCCL group talk to exactly one server; data parallelism happens
inside it), `Recreate` updates (a rolling update would need twice the GPUs), GPUs =
tensorParallelSize × dataParallelSize, startup and readiness probes on `/health`, and a
ClusterIP Service on port 8000. The trainer gets the Service URL and a long
`vllm_server_timeout` through `trainer.json` in the run's ConfigMap (see
`trainer_vllm_options`).

Models the server can load: `hf://org/name[@rev]` (a hub id, `--revision`),
`s3://bucket/prefix` (streamed with vLLM's Run:ai streamer, `--load-format
runai_streamer`; the image needs vLLM's `runai` extra), `file://path` (a path inside the
server image), `run://RUN[/step-N|final]` (resolved by the pod contract's rule,
`trainyard.api.contract`, as the workload does: under the runs root, the parent of this
run's `checkpoint.uri`; that checkpoint must hold a full model). `builtin://` models only
exist inside trainer processes, so they cannot be served.
"""

from __future__ import annotations

import json

from trainyard.api import TrainingRun, contract
from trainyard.api.training_run import VLLMRollout
from trainyard.operator.builders import labels, names, pod_settings
from trainyard.operator.builders.errors import UnrenderableRun

DEFAULT_VLLM_IMAGE = "vllm/vllm-openai:v0.31.0"
SERVER_PORT = 8000
GROUP_PORT = 51216
HEALTH_PATH = "/health"
# TRL waits 240 s for the server by default; a server that first downloads a model of
# several GB takes longer, and the trainer would give up and fail the gang.
SERVER_TIMEOUT_SECONDS = 1800.0
# Same window for the kubelet's startup probe: 180 × 10 s.
STARTUP_PROBE_PERIOD = 10
STARTUP_PROBE_FAILURES = 180
# GRPOConfig/RLOOConfig default of vllm_gpu_memory_utilization (colocate mode).
TRL_COLOCATE_GPU_MEMORY_UTILIZATION = 0.3
# TRL's weight-transfer engine: NCCL, the only backend its client speaks.
WEIGHT_TRANSFER_CONFIG = json.dumps({"backend": "nccl"})


def rollout_of(run: TrainingRun) -> VLLMRollout | None:
    """The vLLM rollout settings, when the run generates with vLLM."""
    rollout = run.spec.rollout
    return rollout.vllm if rollout is not None else None


def needs_rollout_server(run: TrainingRun) -> bool:
    """Whether the run gets a vLLM server of its own (GRPO/RLOO in server mode)."""
    vllm = rollout_of(run)
    return run.spec.method in ("grpo", "rloo") and vllm is not None and vllm.mode == "server"


def server_base_url(run: TrainingRun) -> str:
    """Where the trainer reaches the rollout server: the Service, namespace-qualified when known."""
    host = names.rollout_server_name(run.metadata.name)
    if run.metadata.namespace:
        host = f"{host}.{run.metadata.namespace}.svc"
    return f"http://{host}:{SERVER_PORT}"


def trainer_vllm_options(run: TrainingRun) -> dict:
    """TRL `GRPOConfig`/`RLOOConfig` keyword arguments for the run's vLLM mode ({} without vLLM).

    Only options the operator decides or must override are set; TRL's defaults stand for the rest.
    """
    vllm = rollout_of(run)
    if vllm is None or run.spec.method not in ("grpo", "rloo"):
        return {}
    if vllm.mode == "server":
        return {
            "use_vllm": True,
            "vllm_mode": "server",
            "vllm_server_base_url": server_base_url(run),
            "vllm_group_port": GROUP_PORT,
            "vllm_server_timeout": SERVER_TIMEOUT_SECONDS,
        }
    processes = run.spec.world_size
    if processes % vllm.tensor_parallel_size:
        raise UnrenderableRun(
            "spec.rollout.vllm.tensorParallelSize",
            f"{vllm.tensor_parallel_size} does not divide the {processes} training processes; "
            "in colocate mode each vLLM replica spans that many training ranks, so use a divisor "
            "of nodes × gpusPerNode",
        )
    if vllm.data_parallel_size != 1:
        raise UnrenderableRun(
            "spec.rollout.vllm.dataParallelSize",
            f"{vllm.data_parallel_size} only applies to mode server; in colocate mode every "
            "training process runs its own vLLM, so leave it at 1",
        )
    # The API's default (0.9) is meant for a server that owns its GPUs; colocated vLLM
    # shares them with training, so an unset value takes TRL's colocate default. It is
    # written out, not left to TRL, so it also wins over a value derived from the spec.
    memory = (
        vllm.gpu_memory_utilization
        if "gpu_memory_utilization" in vllm.model_fields_set
        else TRL_COLOCATE_GPU_MEMORY_UTILIZATION
    )
    options = {
        "use_vllm": True,
        "vllm_mode": "colocate",
        "vllm_tensor_parallel_size": vllm.tensor_parallel_size,
        "vllm_gpu_memory_utilization": memory,
    }
    if vllm.max_model_len is not None:
        options["vllm_max_model_length"] = vllm.max_model_len
    return options


def served_model(run: TrainingRun) -> tuple[str, list[str]]:
    """The model argument of `vllm serve` and the options that come with it."""
    model = run.spec.model
    source = model.source
    parsed = contract.parse_source(source)
    options: list[str] = []
    if parsed.scheme == "hf":
        revision = model.revision or parsed.revision
        if revision:
            options += ["--revision", revision]
        served = parsed.path
    elif parsed.scheme == "s3":
        served = source
        options += ["--load-format", "runai_streamer"]
    elif parsed.scheme == "file":
        served = "/" + parsed.path.lstrip("/")
    elif parsed.scheme == "run":
        served = _resolve_run_source(run, source)
        if served.startswith("s3://"):
            options += ["--load-format", "runai_streamer"]
        else:
            served = "/" + served.removeprefix("file://").lstrip("/")
    else:
        raise UnrenderableRun(
            "spec.model.source",
            f"{source!r} cannot be loaded by a vLLM rollout server (builtin models exist only "
            "inside trainer processes); allowed with rollout.vllm.mode server: hf://, s3://, "
            "file://, run://; or use rollout.vllm.mode colocate",
        )
    tokenizer = run.spec.tokenizer
    if tokenizer is not None:
        parsed = contract.parse_source(tokenizer.source)
        if parsed.scheme == "hf":
            options += ["--tokenizer", parsed.path]
        elif parsed.scheme == "s3":
            options += ["--tokenizer", tokenizer.source]
        elif parsed.scheme == "file":
            options += ["--tokenizer", "/" + parsed.path.lstrip("/")]
        else:
            raise UnrenderableRun(
                "spec.tokenizer.source",
                f"{tokenizer.source!r} cannot be loaded by a vLLM rollout server; "
                "allowed with rollout.vllm.mode server: hf://, s3://, file://",
            )
    return served, options


def server_args(run: TrainingRun) -> list[str]:
    """Arguments after `vllm serve`: TRL's `build_command` translation and its imposed flags."""
    vllm = rollout_of(run)
    if vllm is None:
        raise ValueError(f"TrainingRun {run.metadata.name} has no rollout.vllm")
    model = run.spec.model
    served, model_options = served_model(run)
    args = [
        served,
        "--host", "0.0.0.0",
        "--port", str(SERVER_PORT),
        "--tensor-parallel-size", str(vllm.tensor_parallel_size),
        "--data-parallel-size", str(vllm.data_parallel_size),
        "--gpu-memory-utilization", str(vllm.gpu_memory_utilization),
        "--dtype", model.dtype,
        "--kv-cache-dtype", "auto",
        "--model-impl", "vllm",
        "--uvicorn-log-level", "info",
        *model_options,
    ]  # fmt: skip
    if vllm.max_model_len is not None:
        args += ["--max-model-len", str(vllm.max_model_len)]
    args.append(
        "--enable-prefix-caching" if vllm.enable_prefix_caching else "--no-enable-prefix-caching"
    )
    if model.trust_remote_code:
        args.append("--trust-remote-code")
    args += [
        "--weight-transfer-config", WEIGHT_TRANSFER_CONFIG,
        "--logprobs-mode", "processed_logprobs",
        "--max-logprobs", "-1",
    ]  # fmt: skip
    return args


def server_gpus(vllm: VLLMRollout) -> int:
    return vllm.tensor_parallel_size * vllm.data_parallel_size


def render_rollout_service(run: TrainingRun, *, uid: str) -> dict:
    """The ClusterIP Service the trainer reaches the rollout server through."""
    name = names.rollout_server_name(run.metadata.name)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": labels.child_metadata(run, name, labels.ROLLOUT_SERVER, uid),
        "spec": {
            "type": "ClusterIP",
            "selector": labels.selector_labels(run, labels.ROLLOUT_SERVER),
            "ports": [
                {"name": "http", "port": SERVER_PORT, "targetPort": "http", "protocol": "TCP"}
            ],
            # TRL's client does its own waiting on /health. Publishing the pod while it is
            # not ready means a readiness blip (a long weight update) never cuts a running
            # trainer off from its only server.
            "publishNotReadyAddresses": True,
        },
    }


def render_rollout_deployment(run: TrainingRun, *, uid: str, image: str | None = None) -> dict:
    """The vLLM server Deployment, started the way TRL 1.16 expects (see the module docstring)."""
    vllm = rollout_of(run)
    if vllm is None:
        raise ValueError(f"TrainingRun {run.metadata.name} has no rollout.vllm")
    name = names.rollout_server_name(run.metadata.name)
    metadata = labels.child_metadata(run, name, labels.ROLLOUT_SERVER, uid)
    pod_labels = labels.child_labels(run, labels.ROLLOUT_SERVER)
    queue = run.spec.scheduling.queue if run.spec.scheduling else None
    if queue:
        # Kueue admits Deployments through its pod integration, which reads this label.
        metadata["labels"][labels.KUEUE_QUEUE_LABEL] = queue
        pod_labels[labels.KUEUE_QUEUE_LABEL] = queue
    container = {
        "name": "vllm",
        "image": vllm.image or image or DEFAULT_VLLM_IMAGE,
        "imagePullPolicy": run.spec.image_pull_policy,
        "command": ["vllm", "serve"],
        "args": server_args(run),
        "env": pod_settings.merge_env(
            [{"name": "VLLM_SERVER_DEV_MODE", "value": "1"}],
            pod_settings.cache_env(),
            _s3_streamer_env(run) if _loads_from_s3(run) else [],
            # Gated hub models need the same token the trainer has.
            [
                v
                for v in pod_settings.user_env(run)
                if v["name"].startswith(("HF_", "HUGGING_FACE"))
            ],
        ),
        "ports": [{"name": "http", "containerPort": SERVER_PORT, "protocol": "TCP"}],
        "resources": pod_settings.container_resources(vllm.resources, server_gpus(vllm)),
        "startupProbe": {
            **_health_probe(),
            "periodSeconds": STARTUP_PROBE_PERIOD,
            "failureThreshold": STARTUP_PROBE_FAILURES,
        },
        # No liveness probe: the engine can be busy for long in a weight update, and a
        # restarted server has lost the trainer's NCCL group anyway; the trainer then
        # fails and the operator restarts the gang, server included.
        "readinessProbe": {
            **_health_probe(),
            "periodSeconds": 10,
            "timeoutSeconds": 5,
            "failureThreshold": 3,
        },
        "securityContext": pod_settings.container_security_context(),
        "volumeMounts": pod_settings.volume_mounts(),
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata,
        "spec": {
            "replicas": 1,
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": labels.selector_labels(run, labels.ROLLOUT_SERVER)},
            "template": {
                "metadata": {"labels": pod_labels},
                "spec": {
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "securityContext": pod_settings.pod_security_context(),
                    **pod_settings.scheduling_fields(run),
                    "containers": [container],
                    "volumes": pod_settings.volumes(vllm.resources),
                },
            },
        },
    }


def _health_probe() -> dict:
    return {"httpGet": {"path": HEALTH_PATH, "port": "http"}}


def _loads_from_s3(run: TrainingRun) -> bool:
    """Whether the server reads its model or tokenizer from S3 (and so needs credentials)."""
    served, options = served_model(run)
    return any(arg.startswith("s3://") for arg in (served, *options))


def _s3_streamer_env(run: TrainingRun) -> list[dict]:
    """S3 settings for vLLM's Run:ai streamer: boto3's variables plus its own switches."""
    env = pod_settings.s3_env(run)
    s3 = run.spec.storage.s3 if run.spec.storage else None
    if s3 is not None and s3.endpoint:
        # S3-compatible stores (MinIO…) are usually path-style; the streamer defaults to
        # virtual-host addressing, and asks the EC2 metadata service for credentials.
        if s3.addressing_style != "virtual":
            env.append({"name": "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING", "value": "0"})
        env.append({"name": "AWS_EC2_METADATA_DISABLED", "value": "true"})
    return env


def _resolve_run_source(run: TrainingRun, source: str) -> str:
    """`run://RUN[/step-N|final]` as a storage URI under the runs root (the contract's rule)."""
    try:
        reference = contract.parse_run_reference(source)
    except contract.SourceURIError:
        reference = None
    if reference is None or reference.is_latest:
        raise UnrenderableRun(
            "spec.model.source",
            f"{source!r} cannot be served by a vLLM rollout server; allowed: run://RUN, "
            "run://RUN/step-N or run://RUN/final (latest is only known at run time)",
        )
    root = pod_settings.runs_root(run)
    if root is None:
        raise UnrenderableRun(
            "spec.model.source",
            f"{source!r} is found next to this run's checkpoints; set checkpoint.uri "
            "(runs of a pipeline share its parent)",
        )
    return contract.run_checkpoint_uri(reference, root)
