"""Stacked prefixes in the engine (docs/prefix-format.md, "Stacking"): a row whose prefix is a stack of versions
gives the tokens of an unbatched reference (the model's forward behind the parts' keys/values appended to its
cache one part after another, prompt at P1 + P2 + ... + j), the same tokens alone and next to single-prefix,
other-stack and no-prefix rows, and a stack of one is exactly the single prefix.

Served through the production path: EngineClient's loader, PrefixResolver.load_stack over real tiers (a file
blob store, the in-process cache tier, the device pool) and the native codec.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest
import torch
from transformers.cache_utils import DynamicCache

from app.engine.client import EngineClient
from app.engine.factory import context_length
from app.engine.runner import cache_kwarg_name
from app.engine.sampling import SamplingParams
from prefix_store.blobs import FileBlobStore
from prefix_store.cache_tier import InProcessTier
from prefix_store.codec import encode_native
from prefix_store.device_pool import DevicePool
from prefix_store.ref import PrefixRef
from prefix_store.resolver import PrefixResolver
from prefix_store.stack import concat_prefixes
from prefix_store.types import PrefixKV
from tests.engine.helpers import make_engine, random_prefix

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=0)
SEEDED = SamplingParams(max_tokens=8, temperature=0.9, top_p=0.95, seed=77, ignore_eos=True)


class NoCatalog:
    def lookup(self, tenant_id: str, name: str, version: int | None) -> PrefixRef | None:
        raise AssertionError("the engine loads the versions it was given; it never asks the catalog")


@pytest.fixture(params=["tiny_llama", "tiny_gpt2"])
def tiny(request):
    return request.getfixturevalue(request.param)


def stored(loaded, tmp_path: Path) -> tuple[PrefixResolver, dict[str, PrefixRef], dict[str, PrefixKV]]:
    """Three prefixes of 3, 5 and 2 virtual tokens in a blob store, their refs, and the tensors themselves."""
    blobs = FileBlobStore(tmp_path / "blobs")
    resolver = PrefixResolver(catalog=NoCatalog(), pool=DevicePool(2**24), cache=InProcessTier(3600, 2**24),
                              blobs=blobs, device=loaded.device, dtype=loaded.dtype, spec=loaded.spec)
    kvs = {name: random_prefix(loaded, p, seed=seed) for name, p, seed in (("a", 3, 11), ("b", 5, 12), ("c", 2, 13))}
    refs = {name: PrefixRef("t1", f"pfx{name}", name, 1, blobs.put(encode_native(kv)), kv.num_virtual_tokens)
            for name, kv in kvs.items()}
    return resolver, refs, kvs


def stacked_reference(loaded, prompt: list[int], parts: list[PrefixKV], steps: int) -> list[int]:
    """Greedy decoding recomputing everything each step, one row, no padding: the parts' keys/values appended to
    a fresh DynamicCache one part after another (its own concatenation), the prompt at positions P + j."""
    model = loaded.model
    p = sum(part.num_virtual_tokens for part in parts)
    ids, out = list(prompt), []
    for _ in range(steps):
        cache = DynamicCache()
        for part in parts:
            for layer in range(part.num_layers):
                cache.update(part.keys[layer][None].clone(), part.values[layer][None].clone(), layer)
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, p + len(ids), dtype=torch.long),
                           position_ids=torch.arange(p, p + len(ids))[None], use_cache=True,
                           **{cache_kwarg_name(model): cache}).logits
        tok = int(logits[0, -1].argmax())
        out.append(tok)
        ids.append(tok)
    return out


async def run(client: EngineClient, prompt: list[int], prefix, sampling: SamplingParams, rid: str,
              delay: float = 0.0) -> tuple[list[int], list[float]]:
    await asyncio.sleep(delay)
    tokens, logprobs = [], []
    async for ev in client.generate(prompt_ids=prompt, sampling=sampling, prefix=prefix, request_id=rid):
        assert ev.finish_reason in (None, "length"), ev.error
        if ev.token_id is not None:
            tokens.append(ev.token_id)
            if ev.logprob is not None:
                logprobs.append(ev.logprob)
    return tokens, logprobs


async def test_stacked_rows_match_the_reference_alone_and_in_a_mixed_batch(tiny, tmp_path: Path) -> None:
    resolver, refs, kvs = stored(tiny, tmp_path)
    engine = make_engine(tiny, max_batch_rows=8)
    client = EngineClient(engine, tiny.tokenizer, resolver, "tiny", context_length(tiny))
    a, b, c = refs["a"], refs["b"], refs["c"]
    rows = [  # (prompt, prefix as the services pass it, the parts' tensors, sampling)
        ([5, 6, 7, 8], (a, b), ["a", "b"], GREEDY),
        ([9, 10], a, ["a"], GREEDY),
        ([11, 12, 13], None, [], GREEDY),
        ([14, 15], (b, c, a), ["b", "c", "a"], dataclasses.replace(GREEDY, max_tokens=12)),
        ([16, 17, 18, 19, 20], (c, b), ["c", "b"], SEEDED),
    ]
    try:
        alone = [await run(client, p, x, s, f"alone{i}") for i, (p, x, _, s) in enumerate(rows)]
        together = await asyncio.gather(*[  # staggered: later rows join the running batch mid-flight
            run(client, p, x, s, f"mixed{i}", delay=0.002 * i) for i, (p, x, _, s) in enumerate(rows)])
        assert max(engine.stats.batch_sizes) > 1  # they did share decode steps
        for i, ((prompt, _, names, sampling), (a_tok, a_lp), (m_tok, m_lp)) in enumerate(
                zip(rows, alone, together, strict=True)):
            assert a_tok == m_tok, f"row {i}: alone {a_tok} vs in the batch {m_tok}"
            assert len(a_tok) == sampling.max_tokens
            if sampling.temperature == 0.0:
                assert a_tok == stacked_reference(tiny, prompt, [kvs[n] for n in names], len(a_tok)), f"row {i}"
                assert max(abs(x - y) for x, y in zip(a_lp, m_lp, strict=True)) <= 1e-3
    finally:
        engine.stop()


async def test_a_stack_of_one_is_the_single_prefix(tiny_llama, tmp_path: Path) -> None:
    resolver, refs, kvs = stored(tiny_llama, tmp_path)
    single = resolver.load(refs["b"]).kv
    assert concat_prefixes([single]) is single  # no copy, the very tensors the single prefix serves
    engine = make_engine(tiny_llama)
    client = EngineClient(engine, tiny_llama.tokenizer, resolver, "tiny", context_length(tiny_llama))
    try:
        as_single = await run(client, [3, 4, 5], refs["b"], GREEDY, "single")
        as_stack = await run(client, [3, 4, 5], (refs["b"],), GREEDY, "stack")
    finally:
        engine.stop()
    assert as_stack == as_single
    assert as_single[0] == stacked_reference(tiny_llama, [3, 4, 5], [kvs["b"]], GREEDY.max_tokens)


def test_the_stack_is_a_copy_in_order(tiny_llama, tmp_path: Path) -> None:
    """The concatenated KV holds part 1 then part 2 along the virtual-token axis, and writing to it leaves the
    device pool's tensors alone."""
    resolver, refs, kvs = stored(tiny_llama, tmp_path)
    kv = resolver.load_stack([refs["a"], refs["c"]])
    assert kv.keys.shape[2] == 3 + 2
    assert torch.equal(kv.keys[:, :, :3], kvs["a"].keys) and torch.equal(kv.keys[:, :, 3:], kvs["c"].keys)
    assert torch.equal(kv.values[:, :, 3:], kvs["c"].values)
    kv.keys.zero_()
    assert torch.equal(resolver.load(refs["a"]).kv.keys, kvs["a"].keys)
    with pytest.raises(ValueError, match="at least one part"):
        concat_prefixes([])
