"""``/tokenize`` and ``/detokenize`` (vLLM's shapes)."""

from __future__ import annotations

from functools import partial
from typing import Annotated, Any

from pydantic import BaseModel, Field, PlainValidator, StrictInt, model_validator

from inferd.protocol.common import WireModel
from inferd.protocol.limits import MAX_DETOKENIZE_TOKENS, MAX_TOKEN_ID, check_token_ids
from inferd.protocol.openai_chat import Messages


class TokenizeRequest(WireModel):
    model: str | None = None
    prompt: str | None = None
    messages: Annotated[Messages, Field(min_length=1)] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self

    def response(self, token_ids: list[int], max_model_len: int) -> TokenizeResponse:
        return TokenizeResponse(tokens=token_ids, count=len(token_ids), max_model_len=max_model_len)


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


# Checked in one pass (limits.check_token_ids); documented as the list it accepts.
DetokenizeIds = Annotated[
    Any,
    PlainValidator(
        partial(check_token_ids, limit=MAX_DETOKENIZE_TOKENS),
        json_schema_input_type=Annotated[
            list[Annotated[StrictInt, Field(ge=0, le=MAX_TOKEN_ID)]], Field(max_length=MAX_DETOKENIZE_TOKENS)
        ],
    ),
]


class DetokenizeRequest(WireModel):
    model: str | None = None
    tokens: DetokenizeIds
