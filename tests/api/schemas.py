"""The checked-in CRDs, read as the API server would use them, for the API tests.

Two things the API server does that a test has to do itself:

* **Validate against the openAPIV3Schema.** `jsonschema` speaks JSON Schema, not the
  OpenAPI v3.0 dialect of a CRD, so `to_json_schema` converts the parts it does not
  know (see its docstring). Unknown fields are refused, as `kubectl apply` does with
  its default `--validate=strict`.
* **Apply the schema's defaults** before CEL rules run (`apply_defaults`), top-down,
  so a defaulted object gets its own fields' defaults too.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import yaml

REPO = Path(__file__).resolve().parents[2]
CRD_DIR = REPO / "crds"
EXAMPLES_DIR = REPO / "examples"

# Keywords of the structural-schema dialect that plain JSON Schema does not have.
_KUBERNETES_KEYS = ("x-kubernetes-", "nullable")


@functools.cache
def load_crds() -> dict[str, dict[str, Any]]:
    """Kind → the checked-in CRD of that kind (read once; do not modify)."""
    crds = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        crds[crd["spec"]["names"]["kind"]] = crd
    return crds


def openapi_schema(crd: dict[str, Any]) -> dict[str, Any]:
    """The openAPIV3Schema of a CRD's only version."""
    (version,) = crd["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]


def to_json_schema(node: Any) -> Any:
    """An OpenAPI v3.0 structural schema as JSON Schema (draft 2020-12).

    * `exclusiveMinimum: true` + `minimum: X` (v3.0 booleans) → `exclusiveMinimum: X`,
      likewise for the maximum; `exclusiveMinimum: false` is dropped.
    * `nullable: true` → the node's type also admits null.
    * `x-kubernetes-int-or-string: true` → `anyOf: [integer, string]`.
    * An object with `properties` that neither preserves unknown fields nor has
      `additionalProperties` gets `additionalProperties: false`: the API server prunes
      unknown fields and `kubectl apply --validate=strict` (the default) refuses them.
    * Other `x-kubernetes-*` keys (validations, list types) are dropped; CEL rules are
      evaluated separately (test_cel_rules.py).
    """
    if isinstance(node, list):
        return [to_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {k: v for k, v in node.items() if not k.startswith(_KUBERNETES_KEYS)}
    for flag, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(out.get(flag), bool) and out.pop(flag):
            out[flag] = out.pop(bound)
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if node.get("x-kubernetes-int-or-string"):
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    if "properties" in out:
        out["properties"] = {k: to_json_schema(v) for k, v in out["properties"].items()}
    for key in ("items", "additionalProperties"):
        if isinstance(out.get(key), dict):
            out[key] = to_json_schema(out[key])
    return out


def schema_errors(kind: str, document: Any) -> list[str]:
    """Every way `document` breaks the schema of the CRD of `kind`, as `path: message` lines."""
    validator = _validator(kind)
    return sorted(
        f"{'.'.join(str(p) for p in error.absolute_path) or '(root)'}: {error.message}"
        for error in validator.iter_errors(document)
    )


@functools.cache
def _validator(kind: str) -> jsonschema.Draft202012Validator:
    schema = to_json_schema(openapi_schema(load_crds()[kind]))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    """`value` with the schema's defaults filled in, as the API server stores it."""
    value = copy.deepcopy(value)
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        for name, sub in properties.items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
        for name, item in list(value.items()):
            if name in properties:
                value[name] = apply_defaults(properties[name], item)
            elif isinstance(schema.get("additionalProperties"), dict):
                value[name] = apply_defaults(schema["additionalProperties"], item)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        value = [apply_defaults(schema["items"], item) for item in value]
    return value


@functools.cache
def cel_program(expression: str) -> celpy.Runner:
    """A compiled CEL expression (cel-python, RE2 `matches` like the API server's)."""
    env = celpy.Environment()
    return env.program(env.compile(expression))


def evaluate_cel(expression: str, self_value: Any, old_self: Any = None) -> bool:
    """The value of a rule for `self` (and `oldSelf` for a transition rule)."""
    activation = {"self": celpy.json_to_cel(self_value)}
    if old_self is not None:
        activation["oldSelf"] = celpy.json_to_cel(old_self)
    result = cel_program(expression).evaluate(activation)
    if isinstance(result, Exception):
        raise result
    return bool(result)


def cel_violations(schema: dict[str, Any], value: Any, path: str = "") -> list[str]:
    """`path: message` for every `x-kubernetes-validations` rule `value` breaks.

    `value` should carry the schema's defaults (`apply_defaults`), as the API server's
    does. Transition rules (`oldSelf`) are left out: they need the stored object.
    """
    broken = [
        f"{(path + rule.get('fieldPath', '')).lstrip('.') or '(root)'}: {rule['message']}"
        for rule in schema.get("x-kubernetes-validations", [])
        if "oldSelf" not in rule["rule"] and not evaluate_cel(rule["rule"], value)
    ]
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        for name, item in value.items():
            sub = properties.get(name, schema.get("additionalProperties"))
            if isinstance(sub, dict):
                broken += cel_violations(sub, item, f"{path}.{name}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            broken += cel_violations(schema["items"], item, f"{path}[{i}]")
    return broken


def api_server_errors(document: dict[str, Any]) -> list[str]:
    """What the API server would refuse in `document`: schema errors, then CEL rules."""
    kind = document.get("kind")
    errors = schema_errors(kind, document)
    if errors:  # rules assume the schema's types; report the type errors alone
        return errors
    schema = openapi_schema(load_crds()[kind])
    return cel_violations(schema, apply_defaults(schema, document))


def walk(node: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """(path, node) for every schema node; paths read like `.spec.grpo.rewards[*]`."""
    if not isinstance(node, dict):
        return
    yield path, node
    for name, sub in node.get("properties", {}).items():
        yield from walk(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from walk(node["items"], f"{path}[*]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}{{*}}")
