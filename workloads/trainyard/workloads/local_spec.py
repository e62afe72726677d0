"""What `trainyard run` changes in a TrainingRun so it runs on this machine.

Pure functions: a resource document and the runner's options go in, the document the
local workload reads comes out, with one note per change so the user sees every
difference from the spec they wrote.

>>> doc = {"spec": {"training": {"learningRate": 1e-5}}}
>>> apply_overrides(doc, ["training.maxSteps=5", "metadata.name=quick"])["spec"]["training"]
{'learningRate': 1e-05, 'maxSteps': 5}
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trainyard.api import manifests

# `a.b[0].c`: mapping keys separated by dots, list indexes in brackets.
_PATH_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


class OverrideError(ValueError):
    """A `--set key=value` that cannot be applied; the message says which and why."""


def parse_override(text: str) -> tuple[list[str | int], Any]:
    """Split `key.path=value` into path parts and a YAML-typed value.

    Paths are written as in the YAML file (camelCase) and start below `spec` unless
    they name `spec.` or `metadata.` themselves.

    >>> parse_override("training.maxSteps=5")
    (['spec', 'training', 'maxSteps'], 5)
    >>> parse_override("training.learningRate=1e-4")
    (['spec', 'training', 'learningRate'], 0.0001)
    >>> parse_override("grpo.rewards[0].weight=0.5")
    (['spec', 'grpo', 'rewards', 0, 'weight'], 0.5)
    >>> parse_override("metadata.name=quick")
    (['metadata', 'name'], 'quick')
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise OverrideError(f"--set {text!r}: expected key=value, e.g. training.maxSteps=5")
    parts: list[str | int] = []
    position = 0
    for match in _PATH_PART.finditer(key):
        gap = key[position : match.start()]
        if gap not in ("", "."):
            break
        parts.append(match[1] if match[1] is not None else int(match[2]))
        position = match.end()
    if position != len(key) or not parts or isinstance(parts[0], int):
        raise OverrideError(
            f"--set {text!r}: {key!r} is not a field path; write it as in the YAML, "
            "e.g. training.maxSteps or grpo.rewards[0].weight"
        )
    if parts[0] not in ("spec", "metadata"):
        parts.insert(0, "spec")
    try:
        value = manifests.load(raw) if raw.strip() else ""
    except yaml.YAMLError as error:
        raise OverrideError(f"--set {text!r}: the value is not valid YAML: {error}") from None
    return parts, value


def apply_overrides(document: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A copy of the document with every `--set key=value` applied in order.

    Missing mappings on the way are created; the value is checked later with the rest
    of the spec, so a misspelt key gets the usual `unknown field; did you mean …` line.
    """
    result = copy.deepcopy(document)
    for text in overrides:
        parts, value = parse_override(text)
        node: Any = result
        for depth, part in enumerate(parts[:-1]):
            node = _child(node, part, parts[depth + 1], text, parts[: depth + 1])
        last = parts[-1]
        if isinstance(last, int):
            _check_index(node, last, text, parts[:-1])
        elif not isinstance(node, dict):
            raise OverrideError(f"--set {text!r}: {_dotted(parts[:-1])} is not a mapping")
        node[last] = value
    return result


def _child(node: Any, part: str | int, next_part: str | int, text: str, path: list) -> Any:
    if isinstance(part, int):
        _check_index(node, part, text, path[:-1])
        return node[part]
    if not isinstance(node, dict):
        raise OverrideError(f"--set {text!r}: {_dotted(path[:-1])} is not a mapping")
    if node.get(part) is None:
        if isinstance(next_part, int):
            raise OverrideError(f"--set {text!r}: {_dotted(path)} is not a list in this spec")
        node[part] = {}
    return node[part]


def _check_index(node: Any, index: int, text: str, path: list) -> None:
    if not isinstance(node, list):
        raise OverrideError(f"--set {text!r}: {_dotted(path)} is not a list")
    if index >= len(node):
        raise OverrideError(
            f"--set {text!r}: {_dotted(path)} has {len(node)} entries; index {index} is out of range"
        )


def _dotted(path: list) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(document)"


@dataclass
class LocalOptions:
    """How the user asked `trainyard run` to run."""

    output_dir: Path
    nproc: int = 1
    metrics_port: int = 9400
    cuda: bool = False
    keep_storage: bool = False
    """Keep s3:// checkpoint URIs as written (the S3 endpoint must be reachable from here)."""


@dataclass
class LocalRun:
    """The document the local workload trains from, and what was changed and why."""

    document: dict[str, Any]
    notes: list[str] = field(default_factory=list)


RUN_FILE = "run.json"
"""The localized run `trainyard run` writes into its output folder (and trains from)."""


def local_checkpoint_uri(output_dir: Path) -> str:
    return f"file://{(output_dir / 'checkpoints').resolve()}"


def local_runs_root(output_dir: Path, runs_root: Path | None = None) -> str:
    """The runs root a local run resolves `run://` under: `runs_root` when given, else
    the folder that holds this run's output folder (`runs/` for the default
    `runs/NAME-YYYYmmdd-HHMMSS`), so two runs of `trainyard run` chain with no setting.

    >>> local_runs_root(Path("/home/me/runs/dpo-20260101-120000"))
    'file:///home/me/runs'
    """
    root = runs_root if runs_root is not None else output_dir.resolve().parent
    return f"file://{root.resolve()}"


def local_run_uris(root: Path, run: str) -> list[str]:
    """The checkpoint URIs of the local output folders directly under `root` whose
    run file names `run`, newest first (a run trained twice has two folders)."""
    found: list[tuple[float, str]] = []
    try:
        folders = [p for p in root.iterdir() if p.is_dir()]
    except OSError:
        return []
    for folder in folders:
        run_file = folder / RUN_FILE
        try:
            document = json.loads(run_file.read_text())
            if document["metadata"]["name"] == run:
                found.append((run_file.stat().st_mtime, document["spec"]["checkpoint"]["uri"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return [uri for _, uri in sorted(found, reverse=True)]


def localize(document: dict[str, Any], options: LocalOptions) -> LocalRun:
    """Rewrite a valid TrainingRun document (camelCase, as `to_yaml_dict` gives it) for this machine.

    - checkpoints go under OUTPUT/checkpoints when the spec has none, or names s3://
      (a cluster's object store is rarely reachable from a laptop; `keep_storage` keeps it);
    - one node with `nproc` processes; per-device batch sizes stay as written;
    - the metrics endpoint listens on a free local port;
    - without CUDA, vLLM rollouts and bitsandbytes quantization are dropped (both need a
      GPU): generation falls back to transformers, LoRA trains on the full-precision base.

    >>> run = localize(
    ...     {"spec": {"method": "sft", "checkpoint": {"uri": "s3://ckpt/a", "everySteps": 50}}},
    ...     LocalOptions(output_dir=Path("/tmp/out"), metrics_port=9500),
    ... )
    >>> run.document["spec"]["checkpoint"]
    {'uri': 'file:///tmp/out/checkpoints', 'everySteps': 50}
    >>> run.notes[0]
    'checkpoint.uri: file:///tmp/out/checkpoints instead of s3://ckpt/a (pass --keep-storage to write to S3)'
    """
    doc = copy.deepcopy(document)
    spec = doc.setdefault("spec", {})
    notes: list[str] = []
    local_uri = local_checkpoint_uri(options.output_dir)

    checkpoint = spec.get("checkpoint")
    if checkpoint is None:
        spec["checkpoint"] = {"uri": local_uri}
        notes.append(f"checkpoint.uri: {local_uri} (the spec sets no checkpoint)")
    elif checkpoint["uri"].startswith("s3://") and not options.keep_storage:
        notes.append(
            f"checkpoint.uri: {local_uri} instead of {checkpoint['uri']} "
            "(pass --keep-storage to write to S3)"
        )
        checkpoint["uri"] = local_uri

    distributed = spec.setdefault("distributed", {})
    asked = (distributed.get("nodes", 1), distributed.get("gpusPerNode", 1))
    # gpusPerNode sets the world size the spec's rules check (nodes × max(gpusPerNode, 1)).
    if asked[0] != 1 or max(asked[1], 1) != options.nproc:
        distributed["nodes"] = 1
        distributed["gpusPerNode"] = options.nproc
        notes.append(
            f"distributed: 1 node × {options.nproc} process{'es' if options.nproc > 1 else ''} "
            f"(--nproc), the spec asks "
            f"{asked[0]} × {asked[1]}; per-device batch sizes are kept, so the global batch differs"
        )

    spec.setdefault("metrics", {})["port"] = options.metrics_port

    if not options.cuda:
        rollout = spec.get("rollout") or {}
        if rollout.get("vllm") is not None:
            del rollout["vllm"]
            if not rollout:
                spec.pop("rollout", None)
            notes.append(
                "rollout.vllm: dropped (vLLM rollouts need CUDA); generating with transformers"
            )
        model = spec.get("model") or {}
        if model.get("quantization") is not None:
            del model["quantization"]
            notes.append(
                "model.quantization: dropped (bitsandbytes needs CUDA); LoRA trains on the "
                "full-precision base"
            )
        deepspeed = (spec.get("distributed") or {}).get("deepspeed") or {}
        offloaded = [
            k for k in ("offloadOptimizer", "offloadParam") if deepspeed.get(k, "none") != "none"
        ]
        for key in offloaded:
            deepspeed[key] = "none"
        if offloaded:
            notes.append(
                f"distributed.deepspeed: {' and '.join(offloaded)} none (without a GPU everything "
                "is in CPU memory already)"
            )
        optim = (spec.get("training") or {}).get("optim", "")
        if "8bit" in optim or optim.startswith("paged_"):
            spec["training"]["optim"] = "adamw_torch"
            notes.append(
                f"training.optim: adamw_torch instead of {optim} (bitsandbytes needs CUDA)"
            )
    return LocalRun(document=doc, notes=notes)


# ------------------------------------------------------------------ --tiny

TINY_MODEL = "builtin://tiny-qwen2"
TINY_MOE_MODEL = "builtin://tiny-qwen3-moe"
TINY_MAX_STEPS = 2
TINY_BATCH = 2
TINY_GENERATIONS = 2
TINY_COMPLETION_LENGTH = 8
TINY_SEQUENCE_LENGTH = 128
TINY_WORKERS = 2
TINY_DATA_DIR = "tiny-data"
# Built-in rows → the dataset format and the columns they hold under the API's default
# field names (`dataset.<x>Field`), renamed to the spec's own field names.
TINY_ROWS: dict[str, tuple[str, dict[str, str]]] = {
    "chat": ("chat", {"messages": "messagesField"}),
    "alpaca": (
        "alpaca",
        {"instruction": "instructionField", "input": "inputField", "output": "outputField"},
    ),
    "preference": (
        "preference",
        {"prompt": "promptField", "chosen": "chosenField", "rejected": "rejectedField"},
    ),
    "unpaired_preference": (
        "unpaired-preference",
        {"prompt": "promptField", "completion": "completionField", "label": "labelField"},
    ),
    "prompt": ("prompts", {"prompt": "promptField"}),
    "text": ("text", {"text": "textField"}),
}
TINY_FORMAT_OF_METHOD = {
    "sft": "chat",
    "dpo": "preference",
    "reward": "preference",
    "kto": "unpaired_preference",
    "grpo": "prompt",
    "rloo": "prompt",
    "pretrain": "text",
}


@dataclass
class TinyData:
    """Rows `--tiny` writes to OUTPUT/tiny-data/NAME.jsonl, which the spec then names."""

    files: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


def tiny(document: dict[str, Any], output_dir: Path) -> tuple[LocalRun, TinyData]:
    """The spec at toy size, offline, every feature kept: the built-in tiny model, a
    built-in data set of the shape the method and dataset format need (under the spec's
    own field names, with the columns its rewards read), a few steps of small batches.
    Rewards, LoRA, DeepSpeed, packing, evaluation, early stopping and checkpoints stay;
    what needs a GPU is dropped later by `localize`, with its own note.

    >>> run, data = tiny(
    ...     {"spec": {"method": "dpo", "model": {"source": "hf://Qwen/Qwen2.5-7B"},
    ...               "dataset": {"source": "hf://trl-lib/ultrafeedback_binarized",
    ...                           "chosenField": "good"},
    ...               "training": {"epochs": 3, "perDeviceBatchSize": 16}}},
    ...     Path("/tmp/out"))
    >>> run.document["spec"]["model"], run.document["spec"]["dataset"]["source"]
    ({'source': 'builtin://tiny-qwen2'}, 'file:///tmp/out/tiny-data/train.jsonl')
    >>> sorted(data.files["train.jsonl"][0])
    ['good', 'prompt', 'rejected']
    >>> run.document["spec"]["training"]
    {'perDeviceBatchSize': 2, 'maxSteps': 2, 'loggingSteps': 1, 'precision': 'fp32'}
    """
    from trainyard.workloads import builtin

    doc = copy.deepcopy(document)
    spec = doc.setdefault("spec", {})
    notes: list[str] = []
    data = TinyData()
    method = spec.get("method", "sft")
    data_dir = (output_dir / TINY_DATA_DIR).resolve()

    model = spec.setdefault("model", {})
    # LoRA on expert weights (peft.targetParameters) needs a mixture-of-experts model.
    tiny_model = TINY_MOE_MODEL if (spec.get("peft") or {}).get("targetParameters") else TINY_MODEL
    if model.get("source") != tiny_model:
        notes.append(f"model.source: {tiny_model} instead of {model.get('source')} (--tiny)")
    kept = {k: v for k, v in model.items() if k in ("quantization", "trustRemoteCode", "init")}
    if model.get("config"):
        notes.append("model.config: the tiny model's architecture instead (--tiny)")
    spec["model"] = {"source": tiny_model, **kept}
    if spec.pop("tokenizer", None) is not None:
        notes.append("tokenizer: the tiny model's own (--tiny)")

    dataset = spec.setdefault("dataset", {})
    fmt = dataset.get("format", "auto")
    shape = TINY_FORMAT_OF_METHOD[method] if fmt == "auto" else fmt
    rl = spec.get(method) if method in ("grpo", "rloo") else None
    code = rl is not None and any(
        r.get("builtin") == "code_execution" for r in rl.get("rewards") or []
    )
    builtin_name, columns = TINY_ROWS[shape]
    rows = builtin.build_dataset_rows("code" if code else builtin_name)
    renamed = [
        {dataset.get(columns.get(column, ""), column): value for column, value in row.items()}
        for row in rows
    ]
    if rl is not None:
        _add_reward_columns(renamed, rl)
        _add_template_columns(renamed, rl)
    data.files["train.jsonl"] = renamed
    notes.append(
        f"dataset.source: built-in {'code problems' if code else builtin_name} rows "
        f"({len(renamed)}, format {shape}) instead of {dataset.get('source')} (--tiny)"
    )
    dataset["source"] = f"file://{data_dir / 'train.jsonl'}"
    for key in ("config", "split"):
        dataset.pop(key, None)
    if dataset.get("evalSource"):
        data.files["eval.jsonl"] = renamed[: max(4, len(renamed) // 4)]
        dataset["evalSource"] = f"file://{data_dir / 'eval.jsonl'}"

    training = spec.setdefault("training", {})
    training.pop("epochs", None)
    training["perDeviceBatchSize"] = min(training.get("perDeviceBatchSize", 8), TINY_BATCH)
    if training.get("gradientAccumulationSteps", 1) != 1:
        training["gradientAccumulationSteps"] = 1
    training["maxSteps"] = TINY_MAX_STEPS
    training["loggingSteps"] = 1
    if training.get("evalSteps") is not None:
        training["evalSteps"] = 1
    if training.get("maxLength") is not None:
        training["maxLength"] = min(training["maxLength"], TINY_SEQUENCE_LENGTH)
    if training.get("precision", "fp32") != "fp32":
        notes.append(f"training.precision: fp32 instead of {training['precision']} (--tiny)")
    training["precision"] = "fp32"
    if spec.get("pretrain", {}).get("blockSize", 0) > TINY_SEQUENCE_LENGTH:
        spec["pretrain"]["blockSize"] = TINY_SEQUENCE_LENGTH
    if rl is not None:
        rl["numGenerations"] = TINY_GENERATIONS
        rl["maxCompletionLength"] = min(
            rl.get("maxCompletionLength", TINY_COMPLETION_LENGTH), TINY_COMPLETION_LENGTH
        )
        if rl.get("rewardWorkers", 1) > TINY_WORKERS:
            rl["rewardWorkers"] = TINY_WORKERS
        for reward in rl.get("rewards") or []:
            args = reward.get("args") or {}
            if args.get("workers", 0) > TINY_WORKERS:
                args["workers"] = TINY_WORKERS
        if rl.get("rewardModel") is not None:
            rl["rewardModel"] = {"source": TINY_MODEL}
            notes.append(f"{method}.rewardModel.source: {TINY_MODEL} (--tiny)")
    checkpoint = spec.get("checkpoint")
    if checkpoint is not None and checkpoint.get("everySteps") is not None:
        checkpoint["everySteps"] = 1
    notes.append(
        f"training: {TINY_MAX_STEPS} steps, batch ≤ {TINY_BATCH}"
        + (f", {TINY_GENERATIONS} generations" if rl is not None else "")
        + " (--tiny; --set overrides any of it)"
    )
    return LocalRun(document=doc, notes=notes), data


def _add_template_columns(rows: list[dict[str, Any]], rl: dict[str, Any]) -> None:
    """The columns the spec's prompt template reads (`prompt.template`), filled from the
    built-in rows' prompt."""
    from trainyard.api.training_run import template_fields

    template = (rl.get("prompt") or {}).get("template")
    try:
        names = template_fields(template) if isinstance(template, str) else []
    except ValueError:
        return  # the spec's validation says what is wrong with it
    for row in rows:
        for name in names:
            row.setdefault(name, row.get("prompt", ""))


def _add_reward_columns(rows: list[dict[str, Any]], rl: dict[str, Any]) -> None:
    """The columns the spec's rewards read (`args.<x>Field`), filled from the built-in
    rows' reference, answer or tests."""
    for reward in rl.get("rewards") or []:
        args = reward.get("args") or {}
        for key, column in args.items():
            if not key.endswith("Field") or not isinstance(column, str):
                continue
            for row in rows:
                if column in row:
                    continue
                if "tests" in row:
                    module = Path(args.get("fileName", "solution.py")).stem
                    header = f"from {module} import *\n" if args.get("testFileName") else ""
                    row[column] = header + row["tests"]
                else:
                    row[column] = row.get("reference", row.get("answer", ""))
