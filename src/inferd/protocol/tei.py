"""Text Embeddings Inference's ``/embed`` and ``/rerank``."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, Field, StrictStr

from inferd.encoder.params import EmbedParams, RerankParams
from inferd.protocol.common import EncodeInput, TruncationDirection, WireModel, as_list
from inferd.protocol.limits import MAX_BATCH_INPUTS, at_most


class EmbedRequest(WireModel):
    inputs: EncodeInput
    normalize: bool = True
    truncate: bool | None = None
    truncation_direction: TruncationDirection = "right"
    prompt_name: str | None = None
    dimensions: int | None = Field(None, ge=1)

    def input_list(self) -> list[str] | list[list[int]]:
        return as_list(self.inputs)

    def to_embed_params(self) -> EmbedParams:
        return EmbedParams(
            normalize=self.normalize,
            truncate=bool(self.truncate),
            truncation_side=self.truncation_direction.lower(),
            prompt_name=self.prompt_name,
            dimensions=self.dimensions,
        )


class RerankRequest(WireModel):
    query: StrictStr
    texts: Annotated[list[StrictStr], Field(max_length=MAX_BATCH_INPUTS), at_most(MAX_BATCH_INPUTS, "texts")]
    truncate: bool | None = None
    truncation_direction: TruncationDirection = "right"
    raw_scores: bool = False
    return_text: bool = False

    def to_rerank_params(self) -> RerankParams:
        return RerankParams(
            raw_scores=self.raw_scores,
            truncate=bool(self.truncate),
            truncation_side=self.truncation_direction.lower(),
        )


class Rank(BaseModel):
    index: int
    score: float
    text: str | None = None
