"""``GET /v1/models`` and ``GET /v1/models/{id}``."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from inferd.api.deps import model_table
from inferd.api.model_table import ModelTable
from inferd.errors import ModelNotFoundError
from inferd.protocol.models import ModelCard, ModelList

router = APIRouter(tags=["openai"])


@router.get("/v1/models", response_model=ModelList)
async def list_models(models: ModelTable = Depends(model_table)) -> ModelList:
    return ModelList(data=models.cards())


@router.get("/v1/models/{model_id:path}", response_model=ModelCard)
async def get_model(model_id: str, models: ModelTable = Depends(model_table)) -> ModelCard:
    try:
        return models.entry(model_id).card()
    except ModelNotFoundError:
        raise ModelNotFoundError(f"the model {model_id!r} does not exist", param="model") from None
