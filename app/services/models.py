"""What `GET /v1/models` shows a tenant: the base model, one entry per prefix (personal: `user:<id>`); and what
`GET /v1/models/{model}` resolves a stack of prefixes to (`support-bot+user:ann`: each part's version)."""

from __future__ import annotations

import time

import sqlalchemy as sa
from sqlalchemy.orm import Session, aliased

from app.catalog.refs import find_version, find_versions
from app.db.models import Prefix, PrefixVersion
from app.protocol.models import ModelCard, ModelList, StackModelCard, StackPart
from app.services.stacks import StackLimits, model_not_found, named_stack, split_stack
from app.services.targets import parse_model_name
from prefix_store.ref import stack_label

BASE_OWNER = "system"
_STARTED = int(time.time())  # the base model's `created`: when this process started serving it


def base_card(base_model_id: str) -> ModelCard:
    return ModelCard(id=base_model_id, created=_STARTED, owned_by=BASE_OWNER, parent=None)


def list_models(session: Session, *, tenant_id: str, base_model_id: str) -> ModelList:
    """The base model, then the tenant's prefixes that have at least one version, by name."""
    other = aliased(PrefixVersion)
    newest = sa.select(sa.func.max(other.version)).where(other.prefix_id == Prefix.id)
    rows = session.execute(
        sa.select(Prefix.name, Prefix.created_at, PrefixVersion.kind)
        .join(PrefixVersion, PrefixVersion.prefix_id == Prefix.id)
        .where(Prefix.tenant_id == tenant_id, PrefixVersion.version == newest.scalar_subquery())
        .order_by(Prefix.name)
    ).all()
    cards = [base_card(base_model_id)]
    cards += [ModelCard(id=r.name, created=int(r.created_at.timestamp()), owned_by=tenant_id,
                        parent=base_model_id, kind=r.kind) for r in rows]
    return ModelList(data=cards)


def get_model(session: Session, *, tenant_id: str, model: str, base_model_id: str,
              limits: StackLimits | None = None) -> ModelCard:
    """One model by the id a request would use (`name`, `name@3`, `user:<id>`, or a stack `a+b@2`); 404 as for a
    missing one (a stack with any part missing included)."""
    if model == base_model_id:
        return base_card(base_model_id)
    if len(split_stack(model)) > 1:
        return stack_card(session, tenant_id=tenant_id, model=model, base_model_id=base_model_id,
                          limits=limits or StackLimits())
    name, version = parse_model_name(model)
    found = find_version(session, tenant_id=tenant_id, name=name, version=version)
    if found is None:
        raise model_not_found(model)
    created = found.created_at if version is not None else found.prefix_created_at
    assert created is not None  # find_version reads both times
    return ModelCard(id=model, created=int(created.timestamp()), owned_by=tenant_id, parent=base_model_id,
                     kind=found.kind)


def stack_card(session: Session, *, tenant_id: str, model: str, base_model_id: str,
               limits: StackLimits) -> StackModelCard:
    """A stack as a request would resolve it now: each part's name, version and virtual tokens, in order."""
    named = named_stack(model, None, base_model_id=base_model_id, limits=limits)
    found = find_versions(session, tenant_id=tenant_id, parts=[(p.name, p.version) for p in named.parts])
    if any(ref is None for ref in found):
        raise model_not_found(model)
    refs = [ref for ref in found if ref is not None]
    parts = [StackPart(name=r.name, version=r.version, num_virtual_tokens=r.num_virtual_tokens, kind=r.kind,
                       on_top_of=stack_label(r.on_top_of) or None) for r in refs]
    created = max(r.created_at for r in refs if r.created_at is not None)
    return StackModelCard(id=model, created=int(created.timestamp()), owned_by=tenant_id, parent=base_model_id,
                          prefixes=parts, num_virtual_tokens=sum(p.num_virtual_tokens for p in parts))
