"""Liveness, readiness, version and metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from inferd.api.metrics import CONTENT_TYPE
from inferd.version_info import version_info

router = APIRouter(tags=["operations"])


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """Liveness: the process answers and no engine has crashed."""
    table = getattr(request.app.state, "models", None)
    failed = [m.name for m in table if m.client.has_failed] if table is not None else []
    if failed:
        return JSONResponse({"status": "unhealthy", "failed": failed}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    """Readiness: every loaded model's engine runs, and the server is not draining (a model unloaded
    to make room, or not loaded yet, does not make the server unready: a request for it loads it).
    It answers without a key (probes carry none), so with API keys configured it tells counts, not
    which models are served: names restricted to some keys are not for everyone."""
    table = getattr(request.app.state, "models", None)
    running = {m.name: m.client.is_running for m in table} if table is not None else {}
    if request.app.state.keys.is_enabled:
        models: dict = {"running": sum(running.values()), "total": len(running)}
    else:
        models = running
    if request.app.state.lifecycle.is_draining:
        return JSONResponse({"status": "draining", "models": models}, status_code=503)
    is_ready = table is not None and all(running.values())
    return JSONResponse(
        {"status": "ready" if is_ready else "loading", "models": models}, status_code=200 if is_ready else 503
    )


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Prometheus text exposition of this server's metrics."""
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)


@router.get("/version")
async def version() -> dict:
    """inferd's version and the native kernel build it runs on this CPU (null: none was built)."""
    return version_info()
