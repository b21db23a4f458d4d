"""One committed prefix version as the catalog (the database) records it: the one record that travels from the
catalog through the services to the engine and the resolver. Torch-free: the web layer imports it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from prefix_store.cache_tier import PrefixKey
from prefix_store.kinds import SOFT_PROMPT_KINDS, PrefixKind


@dataclass(frozen=True)
class BaseRef:
    """A prefix version another one was trained on top of (frozen, in front of it): which prefix (`prefix_id`,
    so a prefix deleted and made again under the same name is another one), its `name` and `version`."""

    prefix_id: str
    name: str
    version: int

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}"

    def to_json(self) -> dict[str, Any]:
        return {"prefix_id": self.prefix_id, "name": self.name, "version": self.version}


ON_TOP_OF_KEY = "on_top_of"
"""The key of a training job's options (a JSON column) holding the base stack its prefix was trained on top of:
a list of `BaseRef.to_json()`; the published version points at its job, so the catalog reads it from there."""


def bases_from_json(value: object) -> tuple[BaseRef, ...]:
    """The base stack a training job's options record (a list of `BaseRef.to_json()`), () when none or when the
    value is not one (an older row)."""
    if not isinstance(value, list):
        return ()
    out = []
    for item in value:
        if not isinstance(item, dict):
            return ()
        prefix_id, name, version = item.get("prefix_id"), item.get("name"), item.get("version")
        if not (isinstance(prefix_id, str) and isinstance(name, str) and isinstance(version, int)):
            return ()
        out.append(BaseRef(prefix_id, name, version))
    return tuple(out)


def stack_label(parts: tuple[BaseRef, ...] | tuple[PrefixRef, ...]) -> str:
    """`support-bot@3+user:ann@2`: a stack of versions as a request's `model` would pin it."""
    return "+".join(f"{p.name}@{p.version}" for p in parts)


@dataclass(frozen=True)
class PrefixRef:
    """A tenant's prefix `name` at `version`: its content (`sha256`, `num_virtual_tokens`), the base model it was
    made for (`base_model_fingerprint`; empty when the caller does not know it), when the version and its
    prefix were created (None when not read), the prefix versions it was trained on top of (`on_top_of`, in
    stack order; () for a prefix trained or uploaded on its own), and its `kind` (KV prefix or soft prompt).

    A stack of prefixes (docs/prefix-format.md, "Stacking") is a tuple of PrefixRefs, first part first."""

    tenant_id: str
    prefix_id: str
    name: str
    version: int
    sha256: str
    num_virtual_tokens: int
    base_model_fingerprint: str = ""
    created_at: datetime | None = None
    prefix_created_at: datetime | None = None
    on_top_of: tuple[BaseRef, ...] = ()
    kind: PrefixKind = "prefix_tuning"  # KV prefix, or a soft prompt (prefix_store/kinds.py)

    @property
    def soft_prompt(self) -> bool:
        """Whether this version is a soft prompt (learned input embeddings), which never stacks."""
        return self.kind in SOFT_PROMPT_KINDS

    @property
    def key(self) -> PrefixKey:
        return PrefixKey(self.tenant_id, self.prefix_id, self.version, self.sha256)

    @property
    def base(self) -> BaseRef:
        """This version as the base of another."""
        return BaseRef(self.prefix_id, self.name, self.version)
