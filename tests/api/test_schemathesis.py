"""Hostile input, schema-driven: schemathesis generates requests for every operation of the app's OpenAPI
document (valid and invalid bodies, parameters, uploads) and sends them with valid keys (the tenant key with
every scope; the admin key on /admin routes). Every answer must be a non-5xx the document declares, with the
declared content type and body schema.

The app is the real one on a migrated SQLite database with the tiny random Llama loaded (uploads are decoded
against a real model spec), generation answered by the fake engine, no job worker, and no rate limits (the test
sends hundreds of requests a minute). Examples per operation are bounded to keep the file well under 90 s.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, settings
from schemathesis import Case
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from app.config import Settings
from app.main import create_app
from app.runtime import Runtime, open_runtime
from tests.api.fake_engine import FakeEngineClient
from tests.api.fixtures_admin import ADMIN_KEY, native_bytes

EXAMPLES_PER_OPERATION = 20
CHECKS = [schemathesis.checks.not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]


@dataclass
class Env:
    app: FastAPI
    tenant_key: str


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    data = Path(tmp_path_factory.mktemp("schemathesis"))
    settings_ = Settings(data_dir=data, model="random:tiny-llama", admin_key=ADMIN_KEY, job_queue="none",
                         tenant_requests_per_minute=None, tenant_tokens_per_minute=None)
    fake = FakeEngineClient()

    def factory(s: Settings) -> Runtime:
        runtime = open_runtime(s, load_model=True)
        fake.model_id = runtime.model.spec.model_id if runtime.model else fake.model_id
        return replace(runtime, engine_client=fake)

    app = create_app(settings_, runtime_factory=factory)
    from fastapi.testclient import TestClient

    with TestClient(app) as client:  # seed a tenant with a prefix, so some generated names hit real objects
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        key = client.post("/admin/tenants", json={"name": "fuzz"}, headers=admin).json()["api_key"]
        spec = client.app.state.runtime.model.spec  # type: ignore[attr-defined]
        r = client.post("/v1/prefixes", headers={"Authorization": f"Bearer {key}"}, data={"name": "a"},
                        files={"file": ("p.safetensors", native_bytes(spec), "application/octet-stream")})
        assert r.status_code == 201, r.text
    yield Env(app, key)


# The document only (no lifespan, no I/O): the app that answers is the module fixture's, passed at call time.
schema = schemathesis.openapi.from_dict(create_app(Settings(admin_key=ADMIN_KEY)).openapi())


@schema.parametrize()
@settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_operation_conforms(case: Case, env: Env) -> None:
    key = ADMIN_KEY if case.path.startswith("/admin") else env.tenant_key
    case.call_and_validate(app=env.app, headers={"Authorization": f"Bearer {key}"}, checks=CHECKS)
