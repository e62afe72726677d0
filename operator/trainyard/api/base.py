"""The base every API model shares: camelCase in YAML, snake_case in Python, no unknown fields."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel

GROUP = "trainyard.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"


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
    )

    def to_yaml_dict(self) -> dict:
        """The object as a user would write it: camelCase keys, unset fields left out."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")
