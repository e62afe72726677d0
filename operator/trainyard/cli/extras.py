"""Which optional dependency group (`pip install 'trainyard[EXTRA]'`) a command needs.

The core install validates, renders and prints CRDs; training and the operator come
with extras. A command started without its extra says so in one line instead of a
`ModuleNotFoundError` traceback.
"""

from __future__ import annotations

EXTRAS: dict[str, frozenset[str]] = {
    "train": frozenset(
        {
            "torch", "transformers", "trl", "peft", "accelerate", "datasets", "tokenizers",
            "boto3", "botocore", "prometheus_client", "matplotlib",
        }
    ),
    "operator": frozenset({"kopf", "kubernetes_asyncio", "aiohttp", "prometheus_client"}),
}  # fmt: skip
"""Top-level modules of each extra (pyproject.toml's optional dependencies)."""


def missing_extra(command: str, extra: str, error: ModuleNotFoundError) -> str | None:
    """The line for a command whose extra is not installed; None when the missing module
    is not one of the extra's (a real bug, which should keep its traceback).

    >>> missing_extra("operator", "operator", ModuleNotFoundError("No module", name="kopf"))
    "trainyard operator: kopf is not installed; it comes with the operator extra: pip install 'trainyard[operator]'"
    >>> missing_extra("run", "train", ModuleNotFoundError("No module", name="nope")) is None
    True
    """
    top = (error.name or "").partition(".")[0]
    if top not in EXTRAS[extra]:
        return None
    return (
        f"trainyard {command}: {top} is not installed; it comes with the {extra} extra: "
        f"pip install 'trainyard[{extra}]'"
    )
