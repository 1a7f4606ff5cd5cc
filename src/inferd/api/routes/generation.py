"""OpenAI ``POST /v1/chat/completions`` and ``POST /v1/completions``; ``/tokenize``, ``/detokenize``."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel

from inferd.api.cancellation import unless_disconnected
from inferd.api.deps import model_table
from inferd.api.model_table import ModelTable
from inferd.api.serving.chat import chat_completion
from inferd.api.serving.completions import completion
from inferd.config import ModelKind
from inferd.protocol.openai_chat import ChatCompletionRequest
from inferd.protocol.openai_completions import CompletionRequest
from inferd.protocol.tokenize import DetokenizeRequest, TokenizeRequest

router = APIRouter(tags=["openai"])


@router.post("/v1/chat/completions")
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, models: ModelTable = Depends(model_table)
):
    model = models.get(body.model, ModelKind.CHAT)
    return await unless_disconnected(request, chat_completion(body, model.name, model.client))


@router.post("/v1/completions")
async def create_completion(
    body: CompletionRequest, request: Request, models: ModelTable = Depends(model_table)
):
    model = models.get(body.model, ModelKind.CHAT)
    return await unless_disconnected(request, completion(body, model.name, model.client))


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, models: ModelTable = Depends(model_table)) -> BaseModel:
    model = models.get(body.model, ModelKind.CHAT)
    client = model.client
    if body.messages is not None:
        ids = client.render_chat(
            [m.model_dump(exclude_none=True) for m in body.messages],
            add_generation_prompt=body.add_generation_prompt,
        )
    else:
        ids = client.encode(body.prompt or "", add_special_tokens=body.add_special_tokens)
    return body.response(ids, client.max_model_len)


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, models: ModelTable = Depends(model_table)) -> dict:
    model = models.get(body.model, ModelKind.CHAT)
    return {"prompt": model.client.decode(body.tokens)}
