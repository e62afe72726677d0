"""The base every API model shares: camelCase in YAML, snake_case in Python, no unknown fields."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, model_validator
from pydantic.alias_generators import to_camel

from trainyard.api.rules import Rule, check_rules

GROUP = "trainyard.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"


def add_rules_to_schema(schema: dict[str, Any], model: type[ApiModel]) -> None:
    """Put a model's cross-field rules into its schema as CEL (`x-kubernetes-validations`)."""
    if model.rules:
        schema["x-kubernetes-validations"] = [rule.to_crd() for rule in model.rules]


class ApiModel(BaseModel):
    """A part of a Trainyard resource.

    Fields are written camelCase in YAML (``learningRate``) and read snake_case in
    Python (``learning_rate``). Unknown fields are errors, so a typo never silently
    falls back to a default.
    """

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_attribute_docstrings=True,
        validate_default=False,
        # No coercion: "16" is not 16, as the API server's schema check would say too.
        strict=True,
        json_schema_extra=add_rules_to_schema,
    )

    rules: ClassVar[tuple[Rule, ...]] = ()
    """Cross-field rules: checked here in Python, and by the API server as CEL."""

    @model_validator(mode="after")
    def _check_rules(self) -> ApiModel:
        check_rules(self, self.rules)
        return self

    def to_yaml_dict(self) -> dict:
        """The object as a user would write it: camelCase keys, unset fields left out."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")
