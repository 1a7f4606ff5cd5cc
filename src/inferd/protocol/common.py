"""Pieces shared by several wire families."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, StrictInt, StrictStr

from inferd.protocol.limits import MAX_BATCH_INPUTS, MAX_TOKEN_ID, is_token_ids

TokenIds = Annotated[list[Annotated[StrictInt, Field(ge=0, le=MAX_TOKEN_ID)]], Field(min_length=1)]

_INPUT_SHAPES = "a string, a list of strings, a list of token ids, or a list of token-id lists"


def _check_input(value: Any) -> Any:
    """The whole check of an input, in C-speed passes where it can, with one clear message.

    pydantic's own validation of the union tries every member and reports each bad item of each:
    a 16 MiB list took seconds on the event loop and built millions of error objects.
    """
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise ValueError(f"must be {_INPUT_SHAPES}")
    if value and type(value[0]) is int:  # one input as token ids: its length is the model's to judge
        return _check_ids(value)
    if len(value) > MAX_BATCH_INPUTS:
        raise ValueError(f"at most {MAX_BATCH_INPUTS} inputs are allowed, got {len(value)}")
    kinds = set(map(type, value))
    if kinds <= {str}:  # the empty list included: the engines say what they need
        return value
    if kinds == {list}:
        for ids in value:
            _check_ids(ids)
        return value
    raise ValueError(f"must be {_INPUT_SHAPES}")


def _check_ids(ids: list) -> list:
    if is_token_ids(ids):
        return ids
    if ids and set(map(type, ids)) == {int}:
        raise ValueError(f"token ids must be integers from 0 to {MAX_TOKEN_ID}")
    raise ValueError(f"must be {_INPUT_SHAPES}")


# A single text, many texts, one token-id list, or many token-id lists. The documented schema is the
# union; the validation is _check_input alone.
EncodeInput = Annotated[
    Any,
    PlainValidator(
        _check_input,
        json_schema_input_type=StrictStr
        | Annotated[list[StrictStr], Field(max_length=MAX_BATCH_INPUTS)]
        | TokenIds
        | Annotated[list[TokenIds], Field(max_length=MAX_BATCH_INPUTS)],
    ),
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
