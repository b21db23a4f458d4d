"""`GET /v1/models` and `GET /v1/models/{model}` (OpenAI list shape; tenant-scoped)."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import EngineClientDep, InferenceDep, RuntimeDep, SessionDep
from app.protocol.models import ModelCard, ModelList, StackModelCard
from app.services import models as service
from app.services.stacks import StackLimits

router = APIRouter(tags=["models"])


@router.get("/v1/models")
def list_models(principal: InferenceDep, session: SessionDep, engine: EngineClientDep) -> ModelList:
    """The base model and every prefix of the caller's tenant, each with `parent` = the base model."""
    assert principal.tenant_id is not None
    return service.list_models(session, tenant_id=principal.tenant_id, base_model_id=engine.model_id)


@router.get("/v1/models/{model:path}")
def retrieve_model(
    model: str, principal: InferenceDep, session: SessionDep, engine: EngineClientDep, runtime: RuntimeDep
) -> StackModelCard | ModelCard:
    """One model; another tenant's prefix is answered exactly as a missing one. A stack of prefixes
    (`support-bot+user:ann`) shows each part's version and virtual tokens as a request would resolve it now."""
    assert principal.tenant_id is not None
    return service.get_model(session, tenant_id=principal.tenant_id, model=model,
                             base_model_id=engine.model_id, limits=StackLimits.of(runtime.settings))
