"""API keys: generation and hashing (keys are stored only as sha256 hashes), and who a key names.

Authentication itself is app/services/access.py (one query with the limits and the named model)."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

SCOPES = frozenset({"inference", "manage"})
KEY_PREFIX = "psk-"


@dataclass(frozen=True)
class Principal:
    """Who is calling: the platform admin (tenant_id None) or a tenant key with scopes."""

    tenant_id: str | None
    scopes: frozenset[str]
    key_id: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.tenant_id is None


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()
