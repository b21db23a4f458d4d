"""The batch verbs keep the row layout of docs/batching.md: masks, positions, prefix placement, trimming."""

from __future__ import annotations

import torch

from app.engine.batch import Batch, KVGeometry, NewRow
from app.engine.sampling import SamplerState, SamplingParams
from prefix_store.types import PrefixKV

G = KVGeometry(num_layers=2, kv_heads=2, head_dim=4, dtype=torch.float32, device=torch.device("cpu"))


def _prefix(p: int, fill: float) -> PrefixKV:
    shape = (G.num_layers, G.kv_heads, p, G.head_dim)
    return PrefixKV(keys=torch.full(shape, fill), values=torch.full(shape, -fill))


def _row(rid: str, prompt: list[int], prefix: PrefixKV | None) -> NewRow:
    return NewRow(rid, prompt, prefix, SamplerState.create(SamplingParams(temperature=0.0), G.device))


def test_from_requests_layout() -> None:
    b = Batch.from_requests(
        [_row("a", [7, 8, 9], _prefix(2, 1.0)), _row("b", [5], None)], geometry=G, pad_token_id=0
    )
    # KV axis: [pad | prefix | pad | prompt]; P_max = 2, S_max = 3
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1], [0, 0, 0, 0, 1]]
    assert b.input_ids.tolist() == [[7, 8, 9], [0, 0, 5]]
    assert b.position_ids[0].tolist() == [2, 3, 4]  # P + j
    assert b.position_ids[1, -1].item() == 0
    k, v = b.cache.slabs[0].valid()
    assert k.shape == (2, 2, 2, 4)
    assert torch.all(k[0] == 1.0) and torch.all(v[0] == -1.0) and torch.all(k[1] == 0)


def test_advance_extends_mask_and_positions() -> None:
    b = Batch.from_requests(
        [_row("a", [7, 8, 9], _prefix(2, 1.0)), _row("b", [5], None)], geometry=G, pad_token_id=0
    )
    for slab in b.cache.slabs:  # what a forward would append: the 3 prompt columns
        slab.update(torch.zeros(2, 2, 3, 4), torch.zeros(2, 2, 3, 4))
    b.advance([11, 12])
    assert b.input_ids.tolist() == [[11], [12]]
    assert b.position_ids.tolist() == [[5], [1]]  # P + S + 0
    assert b.attention_mask.shape == (2, b.cache.length + 1)


def test_filter_trims_columns_that_are_padding_for_all_kept_rows() -> None:
    b = Batch.from_requests(
        [_row("long", [1] * 6, _prefix(5, 2.0)), _row("short", [3], None)], geometry=G, pad_token_id=0
    )
    for slab in b.cache.slabs:
        slab.update(torch.ones(2, 2, 6, 4), torch.ones(2, 2, 6, 4))
    b.advance([4, 4])
    kept = b.filter({"short"})
    assert kept is not None and len(kept) == 1
    assert kept.attention_mask.tolist() == [[1, 1]]  # its prompt token + the new one
    assert kept.cache.length == 1
    assert b.filter(set()) is None
    assert b.filter({"long", "short"}) is b


def test_concatenate_left_pads_to_the_longest_cache() -> None:
    a = Batch.from_requests([_row("a", [1, 2], _prefix(3, 1.0))], geometry=G, pad_token_id=0)
    c = Batch.from_requests([_row("c", [1], None)], geometry=G, pad_token_id=0)
    for bt, s in ((a, 2), (c, 1)):
        for slab in bt.cache.slabs:
            slab.update(torch.ones(1, 2, s, 4), torch.ones(1, 2, s, 4))
        bt.advance([9])
    m = Batch.concatenate([a, c])
    assert m.request_ids == ["a", "c"]
    assert m.cache.length == 5
    assert m.attention_mask.tolist() == [[1] * 6, [0, 0, 0, 0, 1, 1]]
    k, _ = m.cache.slabs[1].valid()
    assert torch.all(k[1, :, :4] == 0) and torch.all(k[0, :, :3] == 1.0)


def test_new_slabs_never_expose_uninitialised_memory(monkeypatch) -> None:
    """The verbs allocate slabs uninitialised and must write every valid column: with allocations filled with
    NaN (what garbage may hold; a NaN pad would leak through attention as 0 * NaN), every valid column is
    finite after from_requests, concatenate and filter, and pads are exactly zero."""
    from app.engine.kv import SlabCache

    original = SlabCache.allocate.__func__  # type: ignore[attr-defined]

    def poisoned(cls, **kwargs):  # type: ignore[no-untyped-def]
        cache = original(cls, **kwargs)
        for slab in cache.slabs:
            slab.keys.fill_(float("nan"))
            slab.values.fill_(float("nan"))
        return cache

    monkeypatch.setattr(SlabCache, "allocate", classmethod(poisoned))
    a = Batch.from_requests([_row("a", [1, 2], _prefix(3, 1.0)), _row("b", [4], _prefix(1, 2.0))],
                            geometry=G, pad_token_id=0)
    c = Batch.from_requests([_row("c", [1], None)], geometry=G, pad_token_id=0)
    for bt, s in ((a, 2), (c, 1)):
        for slab in bt.cache.slabs:
            slab.update(torch.ones(len(bt), 2, s, 4), torch.ones(len(bt), 2, s, 4))
        bt.advance([9] * len(bt))
    merged = Batch.concatenate([a, c])
    kept = merged.filter({"b", "c"})
    assert kept is not None
    for bt in (a, c, merged, kept):
        for slab in bt.cache.slabs:
            for t in slab.valid():
                assert torch.isfinite(t).all()
    k, _ = merged.cache.slabs[0].valid()  # row c: 4 pad columns, then its prompt token
    assert torch.all(k[2, :, :4] == 0)
    k, _ = kept.cache.slabs[0].valid()  # row b: [pad pad | prefix | pad | prompt], trimmed to its prefix
    assert kept.cache.length == 3 and torch.all(k[0, :, 0] == 2.0)
