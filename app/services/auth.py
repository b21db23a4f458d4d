"""API keys: generation, hashing, authentication. Keys are stored only as sha256 hashes."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import timedelta

import sqlalchemy as sa
from sqlalchemy.orm import Session

from app.db.models import ApiKey, utcnow

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


def authenticate(session: Session, *, raw_key: str, admin_key: str | None) -> Principal | None:
    """The principal for a bearer key, or None. The admin key is compared in constant time; tenant keys are
    looked up by their hash (the hash of a guess reveals nothing about stored keys)."""
    if admin_key and hmac.compare_digest(raw_key.encode(), admin_key.encode()):
        return Principal(tenant_id=None, scopes=frozenset({"admin"}))
    row = session.execute(
        sa.select(ApiKey).where(ApiKey.key_hash == hash_key(raw_key), ApiKey.revoked_at.is_(None))
    ).scalar_one_or_none()
    if row is None:
        return None
    now = utcnow()
    # Touch last_used_at at most once a minute: no write per request.
    if row.last_used_at is None or now - row.last_used_at > timedelta(minutes=1):
        row.last_used_at = now
        session.commit()
    return Principal(tenant_id=row.tenant_id, scopes=frozenset(row.scopes.split(",")), key_id=row.id)
