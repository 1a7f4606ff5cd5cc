"""Liveness, readiness and version."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from inferd import __version__

router = APIRouter(tags=["operations"])


@router.get("/health")
async def health() -> dict:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    """Readiness: every configured model is loaded and its engine running."""
    table = getattr(request.app.state, "models", None)
    models = {m.name: m.client.is_running for m in table} if table is not None else {}
    is_ready = table is not None and all(models.values())
    return JSONResponse(
        {"status": "ready" if is_ready else "loading", "models": models}, status_code=200 if is_ready else 503
    )


@router.get("/version")
async def version() -> dict:
    return {"version": __version__}
