"""What `GET /v1/models` shows a tenant: the base model, one entry per prefix (personal: `user:<id>`)."""

from __future__ import annotations

import time

import sqlalchemy as sa
from sqlalchemy.orm import Session

from app.catalog.refs import find_version
from app.db.models import Prefix, PrefixVersion
from app.protocol.models import ModelCard, ModelList
from app.services.inference import model_not_found, parse_model_name

BASE_OWNER = "system"
_STARTED = int(time.time())  # the base model's `created`: when this process started serving it


def base_card(base_model_id: str) -> ModelCard:
    return ModelCard(id=base_model_id, created=_STARTED, owned_by=BASE_OWNER, parent=None)


def list_models(session: Session, *, tenant_id: str, base_model_id: str) -> ModelList:
    """The base model, then the tenant's prefixes that have at least one version, by name."""
    has_version = sa.exists().where(PrefixVersion.prefix_id == Prefix.id)
    rows = session.execute(
        sa.select(Prefix.name, Prefix.created_at).where(Prefix.tenant_id == tenant_id, has_version)
        .order_by(Prefix.name)
    ).all()
    cards = [base_card(base_model_id)]
    cards += [ModelCard(id=r.name, created=int(r.created_at.timestamp()), owned_by=tenant_id,
                        parent=base_model_id) for r in rows]
    return ModelList(data=cards)


def get_model(session: Session, *, tenant_id: str, model: str, base_model_id: str) -> ModelCard:
    """One model by the id a request would use (`name`, `name@3`, `user:<id>`); 404 as for a missing one."""
    if model == base_model_id:
        return base_card(base_model_id)
    name, version = parse_model_name(model)
    found = find_version(session, tenant_id=tenant_id, name=name, version=version)
    if found is None:
        raise model_not_found(model)
    created = found.created_at if version is not None else found.prefix_created_at
    assert created is not None  # find_version reads both times
    return ModelCard(id=model, created=int(created.timestamp()), owned_by=tenant_id, parent=base_model_id)
