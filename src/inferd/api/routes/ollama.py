"""Ollama's REST API: ``/api/chat``, ``/api/generate``, ``/api/embed`` (and the legacy
``/api/embeddings``), ``/api/tags``, ``/api/ps``, ``/api/show``, ``/api/version``, ``/api/pull``,
``/api/delete``. Errors are ``{"error": message}`` (``api/errors.py``, the Ollama family)."""

from __future__ import annotations

import asyncio
import time

import numpy as np
from fastapi import APIRouter, Depends, Request, Response

from inferd import __version__
from inferd.api.cancellation import unless_disconnected
from inferd.api.context import require_admin, reserve_tokens
from inferd.api.deps import model_table
from inferd.api.model_table import ModelTable, ServedModel
from inferd.api.responses import FastJSONResponse
from inferd.api.routes.admin import keep_alive_seconds
from inferd.api.serving import ollama as serving
from inferd.api.serving.reasoning import think_tokens
from inferd.config import ModelKind
from inferd.encoder.params import EmbedParams
from inferd.errors import InvalidRequestError, ModelNotFoundError
from inferd.protocol.ollama import (
    ChatRequest,
    EmbeddingsRequest,
    EmbedRequest,
    GenerateRequest,
    ModelRequest,
    PullRequest,
)

router = APIRouter(tags=["ollama"], prefix="/api")

_MAYBE_STREAMED = {200: {"content": {serving.NDJSON: {}}}}
# Ollama shows a model kept loaded for ever with a far-future expiry.
_FOREVER = "2318-01-01T00:00:00Z"
_LOADED = "loaded"


def _keep_alive(value) -> dict:
    """``models.get``'s keep_alive argument: none when the request says nothing."""
    return {} if value is None else {"keep_alive": keep_alive_seconds(value)}


async def _get(
    models: ModelTable, name: str, kind: ModelKind, keep_alive, timing: serving.Timing
) -> ServedModel:
    model = await models.get(name, kind, **_keep_alive(keep_alive))
    timing.load = time.perf_counter_ns() - timing.start
    return model


async def _load_or_unload(models: ModelTable, name: str, keep_alive, shape: dict) -> Response:
    """Ollama's idiom: a request with nothing to generate loads the model, or with keep_alive 0
    unloads it."""
    entry = models.entry(name, ModelKind.CHAT)
    seconds = _keep_alive(keep_alive)
    if seconds.get("keep_alive", None) == 0:
        await models.pool.unload(entry, wait=False)  # as Ollama: unloads once its requests end
        reason = "unload"
    else:
        await models.pool.load(entry, **seconds)
        reason = "load"
    body = {"model": entry.name, "created_at": serving.rfc3339()} | shape
    return FastJSONResponse(body | {"done": True, "done_reason": reason})


@router.post("/chat", responses=_MAYBE_STREAMED)
async def chat(body: ChatRequest, request: Request, models: ModelTable = Depends(model_table)) -> Response:
    if not body.messages:
        return await _load_or_unload(models, body.model, body.keep_alive, serving.chat_shape("", "", None))
    timing = serving.Timing()
    converted = serving.chat_request(body)
    model = await _get(models, body.model, ModelKind.CHAT, body.keep_alive, timing)
    work = serving.generate(body, converted, model.name, model.client, timing, serving.chat_shape)
    return await unless_disconnected(request, work)


@router.post("/generate", responses=_MAYBE_STREAMED)
async def generate(
    body: GenerateRequest, request: Request, models: ModelTable = Depends(model_table)
) -> Response:
    if not body.prompt and not body.images:
        return await _load_or_unload(models, body.model, body.keep_alive, {"response": ""})
    timing = serving.Timing()
    converted = serving.generate_request(body)
    model = await _get(models, body.model, ModelKind.CHAT, body.keep_alive, timing)
    raw = body.prompt if body.raw else None
    work = serving.generate(body, converted, model.name, model.client, timing, serving.generate_shape, raw)
    return await unless_disconnected(request, work)


@router.post("/embed")
async def embed(body: EmbedRequest, request: Request, models: ModelTable = Depends(model_table)) -> Response:
    timing = serving.Timing()
    model = await _get(models, body.model, ModelKind.EMBEDDING, body.keep_alive, timing)
    # Ollama's vectors are L2-normalised whatever the model's own configuration says.
    params = EmbedParams(normalize=True, truncate=body.truncate, dimensions=body.dimensions)
    output = await unless_disconnected(
        request, model.client.embed(body.inputs(), params, admit=reserve_tokens)
    )
    return FastJSONResponse(
        {
            "model": model.name,
            "embeddings": list(np.asarray(output.embeddings, dtype=np.float32)),
            "total_duration": time.perf_counter_ns() - timing.start,
            "load_duration": timing.load,
            "prompt_eval_count": output.num_prompt_tokens,
        }
    )


@router.post("/embeddings")
async def embeddings(
    body: EmbeddingsRequest, request: Request, models: ModelTable = Depends(model_table)
) -> Response:
    """The legacy route: one prompt, the model's own (unnormalised unless it normalises) vector."""
    model = await models.get(body.model, ModelKind.EMBEDDING, **_keep_alive(body.keep_alive))
    if not body.prompt:
        return FastJSONResponse({"embedding": []})
    output = await unless_disconnected(
        request, model.client.embed([body.prompt], EmbedParams(), admit=reserve_tokens)
    )
    return FastJSONResponse({"embedding": np.asarray(output.embeddings[0], dtype=np.float32)})


def _model_row(entry, facts: tuple[dict, int, dict]) -> dict:
    details, size, _ = facts
    return {
        "name": entry.name,
        "model": entry.name,
        "modified_at": serving.rfc3339(entry.created),
        "size": size,
        "digest": serving.digest_of(entry.engine.path),
        "details": details,
    }


@router.get("/tags")
async def tags(models: ModelTable = Depends(model_table)) -> dict:
    entries = list(models.entries())
    facts = await asyncio.gather(*(serving.model_details(e.engine.path) for e in entries))
    return {"models": [_model_row(e, f) for e, f in zip(entries, facts)]}


@router.get("/ps")
async def ps(models: ModelTable = Depends(model_table)) -> dict:
    entries = [e for e in models.entries() if e.engine.state == _LOADED]
    facts = await asyncio.gather(*(serving.model_details(e.engine.path) for e in entries))
    rows = []
    for entry, fact in zip(entries, facts):
        status = entry.status()
        expires = status["expires_at"]
        client = entry.engine.client
        rows.append(
            _model_row(entry, fact)
            | {
                "size": status["resident_bytes"],
                "size_vram": status["resident_bytes"]
                if str(entry.engine.spec.device or "").startswith("cuda")
                else 0,
                "expires_at": serving.rfc3339(expires) if expires else _FOREVER,
                "context_length": getattr(client, "max_model_len", None)
                or getattr(getattr(client, "info", None), "max_input_tokens", None),
            }
        )
    return {"models": rows}


@router.post("/show")
async def show(body: ModelRequest, models: ModelTable = Depends(model_table)) -> dict:
    entry = models.entry(body.model_name())
    details, _, info = await serving.model_details(entry.engine.path)
    capabilities = ["embedding"] if entry.kind is ModelKind.EMBEDDING else ["completion"]
    template = ""
    client = entry.engine.client if entry.engine.state == _LOADED else None
    if entry.kind is ModelKind.CHAT and client is not None:
        template = client.tokenizer.chat_template or ""
        capabilities += ["tools"] * ("tools" in template)
        if think_tokens(client.tokenizer) is not None:
            capabilities.append("thinking")
    return {
        "modelfile": f"FROM {entry.engine.path}\n",
        "parameters": "",
        "template": template,
        "details": details,
        "model_info": info,
        "capabilities": capabilities,
        "modified_at": serving.rfc3339(entry.created),
    }


@router.get("/version")
async def version() -> dict:
    return {"version": __version__}


@router.post("/pull", responses=_MAYBE_STREAMED)
async def pull(body: PullRequest, request: Request, models: ModelTable = Depends(model_table)) -> Response:
    require_admin("pull models")
    cache_dir = request.app.state.settings.cache_dir
    name = body.model_name()

    async def events_then_serve():
        async for event in serving.pull_events(name, cache_dir):
            if event.get("status") == "success":
                models.pool.add_registered(name)  # servable by name from now on
            yield event

    events = events_then_serve()
    if body.stream:
        return serving.ndjson_response(events)
    statuses = [event["status"] async for event in events]
    return FastJSONResponse({"status": statuses[-1] if statuses else "success"})


@router.delete("/delete")
async def delete(body: ModelRequest, request: Request, models: ModelTable = Depends(model_table)) -> Response:
    """``inferd rm``; a model this server has loaded is refused."""
    require_admin("delete models")
    from inferd.hub.registry import ModelRegistry
    from inferd.hub.remove import remove_model_files

    name = body.model_name()
    entry = models.pool.entries.get(name)
    if entry is not None and entry.engine.state != "unloaded":
        raise InvalidRequestError(
            f"the model {name!r} is loaded; unload it before deleting it", param="model"
        )
    if entry is not None and entry.source != name:
        raise InvalidRequestError(
            f"the model {name!r} is served from {entry.source}, not the registry", param="model"
        )
    cache_dir = request.app.state.settings.cache_dir
    registry = ModelRegistry(cache_dir)
    registered = registry.get(name)
    if registered is None:
        raise ModelNotFoundError(f"the model {name!r} is not a pulled or registered model", param="model")
    if registered.owned:
        await asyncio.to_thread(remove_model_files, registered, registry.entries(), cache_dir)
    registry.remove(registered.name)
    models.pool.remove(registered.name)
    return Response(status_code=200)
