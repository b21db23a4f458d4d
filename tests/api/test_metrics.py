"""`/metrics`: Prometheus text that parses, request/token counters that move with real requests, scrape-time
gauges (engine, prefix tiers, device pool, training jobs), one registry per app, and the off switch."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app.config import Settings
from app.db.models import TrainingJob
from app.engine.model import load_model
from app.main import create_app
from app.runtime import Runtime, open_runtime
from prefix_store.codec import encode_native
from tests.api.conftest import ADMIN_KEY, AppEnv, TenantKey
from tests.engine.helpers import random_prefix

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def no_model(settings: Settings) -> Runtime:
    return open_runtime(settings, load_model=False)


def parse(text: str) -> Samples:
    """Every sample of an exposition, keyed by (sample name, labels); fails if the text does not parse."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def scrape(client: httpx.AsyncClient) -> Samples:
    r = await client.get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return parse(r.text)


async def test_request_and_token_counters_move(client: httpx.AsyncClient, tenant: TenantKey) -> None:
    before = await scrape(client)
    prompt = "Say hi"
    r = await client.post("/v1/completions", headers=tenant.headers,
                          json={"model": "fake-base", "prompt": prompt, "max_tokens": 50})
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    async with client.stream("POST", "/v1/chat/completions", headers=tenant.headers,
                             json={"model": "fake-base", "stream": True,
                                   "messages": [{"role": "user", "content": "hi"}]}) as s:
        assert s.status_code == 200
        _ = [line async for line in s.aiter_lines()]
    assert (await client.post("/v1/completions", headers=tenant.headers,
                              json={"model": "nope", "prompt": "x"})).status_code == 404
    assert (await client.get("/v1/prefixes/some-name", headers=tenant.headers)).status_code == 404
    assert (await client.get("/no/such/path")).status_code == 404
    after = await scrape(client)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    req = "prefixserve_http_requests_total"
    assert delta(req, route="/v1/completions", method="POST", status="200") == 1
    assert delta(req, route="/v1/completions", method="POST", status="404") == 1
    assert delta(req, route="/v1/chat/completions", method="POST", status="200") == 1
    # route templates, never raw paths; unknown paths share one label value
    assert delta(req, route="/v1/prefixes/{ref}", method="GET", status="404") == 1
    assert delta(req, route="unmatched", method="GET", status="404") == 1
    assert not any("some-name" in str(labels) for _, labels in after)
    assert delta("prefixserve_prompt_tokens_total", route="/v1/completions") == usage["prompt_tokens"]
    assert delta("prefixserve_completion_tokens_total", route="/v1/completions") == usage["completion_tokens"]
    assert delta("prefixserve_completion_tokens_total", route="/v1/chat/completions") > 0
    ttft = "prefixserve_time_to_first_token_seconds_count"
    assert delta(ttft, route="/v1/completions") == 1  # the 404 generated nothing: no TTFT sample
    assert delta(ttft, route="/v1/chat/completions") == 1
    dur = "prefixserve_http_request_duration_seconds_count"
    assert delta(dur, route="/v1/completions", method="POST") == 2
    assert value(after, "prefixserve_http_requests_in_flight") == 1  # the scrape itself


async def test_every_family_is_exported_without_a_model(client: httpx.AsyncClient) -> None:
    """The fake engine has no scheduler or resolver: their families still appear (empty), so dashboards and
    alerts see a stable set of names on every replica."""
    r = await client.get("/metrics")
    names = {f.name for f in text_string_to_metric_families(r.text)}
    for name in ("prefixserve_engine_batch_size", "prefixserve_engine_waiting_requests",
                 "prefixserve_prefix_cache_hits", "prefixserve_prefix_cache_misses",
                 "prefixserve_prefix_load_duration_seconds", "prefixserve_device_pool_bytes",
                 "prefixserve_training_jobs", "prefixserve_time_to_first_token_seconds"):
        assert name in names


async def test_training_jobs_by_state(client: httpx.AsyncClient, app_env: AppEnv, tenant: TenantKey) -> None:
    with app_env.sessions() as s:
        for status in ("queued", "queued", "running", "succeeded"):
            s.add(TrainingJob(tenant_id=tenant.tenant_id, status=status, model="fake-base", prefix_name="p",
                              hyperparameters={}, options={}))
        s.commit()
    samples = await scrape(client)
    assert value(samples, "prefixserve_training_jobs", state="queued") == 2
    assert value(samples, "prefixserve_training_jobs", state="running") == 1
    assert value(samples, "prefixserve_training_jobs", state="succeeded") == 1
    assert value(samples, "prefixserve_training_jobs", state="failed") == 0


async def test_each_app_has_its_own_registry(app_env: AppEnv, tmp_path: Path, tenant: TenantKey) -> None:
    other = create_app(Settings(data_dir=tmp_path / "other", admin_key=ADMIN_KEY), runtime_factory=no_model)
    with TestClient(app_env.app) as a, TestClient(other) as b:
        assert a.get("/healthz").status_code == 200
        assert a.get("/healthz").status_code == 200
        req = "prefixserve_http_requests_total"
        labels = {"route": "/healthz", "method": "GET", "status": "200"}
        assert value(parse(a.get("/metrics").text), req, **labels) == 2
        assert value(parse(b.get("/metrics").text), req, **labels) == 0


def test_metrics_can_be_switched_off(tmp_path: Path) -> None:
    app = create_app(Settings(data_dir=tmp_path / "d", admin_key=ADMIN_KEY, metrics_enabled=False),
                     runtime_factory=no_model)
    with TestClient(app) as c:
        assert c.get("/metrics").status_code == 404
        r = c.get("/healthz")
        assert r.status_code == 200 and r.headers["x-request-id"]  # the middleware still runs


@pytest.fixture
def real_app(tmp_path: Path) -> Callable[[], TestClient]:
    settings = Settings(data_dir=tmp_path / "data", model="random:tiny-llama", admin_key="adm",
                        device_pool_bytes=2**20)
    return lambda: TestClient(create_app(settings))


def test_engine_and_prefix_tier_metrics_on_a_real_model(real_app: Callable[[], TestClient], tmp_path: Path) -> None:
    """The random tiny Llama through the real runtime: a cold prefix misses the device pool and the cache tier
    and is read from the object store once (one load observed); the second request hits the device pool."""
    kv = random_prefix(load_model("random:tiny-llama", data_dir=tmp_path / "builder"), 6, seed=3)
    with real_app() as c:
        r = c.post("/admin/tenants", json={"name": "acme"}, headers={"Authorization": "Bearer adm"})
        auth = {"Authorization": f"Bearer {r.json()['api_key']}"}
        r = c.post("/v1/prefixes", headers=auth, data={"name": "poet"},
                   files={"file": ("p.safetensors", encode_native(kv), "application/octet-stream")})
        assert r.status_code == 201, r.text
        for _ in range(2):
            r = c.post("/v1/completions", headers=auth,
                       json={"model": "poet", "prompt": "hello", "max_tokens": 4, "temperature": 0})
            assert r.status_code == 200, r.text
        m = parse(c.get("/metrics").text)
    assert value(m, "prefixserve_prefix_cache_misses_total", tier="device_pool") == 1
    assert value(m, "prefixserve_prefix_cache_hits_total", tier="device_pool") == 1
    assert value(m, "prefixserve_prefix_cache_misses_total", tier="cache") == 1
    assert value(m, "prefixserve_prefix_cache_hits_total", tier="object_store") == 1
    assert value(m, "prefixserve_prefix_load_duration_seconds_count", source="blob") == 1
    assert value(m, "prefixserve_device_pool_bytes") == kv.keys.numel() * 4 * 2  # fp32 keys + values
    assert value(m, "prefixserve_device_pool_entries") == 1
    assert value(m, "prefixserve_device_pool_capacity_bytes") == 2**20
    assert value(m, "prefixserve_engine_generated_tokens_total") >= 2
    assert value(m, "prefixserve_engine_prefills_total") >= 2
    assert value(m, "prefixserve_engine_batch_size") == 0  # idle now
    assert value(m, "prefixserve_engine_waiting_requests") == 0
    assert value(m, "prefixserve_engine_max_batch_rows") == 64
    assert value(m, "prefixserve_engine_preempted_rows_total") == 0  # no batch-priority rows ran
