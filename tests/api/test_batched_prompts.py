"""/v1/completions with several prompts (OpenAI's choice numbering, usage summed, streaming), `echo`, `best_of`,
and vLLM's `continuous_usage_stats` in streams (completions and chat)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from app.engine.protocol import SamplingParams
from tests.api.conftest import TenantKey
from tests.api.fake_engine import FakeEngineClient
from tests.api.sse import sse_payloads
from tests.api.test_length_controls import assert_400, post


async def complete(client: httpx.AsyncClient, tenant: TenantKey, **body: Any) -> httpx.Response:
    return await post(client, tenant, "completions", **body)


def by_index(chunks: list[dict[str, Any]]) -> dict[int, str]:
    out: dict[int, str] = {}
    for c in chunks:
        for choice in c["choices"]:
            out[choice["index"]] = out.get(choice["index"], "") + choice["text"]
    return out


@pytest.mark.parametrize("prompt", [["ab", "xyz"], [[97, 98], [120, 121, 122]]])
async def test_prompts_times_n_numbered_as_openai(client: httpx.AsyncClient, tenant: TenantKey,
                                                  fake_engine: FakeEngineClient, prompt: Any) -> None:
    r = await complete(client, tenant, prompt=prompt, n=2, seed=5, max_tokens=50)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in body["choices"]] == ["hello world#5", "hello world#6"] * 2
    # choice prompt_index * n + j answers prompt prompt_index with seed + j, as if it had been sent alone
    assert [(c.prompt_ids, c.sampling.seed) for c in fake_engine.calls] == [
        ([97, 98], 5), ([97, 98], 6), ([120, 121, 122], 5), ([120, 121, 122], 6)]
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 4 * 14, "total_tokens": 5 + 4 * 14}


async def test_each_prompt_gets_its_own_budget(client: httpx.AsyncClient, tenant: TenantKey,
                                               fake_engine: FakeEngineClient) -> None:
    """With no max_tokens limit (null), each prompt gets what fits the context after it."""
    r = await complete(client, tenant, prompt=["a", "x" * 100], max_tokens=None)
    assert r.status_code == 200, r.text
    assert [c.sampling.max_tokens for c in fake_engine.calls] == [127, 28]


async def test_a_bad_prompt_is_refused_before_anything_runs(client: httpx.AsyncClient, tenant: TenantKey,
                                                            fake_engine: FakeEngineClient) -> None:
    assert_400(await complete(client, tenant, prompt=["ok", "x" * 200]), "max_tokens")
    assert_400(await complete(client, tenant, prompt=[[1], [300]]), "prompt")
    assert_400(await complete(client, tenant, prompt=["ok", ""]), "prompt")
    assert fake_engine.calls == []


async def test_choice_cap_counts_prompts_times_n(client: httpx.AsyncClient, tenant: TenantKey,
                                                 fake_engine: FakeEngineClient) -> None:
    r = await complete(client, tenant, prompt=["p"] * 9, n=8, max_tokens=1)
    assert_400(r, "prompt")
    assert "72" not in r.json()["error"]["message"] and "64" in r.json()["error"]["message"]
    assert_400(await complete(client, tenant, prompt=["p"] * 5, n=2, best_of=13, max_tokens=1), "prompt")
    assert fake_engine.calls == []
    r = await complete(client, tenant, prompt=["p"] * 8, n=8, max_tokens=1)
    assert r.status_code == 200 and len(r.json()["choices"]) == 64


async def test_stream_several_prompts(client: httpx.AsyncClient, tenant: TenantKey) -> None:
    r = await complete(client, tenant, prompt=["a", "b", "c"], n=2, max_tokens=3, stream=True,
                       stream_options={"include_usage": True})
    *chunks, usage_chunk, done = sse_payloads(r.text)
    assert done == "[DONE]" and usage_chunk["usage"] == {"prompt_tokens": 3, "completion_tokens": 18,
                                                         "total_tokens": 21}
    assert by_index(chunks) == {i: "hel" for i in range(6)}
    finishes = {c["choices"][0]["index"]: c["choices"][0]["finish_reason"] for c in chunks
                if c["choices"][0]["finish_reason"]}
    assert finishes == {i: "length" for i in range(6)}


@pytest.mark.parametrize("stream", [False, True])
async def test_echo_puts_each_prompt_before_its_choices(client: httpx.AsyncClient, tenant: TenantKey,
                                                        stream: bool) -> None:
    for prompt in (["Say: ", "hi"], [[83, 97, 121, 58, 32], [104, 105]]):  # strings, and token ids decoded
        r = await complete(client, tenant, prompt=prompt, echo=True, n=2, max_tokens=3, stream=stream)
        assert r.status_code == 200, r.text
        texts = by_index(sse_payloads(r.text)[:-1]) if stream else \
            {c["index"]: c["text"] for c in r.json()["choices"]}
        assert texts == {0: "Say: hel", 1: "Say: hel", 2: "hihel", 3: "hihel"}


async def test_echo_with_logprobs_is_refused(client: httpx.AsyncClient, tenant: TenantKey) -> None:
    r = await complete(client, tenant, echo=True, logprobs=1)
    assert_400(r, "echo")


async def test_best_of_returns_the_n_likeliest(client: httpx.AsyncClient, tenant: TenantKey,
                                               fake_engine: FakeEngineClient) -> None:
    """Candidates are ranked by mean token logprob (computed even when logprobs were not asked, and not returned);
    every candidate's tokens count in usage."""
    def logprob(s: SamplingParams) -> float:
        return {10: -3.0, 11: -0.1, 12: -2.0, 13: -0.5}[s.seed or 0]

    fake_engine.logprob_of = logprob
    r = await complete(client, tenant, prompt=["a", "b"], n=2, best_of=4, seed=10, max_tokens=50)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["text"] for c in body["choices"]] == ["hello world#11", "hello world#13"] * 2
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3] and body["choices"][0]["logprobs"] is None
    assert len(fake_engine.calls) == 8 and all(c.sampling.logprobs == 0 for c in fake_engine.calls)
    assert body["usage"]["completion_tokens"] == 8 * 15
    with_lp = (await complete(client, tenant, n=1, best_of=2, seed=12, logprobs=1, max_tokens=50)).json()
    assert with_lp["choices"][0]["text"] == "hello world#13" and with_lp["choices"][0]["logprobs"]["tokens"]


@pytest.mark.parametrize(("body", "why"), [
    ({"n": 3, "best_of": 2}, "at least n"), ({"best_of": 2, "stream": True}, "streamed"),
])
async def test_best_of_limits(client: httpx.AsyncClient, tenant: TenantKey, body: dict[str, Any], why: str) -> None:
    r = await complete(client, tenant, **body)
    assert_400(r, "best_of")
    assert why in r.json()["error"]["message"]


async def test_best_of_equal_to_n_streams(client: httpx.AsyncClient, tenant: TenantKey) -> None:
    r = await complete(client, tenant, n=2, best_of=2, stream=True, max_tokens=2)
    assert by_index(sse_payloads(r.text)[:-1]) == {0: "he", 1: "he"}


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
async def test_continuous_usage_stats(client: httpx.AsyncClient, tenant: TenantKey, endpoint: str) -> None:
    """vLLM's continuous_usage_stats (guidellm sends it): every chunk carries its choice's usage so far."""
    r = await post(client, tenant, endpoint, n=2, max_tokens=3, stream=True,
                   stream_options={"include_usage": True, "continuous_usage_stats": True})
    assert r.status_code == 200, r.text
    *chunks, last, done = sse_payloads(r.text)
    prompt = last["usage"]["prompt_tokens"]
    assert done == "[DONE]" and last["choices"] == [] and last["usage"]["completion_tokens"] == 6
    seen: dict[int, list[int]] = {0: [], 1: []}
    for c in chunks:
        assert c["usage"]["prompt_tokens"] == prompt
        seen[c["choices"][0]["index"]].append(c["usage"]["completion_tokens"])
    for counts in seen.values():
        assert counts == sorted(counts) and counts[-1] == 3 and counts[-2] == 2
    without = sse_payloads((await post(client, tenant, endpoint, max_tokens=3, stream=True,
                                       stream_options={"include_usage": True})).text)
    assert all(c["usage"] is None for c in without[:-2])
