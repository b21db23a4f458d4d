"""Prompt tuning (Lester et al., 2021; PEFT PROMPT_TUNING): train learned input embeddings on the frozen model.

The trained tensor is the soft prompt, [P, hidden]: P rows that go through the model in front of each example's
token embeddings, at positions 0..P-1, the tokens after them at P + j (the served convention, app/engine/
soft_inputs.py). Only these rows take gradients; the model is used as for prefix-tuning (app/training/forward.py:
frozen, shared with the engine, LM head only on the target positions).

`training_method` gives the trainer (app/training/trainer.py) what it needs for either kind: the trainable module
and the loss of a batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers import PreTrainedModel

from app.engine.model import LoadedModel
from app.jobs.types import TrainConfig
from app.training.forward import PrefixForward, TrainBatch, behind
from app.training.prefix_params import CREATED_BY, PrefixParameters
from prefix_store.types import PrefixKV, PrefixTensors, SoftPrompt

LossFn = Callable[[TrainBatch], torch.Tensor]
"""The summed cross-entropy (a scalar) of a batch's targets."""


class SoftPromptParameters(torch.nn.Module):
    """The trainable soft prompt: `embedding.weight` [P, hidden] float32 (PEFT's PromptEmbedding layout)."""

    def __init__(self, init: torch.Tensor, fingerprint: str) -> None:
        """`init`: the starting embeddings [P, hidden] (a warm start, real tokens' or sampled tokens' embeddings)."""
        super().__init__()
        self.embedding = torch.nn.Embedding(init.shape[0], init.shape[1], device="meta").to_empty(device=init.device)
        with torch.no_grad():
            self.embedding.weight.copy_(init.float())
        self.fingerprint = fingerprint

    @torch.no_grad()
    def export(self, metadata: dict[str, str] | None = None) -> SoftPrompt:
        """A detached float32 CPU SoftPrompt [P, hidden] (what is stored and served)."""
        return SoftPrompt(embeddings=self.embedding.weight.detach().to("cpu", torch.float32).contiguous(),
                          kind="prompt_tuning", base_fingerprint=self.fingerprint, created_by=CREATED_BY,
                          metadata=dict(metadata or {}))


class SoftPromptForward:
    """The training forward of a soft prompt: [soft (P) | tokens_i | pad] as input embeddings, right-padded."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.split = PrefixForward(model)  # the decoder body and the LM head, apart
        self.embed = model.get_input_embeddings()

    def loss_sum(self, embeddings: torch.Tensor, batch: TrainBatch) -> torch.Tensor:
        """Summed cross-entropy of `batch` (collated for P virtual tokens: mask [B, P + S], positions P + j) behind
        the soft prompt `embeddings` [P, hidden]."""
        b, p = int(batch.input_ids.shape[0]), int(embeddings.shape[0])
        tokens = self.embed(batch.input_ids)  # [B, S, hidden]
        soft = embeddings.to(tokens.dtype).unsqueeze(0).expand(b, -1, -1)  # [B, P, hidden]; backward sums rows
        positions = torch.arange(p, device=tokens.device).expand(b, p)
        out = self.split.body(inputs_embeds=torch.cat([soft, tokens], dim=1), attention_mask=batch.attention_mask,
                              position_ids=torch.cat([positions, batch.position_ids], dim=1), use_cache=False)
        hidden = out.last_hidden_state[:, p:][batch.rows, batch.cols]  # [N, hidden]
        logits = self.split.head(hidden).float()
        return torch.nn.functional.cross_entropy(logits, batch.labels, reduction="sum")


def token_embeddings(loaded: LoadedModel, token_ids: Sequence[int], num_virtual_tokens: int) -> torch.Tensor:
    """The model's input embeddings [P, hidden] (float32) of `token_ids` cycled or cut to P tokens: PEFT's TEXT
    init with the first example's tokens as the text."""
    if not token_ids:
        raise ValueError("token_embeddings needs at least one token id")
    ids = [token_ids[i % len(token_ids)] for i in range(num_virtual_tokens)]
    with torch.no_grad():
        out: torch.Tensor = loaded.model.get_input_embeddings()(torch.tensor(ids, device=loaded.device))
    return out.float()


def sampled_embeddings(loaded: LoadedModel, num_virtual_tokens: int, seed: int) -> torch.Tensor:
    """Input embeddings [P, hidden] of P vocabulary tokens drawn with `seed` (PEFT's SAMPLE_VOCAB init): random,
    but at the scale of real embeddings, where PEFT's RANDOM init (N(0, 1)) is far larger than most models'."""
    gen = torch.Generator().manual_seed(seed)
    vocab = int(loaded.model.config.vocab_size)
    ids = torch.randint(0, vocab, (num_virtual_tokens,), generator=gen).tolist()
    return token_embeddings(loaded, ids, num_virtual_tokens)


def training_method(loaded: LoadedModel, config: TrainConfig, init: PrefixTensors | None,
                    base: PrefixKV | None) -> tuple[torch.nn.Module, LossFn]:
    """(the trainable module, the loss of a batch) for `config.kind`. prefix_tuning: PrefixParameters behind the
    frozen `base`; prompt_tuning: SoftPromptParameters from `init` (a SoftPrompt warm start) or sampled tokens'
    embeddings (the caller passes real tokens' embeddings as a SoftPrompt for the real_tokens init)."""
    if config.kind == "prompt_tuning":
        if base is not None or isinstance(init, PrefixKV):
            raise ValueError("prompt tuning takes no base prefix and only a soft prompt as its warm start")
        start = init.embeddings if init is not None else sampled_embeddings(loaded, config.num_virtual_tokens,
                                                                             config.seed)
        expected = (config.num_virtual_tokens, loaded.spec.hidden_size)
        if tuple(start.shape) != expected:
            raise ValueError(f"the warm-start soft prompt has shape {list(start.shape)}, expected [P, hidden] = "
                             f"{list(expected)}")
        soft = SoftPromptParameters(start.to(loaded.device), loaded.spec.fingerprint)
        forward = SoftPromptForward(loaded.model)
        return soft, lambda batch: forward.loss_sum(soft.embedding.weight, batch)
    if isinstance(init, SoftPrompt):
        raise ValueError("prefix tuning cannot start from a soft prompt")
    prefix = PrefixParameters(loaded.spec, config.num_virtual_tokens, projection=config.prefix_projection,
                              encoder_hidden_size=config.encoder_hidden_size, init=init, seed=config.seed,
                              device=loaded.device)
    kv_forward = PrefixForward(loaded.model)
    return prefix, lambda batch: kv_forward.loss_sum(*behind(base, *prefix.kv()), batch)
