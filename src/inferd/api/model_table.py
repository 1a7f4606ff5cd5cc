"""The served models: names → (kind, engine client), built once at start-up."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

from inferd.api.context import current_context
from inferd.config import ModelKind, ModelSpec, ServerSettings
from inferd.encoder.client import EncoderClient
from inferd.errors import ModelLoadError, ModelNotFoundError, PermissionDeniedError, UnsupportedTaskError
from inferd.hub.resolve import detect_kind, resolve_model
from inferd.llm.client import LLMClient
from inferd.memory.plan import describe
from inferd.memory.server import check_plans, plan_server
from inferd.protocol.models import ModelCard

log = logging.getLogger("inferd.models")

_ROUTE_NAMES = {ModelKind.EMBEDDING: "embeddings", ModelKind.RERANK: "rerank", ModelKind.CHAT: "chat"}


@dataclass(frozen=True, slots=True)
class ServedModel:
    name: str
    kind: ModelKind
    source: str
    path: Path
    client: EncoderClient | LLMClient
    created: int

    def card(self) -> ModelCard:
        if self.kind is ModelKind.CHAT:
            return ModelCard(
                id=self.name,
                created=self.created,
                kind=self.kind.value,
                max_model_len=self.client.max_model_len,
                ready=self.client.is_running,
            )
        info = self.client.info
        return ModelCard(
            id=self.name,
            created=self.created,
            kind=self.kind.value,
            max_input_tokens=info.max_input_tokens,
            dimensions=info.dimensions if self.kind is ModelKind.EMBEDDING else None,
            rerank_method=info.scoring if self.kind is ModelKind.RERANK else None,
            ready=self.client.is_running,
        )


class ModelTable:
    """Lookup by name and kind; a missing name picks the first model of that kind.

    ``visible_to`` gives the view one API key may use: other models look as if they did not exist.
    """

    def __init__(self, models: list[ServedModel], allowed: frozenset[str] | None = None) -> None:
        self._models = {m.name: m for m in models}
        self._allowed = allowed

    def visible_to(self, allowed: frozenset[str] | None) -> ModelTable:
        return self if allowed is None else ModelTable(list(self._models.values()), allowed)

    def _is_visible(self, name: str) -> bool:
        return self._allowed is None or name in self._allowed

    def __iter__(self):
        return (m for m in self._models.values() if self._is_visible(m.name))

    def get(self, name: str | None, kind: ModelKind) -> ServedModel:
        model = self._find(name, kind)
        context = current_context()
        if context is not None:
            context.model = model.name
        return model

    def _find(self, name: str | None, kind: ModelKind) -> ServedModel:
        if name is None:
            for model in self:
                if model.kind is kind:
                    return model
            if any(m.kind is kind for m in self._models.values()):
                raise PermissionDeniedError(f"this API key may not use the {_ROUTE_NAMES[kind]} models")
            raise ModelNotFoundError(f"no {_ROUTE_NAMES[kind]} model is served", param="model")
        model = self._models.get(name)
        if model is None or not self._is_visible(name):
            served = ", ".join(m.name for m in self) or "none"
            access = "" if self._allowed is None else " or you do not have access to it"
            raise ModelNotFoundError(
                f"the model {name!r} does not exist{access}; served models: {served}", param="model"
            )
        if model.kind is not kind:
            raise UnsupportedTaskError(
                f"the model {name!r} is a {model.kind.value} model and cannot serve "
                f"{_ROUTE_NAMES[kind]} requests",
                param="model",
            )
        return model

    def close(self) -> None:
        for client in {id(m.client): m.client for m in self._models.values()}.values():
            client.close()


def load_model_table(settings: ServerSettings, loop: asyncio.AbstractEventLoop) -> ModelTable:
    """Resolve and load every configured model; the same weights served twice are loaded once.

    The memory plan comes first: nothing loads when the models do not fit, and the LLM's KV cache
    gets the planned share (checked again against what is free after its weights load)."""
    plans = plan_server(settings)
    for line in describe(plans):
        log.info("%s", line)
    check_plans(plans)
    planned_kv = {plan.device: plan.kv_cache_bytes for plan in plans}
    clients: dict[tuple, EncoderClient | LLMClient] = {}
    served = []
    for spec in settings.model:
        served.append(_load_one(spec, settings, clients, loop, planned_kv))
        log.info("serving %s (%s) from %s", spec.served_name, served[-1].kind.value, served[-1].path)
    return ModelTable(served)


def _load_one(
    spec: ModelSpec, settings: ServerSettings, clients: dict, loop, planned_kv: dict[str, int]
) -> ServedModel:
    resolved = resolve_model(spec.source, spec.kind, cache_dir=settings.cache_dir)
    files_kind = detect_kind(resolved.path)
    if (resolved.kind is ModelKind.CHAT) != (files_kind is ModelKind.CHAT):
        raise ModelLoadError(
            f"{spec.source} holds a {files_kind.value} model; it cannot be served as {resolved.kind.value}"
        )
    if files_kind is ModelKind.CHAT:
        llm_config = settings.llm_config(spec)
        llm_config = replace(llm_config, kv_cache_memory=planned_kv.get(llm_config.device))
        key = (resolved.path, files_kind, llm_config)
        if key not in clients:
            clients[key] = LLMClient.start(resolved.path, llm_config, loop)
        return ServedModel(
            spec.served_name, ModelKind.CHAT, spec.source, resolved.path, clients[key], int(time.time())
        )
    config = settings.encoder_config(spec)
    key = (resolved.path, files_kind, config)
    if key not in clients:
        clients[key] = EncoderClient.start(resolved.path, files_kind, config)
    client = clients[key]
    if resolved.kind is ModelKind.EMBEDDING and not client.can_embed:
        raise ModelLoadError(f"{spec.source} is a cross-encoder; it can rerank but not embed")
    return ServedModel(spec.served_name, resolved.kind, spec.source, resolved.path, client, int(time.time()))
