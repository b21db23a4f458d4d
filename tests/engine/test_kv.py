"""The slab cache's room-making verbs, for a forward that writes new keys/values into the slabs itself."""

from __future__ import annotations

import torch

from app.engine.kv import SlabCache


def test_reserve_grows_every_layer_keeping_the_valid_part_and_advance_counts_the_new_tokens() -> None:
    cache = SlabCache.allocate(num_layers=2, shape=(2, 1, 3, 4), headroom=0, dtype=torch.float64,
                               device=torch.device("cpu"))
    for slab in cache.slabs:
        slab.keys[:, :, :3] = torch.arange(24.0, dtype=torch.float64).view(2, 1, 3, 4)
        slab.values[:, :, :3] = -1.0
    capacity = cache.slabs[0].keys.shape[2]
    keys, values = cache.reserve(capacity)  # more than the free room: every layer grows
    assert cache.length == 3 and all(k.shape[2] >= capacity + 3 for k in keys)
    assert [k.data_ptr() for k in keys] == [s.keys.data_ptr() for s in cache.slabs]
    for k, v in zip(keys, values, strict=True):
        assert torch.equal(k[:, :, :3], torch.arange(24.0, dtype=torch.float64).view(2, 1, 3, 4))
        assert bool((v[:, :, :3] == -1.0).all())
        k[:, :, 3:5] = 7.0
    cache.advance(2)
    assert cache.length == 5 and all(s.length == 5 for s in cache.slabs)
    assert bool((cache.slabs[1].valid()[0][:, :, 3:] == 7.0).all())
    before = [s.keys for s in cache.slabs]
    cache.reserve(1)  # room enough: nothing moves
    assert all(s.keys is k for s, k in zip(cache.slabs, before, strict=True))
