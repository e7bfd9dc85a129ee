"""GET /v1/models and /v1/models/{id}."""

from __future__ import annotations

from fastapi import APIRouter

from deepseek_serve.api.deps import EngineDep, PrincipalDep
from deepseek_serve.engine.async_engine import AsyncEngine
from deepseek_serve.serving.failures import NotFoundError
from deepseek_serve.serving.schemas import ModelCard, ModelList

router = APIRouter(prefix="/v1", tags=["models"])


def _card(engine: AsyncEngine) -> ModelCard:
    info = engine.model_info
    return ModelCard(id=info.id, created=info.created, max_model_len=info.max_model_len)


@router.get("/models")
async def list_models(engine: EngineDep, principal: PrincipalDep) -> ModelList:
    """The served model (one per server)."""
    return ModelList(data=[_card(engine)])


@router.get("/models/{model_id:path}")
async def get_model(model_id: str, engine: EngineDep, principal: PrincipalDep) -> ModelCard:
    """One model by id; 404 `model_not_found` for any other id."""
    if model_id != engine.model_info.id:
        raise NotFoundError(f"The model '{model_id}' does not exist", param="model", code="model_not_found")
    return _card(engine)
