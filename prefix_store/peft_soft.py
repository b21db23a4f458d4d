"""Import and export of HF PEFT soft prompts: PROMPT_TUNING and P_TUNING adapters (docs/prefix-format.md).

Both learn input embeddings that PEFT puts in front of the prompt's token embeddings. `adapter_config.json` has
peft_type PROMPT_TUNING or P_TUNING, num_virtual_tokens and token_dim (= the model's hidden size);
`adapter_model.safetensors` holds:

- `prompt_embeddings` [P, token_dim]: what `PeftModel.save_pretrained` writes for both methods. For P_TUNING
  it is already the prompt encoder's *output* (peft 0.21 `get_prompt_embedding_to_save` runs the MLP/LSTM), and
  PEFT in inference mode uses it as is; so it is stored as it is.
- or, P_TUNING only, the prompt encoder's own weights (`embedding.weight`, `mlp_head.*`, `lstm_head.*`, bare or
  under `prompt_encoder.<adapter>.`, as a training checkpoint of the module holds them): PEFT's PromptEncoder
  (`encoder_reparameterization_type` MLP or LSTM) is run once here and its output stored.

`decode_peft_adapter` takes an adapter of any of the three methods (PREFIX_TUNING goes to peft_codec.py).
"""

from __future__ import annotations

import json
from typing import Any

import torch

from prefix_store.peft_codec import (
    PEFT_FORMAT_VERSION,
    WEIGHTS_KEY,
    PeftInfo,
    cfg_int,
    check_decoder_only,
    decode_peft,
    parse_config_object,
    recorded_base_model,
)
from prefix_store.peft_zip import CONFIG_NAME, WEIGHTS_NAME, read_peft_zip, zip_files
from prefix_store.soft_codec import check_embeddings
from prefix_store.types import ModelSpec, PrefixError, PrefixKind, PrefixTensors, SoftPrompt
from prefix_store.validate import (
    check_finite,
    check_size,
    check_virtual_tokens,
    dump_safetensors,
    load_checked,
    parse_header,
)

SOFT_PEFT_TYPES = {"PROMPT_TUNING": "prompt_tuning", "P_TUNING": "p_tuning"}
PEFT_TYPES = ("PREFIX_TUNING", *SOFT_PEFT_TYPES)
ENCODER_TYPES = ("MLP", "LSTM")


def decode_peft_adapter(
    config_json: bytes, weights: bytes, *, spec: ModelSpec, max_virtual_tokens: int, max_bytes: int
) -> tuple[PrefixTensors, PeftInfo]:
    """A PEFT PREFIX_TUNING, PROMPT_TUNING or P_TUNING adapter checked against `spec`: PrefixKV or SoftPrompt."""
    check_size(len(config_json) + len(weights), max_bytes, "PEFT adapter")
    cfg = parse_config_object(config_json)
    peft_type = cfg.get("peft_type")
    if peft_type == "PREFIX_TUNING":
        return decode_peft(config_json, weights, spec=spec, max_virtual_tokens=max_virtual_tokens,
                           max_bytes=max_bytes)
    if peft_type not in SOFT_PEFT_TYPES:
        raise PrefixError(f"PEFT adapter peft_type is {peft_type!r}, expected one of {list(PEFT_TYPES)}")
    return _decode_soft(cfg, str(peft_type), weights, spec, max_virtual_tokens)


def decode_peft_adapter_zip(
    data: bytes, *, spec: ModelSpec, max_virtual_tokens: int, max_bytes: int
) -> tuple[PrefixTensors, PeftInfo]:
    """A zipped PEFT adapter directory of any of the three methods (read as peft_zip.read_peft_zip reads)."""
    config_json, weights = read_peft_zip(data, max_bytes=max_bytes)
    return decode_peft_adapter(config_json, weights, spec=spec, max_virtual_tokens=max_virtual_tokens,
                               max_bytes=max_bytes)


def _decode_soft(
    cfg: dict[str, object], peft_type: str, weights: bytes, spec: ModelSpec, max_virtual_tokens: int
) -> tuple[SoftPrompt, PeftInfo]:
    check_decoder_only(cfg)
    p = cfg_int(cfg, "num_virtual_tokens")
    check_virtual_tokens(p, max_virtual_tokens)
    token_dim = cfg_int(cfg, "token_dim")
    if token_dim != spec.hidden_size:
        raise PrefixError(f"PEFT adapter token_dim is {token_dim}, the served model {spec.model_id!r} needs its "
                          f"hidden size {spec.hidden_size}")
    what = f"PEFT {WEIGHTS_NAME}"
    tensors, _ = parse_header(weights, what)
    if set(tensors) == {WEIGHTS_KEY}:
        shape = tensors[WEIGHTS_KEY].shape
        if shape != (p, token_dim):
            raise PrefixError(f"{what}: {WEIGHTS_KEY} has shape {list(shape)}, expected "
                              f"[num_virtual_tokens, token_dim] = {[p, token_dim]}")
        embeddings = load_checked(weights)[WEIGHTS_KEY].to(torch.float32)  # f16/bf16 -> f32 is exact
    elif peft_type == "P_TUNING":
        embeddings = run_prompt_encoder(cfg, load_checked(weights), p, token_dim)
    else:
        raise PrefixError(f"{what}: expected the one tensor {WEIGHTS_KEY!r}, found {sorted(tensors)[:20]}")
    check_finite(WEIGHTS_KEY, embeddings)
    embeddings = embeddings.contiguous()
    check_embeddings(embeddings, spec)
    name = recorded_base_model(cfg)
    info = PeftInfo(base_model_name_or_path=name, num_virtual_tokens=p, prefix_projection=False,
                    name_mismatch=name is not None and name != spec.model_id)
    metadata = {"peft_type": peft_type}
    if peft_type == "P_TUNING":
        metadata["encoder_reparameterization_type"] = _encoder_type(cfg)
    kind: PrefixKind = "p_tuning" if peft_type == "P_TUNING" else "prompt_tuning"
    return SoftPrompt(embeddings=embeddings, kind=kind, created_by="hf-peft", metadata=metadata), info


def _encoder_type(cfg: dict[str, object]) -> str:
    value = cfg.get("encoder_reparameterization_type", "MLP")
    if value not in ENCODER_TYPES:
        raise PrefixError(f"PEFT adapter encoder_reparameterization_type is {value!r}, expected one of "
                          f"{list(ENCODER_TYPES)}")
    return str(value)


def run_prompt_encoder(cfg: dict[str, object], state: dict[str, torch.Tensor], p: int, token_dim: int) -> torch.Tensor:
    """P_TUNING's prompt encoder output [P, token_dim] (float32) from its weights, computed once by PEFT's own
    PromptEncoder (MLP or LSTM head) in eval mode, as `get_prompt_embedding_to_save` computes it."""
    try:
        from peft import PromptEncoder, PromptEncoderConfig  # heavy (accelerate): only this form of upload needs it
    except ImportError:  # pragma: no cover - peft is a dependency; a trimmed install may lack it
        raise PrefixError("this P_TUNING adapter holds its prompt encoder's weights, and running it needs the "
                          "`peft` package, which is not installed; upload PEFT's save_pretrained output "
                          "(prompt_embeddings) instead") from None
    hidden = cfg.get("encoder_hidden_size")
    layers = cfg.get("encoder_num_layers", 2)
    if not isinstance(hidden, int) or isinstance(hidden, bool) or hidden < 1:
        raise PrefixError(f"PEFT adapter encoder_hidden_size must be a positive integer, found {hidden!r}")
    if not isinstance(layers, int) or isinstance(layers, bool) or not 1 <= layers <= 16:
        raise PrefixError(f"PEFT adapter encoder_num_layers must be an integer in 1..16, found {layers!r}")
    config = PromptEncoderConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=p, token_dim=token_dim, num_transformer_submodules=1,
        encoder_reparameterization_type=_encoder_type(cfg), encoder_hidden_size=hidden,
        encoder_num_layers=layers, inference_mode=False,  # inference mode would build no MLP/LSTM head
    )
    weights = _strip_module_prefix({k: v.to(torch.float32) for k, v in state.items()})
    # Built as PEFT builds it, its random init drawn on a forked RNG so the process-global one is left as it was
    # (the weights replace that init anyway).
    with torch.random.fork_rng(devices=[]):
        encoder: Any = PromptEncoder(config)  # type: ignore[no-untyped-call]  # untyped in peft
    try:
        encoder.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        expected = sorted(k for k, _ in encoder.state_dict().items())
        raise PrefixError(f"PEFT {WEIGHTS_NAME}: the P_TUNING prompt encoder's weights do not fit its config "
                          f"(expected tensors {expected[:12]}, found {sorted(weights)[:12]}): "
                          f"{str(exc).splitlines()[0][:300]}") from None
    encoder.eval()
    with torch.no_grad():
        out: torch.Tensor = encoder(torch.arange(p).unsqueeze(0))[0]  # [P, token_dim]
    return out.detach().to(torch.float32)


def _strip_module_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`prompt_encoder.<adapter>.embedding.weight` -> `embedding.weight`, when every key has that prefix."""
    keys = list(state)
    if keys and all(k.startswith("prompt_encoder.") and k.count(".") >= 3 for k in keys):
        prefixes = {".".join(k.split(".")[:2]) for k in keys}
        if len(prefixes) == 1:
            return {k.split(".", 2)[2]: v for k, v in state.items()}
    return state


def encode_peft_soft(prompt: SoftPrompt, *, spec: ModelSpec, base_model_name_or_path: str) -> dict[str, bytes]:
    """A soft prompt as a PEFT adapter directory `PeftModel.from_pretrained` loads ({file name: bytes}): PROMPT_TUNING,
    or P_TUNING for one imported as P_TUNING (inference mode: PEFT uses `prompt_embeddings`, the encoder's
    output, as is). prompt_embeddings is float32 [P, hidden]."""
    check_embeddings(prompt.embeddings, spec)
    common: dict[str, object] = {
        "auto_mapping": None, "base_model_name_or_path": base_model_name_or_path, "inference_mode": True,
        "modules_to_save": None, "num_attention_heads": None, "num_layers": spec.num_layers,
        "num_transformer_submodules": 1, "num_virtual_tokens": prompt.num_virtual_tokens,
        "peft_version": PEFT_FORMAT_VERSION, "revision": None, "task_type": "CAUSAL_LM",
        "token_dim": spec.hidden_size,
    }
    if prompt.kind == "p_tuning":
        config = {**common, "peft_type": "P_TUNING", "encoder_dropout": 0.0, "encoder_hidden_size": spec.hidden_size,
                  "encoder_num_layers": 2,
                  "encoder_reparameterization_type": prompt.metadata.get("encoder_reparameterization_type", "MLP")}
    else:
        config = {**common, "peft_type": "PROMPT_TUNING", "prompt_tuning_init": "RANDOM",
                  "prompt_tuning_init_text": None, "tokenizer_kwargs": None, "tokenizer_name_or_path": None}
    weights = prompt.embeddings.detach().to(device="cpu", dtype=torch.float32).contiguous()
    return {
        CONFIG_NAME: json.dumps(config, indent=2, sort_keys=True).encode("utf-8"),
        WEIGHTS_NAME: dump_safetensors({WEIGHTS_KEY: weights}, {"format": "pt"}),
    }


def encode_peft_soft_zip(prompt: SoftPrompt, *, spec: ModelSpec, base_model_name_or_path: str) -> bytes:
    """`encode_peft_soft` as one deterministic zip, the files at its root."""
    return zip_files(encode_peft_soft(prompt, spec=spec, base_model_name_or_path=base_model_name_or_path))
