"""Request-scoped access to what the lifespan built."""

from __future__ import annotations

from fastapi import Request

from inferd.api.model_table import ModelTable
from inferd.errors import EngineUnavailableError


def model_table(request: Request) -> ModelTable:
    table = getattr(request.app.state, "models", None)
    if table is None:
        raise EngineUnavailableError("models are still loading")
    return table
