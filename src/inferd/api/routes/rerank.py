"""Cohere / Jina ``POST /v1/rerank`` and Cohere ``POST /v2/rerank``."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from inferd.api.cancellation import unless_disconnected
from inferd.api.context import reserve_tokens
from inferd.api.deps import model_table
from inferd.api.model_table import ModelTable
from inferd.api.responses import FastJSONResponse
from inferd.api.serving.rerank import cohere_rerank_body
from inferd.config import ModelKind
from inferd.protocol.rerank import CohereRerankRequest, CohereRerankResponse

router = APIRouter(tags=["cohere"])


async def _rerank(body: CohereRerankRequest, request: Request, models: ModelTable, version: str):
    model = await models.get(body.model, ModelKind.RERANK)
    texts = body.texts()
    output = await unless_disconnected(
        request, model.client.rerank(body.query, texts, body.to_rerank_params(), admit=reserve_tokens)
    )
    # v1 (and Jina) return the documents unless asked not to; v2 only when asked.
    return_documents = body.return_documents if body.return_documents is not None else version == "1"
    return FastJSONResponse(
        cohere_rerank_body(
            output,
            texts,
            model=model.name,
            top_n=body.top_n,
            return_documents=return_documents,
            api_version=version,
        )
    )


@router.post("/v1/rerank", response_model=CohereRerankResponse, response_class=FastJSONResponse)
async def rerank_v1(
    body: CohereRerankRequest, request: Request, models: ModelTable = Depends(model_table)
) -> FastJSONResponse:
    return await _rerank(body, request, models, "1")


@router.post("/v2/rerank", response_model=CohereRerankResponse, response_class=FastJSONResponse)
async def rerank_v2(
    body: CohereRerankRequest, request: Request, models: ModelTable = Depends(model_table)
) -> FastJSONResponse:
    return await _rerank(body, request, models, "2")
