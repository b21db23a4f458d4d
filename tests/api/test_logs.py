"""The access log: one line per request with request id, tenant, model, tokens, status and latency; JSON as an
option; streams logged when they end; never an API key, never prompt text unless `log_prompts` allows it."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.config import Settings
from app.logs import JsonFormatter, TextFormatter, configure_logging
from tests.api.conftest import ADMIN_KEY, AppEnv, TenantKey

PROMPT = "zebra-quartz prompt text"


@pytest.fixture
def settings(tmp_path: Path, request: pytest.FixtureRequest) -> Settings:
    """The API fixtures' settings, with `log_prompts` from indirect parametrization (default off)."""
    return Settings(data_dir=tmp_path / "data", admin_key=ADMIN_KEY, log_prompts=getattr(request, "param", False))


def access_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "prefixserve.access"]


def every_rendering(caplog: pytest.LogCaptureFixture) -> str:
    """Every captured record as the text and the JSON formatter write it (extras included)."""
    text, js = TextFormatter(), JsonFormatter()
    return "\n".join(f.format(r) for r in caplog.records for f in (text, js))


async def complete(client: httpx.AsyncClient, tenant: TenantKey, **extra: object) -> httpx.Response:
    return await client.post("/v1/completions", headers=tenant.headers,
                              json={"model": "fake-base", "prompt": PROMPT, **extra})


async def test_one_line_per_request_with_its_facts(client: httpx.AsyncClient, tenant: TenantKey,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    r = await complete(client, tenant, max_tokens=50)
    assert r.status_code == 200
    (rec,) = access_records(caplog)
    usage = r.json()["usage"]
    assert rec.request_id == r.headers["x-request-id"]  # type: ignore[attr-defined]
    fields = json.loads(JsonFormatter().format(rec))
    assert fields["tenant_id"] == tenant.tenant_id
    assert fields["model"] == "fake-base"
    assert fields["prompt_tokens"] == usage["prompt_tokens"] == len(PROMPT)
    assert fields["completion_tokens"] == usage["completion_tokens"]
    assert fields["status"] == 200 and fields["route"] == "/v1/completions"
    assert fields["latency_ms"] >= fields["ttft_ms"] >= 0
    assert "prompt" not in fields
    text = TextFormatter().format(rec)
    assert f"request_id={rec.request_id}" in text and f"tenant_id={tenant.tenant_id}" in text  # type: ignore[attr-defined]


async def test_request_id_is_taken_from_the_client_or_made(client: httpx.AsyncClient,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    r = await client.get("/healthz", headers={"X-Request-ID": "req-42.a:b"})
    assert r.headers["x-request-id"] == "req-42.a:b"
    made = (await client.get("/healthz")).headers["x-request-id"]
    assert len(made) == 32
    # a hostile id (newline, too long) is replaced, never echoed into headers or logs
    bad = (await client.get("/healthz", headers={"X-Request-ID": "x" * 300})).headers["x-request-id"]
    assert bad != "x" * 300 and len(bad) == 32
    assert [r.request_id for r in access_records(caplog)] == ["req-42.a:b", made, bad]  # type: ignore[attr-defined]


async def test_stream_is_logged_when_it_ends(client: httpx.AsyncClient, app_env: AppEnv, tenant: TenantKey,
                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    app_env.engine.token_delay_s = 0.01
    async with client.stream("POST", "/v1/completions", headers=tenant.headers,
                             json={"model": "fake-base", "prompt": PROMPT, "stream": True}) as s:
        body = "".join([line async for line in s.aiter_lines()])
    assert "[DONE]" in body
    (rec,) = access_records(caplog)
    tokens = len("hello world") + 1  # the fake's script and its EOS
    assert rec.completion_tokens == tokens  # type: ignore[attr-defined]  # known only at the stream's end
    assert rec.latency_ms >= tokens * 10  # type: ignore[attr-defined]


async def test_no_api_key_in_any_log(client: httpx.AsyncClient, tenant: TenantKey,
                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, every level
    wrong = "psk-not-a-real-key-but-secret-looking"
    assert (await complete(client, tenant, max_tokens=5)).status_code == 200
    assert (await client.get("/v1/models", headers={"Authorization": f"Bearer {wrong}"})).status_code == 401
    assert (await client.get("/admin/tenants", headers={"Authorization": f"Bearer {ADMIN_KEY}"})).status_code == 200
    async with client.stream("POST", "/v1/completions", headers=tenant.headers,
                             json={"model": "fake-base", "prompt": PROMPT, "stream": True}) as s:
        _ = [line async for line in s.aiter_lines()]
    assert len(access_records(caplog)) == 4
    logged = every_rendering(caplog)
    for secret in (tenant.key, wrong, ADMIN_KEY):
        assert secret not in logged
    assert PROMPT not in logged  # log_prompts is off


@pytest.mark.parametrize("settings", [True], indirect=True)
async def test_prompts_are_logged_only_when_allowed(client: httpx.AsyncClient, tenant: TenantKey,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    assert (await complete(client, tenant, max_tokens=5)).status_code == 200
    r = await client.post("/v1/chat/completions", headers=tenant.headers,
                          json={"model": "fake-base", "messages": [{"role": "user", "content": PROMPT}]})
    assert r.status_code == 200
    first, second = access_records(caplog)
    assert json.loads(first.prompt) == PROMPT  # type: ignore[attr-defined]
    assert json.loads(second.prompt) == [{"role": "user", "content": PROMPT}]  # type: ignore[attr-defined]
    assert tenant.key not in every_rendering(caplog)


@pytest.fixture
def root_logging() -> Iterator[None]:
    """Let a test call `configure_logging`; restore pytest's handlers afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


@pytest.mark.usefixtures("root_logging")
async def test_json_format_is_one_object_per_line(client: httpx.AsyncClient, tenant: TenantKey,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", json_format=True)  # a handler on the (captured) stderr of this moment
    assert (await complete(client, tenant, max_tokens=5)).status_code == 200
    assert (await client.get("/nowhere")).status_code == 404
    err = capsys.readouterr().err
    lines = [json.loads(line) for line in err.splitlines()]
    access = [line for line in lines if line["logger"] == "prefixserve.access"]
    assert [(a["route"], a["status"]) for a in access] == [("/v1/completions", 200), ("unmatched", 404)]
    assert access[0]["tenant_id"] == tenant.tenant_id and access[1]["tenant_id"] is None
    assert tenant.key not in err
