"""``/v1/models``: OpenAI's list shape plus what a client needs to use each model."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "inferd"
    kind: str
    max_input_tokens: int | None = None
    max_model_len: int | None = None
    dimensions: int | None = None
    rerank_method: str | None = None
    # A model on the LLM engine (chat, an LLM reranker): its precision as served (the server's own
    # int8 choices resolved at load): the dtype it computes in, "int8" or "none" for its weights,
    # the KV cache's dtype.
    dtype: str | None = None
    quantization: str | None = None
    kv_cache_dtype: str | None = None
    ready: bool = True
    # loaded, loading, unloading, or unloaded: servable, and loaded by its first request.
    state: str = "loaded"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
