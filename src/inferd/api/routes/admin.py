"""``/admin/models``: list the servable models with their memory, expiry and pin; load, unload, pin.

Behind the API key like every route but the probes; a key limited to some models sees only those, and
only admin keys (by default those not limited to some models) may load, unload or pin.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends

from inferd.api.context import require_admin
from inferd.api.deps import model_table
from inferd.api.model_table import UNCHANGED, ModelTable
from inferd.config.durations import parse_keep_alive
from inferd.errors import InvalidRequestError
from inferd.protocol.admin import AdminModel, AdminModelList, LoadRequest, PinRequest, UnloadRequest

router = APIRouter(tags=["admin"], prefix="/admin/models")


@router.get("", response_model=AdminModelList)
async def list_models(models: ModelTable = Depends(model_table)) -> AdminModelList:
    return AdminModelList(data=[AdminModel(**e.status()) for e in models.entries()])


@router.post("/load", response_model=AdminModel)
async def load(body: LoadRequest, models: ModelTable = Depends(model_table)) -> AdminModel:
    require_admin("load models")
    entry = models.entry(body.model)
    keep_alive = UNCHANGED if body.keep_alive is None else keep_alive_seconds(body.keep_alive)
    await models.pool.load(entry, pin=body.pin, keep_alive=keep_alive)
    return AdminModel(**entry.status())


@router.post("/unload", response_model=AdminModel)
async def unload(body: UnloadRequest, models: ModelTable = Depends(model_table)) -> AdminModel:
    require_admin("unload models")
    entry = models.entry(body.model)
    await models.pool.unload(entry, force=body.force)
    return AdminModel(**entry.status())


@router.post("/pin", response_model=AdminModel)
async def pin(body: PinRequest, models: ModelTable = Depends(model_table)) -> AdminModel:
    require_admin("pin models")
    entry = models.entry(body.model)
    models.pool.pin(entry, body.pinned)
    return AdminModel(**entry.status())


def keep_alive_seconds(value: str | float) -> float | None:
    """A client's keep_alive as seconds (None: forever); unreadable is the client's 400. It sets how
    long a shared model stays loaded: admin keys only."""
    require_admin("set keep_alive")
    try:
        return parse_keep_alive(value)
    except ValueError as exc:
        raise InvalidRequestError(str(exc), param="keep_alive") from None
