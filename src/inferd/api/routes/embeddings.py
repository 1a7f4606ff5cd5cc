"""OpenAI ``POST /v1/embeddings``."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from inferd.api.cancellation import unless_disconnected
from inferd.api.context import reserve_tokens
from inferd.api.deps import model_table
from inferd.api.model_table import ModelTable
from inferd.api.responses import FastJSONResponse
from inferd.api.serving.embeddings import openai_embeddings_body
from inferd.config import ModelKind
from inferd.protocol.openai_embeddings import EmbeddingRequest, EmbeddingResponse

router = APIRouter(tags=["openai"])


@router.post("/v1/embeddings", response_model=EmbeddingResponse, response_class=FastJSONResponse)
async def create_embeddings(
    body: EmbeddingRequest, request: Request, models: ModelTable = Depends(model_table)
) -> FastJSONResponse:
    model = await models.get(body.model, ModelKind.EMBEDDING)
    output = await unless_disconnected(request, model.client.embed(body.inputs(), body.to_embed_params(), admit=reserve_tokens))
    return FastJSONResponse(openai_embeddings_body(output, model.name, body.encoding_format))
