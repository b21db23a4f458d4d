"""A new prefix starts from the model's own keys/values of real tokens (app/training/init_kv.py)."""

from __future__ import annotations

import pytest
import torch

from app.engine.batch import Batch, NewRow
from app.engine.runner import ModelRunner, geometry_of
from app.engine.sampling import SamplerState, SamplingParams
from app.jobs.types import TokenizedExample, TrainConfig
from app.training.init_kv import init_token_ids, real_token_kv
from app.training.trainer import train_prefix
from prefix_store.stack import concat_prefixes
from tests.engine.helpers import random_prefix
from tests.training.helpers import toy_task


def _next_logits(loaded, prompt: list[int], prefix) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """The engine's next-token logits [V] for `prompt` after `prefix` (None: no prefix)."""
    geometry = geometry_of(loaded.model, loaded.device, loaded.dtype)
    sampler = SamplerState.create(SamplingParams(max_tokens=1, temperature=0.0), loaded.device)
    batch = Batch.from_requests([NewRow("r", prompt, prefix, sampler)], geometry=geometry,
                                pad_token_id=int(loaded.tokenizer.pad_token_id))
    return ModelRunner(loaded.model).forward(batch)[0]


def test_the_init_is_the_models_own_cache_of_those_tokens(tiny) -> None:  # type: ignore[no-untyped-def]
    """Served as a prefix, the KV of tokens t_0..t_{P-1} must act exactly like those tokens written in the
    prompt: same positions (0..P-1), same keys and values."""
    text, prompt = [40, 41, 42, 43, 44], [50, 51, 52]
    kv = real_token_kv(tiny, text, 5)
    assert kv.keys.shape == (tiny.spec.num_layers, tiny.spec.num_kv_heads, 5, tiny.spec.head_dim)
    assert kv.base_fingerprint == tiny.spec.fingerprint
    as_prefix = _next_logits(tiny, prompt, kv)
    as_text = _next_logits(tiny, text + prompt, None)
    assert torch.allclose(as_prefix, as_text, atol=1e-4)


def test_behind_a_base_the_init_acts_like_its_tokens_written_after_the_base(tiny) -> None:  # type: ignore[no-untyped-def]
    """A prefix trained on top of `base` starts as the KV its tokens get behind the base (positions Pb..): served
    as the stack base+init, it must act exactly like the base followed by those tokens in the prompt."""
    base = random_prefix(tiny, 3, seed=5)
    text, prompt = [40, 41, 42, 43, 44], [50, 51, 52]
    kv = real_token_kv(tiny, text, 5, base)
    as_stack = _next_logits(tiny, prompt, concat_prefixes([base, kv]))
    as_text = _next_logits(tiny, text + prompt, base)
    assert torch.allclose(as_stack, as_text, atol=1e-4)
    assert not torch.allclose(kv.keys, real_token_kv(tiny, text, 5).keys, atol=1e-3)  # the base changed the init


def test_short_text_is_cycled_to_the_prefix_length(tiny_llama) -> None:  # type: ignore[no-untyped-def]
    a = real_token_kv(tiny_llama, [7, 8], 6)
    b = real_token_kv(tiny_llama, [7, 8, 7, 8, 7, 8], 6)
    assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    with pytest.raises(ValueError):
        real_token_kv(tiny_llama, [], 4)


@pytest.mark.parametrize("projection", [False, True])
def test_training_starts_from_the_first_examples_tokens(tiny_llama, projection) -> None:  # type: ignore[no-untyped-def]
    data = toy_task(8)
    config = TrainConfig(num_virtual_tokens=4, batch_size=4, max_steps=1, learning_rate=1e-12,
                         prefix_projection=projection)
    assert config.prefix_init == "real_tokens"  # the default
    result = train_prefix(tiny_llama, data, None, config)
    start = real_token_kv(tiny_llama, data[0].input_ids, 4)
    assert torch.allclose(result.prefix.keys, start.keys, atol=1e-5)
    assert torch.allclose(result.prefix.values, start.values, atol=1e-5)
    random_start = train_prefix(tiny_llama, data, None, TrainConfig(**{**config.__dict__, "prefix_init": "random"}))
    assert not torch.allclose(random_start.prefix.keys, start.keys, atol=1e-2)


def test_a_prefix_longer_than_the_first_example_starts_from_the_next_examples_too() -> None:
    a = TokenizedExample([1, 2, 3], [False, True, True])
    b = TokenizedExample([4, 5], [False, True])
    assert init_token_ids([a, b], 2) == [1, 2]  # P within the first example: its first P tokens, as before
    assert init_token_ids([a, b], 4) == [1, 2, 3, 4]
    assert init_token_ids([a, b], 9) == [1, 2, 3, 4, 5]  # all of them (real_token_kv cycles them to P)


def test_training_starts_from_the_examples_in_order(tiny_llama) -> None:  # type: ignore[no-untyped-def]
    data = toy_task(8)
    p = len(data[0].input_ids) + 2
    config = TrainConfig(num_virtual_tokens=p, batch_size=4, max_steps=1, learning_rate=1e-12)
    result = train_prefix(tiny_llama, data, None, config)
    start = real_token_kv(tiny_llama, data[0].input_ids + data[1].input_ids[:2], p)
    assert torch.allclose(result.prefix.keys, start.keys, atol=1e-5)
    assert torch.allclose(result.prefix.values, start.values, atol=1e-5)
