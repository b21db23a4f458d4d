"""Stacks of prefixes in one request: what `model` (or `prefixes`) names, and the checks on what it resolves to.

A request names its prefixes in `model`, parts joined with `+` (`support-bot+user:ann`, `support-bot@3+user:ann`),
or in the list field `prefixes` (`["support-bot@3", "user:ann"]`, with `model` the base model's id or the same
stack written with `+`). Each part is anything a single `model` names today. Their keys and values are
concatenated along the sequence, first part first (docs/prefix-format.md, "Stacking"), so a stack of one is
exactly a single prefix.

An end user's id may contain `+`, so in `model` a personal part (`user:<id>`) runs to the end of the string:
`user:ann+x` is still the personal prefix of `ann+x`, as before stacks existed. To put a personal prefix before
another part, use `prefixes`.

Checks, after the one access query read every part (app/services/access.py): a missing part (or another
tenant's) answers exactly as a missing model; a version made for another base model is the 409 it is alone; a
stack longer than the limits is a 400 naming the field; a soft prompt (PEFT prompt/p-tuning: learned input
embeddings) in a stack of two or more is a 400 `soft_prompt_not_stackable` (docs/prefix-format.md, "Soft
prompts"); a part trained on top of other prefix versions
(app/training) must have exactly those versions right before it, else a 409 `base_prefix_mismatch`, unless the
request sends `allow_base_mismatch: true`. No torch here: the web layer imports this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from app.catalog.refs import InvalidRef, split_ref
from app.db.models import PERSONAL_PREFIX_PREFIX
from app.errors import Conflict, InvalidRequest, NotFound
from prefix_store.ref import PrefixRef, stack_label

if TYPE_CHECKING:
    from app.config import Settings


@dataclass(frozen=True)
class ModelQuery:
    """The prefix version to look up: `name` at `version` (None: the newest)."""

    name: str
    version: int | None


StackQuery = tuple[ModelQuery, ...]
"""The parts of a stack to look up, first part first (one part for a single prefix)."""


@dataclass(frozen=True)
class StackLimits:
    """How many prefixes a stack may have, and how many virtual tokens all of them together."""

    max_prefixes: int = 4
    max_virtual_tokens: int = 512

    @classmethod
    def of(cls, settings: Settings) -> StackLimits:
        return cls(settings.max_stack_prefixes, settings.max_stack_virtual_tokens)


@dataclass(frozen=True)
class NamedStack:
    """What a request names: `label` (the stack as the client wrote it, for messages), `param` (the field that
    named it: `model` or `prefixes`) and the `parts` to look up (empty for the base model)."""

    label: str
    param: str
    parts: StackQuery


def model_not_found(model: str) -> NotFound:
    """The one answer for a missing model and another tenant's: same status, same body."""
    return NotFound(f"The model `{model}` does not exist or you do not have access to it.",
                    param="model", code="model_not_found")


def split_stack(model: str) -> list[str]:
    """`a+b@2+user:ann` -> ["a", "b@2", "user:ann"]; a personal part runs to the end (`user:ann+x` is one
    part). An empty part (`a++b`, `a+`) stays in the list and names no prefix."""
    parts: list[str] = []
    rest: str | None = model
    while rest is not None:
        if rest.startswith(PERSONAL_PREFIX_PREFIX):
            parts.append(rest)
            break
        head, sep, tail = rest.partition("+")
        parts.append(head)
        rest = tail if sep else None
    return parts


def named_stack(model: str, prefixes: Sequence[str] | None, *, base_model_id: str,
                limits: StackLimits) -> NamedStack:
    """The stack a request names (no parts: the base model). A malformed version names no model (the 404, as
    for a single prefix); too many parts, or `prefixes` that disagree with `model`, are 400s naming the field."""
    if prefixes is None:
        if model == base_model_id:
            return NamedStack(model, "model", ())
        raw, param, label = split_stack(model), "model", model
    else:
        raw, param, label = list(prefixes), "prefixes", "+".join(prefixes)
        if model != base_model_id and split_stack(model) != raw:
            raise InvalidRequest(
                f"`prefixes` {raw!r} and `model` {model!r} name different stacks: with `prefixes`, give `model` as "
                f"the base model's id ({base_model_id!r}) or as the same stack joined with `+` ({label!r})",
                param="prefixes")
    if len(raw) > limits.max_prefixes:
        raise InvalidRequest(f"`{param}` names a stack of {len(raw)} prefixes; at most {limits.max_prefixes} are "
                             "allowed", param=param, code="too_many_prefixes")
    parts = []
    for part in raw:
        try:
            name, version = split_ref(part)
        except InvalidRef:
            raise model_not_found(label) from None
        parts.append(ModelQuery(name, version))
    return NamedStack(label, param, tuple(parts))


def check_stack(named: NamedStack, found: Sequence[PrefixRef | None], *, base_model_id: str, fingerprint: str,
                limits: StackLimits, allow_base_mismatch: bool) -> tuple[PrefixRef, ...]:
    """The versions that serve the request, once each part passes the checks in the module docstring."""
    if len(found) != len(named.parts) or any(ref is None for ref in found):
        raise model_not_found(named.label)
    refs = tuple(ref for ref in found if ref is not None)
    for ref in refs:
        if ref.base_model_fingerprint != fingerprint:
            # Caught here, not at load time (a 503 that retrying never fixes): e.g. the operator changed the model.
            raise Conflict(f"prefix version {ref.name}@{ref.version} was made for the base model with fingerprint "
                           f"{ref.base_model_fingerprint!r}; this server runs {base_model_id!r} (fingerprint "
                           f"{fingerprint!r})", param=named.param, code="model_mismatch")
    soft = [f"{ref.name}@{ref.version}" for ref in refs if ref.soft_prompt]
    if len(refs) > 1 and soft:
        raise InvalidRequest(f"the stack `{named.label}` holds the soft prompt {', '.join(soft)} (learned input "
                             "embeddings); a soft prompt is served alone, never stacked with other prefixes",
                             param=named.param, code="soft_prompt_not_stackable")
    total = sum(ref.num_virtual_tokens for ref in refs)
    if len(refs) > 1 and total > limits.max_virtual_tokens:
        sizes = " + ".join(str(ref.num_virtual_tokens) for ref in refs)
        raise InvalidRequest(f"the stack `{named.label}` has {sizes} = {total} virtual tokens; a stack may have at "
                             f"most {limits.max_virtual_tokens}", param=named.param, code="stack_too_long")
    if not allow_base_mismatch:
        for i, ref in enumerate(refs):
            check_base(ref, refs[:i], param=named.param)
    return refs


def check_base(ref: PrefixRef, before: tuple[PrefixRef, ...], *, param: str) -> None:
    """A version trained on top of a base stack is served with exactly those versions right before it: anything
    else gives it a context it was not trained for (a 409 `base_prefix_mismatch`, naming both)."""
    if not ref.on_top_of:
        return
    got = before[max(0, len(before) - len(ref.on_top_of)):]
    if tuple(r.base for r in got) == ref.on_top_of:
        return
    want = stack_label(ref.on_top_of)
    actual = f"puts {stack_label(got)} in front of it" if got else "puts nothing in front of it"
    raise Conflict(f"prefix version {ref.name}@{ref.version} was trained on top of {want}, and this request "
                   f"{actual}: name {want}+{ref.name}@{ref.version}, or send `allow_base_mismatch: true` to serve "
                   "it anyway", param=param, code="base_prefix_mismatch")
