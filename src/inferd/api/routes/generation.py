"""OpenAI ``POST /v1/chat/completions`` and ``POST /v1/completions``; ``/tokenize``, ``/detokenize``."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from inferd.api.cancellation import unless_disconnected
from inferd.api.deps import model_table
from inferd.api.model_table import ModelTable
from inferd.api.serving.chat import chat_completion
from inferd.api.serving.completions import completion
from inferd.api.serving.generation import off_loop
from inferd.config import ModelKind
from inferd.llm.client import LLMClient
from inferd.protocol.openai_chat import ChatCompletionRequest, num_message_chars
from inferd.protocol.openai_completions import CompletionRequest
from inferd.protocol.tokenize import DetokenizeRequest, TokenizeRequest, TokenizeResponse

router = APIRouter(tags=["openai"])

# With "stream": true the answer is server-sent events; the document says so, or clients and
# schema checkers reject a correct stream.
_MAYBE_STREAMED = {200: {"content": {"text/event-stream": {}}}}


@router.post("/v1/chat/completions", responses=_MAYBE_STREAMED)
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, models: ModelTable = Depends(model_table)
):
    model = await models.get(body.model, ModelKind.CHAT)
    return await unless_disconnected(request, chat_completion(body, model.name, model.client))


@router.post("/v1/completions", responses=_MAYBE_STREAMED)
async def create_completion(
    body: CompletionRequest, request: Request, models: ModelTable = Depends(model_table)
):
    model = await models.get(body.model, ModelKind.CHAT)
    return await unless_disconnected(request, completion(body, model.name, model.client))


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, models: ModelTable = Depends(model_table)) -> TokenizeResponse:
    client = (await models.get(body.model, ModelKind.CHAT)).client
    ids = await off_loop(_token_ids, body, client)
    return body.response(ids, client.max_model_len)


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, models: ModelTable = Depends(model_table)) -> dict:
    client = (await models.get(body.model, ModelKind.CHAT)).client
    return {"prompt": await off_loop(client.decode, body.tokens)}


def _token_ids(body: TokenizeRequest, client: LLMClient) -> list[int]:
    if body.messages is not None:
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        client.check_prompt_chars(num_message_chars(body.messages), "messages")
        return client.render_chat(messages, add_generation_prompt=body.add_generation_prompt)
    return client.encode(body.prompt or "", add_special_tokens=body.add_special_tokens)
