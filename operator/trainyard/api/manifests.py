"""Reading manifests as Kubernetes does.

kubectl and the API server read YAML 1.2, where `1e-5` is a number; PyYAML's safe loader
follows YAML 1.1 and reads it as the string '1e-5' (it wants `1.0e-5`). The API models are
strict about types, as the CRD is, so a learning rate written the usual way would be
refused here and accepted by `kubectl apply`. `Loader` reads floats the YAML 1.2 way.

>>> load("lr: 1e-5\\nepochs: 3\\nversion: '1e-5'")
{'lr': 1e-05, 'epochs': 3, 'version': '1e-5'}
>>> load_all("a: .5e+2\\n---\\nb: -2E3\\n")
[{'a': 50.0}, {'b': -2000.0}]
"""

from __future__ import annotations

import re
from typing import Any

import yaml


class Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 floats (exponent without a dot)."""


# The YAML 1.2 core schema's float, plus YAML 1.1's forms PyYAML already reads.
_FLOAT = re.compile(
    r"""^(?:[-+]?(?:\.[0-9]+|[0-9][0-9_]*(?:\.[0-9_]*)?)(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)

Loader.yaml_implicit_resolvers = {
    key: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:float"]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def load(text: str) -> Any:
    """The single document of `text`."""
    return yaml.load(text, Loader=Loader)  # noqa: S506 - Loader is a SafeLoader


def load_all(text: str) -> list[Any]:
    """Every document of `text`, in order (empty ones as None)."""
    return list(yaml.load_all(text, Loader=Loader))  # noqa: S506 - Loader is a SafeLoader
