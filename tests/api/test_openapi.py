"""The OpenAPI document lists every route and documents the `model` naming forms; /docs serves Swagger UI."""

from __future__ import annotations

from typing import Any

import httpx

ROUTES = {
    "/v1/completions": {"post"},
    "/v1/chat/completions": {"post"},
    "/v1/models": {"get"},
    "/v1/models/{model}": {"get"},
    "/v1/prefixes": {"get", "post"},
    "/v1/prefixes/{ref}": {"get", "delete"},
    "/v1/prefixes/{ref}/download": {"get"},
    "/admin/tenants": {"get", "post"},
    "/admin/tenants/{tenant_id}": {"delete"},
    "/admin/tenants/{tenant_id}/keys": {"get", "post"},
    "/admin/keys/{key_id}": {"delete"},
    "/healthz": {"get"},
    "/readyz": {"get"},
}


def _request_schema(doc: dict[str, Any], path: str) -> dict[str, Any]:
    ref = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    return doc["components"]["schemas"][ref.rsplit("/", 1)[-1]]


async def test_openapi_lists_every_route(client: httpx.AsyncClient) -> None:
    r = await client.get("/openapi.json")
    assert r.status_code == 200
    paths = r.json()["paths"]
    for path, methods in ROUTES.items():
        assert path in paths, path
        assert methods <= set(paths[path]), (path, set(paths[path]))


async def test_model_field_documents_naming_forms(client: httpx.AsyncClient) -> None:
    doc = (await client.get("/openapi.json")).json()
    for path in ("/v1/completions", "/v1/chat/completions"):
        schema = _request_schema(doc, path)
        assert "model" in schema["required"]
        description = schema["properties"]["model"].get("description", "")
        assert "name@version" in description, (path, description)
        assert "user:" in description, (path, description)


async def test_docs_page(client: httpx.AsyncClient) -> None:
    r = await client.get("/docs")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert "swagger" in r.text.lower()
