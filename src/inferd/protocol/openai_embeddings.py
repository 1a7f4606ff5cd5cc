"""OpenAI ``/v1/embeddings``, with inferd's extensions (normalize, truncate, prompts, embedding_type)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from inferd.encoder.params import EmbeddingType, EmbedParams
from inferd.protocol.common import EncodeInput, TruncationDirection, WireModel, as_list


class EmbeddingRequest(WireModel):
    model: str
    input: EncodeInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None
    # Extensions beyond OpenAI's API.
    normalize: bool | None = Field(
        None, description="Unit-length output; default: as the model is configured."
    )
    truncate: bool = Field(False, description="Cut inputs over the model's limit instead of a 400.")
    truncation_direction: TruncationDirection = "right"
    prompt_name: str | None = Field(
        None, description="A prompt from the model's sentence-transformers config."
    )
    prompt: str | None = Field(None, description="A literal instruction prefix for every input.")
    embedding_type: EmbeddingType = "float"

    def inputs(self) -> list[str] | list[list[int]]:
        return as_list(self.input)

    def to_embed_params(self) -> EmbedParams:
        return EmbedParams(
            normalize=self.normalize,
            truncate=self.truncate,
            truncation_side=self.truncation_direction.lower(),
            prompt_name=self.prompt_name,
            prompt=self.prompt,
            dimensions=self.dimensions,
            embedding_type=self.embedding_type,
        )


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | list[int] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
