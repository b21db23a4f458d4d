"""One committed prefix version as the catalog (the database) records it: the one record that travels from the
catalog through the services to the engine and the resolver. Torch-free: the web layer imports it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from prefix_store.cache_tier import PrefixKey


@dataclass(frozen=True)
class PrefixRef:
    """A tenant's prefix `name` at `version`: its content (`sha256`, `num_virtual_tokens`), the base model it was
    made for (`base_model_fingerprint`; empty when the caller does not know it) and when the version and its
    prefix were created (None when not read)."""

    tenant_id: str
    prefix_id: str
    name: str
    version: int
    sha256: str
    num_virtual_tokens: int
    base_model_fingerprint: str = ""
    created_at: datetime | None = None
    prefix_created_at: datetime | None = None

    @property
    def key(self) -> PrefixKey:
        return PrefixKey(self.tenant_id, self.prefix_id, self.version, self.sha256)
