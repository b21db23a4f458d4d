"""Shared fixtures and helpers of the admin / prefix management tests.

Test modules import the fixture as `from tests.api.fixtures_admin import api_fixture  # noqa: F401`; it is
registered under the name `api` (a different function name keeps ruff's F811 quiet).

The app runs its real lifespan on a temporary data directory: SQLite migrated by open_runtime, a local blob
directory, and the `random:tiny-llama` model (2 layers, 2 KV heads, head_dim 16), which gives a real spec.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa
import torch
from fastapi.testclient import TestClient
from httpx import Response

from app.config import Settings
from app.db.models import Prefix, PrefixVersion
from app.main import create_app
from app.runtime import Runtime
from prefix_store.codec import encode_native
from prefix_store.types import ModelSpec, PrefixKV

ADMIN_KEY = "test-admin"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@dataclass
class Api:
    """A running app plus the paths and handles tests inspect."""

    client: TestClient
    data_dir: Path

    @property
    def runtime(self) -> Runtime:
        runtime: Runtime = self.client.app.state.runtime  # type: ignore[attr-defined]
        return runtime

    @property
    def spec(self) -> ModelSpec:
        assert self.runtime.model is not None
        return self.runtime.model.spec

    def blob_files(self) -> list[str]:
        """Every file under the blob directory (temp files included: nothing half-written may remain)."""
        root = self.data_dir / "blobs"
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())

    def prefix_rows(self) -> tuple[int, int]:
        """(prefixes, prefix_versions) rows in the database, all tenants."""
        with self.runtime.sessions() as s:
            return (s.scalar(sa.select(sa.func.count()).select_from(Prefix)) or 0,
                    s.scalar(sa.select(sa.func.count()).select_from(PrefixVersion)) or 0)

    def tenant(self, name: str) -> tuple[str, str]:
        """Create a tenant; return (tenant id, its inference+manage key)."""
        r = self.client.post("/admin/tenants", json={"name": name}, headers=ADMIN)
        assert r.status_code == 201, r.text
        return r.json()["id"], r.json()["api_key"]

    def upload(self, key: str, name: str, data: bytes, filename: str = "prefix.safetensors") -> Response:
        return self.client.post("/v1/prefixes", headers=bearer(key), data={"name": name},
                                files={"file": (filename, data, "application/octet-stream")})


def make_api(data_dir: Path, **overrides: object) -> Iterator[Api]:
    settings = Settings(data_dir=data_dir, model="random:tiny-llama", admin_key=ADMIN_KEY,
                        **overrides)  # type: ignore[arg-type]
    with TestClient(create_app(settings)) as client:
        yield Api(client, data_dir)


@pytest.fixture(name="api")
def api_fixture(tmp_path: Path, api_database_url: str | None) -> Iterator[Api]:
    """A fresh app on an empty data directory (model loaded, stores empty); its database is SQLite, or a fresh
    PostgreSQL one in the modules marked `both_databases`."""
    yield from make_api(tmp_path, database_url=api_database_url)


def random_prefix(spec: ModelSpec, p: int = 4, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                  fingerprint: str | None = None) -> PrefixKV:
    """A random prefix for `spec`: keys/values [L, kv_heads, p, head_dim]."""
    g = torch.Generator().manual_seed(seed)
    shape = (spec.num_layers, spec.num_kv_heads, p, spec.head_dim)
    keys, values = torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)
    return PrefixKV(keys=keys, values=values, base_fingerprint=fingerprint or spec.fingerprint,
                    created_by="test")


def native_bytes(spec: ModelSpec, p: int = 4, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                 fingerprint: str | None = None) -> bytes:
    return encode_native(random_prefix(spec, p, seed=seed, dtype=dtype, fingerprint=fingerprint))


def zip_bytes(files: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as zf:
        for name, content in files.items():
            zf.writestr(name, content)
    return buf.getvalue()
