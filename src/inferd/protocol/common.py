"""Pieces shared by several wire families."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictInt, StrictStr

TokenIds = Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(min_length=1)]

_INPUT_SHAPES = "a string, a list of strings, a list of token ids, or a list of token-id lists"


def _check_input_shape(value: Any) -> Any:
    """One clear message instead of pydantic's report on each member of the union."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        if all(isinstance(v, str) for v in value) or _is_ids(value):
            return value
        if all(isinstance(v, list) and _is_ids(v) for v in value):
            return value
    raise ValueError(f"must be {_INPUT_SHAPES}")


def _is_ids(value: list) -> bool:
    return bool(value) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


# A single text, many texts, one token-id list, or many token-id lists.
EncodeInput = Annotated[
    StrictStr | list[StrictStr] | TokenIds | list[TokenIds], BeforeValidator(_check_input_shape)
]


class WireModel(BaseModel):
    """Requests ignore unknown fields, as the servers they imitate do."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())


TruncationDirection = Literal["right", "left", "Right", "Left"]


def as_list(value: str | list) -> list:
    """One input or many → many; a flat token-id list is one input."""
    if isinstance(value, str):
        return [value]
    if value and isinstance(value[0], int):
        return [value]
    return value
