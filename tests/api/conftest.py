"""API test fixtures: a real migrated SQLite database, the app with a fake engine client, tenants and keys.

Generic on purpose (shared by every tests/api module): `app_env` builds the app around a `FakeEngineClient`
(swap or tune `app_env.engine` per test), `client` is an httpx client bound to it with the lifespan run, and
`make_tenant` / `tenant` create tenants with API keys directly in the database.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.db.migrate import upgrade
from app.db.models import ApiKey, Prefix, PrefixVersion, Tenant
from app.db.session import make_engine, make_session_factory
from app.main import create_app
from app.runtime import Runtime, open_runtime
from app.services.auth import generate_key, hash_key
from tests.api.fake_engine import FAKE_FINGERPRINT, FakeEngineClient, with_fake_model

ADMIN_KEY = "psk-admin-test-key"


@dataclass
class TenantKey:
    tenant_id: str
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


@dataclass
class AppEnv:
    app: FastAPI
    settings: Settings
    sessions: sessionmaker[Session]
    engine: FakeEngineClient


@pytest.fixture
def settings(tmp_path: Path, api_database_url: str | None) -> Settings:
    return Settings(data_dir=tmp_path / "data", admin_key=ADMIN_KEY, database_url=api_database_url)


@pytest.fixture
def fake_engine() -> FakeEngineClient:
    return FakeEngineClient()


@pytest.fixture
def app_env(settings: Settings, fake_engine: FakeEngineClient) -> Iterator[AppEnv]:
    """The app (lifespan not yet run) on a migrated database (SQLite, or PostgreSQL for the modules marked
    `both_databases`), its runtime serving `fake_engine`."""
    url = settings.resolved_database_url
    upgrade(url)
    db = make_engine(url)

    def factory(s: Settings) -> Runtime:
        return replace(open_runtime(s, load_model=False), engine_client=fake_engine)

    app = with_fake_model(create_app(settings, runtime_factory=factory))
    yield AppEnv(app, settings, make_session_factory(db), fake_engine)
    db.dispose()


@pytest.fixture
async def client(app_env: AppEnv) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client on the app, with its lifespan running."""
    async with app_env.app.router.lifespan_context(app_env.app):
        transport = httpx.ASGITransport(app=app_env.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            yield c


@pytest.fixture
def make_tenant(app_env: AppEnv) -> Callable[..., TenantKey]:
    """Create a tenant with one API key (scopes "inference,manage" unless given)."""

    def make(name: str = "acme", scopes: str = "inference,manage") -> TenantKey:
        key = generate_key()
        with app_env.sessions() as s:
            tenant = Tenant(name=name)
            s.add(tenant)
            s.flush()
            s.add(ApiKey(tenant_id=tenant.id, key_hash=hash_key(key), key_prefix=key[:8], scopes=scopes))
            s.commit()
            return TenantKey(tenant.id, key)

    return make


@pytest.fixture
def tenant(make_tenant: Callable[..., TenantKey]) -> TenantKey:
    return make_tenant("acme")


@pytest.fixture
def insert_prefix(app_env: AppEnv) -> Callable[..., str]:
    """Insert a prefix row with `versions` version rows (metadata only, no blob); returns the prefix id.
    For a personal prefix pass `end_user_id` and the name `user:<external id>`; `fingerprint`: the base model
    the versions were made for (the fake engine's by default)."""

    def insert(tenant_id: str, name: str, versions: int = 1, *, num_virtual_tokens: int = 4,
               end_user_id: str | None = None, fingerprint: str = FAKE_FINGERPRINT) -> str:
        with app_env.sessions() as s:
            prefix = Prefix(tenant_id=tenant_id, name=name, end_user_id=end_user_id)
            s.add(prefix)
            s.flush()
            for v in range(1, versions + 1):
                s.add(PrefixVersion(prefix_id=prefix.id, version=v, sha256=f"{v:064x}", size_bytes=1,
                                    num_virtual_tokens=num_virtual_tokens, source_format="native",
                                    base_model_fingerprint=fingerprint))
            s.commit()
            return prefix.id

    return insert
