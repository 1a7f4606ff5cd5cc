"""Cohere (v1, v2) and Jina rerank: ``/v1/rerank`` and ``/v2/rerank``."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, Field, StrictStr

from inferd.encoder.params import RerankParams
from inferd.protocol.common import WireModel
from inferd.protocol.limits import MAX_BATCH_INPUTS, at_most


class TextDocument(WireModel):
    text: StrictStr


class CohereRerankRequest(WireModel):
    model: str | None = None
    query: StrictStr
    documents: Annotated[
        list[StrictStr | TextDocument],
        Field(max_length=MAX_BATCH_INPUTS),
        at_most(MAX_BATCH_INPUTS, "documents"),
    ]
    top_n: int | None = Field(None, ge=1)
    return_documents: bool | None = None
    max_tokens_per_doc: int | None = Field(None, ge=1)
    raw_scores: bool = False  # extension: cross-encoder logits instead of sigmoid probabilities

    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]

    def to_rerank_params(self) -> RerankParams:
        # Cohere and Jina cut long documents rather than refuse them.
        return RerankParams(
            raw_scores=self.raw_scores, truncate=True, max_tokens_per_doc=self.max_tokens_per_doc
        )


class RerankDocument(BaseModel):
    text: str


class RerankResult(BaseModel):
    index: int
    relevance_score: float
    document: RerankDocument | None = None


class ApiVersion(BaseModel):
    version: str


class BilledUnits(BaseModel):
    search_units: int


class RerankMeta(BaseModel):
    api_version: ApiVersion
    billed_units: BilledUnits


class RerankUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class CohereRerankResponse(BaseModel):
    """Cohere's shape (id, results, meta) plus Jina's (model, usage), so clients of both work."""

    id: str
    model: str
    results: list[RerankResult]
    meta: RerankMeta
    usage: RerankUsage
