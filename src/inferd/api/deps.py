"""Request-scoped access to what the lifespan built."""

from __future__ import annotations

from fastapi import Request

from inferd.api.context import current_context
from inferd.api.model_table import ModelTable
from inferd.errors import EngineUnavailableError


async def model_table(request: Request) -> ModelTable:
    """The served models this request's API key may use. Async so that FastAPI calls it in place
    rather than through its thread pool (a thread hop per request)."""
    table = getattr(request.app.state, "models", None)
    if table is None:
        raise EngineUnavailableError("models are still loading")
    context = current_context()
    principal = context.principal if context is not None else None
    return table.visible_to(principal.models if principal is not None else None)
