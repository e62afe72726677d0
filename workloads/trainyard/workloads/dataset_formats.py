"""Bring a dataset into the column layout the method's TRL trainer reads.

| method      | columns produced                                                   |
|-------------|--------------------------------------------------------------------|
| sft         | `messages` (chat), `prompt`/`completion` (alpaca, prompt data), or `text` |
| pretrain    | `text`                                                             |
| dpo, reward | `prompt`/`chosen`/`rejected` (or `chosen`/`rejected` chats)        |
| kto         | `prompt`/`completion`/`label` (paired data is unpaired)            |
| grpo, rloo  | `prompt` plus every other column, for reward functions             |

Column names in the data are mapped by the `*_field` options of `spec.dataset`.
Alpaca becomes prompt/completion, so `completion_only_loss` keeps instruction tokens
out of the loss.

>>> alpaca_prompt("Add the numbers.", "2 and 3")
'### Instruction:\\nAdd the numbers.\\n\\n### Input:\\n2 and 3\\n\\n### Response:\\n'
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from datasets import Dataset

FORMATS = ("chat", "alpaca", "preference", "unpaired_preference", "prompt", "text")
# What each method can train on, in the order auto-detection prefers.
METHOD_FORMATS = {
    "sft": ("chat", "alpaca", "prompt", "text", "preference"),
    "pretrain": ("text",),
    "dpo": ("preference",),
    "reward": ("preference",),
    "kto": ("unpaired_preference", "preference"),
    "grpo": ("prompt", "chat", "alpaca", "preference"),
    "rloo": ("prompt", "chat", "alpaca", "preference"),
}


class DatasetFormatError(ValueError):
    """Data whose columns do not fit the format or method."""


def alpaca_prompt(instruction: str, input_text: str | None) -> str:
    """The Alpaca prompt: instruction, optional input, then the response header."""
    if input_text:
        return f"### Instruction:\n{instruction}\n\n### Input:\n{input_text}\n\n### Response:\n"
    return f"### Instruction:\n{instruction}\n\n### Response:\n"


def detect_format(columns: list[str], spec: Any) -> str:
    """The format the columns look like, given the field names in `spec.dataset`."""
    has = set(columns).__contains__
    if has(spec.messages_field):
        return "chat"
    if has(spec.chosen_field) and has(spec.rejected_field):
        return "preference"
    if has(spec.label_field) and has(spec.completion_field):
        return "unpaired_preference"
    if has(spec.instruction_field) and has(spec.output_field):
        return "alpaca"
    if has(spec.prompt_field):
        return "prompt"
    if has(spec.text_field):
        return "text"
    raise DatasetFormatError(
        f"dataset.format: cannot tell the format from the columns {sorted(columns)}; expected "
        f"{spec.messages_field!r} (chat), {spec.chosen_field!r}+{spec.rejected_field!r} (preference), "
        f"{spec.prompt_field!r}+{spec.completion_field!r}+{spec.label_field!r} (unpaired_preference), "
        f"{spec.instruction_field!r}+{spec.output_field!r} (alpaca), {spec.prompt_field!r} (prompt) "
        f"or {spec.text_field!r} (text); set dataset.format and the *Field options"
    )


def _require(columns: list[str], needed: dict[str, str], fmt: str) -> None:
    missing = [f"{option}={name!r}" for option, name in needed.items() if name not in columns]
    if missing:
        raise DatasetFormatError(
            f"dataset: format {fmt} needs the columns {', '.join(missing)}; "
            f"the data has {sorted(columns)}"
        )


def _split_chat(messages: list[dict[str, Any]]) -> tuple[list[dict], list[dict]]:
    """Split a conversation before its last assistant turn: (prompt messages, completion)."""
    for index in range(len(messages) - 1, -1, -1):
        if messages[index].get("role") == "assistant":
            return messages[:index], messages[index:]
    return messages, []


def prepare_dataset(
    dataset: Dataset, spec: Any, method: str, template: str | None = None
) -> Dataset:
    """Normalize `dataset` (described by `spec`, a `DatasetSpec`) for `method`.

    With a prompt `template` (GRPO/RLOO's `prompt.template`), each row's prompt is the
    template filled from the row's columns, whatever the format; every column is kept
    for the rewards.
    """
    columns = list(dataset.column_names)
    if template is not None and method in ("grpo", "rloo"):
        return fill_template(dataset, template, field=f"{method}.prompt.template")
    fmt = spec.format if spec.format != "auto" else detect_format(columns, spec)
    if fmt not in METHOD_FORMATS[method]:
        raise DatasetFormatError(
            f"dataset.format: method {method} cannot train on {fmt} data; "
            f"it takes {', '.join(METHOD_FORMATS[method])}"
        )
    online = method in ("grpo", "rloo")

    if fmt == "chat":
        _require(columns, {"messagesField": spec.messages_field}, fmt)
        if online:

            def to_row(row):
                prompt, completion = _split_chat(row[spec.messages_field])
                out = {"prompt": prompt}
                if completion:
                    out["reference"] = completion[0].get("content", "")
                return out

            return _remap(dataset, to_row, drop=[spec.messages_field], keep_rest=True)
        return _remap(dataset, lambda r: {"messages": r[spec.messages_field]}, drop=columns)

    if fmt == "alpaca":
        fields = {"instructionField": spec.instruction_field, "outputField": spec.output_field}
        _require(columns, fields, fmt)

        def alpaca_row(row):
            prompt = alpaca_prompt(row[spec.instruction_field], row.get(spec.input_field))
            if online:
                return {"prompt": prompt, "reference": row[spec.output_field]}
            return {"prompt": prompt, "completion": row[spec.output_field]}

        source_columns = [spec.instruction_field, spec.input_field, spec.output_field]
        return _remap(
            dataset, alpaca_row, drop=columns if not online else source_columns, keep_rest=online
        )

    if fmt == "preference":
        _require(
            columns, {"chosenField": spec.chosen_field, "rejectedField": spec.rejected_field}, fmt
        )
        has_prompt = spec.prompt_field in columns
        if online:
            _require(columns, {"promptField": spec.prompt_field}, fmt)
            return _remap(
                dataset,
                lambda r: {"prompt": r[spec.prompt_field], "reference": r[spec.chosen_field]},
                drop=[spec.prompt_field, spec.chosen_field, spec.rejected_field],
                keep_rest=True,
            )
        if method == "sft":
            _require(columns, {"promptField": spec.prompt_field}, fmt)
            return _remap(
                dataset,
                lambda r: {"prompt": r[spec.prompt_field], "completion": r[spec.chosen_field]},
                drop=columns,
            )

        def pair(row):
            out = {"chosen": row[spec.chosen_field], "rejected": row[spec.rejected_field]}
            if has_prompt:
                out["prompt"] = row[spec.prompt_field]
            return out

        paired = _remap(dataset, pair, drop=columns)
        if method == "kto":
            from trl.data_utils import unpair_preference_dataset

            return unpair_preference_dataset(paired)
        return paired

    if fmt == "unpaired_preference":
        fields = {
            "promptField": spec.prompt_field,
            "completionField": spec.completion_field,
            "labelField": spec.label_field,
        }
        _require(columns, fields, fmt)
        return _remap(
            dataset,
            lambda r: {
                "prompt": r[spec.prompt_field],
                "completion": r[spec.completion_field],
                "label": bool(r[spec.label_field]),
            },
            drop=columns,
        )

    if fmt == "prompt":
        _require(columns, {"promptField": spec.prompt_field}, fmt)
        if online:
            return _remap(
                dataset,
                lambda r: {"prompt": r[spec.prompt_field]},
                drop=[spec.prompt_field],
                keep_rest=True,
            )
        _require(columns, {"completionField": spec.completion_field}, "prompt (for sft)")
        return _remap(
            dataset,
            lambda r: {"prompt": r[spec.prompt_field], "completion": r[spec.completion_field]},
            drop=columns,
        )

    # text
    _require(columns, {"textField": spec.text_field}, fmt)
    return _remap(dataset, lambda r: {"text": r[spec.text_field]}, drop=columns)


def fill_template(dataset: Dataset, template: str, field: str = "prompt.template") -> Dataset:
    """Each row's `prompt`: `template` filled from the row's columns (all columns kept).

    >>> from datasets import Dataset
    >>> rows = Dataset.from_list([{"goal": "ship it", "team": "two devs"}])
    >>> fill_template(rows, "Goal: {goal}\\nTeam: {team}")[0]["prompt"]
    'Goal: ship it\\nTeam: two devs'
    >>> fill_template(rows, "Goal: {sprint_goal}")
    Traceback (most recent call last):
    ...
    trainyard.workloads.dataset_formats.DatasetFormatError: prompt.template: names the column 'sprint_goal', which the data lacks; its columns are goal, team
    """
    from trainyard.api.training_run import template_fields

    columns = list(dataset.column_names)
    missing = [name for name in template_fields(template) if name not in columns]
    if missing:
        raise DatasetFormatError(
            f"{field}: names the column{'s' if len(missing) > 1 else ''} "
            f"{', '.join(map(repr, missing))}, which the data lacks; its columns are "
            f"{', '.join(columns)}"
        )
    return dataset.map(lambda row: {"prompt": template.format_map(row)})


def chat_prompt(prompt: Any, system: str | None) -> list[dict[str, Any]]:
    """The messages of a prompt (a string is one user turn), with `system` as the
    system message (replacing one the data has).

    >>> chat_prompt("Hi", "Be brief.")
    [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi'}]
    """
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system is not None:
        messages = [{"role": "system", "content": system}] + [
            m for m in messages if m.get("role") != "system"
        ]
    return messages


def render_prompts(dataset: Dataset, prompt: Any, tokenizer: Any, field: str) -> Dataset:
    """Each row's `prompt` as the text the policy completes: the system message and the
    user turn through the tokenizer's chat template (with the generation prompt), then
    `prompt.assistantPrefix`. `prompt` is a `PromptSpec`; `field` its path for errors."""
    if prompt.chat_template and not getattr(tokenizer, "chat_template", None):
        raise DatasetFormatError(
            f"{field}.chatTemplate: the tokenizer has no chat template; use a tokenizer that has "
            "one (tokenizer.source), or set chatTemplate: false to join the system prompt, the "
            "user turn and the assistant prefix with blank lines"
        )
    prefix = prompt.assistant_prefix or ""

    def render(row: dict[str, Any]) -> dict[str, str]:
        messages = chat_prompt(row["prompt"], prompt.system)
        if prompt.chat_template:
            text = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        else:
            text = "\n\n".join(str(m["content"]) for m in messages) + ("\n\n" if prefix else "")
        return {"prompt": text + prefix}

    return dataset.map(render)


def _remap(dataset: Dataset, row_fn, *, drop: list[str], keep_rest: bool = False) -> Dataset:
    """Map rows through `row_fn`; drop the source columns (all others too unless keep_rest)."""
    columns = list(dataset.column_names)
    remove = sorted(set(drop) if keep_rest else set(columns))
    return dataset.map(row_fn, remove_columns=[c for c in remove if c in columns])


def select_samples(dataset: Dataset, max_samples: int | None) -> Dataset:
    """The first `max_samples` records (all when None)."""
    if max_samples is None or max_samples >= len(dataset):
        return dataset
    return dataset.select(range(max_samples))
