"""The training forward: right-padded batches at served positions, and train/serve equivalence.

The key contract: a prefix trained here gives, in the serving engine (left-padded batches with other prefixes)
and in HF PEFT (`PeftModel.forward`), the logits the trainer optimized.
"""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from app.engine.batch import Batch, NewRow
from app.engine.model import load_model
from app.engine.runner import ModelRunner, geometry_of
from app.engine.sampling import SamplerState, SamplingParams
from app.jobs.types import TrainConfig
from app.training.forward import PrefixForward, collate
from app.training.trainer import train_prefix
from prefix_store.peft_codec import encode_peft
from tests.engine.helpers import random_prefix
from tests.engine.test_peft_equivalence import _peft_greedy
from tests.training.helpers import example, toy_task

PROMPTS = [[40, 41, 42, 7], [50, 7], [45, 46, 47, 48, 49, 50, 7], [60]]


def _trained(loaded, projection: bool, p: int = 5):
    config = TrainConfig(num_virtual_tokens=p, prefix_projection=projection, max_steps=12, batch_size=4,
                         learning_rate=3e-2, seed=1)
    return train_prefix(loaded, toy_task(12), None, config).prefix


def test_collate_right_pads_at_served_positions() -> None:
    batch = collate(
        [example([1, 2, 3], [4, 5]), example([6], [7])], num_virtual_tokens=3, pad_token_id=0,
        device=torch.device("cpu"),
    )
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5], [6, 7, 0, 0, 0]]
    assert batch.position_ids.tolist() == [[3, 4, 5, 6, 7]] * 2  # P + j whatever the padding
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0, 0]]
    # targets 4, 5 (row 0, predicted from columns 2, 3) and 7 (row 1, from column 0)
    assert list(zip(batch.rows.tolist(), batch.cols.tolist(), batch.labels.tolist(), strict=True)) == [
        (0, 2, 4), (0, 3, 5), (1, 0, 7),
    ]
    assert batch.real_tokens == 7 and batch.num_targets == 3


def test_collate_drops_a_target_at_column_zero() -> None:
    batch = collate([example([], [4, 5])], num_virtual_tokens=1, pad_token_id=0, device=torch.device("cpu"))
    assert batch.labels.tolist() == [5]


def test_padding_does_not_change_a_row(tiny) -> None:
    """A row's target logits are the same alone and right-padded next to a longer row."""
    prefix = random_prefix(tiny, 4, seed=3)
    fwd = PrefixForward(tiny.model)
    short, long = example([40, 41], [42, 43]), example(list(range(50, 70)), [71])
    with torch.no_grad():
        alone = fwd.target_logits(prefix.keys, prefix.values, collate([short], num_virtual_tokens=4,
                                                                      pad_token_id=0, device=tiny.device))
        padded = fwd.target_logits(prefix.keys, prefix.values, collate([short, long], num_virtual_tokens=4,
                                                                       pad_token_id=0, device=tiny.device))
    torch.testing.assert_close(padded[:2], alone, rtol=0, atol=1e-5)


@pytest.mark.parametrize("projection", [False, True])
def test_trained_prefix_logits_equal_the_engine(tiny, projection) -> None:
    """Next-token logits of the engine (left-padded batch, mixed prefix lengths) == the trainer's, within 1e-4."""
    trained = _trained(tiny, projection)
    other = random_prefix(tiny, 9, seed=4)  # a neighbour with another prefix length shifts the padding
    prefixes = [trained, other, trained, trained]
    rows = [
        NewRow(str(i), prompt, prefix, SamplerState.create(SamplingParams(max_tokens=1, temperature=0.0), tiny.device))
        for i, (prompt, prefix) in enumerate(zip(PROMPTS, prefixes, strict=True))
    ]
    batch = Batch.from_requests(rows, geometry=geometry_of(tiny.model, tiny.device, tiny.dtype),
                                pad_token_id=int(tiny.tokenizer.pad_token_id))
    served = ModelRunner(tiny.model).forward(batch)  # [B, V]

    mine = [PROMPTS[i] for i in (0, 2, 3)]
    # The trainer predicts a (dummy) target after the prompt from the prompt's last hidden state.
    train_batch = collate([example(p, [0]) for p in mine], num_virtual_tokens=trained.num_virtual_tokens,
                          pad_token_id=int(tiny.tokenizer.pad_token_id), device=tiny.device)
    with torch.no_grad():
        trainer_logits = PrefixForward(tiny.model).target_logits(trained.keys, trained.values, train_batch)
    torch.testing.assert_close(served[[0, 2, 3]], trainer_logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2"])
def test_trained_prefix_exported_to_peft_gives_the_same_greedy_tokens(tmp_path, preset, projection) -> None:
    # A fresh model: PeftModel wraps the model object it is given, and the session's models are shared.
    loaded = load_model(f"random:{preset}", data_dir=tmp_path)
    trained = _trained(loaded, projection)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for name, data in encode_peft(trained, spec=loaded.spec, base_model_name_or_path=preset).items():
        (adapter / name).write_bytes(data)
    peft_model = PeftModel.from_pretrained(loaded.model, str(adapter))
    peft_model.eval()
    fwd = PrefixForward(loaded.model)
    pad = int(loaded.tokenizer.pad_token_id)
    ours = []
    for prompt in PROMPTS[:3]:
        ids = list(prompt)
        for _ in range(6):  # the trainer's own greedy continuation
            batch = collate([example(ids, [0])], num_virtual_tokens=5, pad_token_id=pad, device=loaded.device)
            with torch.no_grad():
                ids.append(int(fwd.target_logits(trained.keys, trained.values, batch)[0].argmax()))
        ours.append(ids[len(prompt) :])
    assert [_peft_greedy(peft_model, prompt, 6) for prompt in PROMPTS[:3]] == ours
    # the prefix matters: the bare model continues differently
    assert [_peft_greedy(loaded.model, prompt, 6) for prompt in PROMPTS[:3]] != ours
