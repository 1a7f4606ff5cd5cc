"""Text Embeddings Inference's ``POST /embed`` and ``POST /rerank`` (first model of each kind)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from inferd.api.cancellation import unless_disconnected
from inferd.api.context import reserve_tokens
from inferd.api.deps import model_table
from inferd.api.model_table import ModelTable
from inferd.api.responses import FastJSONResponse
from inferd.api.serving.rerank import tei_rerank_body
from inferd.config import ModelKind
from inferd.protocol.tei import EmbedRequest, Rank, RerankRequest

router = APIRouter(tags=["tei"])


@router.post("/embed", response_model=list[list[float]], response_class=FastJSONResponse)
async def embed(
    body: EmbedRequest, request: Request, models: ModelTable = Depends(model_table)
) -> FastJSONResponse:
    model = await models.get(None, ModelKind.EMBEDDING)
    output = await unless_disconnected(request, model.client.embed(body.input_list(), body.to_embed_params(), admit=reserve_tokens))
    return FastJSONResponse(output.embeddings)


@router.post("/rerank", response_model=list[Rank], response_class=FastJSONResponse)
async def rerank(
    body: RerankRequest, request: Request, models: ModelTable = Depends(model_table)
) -> FastJSONResponse:
    model = await models.get(None, ModelKind.RERANK)
    output = await unless_disconnected(
        request, model.client.rerank(body.query, body.texts, body.to_rerank_params(), param="texts", admit=reserve_tokens)
    )
    return FastJSONResponse(tei_rerank_body(output, body.texts, body.return_text))
