"""The sampling controls over HTTP, in completions and chat: each reaches the engine for every choice (vLLM's
spellings mapped: top_k -1 = off, logit_bias keys as token ids), a bad value is a 400 naming the field, and the
OpenAPI document describes every request field."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from app.protocol.common import SamplingFields, StreamOptions
from tests.api.conftest import TenantKey
from tests.api.fake_engine import FakeEngineClient
from tests.api.test_length_controls import assert_400, post


@pytest.fixture(params=["completions", "chat"])
def endpoint(request: pytest.FixtureRequest) -> str:
    return str(request.param)


CONTROLS: dict[str, Any] = {"top_k": 40, "min_p": 0.05, "presence_penalty": 0.5, "frequency_penalty": -0.25,
                            "repetition_penalty": 1.2, "logit_bias": {"65": -100, "7": 2.5},
                            "stop_token_ids": [10, 3]}


async def test_controls_reach_the_engine_for_every_choice(client: httpx.AsyncClient, tenant: TenantKey,
                                                          fake_engine: FakeEngineClient, endpoint: str) -> None:
    r = await post(client, tenant, endpoint, max_tokens=8, n=2, **CONTROLS)
    assert r.status_code == 200, r.text
    for call in fake_engine.calls:
        s = call.sampling
        assert (s.top_k, s.min_p, s.presence_penalty, s.frequency_penalty, s.repetition_penalty) == \
            (40, 0.05, 0.5, -0.25, 1.2)
        assert s.logit_bias == ((7, 2.5), (65, -100.0)) and s.stop_token_ids == (10, 3)
    assert len(fake_engine.calls) == 2


async def test_defaults_are_off(client: httpx.AsyncClient, tenant: TenantKey, fake_engine: FakeEngineClient,
                                endpoint: str) -> None:
    r = await post(client, tenant, endpoint, max_tokens=8, top_k=-1)  # vLLM's "off"
    assert r.status_code == 200, r.text
    s = fake_engine.calls[0].sampling
    assert (s.top_k, s.min_p, s.presence_penalty, s.frequency_penalty, s.repetition_penalty, s.logit_bias,
            s.stop_token_ids) == (0, 0.0, 0.0, 0.0, 1.0, (), ())


BAD_VALUES: list[tuple[str, Any]] = [
    ("top_k", -2), ("top_k", 1.5), ("min_p", 1.5), ("min_p", -0.1), ("presence_penalty", 2.5),
    ("frequency_penalty", -2.5), ("frequency_penalty", "1"), ("repetition_penalty", 0), ("repetition_penalty", 2.5),
    ("logit_bias", {"5": 101}), ("logit_bias", {"x": 1}), ("logit_bias", {"-1": 1}), ("logit_bias", {"1": "a"}),
    ("logit_bias", {"1": 1, "01": 2}), ("logit_bias", {"256": 1}), ("logit_bias", [1]),
    ("stop_token_ids", [-1]), ("stop_token_ids", [256]), ("stop_token_ids", "3"), ("stop_token_ids", [1.5]),
]


async def test_bad_values_are_a_400_naming_the_field(client: httpx.AsyncClient, tenant: TenantKey,
                                                     fake_engine: FakeEngineClient) -> None:
    """Checked on completions; chat shares the fields' model (SamplingFields) and their service-side checks, as
    test_vocabulary_checks_say_the_range shows on both. One app for all the cases (its set-up is the cost)."""
    for field, value in BAD_VALUES:
        r = await post(client, tenant, "completions", max_tokens=8, **{field: value})
        assert r.status_code == 400, (field, value, r.text)
        assert r.json()["error"]["param"].split(".")[0] == field, (field, value, r.text)
    assert fake_engine.calls == []


async def test_vocabulary_checks_say_the_range(client: httpx.AsyncClient, tenant: TenantKey,
                                               endpoint: str) -> None:
    r = await post(client, tenant, endpoint, max_tokens=8, logit_bias={"300": 1})
    assert_400(r, "logit_bias")
    assert "300" in r.json()["error"]["message"] and "[0, 256)" in r.json()["error"]["message"]


OWN_FIELDS = {
    "CompletionRequest": {*SamplingFields.model_fields, "prompt", "max_tokens", "logprobs", "echo", "best_of"},
    "ChatCompletionRequest": {*SamplingFields.model_fields, "messages", "max_tokens", "max_completion_tokens",
                              "logprobs", "top_logprobs"},
    "StreamOptions": set(StreamOptions.model_fields),
}


async def test_openapi_describes_every_request_field(client: httpx.AsyncClient) -> None:
    schemas = (await client.get("/openapi.json")).json()["components"]["schemas"]
    for name, fields in OWN_FIELDS.items():
        props = schemas[name]["properties"]
        assert fields <= set(props), name
        undocumented = [f for f in fields if not props[f].get("description")]
        assert undocumented == [], (name, undocumented)
        assert schemas[name].get("additionalProperties") is False, name  # unknown fields are refused
    assert set(CONTROLS) <= OWN_FIELDS["ChatCompletionRequest"]
