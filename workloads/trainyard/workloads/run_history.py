"""The logged history of a local run, and the PNG of its loss and reward curves.

The trainer's log dicts (`{"step": 3, "loss": 2.1, "reward": 0.4, …}`) are found, in order
of preference, in the `logHistory` of the workload's OUTPUT/result.json (written when
training ends), in the `log_history` of the newest `trainer_state.json` under the output
or checkpoint directory (a run stopped early), and last in the samples the runner itself
took from the progress file while the run went on.

>>> merge_histories([{"step": 1, "loss": 2.0}], [{"step": 1, "loss": 9.0}, {"step": 2, "loss": 1.5}])
[{'step': 1, 'loss': 2.0}, {'step': 2, 'loss': 1.5}]
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# Written by trainyard.workloads.train on rank 0 at the end: {"logHistory": [...], ...}.
RESULT_FILE = "result.json"
# Panels drawn, each with its curves by the trainer's own log keys: (key, label). Every
# reward function's mean (`rewards/<name>/mean`) joins the reward panel, so a person sees
# which reward moved.
PANELS: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("loss", (("loss", "train loss"), ("eval_loss", "eval loss"))),
    ("reward", (("reward", "reward (mean)"),)),
    ("KL", (("kl", "KL to the reference"),)),
    ("completion length", (("completions/mean_length", "mean completion length"),)),
    ("learning rate", (("learning_rate", "learning rate"),)),
)
REWARD_COMPONENT = re.compile(r"rewards/(?P<name>.+)/mean")


def read_result_history(path: Path) -> list[dict[str, Any]] | None:
    """The log history in a workload's result.json, None when it has none."""
    try:
        history = json.loads(path.read_text()).get("logHistory")
    except (OSError, ValueError, AttributeError):
        return None
    return [e for e in history if isinstance(e, dict)] if isinstance(history, list) else None


def newest_trainer_state(directories: Iterable[Path]) -> Path | None:
    """The `trainer_state.json` with the highest global_step under any of the directories."""
    best: tuple[int, Path] | None = None
    for directory in directories:
        if not directory.is_dir():
            continue
        for path in directory.rglob("trainer_state.json"):
            try:
                step = int(json.loads(path.read_text()).get("global_step", -1))
            except (OSError, ValueError, json.JSONDecodeError):
                continue
            if best is None or step > best[0]:
                best = (step, path)
    return best[1] if best else None


def merge_histories(primary: list[dict], extra: list[dict]) -> list[dict]:
    """primary, followed by the entries of extra logged at later steps."""
    last = max((e.get("step", -1) for e in primary), default=-1)
    return list(primary) + [e for e in extra if e.get("step", -1) > last]


def read_history(
    output_dir: Path, checkpoint_dir: Path | None = None, samples: list[dict] | None = None
) -> tuple[list[dict[str, Any]], str]:
    """The run's log dicts and where they came from (a path, or "progress samples")."""
    samples = samples or []
    result = output_dir / RESULT_FILE
    history = read_result_history(result)
    if history is not None:
        return merge_histories(history, samples), str(result)
    roots = [output_dir] + ([checkpoint_dir] if checkpoint_dir else [])
    state = newest_trainer_state(roots)
    if state is not None:
        history = json.loads(state.read_text()).get("log_history", [])
        return merge_histories(history, samples), str(state)
    return list(samples), "progress samples"


def final_value(history: list[dict], key: str) -> float | None:
    """The last finite value logged under key."""
    for entry in reversed(history):
        value = entry.get(key)
        if _finite(value):
            return float(value)
    return None


def series(history: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of every finite value logged under key."""
    steps, values = [], []
    for entry in history:
        value, step = entry.get(key), entry.get("step")
        if _finite(value) and _finite(step):
            steps.append(float(step))
            values.append(float(value))
    return steps, values


def panel_keys(history: list[dict]) -> list[tuple[str, list[tuple[str, str]]]]:
    """The panels to draw and their (key, label) curves, for the keys the history logs.

    >>> panel_keys([{"step": 1, "loss": 1.0, "reward": 0.5, "rewards/format/mean": 0.2}])
    [('loss', [('loss', 'train loss')]), ('reward', [('reward', 'reward (mean)'), ('rewards/format/mean', 'format')])]
    """
    logged = {key for entry in history for key, value in entry.items() if _finite(value)}
    components = sorted(
        (key, match["name"]) for key in logged if (match := REWARD_COMPONENT.fullmatch(key))
    )
    panels = []
    for label, keys in PANELS:
        curves = [(key, name) for key, name in keys if key in logged]
        if label == "reward":
            curves += components
        if curves:
            panels.append((label, curves))
    return panels


def plot_curves(history: list[dict], path: Path, title: str) -> list[tuple[str, list[str]]]:
    """Write one panel per logged quantity (loss with eval loss, reward with every reward
    function's mean, KL, completion length, learning rate) to a PNG. Returns the panels
    drawn with their curves' labels; [] (and no file) when nothing was logged."""
    panels = [
        (label, [(name, *series(history, key)) for key, name in curves])
        for label, curves in panel_keys(history)
    ]
    panels = [(label, [c for c in curves if c[1]]) for label, curves in panels]
    panels = [(label, curves) for label, curves in panels if curves]
    if not panels:
        return []
    import matplotlib

    matplotlib.use("Agg")  # no display: the runner may run over SSH or in CI
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(
        len(panels), 1, figsize=(7, 3.2 * len(panels)), squeeze=False, sharex=True
    )
    for ax, (label, curves) in zip(axes[:, 0], panels, strict=True):
        for name, steps, values in curves:
            ax.plot(
                steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=name
            )
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best")
    axes[-1, 0].set_xlabel("step")
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return [(label, [name for name, *_ in curves]) for label, curves in panels]


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
