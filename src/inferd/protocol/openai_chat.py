"""OpenAI ``/v1/chat/completions``."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from inferd.llm.params import SamplingParams
from inferd.protocol.limits import (
    MAX_CONTENT_PARTS,
    MAX_JSON_DEPTH,
    MAX_MESSAGES,
    MAX_TEMPLATE_KWARGS,
    MAX_TOOL_CALLS,
    MAX_TOOLS,
    MAX_TOOLS_CHARS,
    at_most,
    at_most_nested,
    is_nested_deeper,
)
from inferd.protocol.openai_sampling import SamplingFields

Role = Literal["system", "developer", "user", "assistant", "tool"]


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Role
    content: Annotated[
        str | Annotated[list[ContentPart], Field(max_length=MAX_CONTENT_PARTS)] | None,
        at_most(MAX_CONTENT_PARTS, "content parts in one message"),
    ] = None
    name: str | None = None
    tool_calls: Annotated[
        list[dict[str, Any]] | None,
        Field(max_length=MAX_TOOL_CALLS),
        at_most(MAX_TOOL_CALLS, "tool calls in one message"),
    ] = None
    tool_call_id: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _check_nesting(cls, value: Any) -> Any:
        # The whole message reaches the chat template, extra fields and tool calls included.
        if is_nested_deeper(value, MAX_JSON_DEPTH):
            raise ValueError(f"a message may nest at most {MAX_JSON_DEPTH} levels of lists and objects")
        return value

    def text(self) -> str | None:
        """The content as one string; image and audio parts are refused by the serving layer."""
        if self.content is None or isinstance(self.content, str):
            return self.content
        return "".join(part.text or "" for part in self.content if part.type == "text")

    def non_text_part(self) -> str | None:
        if isinstance(self.content, list):
            return next((part.type for part in self.content if part.type != "text"), None)
        return None


# Capped before each message is validated (see at_most).
Messages = Annotated[list[ChatMessage], Field(max_length=MAX_MESSAGES), at_most(MAX_MESSAGES, "messages")]


def num_message_chars(messages: list[ChatMessage]) -> int:
    """The characters of the messages' text: what a chat template renders, before its own text."""
    return sum(len(m.text() or "") for m in messages)


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    """``{"type": "function", "function": {"name": ...}}``: the reply is one call of that function."""

    type: Literal["function"]
    function: NamedFunction


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[Messages, Field(min_length=1)]
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    stream_options: StreamOptions | None = None
    tools: Annotated[
        list[dict[str, Any]] | None,
        Field(max_length=MAX_TOOLS),
        at_most_nested(MAX_JSON_DEPTH),
        at_most(MAX_TOOLS, "tools"),  # before validators run last first: the count is checked first
    ] = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    add_generation_prompt: bool = True
    chat_template_kwargs: Annotated[
        dict[str, Any] | None,
        Field(max_length=MAX_TEMPLATE_KWARGS),
        at_most_nested(MAX_JSON_DEPTH),
        at_most(MAX_TEMPLATE_KWARGS, "chat_template_kwargs entries"),
    ] = None

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _check_tool_choice(cls, value: Any) -> Any:
        # Before the union's own checks, which would name each member in the error's field
        # ("tool_choice.literal['none','auto','required']").
        if value is None or value in ("none", "auto", "required"):
            return value
        function = value.get("function") if isinstance(value, dict) else None
        if (
            isinstance(function, dict)
            and value.get("type") == "function"
            and isinstance(function.get("name"), str)
        ):
            return value
        got = repr(value) if isinstance(value, str) else f"a {type(value).__name__} of another shape"
        raise ValueError(
            "tool_choice must be 'none', 'auto', 'required' or "
            f'{{"type": "function", "function": {{"name": ...}}}}, got {got}'
        )

    @field_validator("tools")
    @classmethod
    def _check_tools_size(cls, value: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        # Every definition is rendered into the prompt; bound them together, not only by count.
        size = len(json.dumps(value)) if value else 0
        if size > MAX_TOOLS_CHARS:
            raise ValueError(
                f"the tool definitions may have at most {MAX_TOOLS_CHARS} characters as JSON, got {size}"
            )
        return value

    @model_validator(mode="after")
    def _check_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs set to true")
        return self

    def to_sampling_params(self, seed_offset: int = 0) -> SamplingParams:
        max_tokens = self.max_completion_tokens or self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self.sampling_params(max_tokens=max_tokens, logprobs=logprobs, seed_offset=seed_offset)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)
