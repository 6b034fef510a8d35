"""The base of every config section: what pydantic accepts by default that a config must not.

Pydantic reads `true` and `false` as 1 and 0 where a number is wanted, so `--set
pretrain.steps=true` trained one step without a word. Unknown keys are errors too, so a
misspelt setting is not silently ignored.
"""

from __future__ import annotations

import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator


def wants_number(annotation: Any) -> bool:
    """Whether a field of this type takes an int or a float and never a bool."""
    kinds = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, type(int | None)) \
        else (annotation,)
    return bool({int, float} & set(kinds)) and bool not in kinds


def refuse_bool(value: Any, annotation: Any, name: str) -> Any:
    """`value`, unless it is true or false where `annotation` wants a number (the error names
    the setting `name`)."""
    if isinstance(value, bool) and wants_number(annotation):
        raise ValueError(f"{name} must be a number, not {str(value).lower()}")
    return value


class Settings(BaseModel):
    """A config section: unknown keys are errors, and so is true or false for a number."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _no_bool_for_number(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, field in cls.model_fields.items():
                if name in data:
                    refuse_bool(data[name], field.annotation, name)
        return data
