"""The evaluation's Markdown report and its plot: the metrics side by side with the
baseline's, and the examples that regressed."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from trainyard.api.verdict import EvalResults

PLOT_FILE = "eval-metrics.png"
MAX_EXAMPLES = 10


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _short(value: Any, width: int = 80) -> str:
    if isinstance(value, list):  # chat messages: the last user turn says what was asked
        value = next((m.get("content", "") for m in reversed(value) if m.get("role") == "user"), "")
    text = " ".join(str(value).split()).replace("|", "\\|")
    return text if len(text) <= width else text[: width - 1] + "…"


def plot_metrics(results: EvalResults, path: Path) -> bool:
    """One small panel per metric, candidate beside baseline; False when nothing to plot."""
    names = [n for n, v in results.metrics.items() if not math.isnan(v) and n != "reward"]
    if not names:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(len(names), 4)
    rows = math.ceil(len(names) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.6 * rows), squeeze=False)
    for ax in axes.flat[len(names) :]:
        ax.axis("off")
    for ax, name in zip(axes.flat, names, strict=False):
        labels, values, colors = ["candidate"], [results.metrics[name]], ["tab:blue"]
        if results.baseline is not None and name in results.baseline.metrics:
            labels.append("baseline")
            values.append(results.baseline.metrics[name])
            colors.append("tab:gray")
        ax.bar(labels, values, color=colors)
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=8)
        for x, value in enumerate(values):
            ax.annotate(f"{value:.3g}", (x, value), ha="center", va="bottom", fontsize=8)
    figure.suptitle(f"{results.model}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


def regressions(
    candidate: list[dict[str, Any]], baseline: list[dict[str, Any]] | None
) -> list[tuple[dict[str, Any], dict[str, Any], str]]:
    """Examples the baseline got right and the candidate not (or scored lower), worst first.

    >>> regressions([{"id": "1", "correct": False}], [{"id": "1", "correct": True}])[0][2]
    'correct → wrong'
    """
    if not baseline:
        return []
    by_id = {e["id"]: e for e in baseline}
    found = []
    for example in candidate:
        base = by_id.get(example["id"])
        if base is None:
            continue
        if base.get("correct") is True and example.get("correct") is False:
            found.append((3.0, example, base, "correct → wrong"))
        if base.get("should_refuse") is not None and base.get("refused") != example.get("refused"):
            should = example.get("should_refuse")
            if example.get("refused") != should:
                found.append(
                    (2.0, example, base, "refused" if example.get("refused") else "complied")
                )
        reward, base_reward = example.get("reward"), base.get("reward")
        if reward is not None and base_reward is not None and reward < base_reward:
            found.append(
                (base_reward - reward, example, base, f"reward {base_reward:.3g} → {reward:.3g}")
            )
        loss, base_loss = example.get("loss"), base.get("loss")
        if loss is not None and base_loss is not None and loss > base_loss * 1.2:
            found.append((loss - base_loss, example, base, f"loss {base_loss:.3g} → {loss:.3g}"))
    found.sort(key=lambda item: -item[0])
    return [(e, b, why) for _, e, b, why in found]


def render_report(
    results: EvalResults,
    examples: list[dict[str, Any]],
    baseline_examples: list[dict[str, Any]] | None,
    plot: str | None,
) -> str:
    """The Markdown report."""
    lines = [f"# Evaluation of `{results.model}`", ""]
    generation = results.generation
    settings = [
        ("dataset", results.dataset),
        ("examples", results.examples),
        ("suite", ", ".join(results.suite)),
        ("seed", results.seed),
        (
            "generation",
            ", ".join(f"{k} {v}" for k, v in generation.items()) if generation else None,
        ),
        ("backend", results.backend),
        ("baseline", results.baseline.model if results.baseline else None),
    ]
    lines += [f"- {name}: `{value}`" for name, value in settings if value not in (None, "")]
    lines += ["", "## Metrics", ""]
    if results.baseline is not None:
        lines += ["| metric | candidate | baseline | change |", "|---|---:|---:|---:|"]
        for name, value in results.metrics.items():
            base = results.baseline.metrics.get(name)
            change = None if base is None else value - base
            lines.append(f"| {name} | {_cell(value)} | {_cell(base)} | {_cell(change)} |")
    else:
        lines += ["| metric | value |", "|---|---:|"]
        lines += [f"| {name} | {_cell(value)} |" for name, value in results.metrics.items()]
    if plot:
        lines += ["", f"![metrics]({plot})"]
    regressed = regressions(examples, baseline_examples)
    if regressed:
        lines += [
            "",
            f"## Regressions ({len(regressed)}; the worst {min(len(regressed), MAX_EXAMPLES)})",
            "",
        ]
        lines += ["| id | what | prompt | candidate | baseline |", "|---|---|---|---|---|"]
        for example, base, why in regressed[:MAX_EXAMPLES]:
            lines.append(
                f"| {example['id']} | {why} | {_short(example.get('prompt'))} | "
                f"{_short(example.get('completion'), 60)} | {_short(base.get('completion'), 60)} |"
            )
    wrong = [e for e in examples if e.get("correct") is False]
    if wrong:
        lines += [
            "",
            f"## Wrong answers ({len(wrong)}; the first {min(len(wrong), MAX_EXAMPLES)})",
            "",
        ]
        lines += ["| id | prompt | expected | given |", "|---|---|---|---|"]
        for example in wrong[:MAX_EXAMPLES]:
            lines.append(
                f"| {example['id']} | {_short(example.get('prompt'))} | "
                f"{_short(example.get('answer'), 30)} | {_short(example.get('predicted'), 30)} |"
            )
    return "\n".join(lines) + "\n"
