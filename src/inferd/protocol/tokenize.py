"""``/tokenize`` and ``/detokenize`` (vLLM's shapes)."""

from __future__ import annotations

from pydantic import BaseModel, Field, StrictInt, model_validator

from inferd.protocol.common import WireModel
from inferd.protocol.openai_chat import ChatMessage


class TokenizeRequest(WireModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
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


class DetokenizeRequest(WireModel):
    model: str | None = None
    tokens: list[StrictInt] = Field(min_length=0)
