"""Two replicas of the app sharing one PostgreSQL database, one Redis and one object store.

A prefix uploaded, re-versioned or deleted through replica A is seen by replica B at once: B serves the new
prefix, switches to a new version on the next request, and answers 404 after a delete (no stale device-pool
or Redis copy is ever served).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.db.migrate import upgrade
from app.engine.model import load_model
from app.main import create_app
from prefix_store.codec import encode_native
from tests.engine.helpers import random_prefix

MODEL = "random:tiny-llama"
ADMIN = {"Authorization": "Bearer adm"}
PROMPT = "The quick brown fox"
NAME = "poet"


def _settings(data_dir: Path, postgres_url: str, redis_url: str, blobs: Path) -> Settings:
    return Settings(data_dir=data_dir, model=MODEL, database_url=postgres_url, redis_url=redis_url,
                    object_store_url=f"file://{blobs}", admin_key="adm")


@pytest.fixture
def replicas(tmp_path: Path, postgres_url: str, redis_url: str) -> Iterator[tuple[TestClient, TestClient]]:
    upgrade(postgres_url)
    blobs = tmp_path / "blobs"
    a = create_app(_settings(tmp_path / "a", postgres_url, redis_url, blobs))
    b = create_app(_settings(tmp_path / "b", postgres_url, redis_url, blobs))
    with TestClient(a) as ca, TestClient(b) as cb:
        yield ca, cb


def _prefix_bytes(tmp_path: Path, seed: int) -> bytes:
    loaded = load_model(MODEL, data_dir=tmp_path / "builder")
    kv = random_prefix(loaded, 6, seed=seed, scale=2.0)
    assert kv.base_fingerprint == loaded.spec.fingerprint
    return encode_native(kv)


def _upload(client: TestClient, key: str, data: bytes) -> dict:
    r = client.post("/v1/prefixes", headers={"Authorization": f"Bearer {key}"}, data={"name": NAME},
                    files={"file": ("prefix.safetensors", data, "application/octet-stream")})
    assert r.status_code == 201, r.text
    return r.json()


def _complete(client: TestClient, key: str, model: str) -> tuple[int, str]:
    r = client.post("/v1/completions", headers={"Authorization": f"Bearer {key}"},
                    json={"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0})
    if r.status_code != 200:
        return r.status_code, r.text
    return 200, r.json()["choices"][0]["text"]


def _ok(client: TestClient, key: str, model: str) -> str:
    status, text = _complete(client, key, model)
    assert status == 200, text
    return text


def test_replicas_share_prefix_lifecycle(replicas: tuple[TestClient, TestClient], tmp_path: Path) -> None:
    a, b = replicas
    r = a.post("/admin/tenants", json={"name": "acme"}, headers=ADMIN)
    assert r.status_code == 201, r.text
    key = r.json()["api_key"]
    auth = {"Authorization": f"Bearer {key}"}

    models_b = b.get("/v1/models", headers=auth)
    assert models_b.status_code == 200, models_b.text
    base = models_b.json()["data"][0]["id"]
    base_text = _ok(b, key, base)
    assert _ok(a, key, base) == base_text  # same frozen model on both replicas

    # upload v1 through A → B serves it and lists it
    assert _upload(a, key, _prefix_bytes(tmp_path, seed=1))["version"] == 1
    v1_text = _ok(b, key, NAME)
    assert v1_text != base_text
    assert NAME in [m["id"] for m in b.get("/v1/models", headers=auth).json()["data"]]
    assert _ok(a, key, NAME) == v1_text

    # new version through A → B serves v2 on the very next request (B's device pool holds v1)
    assert _upload(a, key, _prefix_bytes(tmp_path, seed=2))["version"] == 2
    latest_b = _ok(b, key, NAME)
    v2_text = _ok(b, key, f"{NAME}@2")
    assert latest_b == v2_text
    assert _ok(b, key, f"{NAME}@1") == v1_text
    assert v2_text != v1_text
    assert _ok(a, key, NAME) == v2_text

    # delete through A → B answers 404 at once for every form of the name
    r = a.delete(f"/v1/prefixes/{NAME}", headers=auth)
    assert r.status_code == 200, r.text
    for model in (NAME, f"{NAME}@1", f"{NAME}@2"):
        status, body = _complete(b, key, model)
        assert status == 404, (model, body)
        assert b.get(f"/v1/models/{model}", headers=auth).status_code == 404
    assert NAME not in [m["id"] for m in b.get("/v1/models", headers=auth).json()["data"]]
    assert _ok(b, key, base) == base_text
