"""The training entrypoint: `python -m trainyard.workloads.train RUN_JSON [--output DIR]`.

RUN_JSON is a TrainingRun (`apiVersion/kind/metadata/spec`, camelCase, JSON or YAML):
the operator mounts it from a ConfigMap, `trainyard run` writes it to a file. The run
is trained with the TRL trainer of its method, in this process or as one rank under
`torchrun` (RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR from the environment; gloo on CPU,
NCCL on GPU, as accelerate picks).

Environment (the pod contract, `trainyard.api.contract.Env`):
  TRAINYARD_OUTPUT_DIR      output directory when --output is not given (default ./trainyard-output)
  TRAINYARD_METRICS_PORT    overrides spec.metrics.port; 0 picks a free port, "off" serves none
  TRAINYARD_CACHE           where built-in models and S3 downloads are cached
  TRAINYARD_RUNS_URI        root of other runs' checkpoints, for run://RUN model sources
  TRAINYARD_VLLM_URL, TRAINYARD_VLLM_HOST, TRAINYARD_VLLM_PORT   the vLLM rollout server
  TRAINYARD_RESTART_ATTEMPT the operator's restart attempt (ties the nodes' checkpoint parts)
  TRAINYARD_TRAINER_OPTIONS a JSON file of TRL config options applied over the derived ones
                            (the operator's trainer.json: vLLM connection, colocate settings)
  TRAINYARD_TERMINATION_LOG where a CUDA out-of-memory is said (default: the kubelet's
                            /dev/termination-log, in a pod)

Output directory (rank 0 writes it): checkpoint-N/ (transformers), final/ (model or
adapter + tokenizer), final-merged/ (with checkpoint.exportMerged and LoRA), progress.json
(metrics), completions.jsonl (GRPO/RLOO samples),
result.json (method, steps, final loss, log history). Exit status: 0 trained,
2 bad spec or source (message on stderr), 75 CUDA out of memory (`trainyard.workloads.oom`:
a `CudaOutOfMemory: …` termination message too), 143 SIGTERM (after the checkpoint being
written was finished and uploaded), 1 anything else.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from trainyard.api.contract import Env
from trainyard.workloads import oom, sources
from trainyard.workloads.dataset_formats import (
    DatasetFormatError,
    prepare_dataset,
    select_samples,
)
from trainyard.workloads.methods.common import (
    Environment,
    SpecError,
    TrainContext,
    check_dataset_size,
    check_environment,
    detect_environment,
    early_stopping_callbacks,
    lora_config,
    model_init_kwargs,
    quantization_config,
    random_init_model,
    read_trainer_options,
    training_arguments,
)

logger = logging.getLogger("trainyard.train")

OUTPUT_ENV = Env.OUTPUT_DIR
METRICS_PORT_ENV = Env.METRICS_PORT
# The operator's restart count of the gang: parts of a step from another attempt are
# not merged into this attempt's manifest.
RESTART_ATTEMPT_ENV = Env.RESTART_ATTEMPT
DEFAULT_OUTPUT = "trainyard-output"
FINAL_DIR = "final"
MERGED_DIR = "final-merged"
STACKED_BASE_DIR = "base"
"""final/base/: the base a stacked adapter was trained on (an earlier adapter merged into
its own base), saved with the adapter so the adapter can be loaded and served anywhere."""
MERGED_MARKER = "trainyard-merged.json"
ADAPTER_BASE_FILE = "trainyard-base.json"
"""Beside an adapter: the model source it was trained on (spec.model), so a later stage
on another machine finds the base where base_model_name_or_path names a local cache path
(an s3:// or run:// model downloaded by the pod that trained it)."""
RESULT_FILE = "result.json"
PROGRESS_FILE = "progress.json"
COMPLETIONS_FILE = "completions.jsonl"


class RunFileError(ValueError):
    """The run file cannot be read or is not a valid TrainingRun."""


# --------------------------------------------------------------------------- loading


def load_run(path: str | os.PathLike[str]):
    """The TrainingRun in a JSON (or YAML) file, validated by the API models."""
    from trainyard.api import InvalidResource, parse_resource

    try:
        text = Path(path).read_text()
    except OSError as error:
        raise RunFileError(f"cannot read the run file {path}: {error.strerror}") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError:
        import yaml

        from trainyard.api import manifests

        try:
            document = manifests.load(text)
        except yaml.YAMLError as error:
            raise RunFileError(f"{path} is neither JSON nor YAML: {error}") from None
    try:
        run = parse_resource(document)
    except InvalidResource as invalid:
        raise RunFileError(f"{path} is not a valid TrainingRun:\n" + str(invalid)) from None
    if type(run).__name__ != "TrainingRun":
        raise RunFileError(f"{path} holds a {type(run).__name__}; expected kind TrainingRun")
    return run


@contextlib.contextmanager
def node_lock(path: Path):
    """An exclusive lock shared by the processes of this node (the ranks under torchrun)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def merged_adapter_path(adapter_dir: str, method: str, spec: Any = None) -> str:
    """A LoRA checkpoint (an adapter directory from an earlier stage) merged into its base.

    The next stage trains a plain model (LoRA → full: the adapter is merged in), or a new
    adapter on the merged model (LoRA → LoRA: stacked; `export_stacked_base` saves the
    merged base beside the new adapter). The base is the adapter's `base/` folder when
    it has one (a stacked adapter), else its `base_model_name_or_path`, else, when that
    is not on this machine, the source in its trainyard-base.json (fetched with `spec`'s
    storage settings). The merged copy is cached, so the ranks of a node merge once.
    """
    key = hashlib.sha256(f"{Path(adapter_dir).resolve()}:{method}".encode()).hexdigest()[:16]
    target = sources.cache_dir("merged") / key
    with node_lock(target.with_name(key + ".lock")):
        if (target / "config.json").exists():
            return str(target)
        from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification

        loader = (
            AutoPeftModelForSequenceClassification
            if method == "reward"
            else AutoPeftModelForCausalLM
        )
        base_path = adapter_base_path(adapter_dir, spec)
        if base_path is not None:
            from peft import PeftModel

            base = loader._target_class.from_pretrained(base_path)
            model = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
        else:
            model = loader.from_pretrained(adapter_dir).merge_and_unload()
        staging = target.with_name(key + ".partial")
        model.save_pretrained(staging)
        (staging / MERGED_MARKER).write_text(json.dumps({"adapter": str(adapter_dir)}))
        with contextlib.suppress(Exception):
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(staging)
        staging.rename(target)
    return str(target)


def adapter_base_path(adapter_dir: str, spec: Any = None) -> str | None:
    """Where an adapter's base lies on this machine when PEFT's own base_model_name_or_path
    will not do: its base/ folder (stacked), or its recorded source resolved here; None
    to let PEFT load base_model_name_or_path (a hub id, or a path that exists here)."""
    stacked = Path(adapter_dir) / STACKED_BASE_DIR
    if (stacked / "config.json").is_file():
        return str(stacked)
    named = sources.adapter_base(adapter_dir)
    record = Path(adapter_dir) / ADAPTER_BASE_FILE
    if named is None or Path(named).exists() or not record.is_file():
        return None
    base = json.loads(record.read_text())
    path, _ = sources.resolve_model(
        base["source"],
        revision=base.get("revision"),
        storage=getattr(spec, "storage", None),
        checkpoint_uri=spec.checkpoint.uri if getattr(spec, "checkpoint", None) else None,
    )
    return path


def export_stacked_base(model_path: str, final: Path) -> bool:
    """A LoRA adapter trained on a merged adapter (stacked): copy that merged base into
    final/base/ and name it as the adapter's base, so the adapter loads (PEFT) and
    serves (vLLM: base + --lora-modules) without the cache of the pod that trained it."""
    import shutil

    if not (Path(model_path) / MERGED_MARKER).is_file():
        return False
    shutil.copytree(model_path, final / STACKED_BASE_DIR, dirs_exist_ok=True)
    config_path = final / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = str((final / STACKED_BASE_DIR).resolve())
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
    return True


def load_tokenizer(spec: Any, model_path: str, model_kwargs: dict[str, Any]):
    """The tokenizer of `spec.tokenizer`, else of the model; pad falls back to eos."""
    from transformers import AutoTokenizer

    if spec.tokenizer is not None:
        path, kwargs = sources.resolve_model(
            spec.tokenizer.source,
            revision=spec.tokenizer.revision,
            storage=spec.storage,
            checkpoint_uri=spec.checkpoint.uri if spec.checkpoint else None,
            field="tokenizer.source",
        )
    else:
        path, kwargs = model_path, {k: v for k, v in model_kwargs.items() if k == "revision"}
    tokenizer = AutoTokenizer.from_pretrained(
        path, trust_remote_code=spec.model.trust_remote_code, **kwargs
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_datasets(spec: Any):
    """Training and evaluation datasets in the layout of the method's trainer."""
    data = spec.dataset
    rl = spec.online_rl
    template = rl.prompt.template if rl is not None and rl.prompt is not None else None
    train = sources.load_dataset_source(
        data.source, split=data.split, config=data.config, storage=spec.storage
    )
    train = select_samples(train, data.max_samples)
    train = prepare_dataset(train, data, spec.method, template)
    evaluation = None
    if data.eval_source is not None:
        evaluation = sources.load_dataset_source(
            data.eval_source,
            split=data.split,
            config=data.config,
            storage=spec.storage,
            field="dataset.evalSource",
        )
        evaluation = prepare_dataset(evaluation, data, spec.method, template)
    elif data.eval_split is not None:
        parts = train.train_test_split(test_size=data.eval_split, seed=spec.training.seed)
        train, evaluation = parts["train"], parts["test"]
    return train, evaluation


# --------------------------------------------------------------------------- callbacks


class Observers:
    """Metrics endpoint, checkpoint sync and completion log of this process (rank 0 serves)."""

    def __init__(self) -> None:
        self.metrics = None
        self.sync = None
        self.completions = None
        self.checkpoints = None
        self.callbacks: list[Any] = []

    def close(self, *, interrupted: bool = False) -> None:
        """Drain the checkpoint uploads (raising if one failed) and stop serving metrics.

        When training is already failing or was interrupted, an upload error is logged
        instead: Ctrl-C reaches the uploader's process group too, and its failure must
        not replace the KeyboardInterrupt (exit 130) or the error that stopped training.
        """
        try:
            if self.sync is not None:
                try:
                    if self.checkpoints is not None and self.checkpoints.saves is not None:
                        # A save still being written when training stopped (CUDA out of
                        # memory a step after it) is finished and uploaded: the restart
                        # resumes from it. After a normal end this has nothing to do.
                        self.checkpoints.saves.close()
                    self.sync.close()
                except Exception as error:
                    if not interrupted:
                        raise
                    logger.warning("checkpoint uploads left unfinished: %s", error)
        finally:
            if self.metrics is not None:
                self.metrics.shutdown()


def metrics_port(spec: Any) -> int | None:
    value = os.environ.get(METRICS_PORT_ENV)
    if value is None:
        return spec.metrics.port
    if value.lower() in ("off", "none", ""):
        return None
    return int(value)


def build_observers(spec: Any, output_dir: Path, env: Environment) -> Observers:
    from trainyard.workloads.metrics import CompletionLog, MetricsCallback, TrainingMetrics

    observers = Observers()
    main_process = env.rank == 0
    if main_process:
        observers.metrics = TrainingMetrics(progress_path=output_dir / PROGRESS_FILE)
        port = metrics_port(spec)
        if port is not None:
            served = observers.metrics.serve(port)
            logger.info("metrics on :%d/metrics", served)
        observers.callbacks.append(MetricsCallback(observers.metrics))
        rl = spec.online_rl
        if rl is not None and rl.log_completions_every:
            observers.completions = CompletionLog(
                output_dir / COMPLETIONS_FILE, sample_every=rl.log_completions_every
            )
            observers.callbacks.append(CompletionLogCallback(observers.completions))
    if spec.checkpoint is not None:
        from trainyard.workloads.checkpoint import CheckpointSync, CheckpointSyncCallback

        s3 = sources.S3Settings.from_spec(spec.storage)
        options = s3.store_options() if spec.checkpoint.uri.startswith("s3://") else {}
        node, nodes = node_layout()
        observers.sync = CheckpointSync(
            spec.checkpoint.uri,
            keep_last=spec.checkpoint.keep_last,
            node=node,
            nodes=nodes,
            attempt=os.environ.get(RESTART_ATTEMPT_ENV, "0"),
            on_upload=observers.metrics.record_checkpoint_upload if observers.metrics else None,
            **options,
        )
        observers.checkpoints = CheckpointSyncCallback(observers.sync)
        observers.callbacks.append(observers.checkpoints)
        if main_process and "tensorboard" in spec.training.report_to:
            from trainyard.workloads.metrics import TensorBoardUpload
            from trainyard.workloads.storage import open_store

            store = open_store(spec.checkpoint.uri, **options)
            observers.callbacks.append(TensorBoardUpload(store, output_dir / "runs"))
    return observers


def node_layout() -> tuple[int, int]:
    """(this node's rank, number of nodes) from torchrun's environment; (0, 1) outside it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    nodes = int(os.environ.get("GROUP_WORLD_SIZE", str(max(world // max(per_node, 1), 1))))
    return int(os.environ.get("GROUP_RANK", "0")), nodes


class CompletionLogCallback(TrainerCallback):
    """Writes sampled GRPO/RLOO completions with their per-function rewards.

    TRL keeps the latest generation batch in the trainer's `_logs` (what its own
    `log_completions` prints); this callback reads it at each log on rank 0.
    """

    def __init__(self, log) -> None:
        self.log = log
        self.trainer = None
        self.written = 0

    def on_log(self, args, state, control, **kwargs):
        trainer = self.trainer
        logs = getattr(trainer, "_logs", None)
        if not state.is_world_process_zero or not logs or not logs.get("prompt"):
            return control
        rewards = {name: list(values) for name, values in logs["rewards"].items()}
        extra = {name: list(values) for name, values in logs.get("extra", {}).items()}
        self.written += self.log.record(
            state.global_step, list(logs["prompt"]), list(logs["completion"]), rewards, extra
        )
        return control


def resume_checkpoint(spec: Any, observers: Observers, output_dir: Path) -> str | None:
    """The local path of the newest complete checkpoint to resume from, or None.

    Under torch.distributed (the Trainer has started it by now where the world has
    several processes) every rank takes part: the ranks agree on the step and fall back
    together, and each node's first process downloads the shared files and its node's
    ranks' own for all of them (`CheckpointSync.resume` with a group). A single process
    downloads alone; one process per node downloads (under a lock) and the other ranks
    of the same torchrun launch (same parent process) reuse its download.
    """
    if spec.checkpoint is None or spec.checkpoint.resume != "auto" or observers.sync is None:
        return None
    group = resume_group(spec)
    if group is not None:
        found = observers.sync.resume(output_dir, group)
        return str(found) if found else None
    marker = output_dir / ".resume"
    launch = str(os.getppid()) if "LOCAL_RANK" in os.environ else str(os.getpid())
    with node_lock(output_dir / ".resume.lock"):
        if marker.exists():
            recorded_launch, _, path = marker.read_text().partition("\n")
            if recorded_launch == launch:
                return path or None
        found = observers.sync.resume(output_dir)
        marker.write_text(f"{launch}\n{found or ''}")
    return str(found) if found else None


def resume_group(spec: Any):
    """The run's ranks as a checkpoint.ResumeGroup over torch.distributed; None for a
    single process or where torch.distributed is not started."""
    import torch.distributed as dist

    from trainyard.workloads.checkpoint import ResumeGroup

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return None
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    first = rank - local_rank

    def share(value: Any) -> Any:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(value: Any) -> list:
        values: list = [None] * world
        dist.all_gather_object(values, value)
        return values

    return ResumeGroup(
        rank=rank,
        ranks=range(first, first + int(os.environ.get("LOCAL_WORLD_SIZE", "1"))),
        world_size=world,
        share=share,
        gather=gather,
        selective=not reads_every_ranks_files(spec),
    )


def reads_every_ranks_files(spec: Any) -> bool:
    """Whether a rank's resume may read other ranks' files although the world size is
    the same: DeepSpeed's elastic checkpoints (engine.py loads every ZeRO shard on every
    rank) and universal checkpoints (another layout, read whole).

    >>> from types import SimpleNamespace as S
    >>> zero = S(config={"zero_optimization": {"elastic_checkpoint": True}})
    >>> reads_every_ranks_files(S(distributed=S(deepspeed=zero)))
    True
    >>> reads_every_ranks_files(S(distributed=S(deepspeed=S(config=None))))
    False
    """
    deepspeed = spec.distributed.deepspeed
    config = (deepspeed.config if deepspeed is not None else None) or {}
    zero = config.get("zero_optimization") or {}
    checkpoint = config.get("checkpoint") or {}
    return bool(zero.get("elastic_checkpoint") or checkpoint.get("load_universal"))


# --------------------------------------------------------------------------- trainer


def build_context(run: Any, output_dir: Path, env: Environment) -> TrainContext:
    """Resolve sources, load tokenizer and data, and collect every option for the trainer."""
    spec = run.spec
    check_environment(spec, env)
    path, kwargs = sources.resolve_model(
        spec.model.source,
        revision=spec.model.revision,
        storage=spec.storage,
        checkpoint_uri=spec.checkpoint.uri if spec.checkpoint else None,
    )
    if sources.adapter_base(path) is not None:
        path = merged_adapter_path(path, spec.method, spec)
    init_kwargs = model_init_kwargs(spec.model, env, kwargs)
    tokenizer = load_tokenizer(spec, path, kwargs)
    if spec.model.init == "random":
        path = random_init_model(spec.model, path, kwargs, tokenizer, spec.training.seed)
        init_kwargs = model_init_kwargs(spec.model, env, {})
    train_dataset, eval_dataset = load_datasets(spec)
    check_dataset_size(spec, len(train_dataset), env.world_size)
    ctx = TrainContext(
        spec=spec,
        model=path,
        model_init_kwargs=init_kwargs,
        tokenizer=tokenizer,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        peft_config=lora_config(spec.peft, spec.method),
        quantization_config=quantization_config(spec.model),
        base_args=training_arguments(spec, str(output_dir), env, run_name=run.metadata.name),
        callbacks=early_stopping_callbacks(spec),
        trainer_options=read_trainer_options(),
    )
    rl = spec.online_rl
    if ctx.trainer_options and rl is None:
        # Only GRPO/RLOO configs take them today; dropping them silently would hide a mismatch
        # between operator and image.
        raise SpecError(
            f"{Env.TRAINER_OPTIONS}: method {spec.method!r} takes no operator TRL options, "
            f"got {sorted(ctx.trainer_options)}; they apply to grpo and rloo only"
        )
    if rl is not None:
        from trainyard.workloads.methods.online import (
            build_reward_sources,
            check_vllm_installed,
            load_reward_model,
        )

        check_vllm_installed(spec.rollout)
        funcs, weights = build_reward_sources(rl, spec)
        processing: list[Any] = [None] * len(funcs)
        if rl.reward_model is not None:
            reward_path, reward_kwargs = sources.resolve_model(
                rl.reward_model.source,
                revision=rl.reward_model.revision,
                storage=spec.storage,
                checkpoint_uri=spec.checkpoint.uri if spec.checkpoint else None,
                field=f"{spec.method}.rewardModel.source",
            )
            model, reward_tokenizer = load_reward_model(
                reward_path, {**model_init_kwargs(rl.reward_model, env, reward_kwargs)}
            )
            funcs.append(model)
            weights.append(rl.reward_model_weight)
            processing.append(reward_tokenizer)
        ctx.reward_funcs, ctx.reward_weights = funcs, weights
        ctx.reward_processing_classes = processing
    return ctx


def build_trainer(ctx: TrainContext):
    """The TRL trainer of the run's method."""
    method = ctx.spec.method
    if method == "sft":
        from trainyard.workloads.methods.sft import build_sft_trainer

        return build_sft_trainer(ctx)
    if method == "pretrain":
        from trainyard.workloads.methods.pretrain import build_pretrain_trainer

        return build_pretrain_trainer(ctx)
    if method == "dpo":
        from trainyard.workloads.methods.dpo import build_dpo_trainer

        return build_dpo_trainer(ctx)
    if method == "kto":
        from trainyard.workloads.methods.kto import build_kto_trainer

        return build_kto_trainer(ctx)
    if method == "reward":
        from trainyard.workloads.methods.reward import build_reward_trainer

        return build_reward_trainer(ctx)
    if method == "grpo":
        from trainyard.workloads.methods.grpo import build_grpo_trainer

        return build_grpo_trainer(ctx)
    if method == "rloo":
        from trainyard.workloads.methods.rloo import build_rloo_trainer

        return build_rloo_trainer(ctx)
    raise SpecError(f"method: {method!r} is not a training method")


def init_deepspeed_comm(spec: Any, env: Environment) -> None:
    """Start DeepSpeed's communication layer before the model is loaded.

    ZeRO-3 builds the model inside `deepspeed.zero.Init`, which reads the world size from
    DeepSpeed's own comm module; accelerate starts that module on GPUs but not with
    `use_cpu`, and ZeRO-3 then sees a world of 1 and rejects the batch size.
    """
    if spec.distributed.deepspeed is None or env.world_size <= 1:
        return
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if env.cuda else "gloo")


def last_loss(log_history: list[dict[str, Any]]) -> float | None:
    """The last training loss the trainer logged (a logging window's loss, the number the
    progress file, the metrics and `trainyard run`'s table show; not the run's mean).

    >>> last_loss([{"loss": 6.4, "step": 1}, {"loss": 6.2, "step": 2}, {"train_loss": 6.3}])
    6.2
    """
    for entry in reversed(log_history):
        value = entry.get("loss")
        if isinstance(value, int | float) and math.isfinite(value):
            return float(value)
    return None


def fix_model_card(path: Path, model_source: str, final_dir: Path) -> bool:
    """Name the base model in TRL's model card. TRL only names a hub id; for a local path
    (a built-in, S3 or run:// model) it writes "fine-tuned version of [None]" and a usage
    example loading "None". Returns whether the card was changed."""
    try:
        card = path.read_text()
    except OSError:
        return False
    fixed = card.replace(
        "fine-tuned version of [None](https://huggingface.co/None)",
        f"fine-tuned version of `{model_source}`",
    ).replace('model="None"', f'model="{final_dir}"')
    if fixed == card:
        return False
    path.write_text(fixed)
    return True


def checkpoint_step(path: str | None) -> int:
    """The step of a `checkpoint-N` directory; 0 for none."""
    name = Path(path).name if path else ""
    return int(name.rsplit("-", 1)[1]) if name.rsplit("-", 1)[-1].isdigit() else 0


def train(run: Any, output_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Train `run` and save the final model/adapter under output_dir/final; returns the result."""
    output = Path(output_dir).resolve()
    output.mkdir(parents=True, exist_ok=True)
    env = detect_environment()
    spec = run.spec
    ctx = build_context(run, output, env)
    init_deepspeed_comm(spec, env)
    observers = build_observers(spec, output, env)
    try:
        ctx.callbacks.extend(observers.callbacks)
        ctx.callbacks.extend(oom.callbacks())
        trainer = build_trainer(ctx)
        for callback in observers.callbacks:
            if hasattr(callback, "trainer"):
                callback.trainer = trainer
        resume_from = resume_checkpoint(spec, observers, output)
        if resume_from:
            logger.info("resuming from %s", resume_from)
        outcome = trainer.train(resume_from_checkpoint=resume_from)
        final = output / FINAL_DIR
        # Every rank calls save_model: under ZeRO-3 the weights are gathered from all of them.
        trainer.save_model(str(final))
        trained = trainer.state.global_step - checkpoint_step(resume_from)
        result = {
            "run": run.metadata.name,
            "method": spec.method,
            "globalStep": trainer.state.global_step,
            "stepsTrained": trained,
            # The mean over the steps this launch trained (transformers' training_loss),
            # which a launch that trained none has not got.
            "trainLoss": outcome.training_loss if outcome and trained > 0 else None,
            "lastLoss": last_loss(trainer.state.log_history),
            "resumedFrom": resume_from,
            "peft": spec.peft is not None,
            "finalDir": str(final),
            "worldSize": env.world_size,
            "deepspeedZeroStage": (
                trainer.accelerator.state.deepspeed_plugin.zero_stage
                if trainer.is_deepspeed_enabled
                else None
            ),
            "logHistory": trainer.state.log_history,
        }
        if trainer.is_world_process_zero():
            if ctx.tokenizer is not None:
                ctx.tokenizer.save_pretrained(str(final))
            if spec.peft is not None and export_stacked_base(ctx.model, final):
                result["stackedOn"] = str(final / STACKED_BASE_DIR)
            elif spec.peft is not None:
                base = {"source": spec.model.source, "revision": spec.model.revision}
                (final / ADAPTER_BASE_FILE).write_text(json.dumps(base, indent=2) + "\n")
            if observers.sync is not None:
                observers.sync.export_final(final, step=trainer.state.global_step)
                if spec.checkpoint.export_merged and spec.peft is not None:
                    merged = output / MERGED_DIR
                    trainer.model.merge_and_unload().save_pretrained(str(merged))
                    ctx.tokenizer.save_pretrained(str(merged))
                    observers.sync.export_final(
                        merged, name="final/merged", step=trainer.state.global_step
                    )
            fix_model_card(output / "README.md", spec.model.source, final)
            if observers.metrics is not None:
                observers.metrics.set_phase("Succeeded")
            (output / RESULT_FILE).write_text(json.dumps(result, indent=1, default=str))
        return result
    finally:
        observers.close(interrupted=sys.exc_info()[0] is not None)


# --------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m trainyard.workloads.train",
        description="Train a TrainingRun with TRL (one process, or one rank under torchrun).",
    )
    parser.add_argument("run_json", help="the TrainingRun as JSON (or YAML)")
    parser.add_argument(
        "--output",
        default=None,
        help=f"output directory (default ${OUTPUT_ENV}, else ./{DEFAULT_OUTPUT})",
    )
    return parser.parse_args(argv)


class Terminated(BaseException):
    """SIGTERM: the pod is evicted or preempted, or torchrun stops the gang after another
    rank failed. Raised in the main thread, it unwinds training like Ctrl-C does, so the
    checkpoint being written is finished and uploaded before the process exits (the
    restart resumes from it); the default action would exit at once and lose it."""


def _terminated(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM stops at once
    raise Terminated()


def release_process_group() -> None:
    """Destroy this rank's torch.distributed process group once training is done (every
    collective of the run is behind it), as PyTorch asks: left to interpreter exit, its
    threads were torn down by C++ destructors and a rank could abort after a finished run
    ("terminate called without an active exception", exit -6, seen once under gloo)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    output = args.output or os.environ.get(OUTPUT_ENV) or DEFAULT_OUTPUT
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated)
    try:
        run = load_run(args.run_json)
        result = train(run, output)
    except Terminated:
        logger.warning("terminated (SIGTERM): stopped after draining the checkpoint uploads")
        return 128 + signal.SIGTERM
    except (RunFileError, SpecError, sources.SourceError, DatasetFormatError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Exception as error:
        if oom.is_cuda_oom(error):
            return oom.report(error)  # the operator / trainyard run retries with a smaller batch
        # S3 errors a user fixes by hand (credentials, endpoint) get one line, wherever
        # they surface (sources, resuming, checkpoint uploads); anything else is a bug.
        problem = sources.s3_problem(error)
        if problem is None:
            raise
        print(f"error: checkpoint.uri / storage: {problem}", file=sys.stderr)
        return 2
    release_process_group()
    loss = result.get("lastLoss")
    summary = f"{result['method']}: {result['globalStep']} steps"
    if loss is not None and math.isfinite(loss):
        summary += f", loss {loss:.4f}"
    logger.info("%s; final model in %s", summary, result["finalDir"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
