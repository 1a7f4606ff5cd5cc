"""Ollama's REST API (``/api/chat``, ``/api/generate``, ``/api/embed``, ...): request bodies.

Bounds match the OpenAI requests these convert into (``openai_chat``, ``openai_sampling``), so a
value the engine would refuse is a 400 here, in Ollama's error shape, before any work starts.
Unknown fields and unknown ``options`` are ignored, as Ollama ignores them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from inferd.protocol.common import WireModel
from inferd.protocol.limits import (
    MAX_BATCH_INPUTS,
    MAX_JSON_DEPTH,
    MAX_MODEL_NAME_CHARS,
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    MAX_TOKEN_ID,
    SEED_RANGE,
    at_most,
    at_most_nested,
)
from inferd.protocol.openai_chat import Messages
from inferd.protocol.openai_sampling import JsonSchema

ModelName = Annotated[str, Field(min_length=1, max_length=MAX_MODEL_NAME_CHARS)]
# A duration string ("5m"), seconds, 0 (unload when idle) or a negative number (forever).
KeepAlive = Annotated[str, Field(max_length=64)] | float | None
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_STRING_CHARS)]


class Options(WireModel):
    """The runtime ``options`` inferd applies; load-time ones (num_gpu, num_thread, ...) and
    samplers it lacks (mirostat, tfs_z, typical_p) are ignored."""

    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    # -1: until the context is full; -2: fill the context (both: no limit but the context).
    num_predict: int | None = Field(None, ge=-2)
    stop: Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | StopString | None = None
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    num_ctx: int | None = Field(None, ge=1)
    repeat_penalty: float | None = Field(None, gt=0, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)

    @field_validator("num_predict", "num_ctx")
    @classmethod
    def _bounded(cls, value: int | None) -> int | None:
        if value is not None and value > MAX_TOKEN_ID:
            raise ValueError(f"must be at most {MAX_TOKEN_ID}")
        return value

    def stops(self) -> list[str] | None:
        return [self.stop] if isinstance(self.stop, str) else self.stop

    def max_tokens(self) -> int | None:
        """num_predict as max_tokens (None: up to the context)."""
        return None if self.num_predict is None or self.num_predict < 0 else max(self.num_predict, 1)


# format: "json" (any JSON object), a JSON schema, or "" / absent (free text).
Format = Literal["", "json"] | JsonSchema | None
# think: on or off, or a level ("low", "medium", "high") for models that take one.
Think = bool | Annotated[str, Field(max_length=16)] | None
Tools = Annotated[list[dict[str, Any]] | None, at_most_nested(MAX_JSON_DEPTH), at_most(128, "tools")]


class _Generating(WireModel):
    model: ModelName
    stream: bool = True
    options: Options = Field(default_factory=Options)
    format: Format = None
    keep_alive: KeepAlive = None
    think: Think = None


class ChatRequest(_Generating):
    # Empty: a request that only loads (or, with keep_alive 0, unloads) the model.
    messages: Messages = Field(default_factory=list)
    tools: Tools = None


class GenerateRequest(_Generating):
    prompt: Annotated[str, Field(max_length=16 * 2**20)] | None = None
    system: Annotated[str, Field(max_length=16 * 2**20)] | None = None
    suffix: str | None = None
    template: str | None = None
    raw: bool = False
    images: list[Any] | None = None
    context: list[int] | None = None


class EmbedRequest(WireModel):
    model: ModelName
    input: (
        Annotated[str, Field(max_length=16 * 2**20)]
        | Annotated[list[str], Field(max_length=MAX_BATCH_INPUTS), at_most(MAX_BATCH_INPUTS, "inputs")]
    )
    truncate: bool = True
    dimensions: int | None = Field(None, ge=1)
    keep_alive: KeepAlive = None
    options: dict[str, Any] | None = None  # accepted, nothing in it applies to an embedder

    def inputs(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else self.input


class EmbeddingsRequest(WireModel):
    """The legacy ``/api/embeddings``: one prompt, one vector."""

    model: ModelName
    prompt: Annotated[str, Field(max_length=16 * 2**20)] = ""
    keep_alive: KeepAlive = None
    options: dict[str, Any] | None = None


class ModelRequest(WireModel):
    """``/api/show`` and ``/api/delete``: the model, under its current name or the old ``name``."""

    model: ModelName | None = None
    name: ModelName | None = None

    @model_validator(mode="after")
    def _check_named(self) -> ModelRequest:
        if not (self.model or self.name):
            raise ValueError("model is required")
        return self

    def model_name(self) -> str:
        return self.model or self.name or ""


class PullRequest(ModelRequest):
    stream: bool = True
    insecure: bool = False
