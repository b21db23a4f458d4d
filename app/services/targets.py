"""What answers a request: resolve `model` (a prefix, a version, a stack or the base model) for the tenant, and
check that the prompt and the completion fit the context in front of it."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.orm import Session

from app.catalog.refs import InvalidRef, find_versions, split_ref
from app.engine.protocol import EngineClientProtocol, PrefixSelection
from app.errors import InvalidRequest
from app.observability.context import note_model
from app.services.access import Access
from app.services.db_calls import DbCalls
from app.services.stacks import StackLimits, check_stack, model_not_found, named_stack
from prefix_store.ref import PrefixRef


@dataclass(frozen=True)
class ModelTarget:
    """What answers a request: `model` as the client named it, and the base model (no prefix) or the concrete
    prefix versions it resolved to, first part first (app/services/stacks.py; one for a single prefix). The
    engine serves exactly those, even if a newer version lands meanwhile."""

    model: str
    stack: tuple[PrefixRef, ...] = ()

    @property
    def ref(self) -> PrefixRef | None:
        """The prefix of a single-prefix target; None for the base model and for a stack of several."""
        return self.stack[0] if len(self.stack) == 1 else None

    @property
    def prefix(self) -> PrefixSelection:
        """What the engine puts in front of the prompt: nothing, the one version, or the stack."""
        return None if not self.stack else self.stack[0] if len(self.stack) == 1 else self.stack

    @property
    def num_virtual_tokens(self) -> int:
        return sum(ref.num_virtual_tokens for ref in self.stack)


def parse_model_name(model: str) -> tuple[str, int | None]:
    """`name` → (name, None); `name@3` → (name, 3). A malformed or zero version names no model: the 404."""
    try:
        return split_ref(model)
    except InvalidRef:
        raise model_not_found(model) from None


def resolve_model(session: Session, *, tenant_id: str, model: str, base_model_id: str, fingerprint: str,
                  prefixes: list[str] | None = None, allow_base_mismatch: bool = False,
                  limits: StackLimits | None = None) -> ModelTarget:
    """The target `model` (or `prefixes`) names for this tenant, every part looked up in one statement: the 404
    when a part does not exist, the 409 when a version was made for another base model than the one served
    (`fingerprint`) or over another base prefix version; see app/services/stacks.py."""
    limits = limits or StackLimits()
    named = named_stack(model, prefixes, base_model_id=base_model_id, limits=limits)
    if not named.parts:
        return ModelTarget(model)
    found = find_versions(session, tenant_id=tenant_id, parts=[(p.name, p.version) for p in named.parts])
    return ModelTarget(model, check_stack(named, found, base_model_id=base_model_id, fingerprint=fingerprint,
                                          limits=limits, allow_base_mismatch=allow_base_mismatch))


async def request_target(access: Access, *, db_calls: DbCalls, model: str, base_model_id: str, fingerprint: str,
                         prefixes: list[str] | None = None, allow_base_mismatch: bool = False) -> ModelTarget:
    """What answers the request (`model`, or the stack in `prefixes`). The versions were normally read by the
    query that checked the API key (one round trip for all); they are looked up on their own (one statement)
    only when that query did not ask for them."""
    note_model(model if prefixes is None else "+".join(prefixes))
    tenant_id = access.principal.tenant_id
    assert tenant_id is not None  # generation routes refuse the admin key
    named = named_stack(model, prefixes, base_model_id=base_model_id, limits=access.stacking)
    if not named.parts:
        return ModelTarget(model)
    if access.looked_up == named.parts:
        found = access.found
    else:
        found = await db_calls.run(lambda session: find_versions(
            session, tenant_id=tenant_id, parts=[(p.name, p.version) for p in named.parts]))
    return ModelTarget(model, check_stack(named, found, base_model_id=base_model_id, fingerprint=fingerprint,
                                          limits=access.stacking, allow_base_mismatch=allow_base_mismatch))


def check_prompt(prompt_ids: list[int], engine: EngineClientProtocol, *, param: str) -> None:
    """Refuse an empty prompt or token ids outside the vocabulary (the engine would fail on them)."""
    if not prompt_ids:
        raise InvalidRequest("the prompt is empty", param=param)
    vocab = engine.vocab_size
    bad = next((t for t in prompt_ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise InvalidRequest(f"token id {bad} is outside the vocabulary [0, {vocab})", param=param)


def completion_budget(prompt_len: int, requested: int | None, target: ModelTarget, context_length: int,
                      *, param: str) -> int:
    """max_tokens to use: the requested one if prefix + prompt + it fit the context, else 400;
    None means "as many as fit"."""
    room = context_length - target.num_virtual_tokens - prompt_len
    if room < 1 or (requested is not None and requested > room):
        asked = f" + {requested} completion tokens" if requested is not None else ""
        prefix = f" + {target.num_virtual_tokens} prefix tokens" if target.num_virtual_tokens else ""
        raise InvalidRequest(
            f"This model's maximum context length is {context_length} tokens; the request has "
            f"{prompt_len} prompt tokens{prefix}{asked}.", param=param, code="context_length_exceeded")
    return requested if requested is not None else room
