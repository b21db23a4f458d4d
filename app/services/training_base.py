"""Training a prefix on top of other prefixes (`on_top_of`): the frozen base a fine-tuning or personalization
job trains behind, resolved and pinned when the job is created.

`on_top_of` names a prefix as `model` does (`support-bot` = its newest version, `support-bot@3`, `user:<id>`) or
a stack of them (`support-bot@3+team`). Each part is pinned to the version it resolves to now and recorded in the
job's options (app/jobs/job_config.py); the trainer puts those versions, frozen, in front of the new prefix at the
positions the stack `base+new` is served at, and the published version carries the record, so serving it behind
other versions is a 409 (app/services/stacks.py). Every refusal here is a 400 naming the field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

from app.catalog.refs import find_versions
from app.errors import Conflict, InvalidRequest, NotFound
from app.jobs.types import TrainConfig
from app.services.stacks import check_base, named_stack
from prefix_store.ref import ON_TOP_OF_KEY, PrefixRef, stack_label

if TYPE_CHECKING:
    from app.services.training_setup import TrainingContext

PARAM = "on_top_of"


@dataclass(frozen=True)
class TrainingBase:
    """The pinned versions a job trains behind, first part first."""

    refs: tuple[PrefixRef, ...]

    @property
    def num_virtual_tokens(self) -> int:
        return sum(ref.num_virtual_tokens for ref in self.refs)

    @property
    def label(self) -> str:
        return stack_label(self.refs)

    def options(self) -> dict[str, Any]:
        """The job options entry the worker and the catalog read back."""
        return {ON_TOP_OF_KEY: [ref.base.to_json() for ref in self.refs]}


def resolve_base(session: Session, ctx: TrainingContext, *, tenant_id: str, ref: str) -> TrainingBase:
    """The tenant's versions `ref` names, pinned (a name without a version: its newest now)."""
    limits = ctx.stacking
    if ref == ctx.base_model_id:
        raise InvalidRequest(f"{PARAM}: {ref!r} is the base model; name one of your prefixes", param=PARAM,
                             code="prefix_not_found")
    try:
        # one part fewer than a served stack: the prefix being trained is the last part
        named = named_stack(ref, None, base_model_id=ctx.base_model_id,
                            limits=dataclasses.replace(limits, max_prefixes=limits.max_prefixes - 1))
    except (InvalidRequest, NotFound) as exc:
        raise InvalidRequest(f"{PARAM}: {exc.message}", param=PARAM, code=exc.code) from None
    found = find_versions(session, tenant_id=tenant_id, parts=[(p.name, p.version) for p in named.parts])
    if any(f is None for f in found):
        raise InvalidRequest(f"{PARAM}: no prefix {ref[:200]!r}", param=PARAM, code="prefix_not_found")
    refs = tuple(f for f in found if f is not None)
    for i, part in enumerate(refs):
        if part.soft_prompt:
            raise InvalidRequest(f"{PARAM}: prefix {part.name}@{part.version} is a soft prompt (learned input "
                                 "embeddings), which never stacks; train on top of KV prefixes only", param=PARAM,
                                 code="soft_prompt_not_stackable")
        if part.base_model_fingerprint != ctx.fingerprint:
            raise InvalidRequest(f"{PARAM}: prefix {part.name}@{part.version} was made for another base model",
                                 param=PARAM, code="model_mismatch")
        try:
            check_base(part, refs[:i], param=PARAM)  # the base is itself a stack that serves without a 409
        except Conflict as exc:
            raise InvalidRequest(f"{PARAM}: {exc.message}", param=PARAM, code=exc.code) from None
    return TrainingBase(refs)


def behind_base(ctx: TrainingContext, base: TrainingBase | None) -> TrainingContext:
    """The context the trained prefix and its examples have left once the base's virtual tokens are in front."""
    if base is None:
        return ctx
    return dataclasses.replace(ctx, context_length=ctx.context_length - base.num_virtual_tokens)


def check_stack_room(ctx: TrainingContext, base: TrainingBase | None, config: TrainConfig) -> None:
    """The base and the new prefix together must be servable as one stack."""
    if base is None:
        return
    total = base.num_virtual_tokens + config.num_virtual_tokens
    if total > ctx.stacking.max_virtual_tokens:
        raise InvalidRequest(f"num_virtual_tokens {config.num_virtual_tokens} on top of {base.label} "
                             f"({base.num_virtual_tokens}) makes a stack of {total} virtual tokens; this server "
                             f"serves stacks of at most {ctx.stacking.max_virtual_tokens}", param="num_virtual_tokens")
