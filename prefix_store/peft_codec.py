"""Import and export of HF PEFT prefix-tuning adapters (docs/prefix-format.md), bit-exact with peft 0.21.

An adapter directory holds `adapter_config.json` (peft_type PREFIX_TUNING, num_virtual_tokens, num_layers,
num_attention_heads = KV heads, token_dim = kv_heads * head_dim, ...) and `adapter_model.safetensors` with one
tensor `prompt_embeddings`, [P, num_layers * 2 * token_dim]:
`flat[t, ((2*l + s) * kv_heads + h) * head_dim + d]`, s=0 key, s=1 value.

With `prefix_projection=true`, peft saves the *output* of its MLP (`get_prompt_embedding_to_save` runs the
prompt encoder) and not the MLP; on load (inference_mode) it builds a plain embedding of that size and
`get_prompt` reads it directly. So both settings decode the same way here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from prefix_store.peft_zip import CONFIG_NAME, WEIGHTS_NAME, read_peft_zip, zip_files
from prefix_store.types import ModelSpec, PrefixError, PrefixKV
from prefix_store.validate import (
    check_finite,
    check_kv,
    check_size,
    check_virtual_tokens,
    dump_safetensors,
    load_checked,
    parse_header,
    require_names,
)

WEIGHTS_KEY = "prompt_embeddings"
PEFT_FORMAT_VERSION = "0.21.2"  # the peft release whose adapter_config.json we reproduce


@dataclass(frozen=True)
class PeftInfo:
    """What an imported adapter recorded about itself."""

    base_model_name_or_path: str | None
    num_virtual_tokens: int
    prefix_projection: bool
    name_mismatch: bool  # the recorded base model name differs from the served model's id


def decode_peft(
    config_json: bytes, weights: bytes, *, spec: ModelSpec, max_virtual_tokens: int, max_bytes: int
) -> tuple[PrefixKV, PeftInfo]:
    """Check a PEFT prefix-tuning adapter against `spec`; return float32 keys/values [L, kv_heads, P, hd].

    A PEFT adapter has no fingerprint: it is accepted when its shapes match the served model, and
    `PeftInfo.name_mismatch` tells the caller when its recorded base model name differs.
    """
    check_size(len(config_json) + len(weights), max_bytes, "PEFT adapter")
    cfg = _parse_config(config_json)
    p = cfg_int(cfg, "num_virtual_tokens")
    check_virtual_tokens(p, max_virtual_tokens)
    for field, expected in (
        ("num_layers", spec.num_layers),
        ("num_attention_heads", spec.num_kv_heads),
        ("token_dim", spec.token_dim),
    ):
        found = cfg_int(cfg, field)
        if found != expected:
            raise PrefixError(
                f"PEFT adapter {field} is {found}, the served model {spec.model_id!r} needs {expected} "
                f"(num_attention_heads = KV heads {spec.num_kv_heads}, token_dim = KV heads * head_dim "
                f"{spec.num_kv_heads} * {spec.head_dim})"
            )
    what = f"PEFT {WEIGHTS_NAME}"
    tensors, _ = parse_header(weights, what)
    require_names(tensors, {WEIGHTS_KEY}, what)
    expected_shape = (p, spec.num_layers * 2 * spec.token_dim)
    if tensors[WEIGHTS_KEY].shape != expected_shape:
        raise PrefixError(
            f"{what}: {WEIGHTS_KEY} has shape {list(tensors[WEIGHTS_KEY].shape)}, expected "
            f"[num_virtual_tokens, num_layers * 2 * token_dim] = {list(expected_shape)}"
        )
    flat = load_checked(weights)[WEIGHTS_KEY].to(torch.float32)  # f16/bf16 -> f32 is exact
    check_finite(WEIGHTS_KEY, flat)
    keys, values = flat_to_kv(flat, spec)
    keys, values = keys.contiguous(), values.contiguous()
    check_kv(keys, values, spec)
    name = recorded_base_model(cfg)
    projection = cfg.get("prefix_projection", False)
    if not isinstance(projection, bool):
        raise PrefixError(f"PEFT adapter prefix_projection must be true or false, found {projection!r}")
    info = PeftInfo(
        base_model_name_or_path=name,
        num_virtual_tokens=p,
        prefix_projection=projection,
        name_mismatch=name is not None and name != spec.model_id,
    )
    return PrefixKV(keys=keys, values=values, base_fingerprint=None, created_by="hf-peft"), info


def recorded_base_model(cfg: dict[str, object]) -> str | None:
    """The adapter's `base_model_name_or_path` (a string or null)."""
    name = cfg.get("base_model_name_or_path")
    if name is not None and not isinstance(name, str):
        raise PrefixError(f"PEFT adapter base_model_name_or_path must be a string or null, found {name!r}")
    return name


def flat_to_kv(flat: torch.Tensor, spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's flat prefix [P, L*2*token_dim] -> (keys, values), each [L, kv_heads, P, head_dim].

    Pure view/permute (no copy, differentiable): the trainer builds its prefix through this same function, so
    training, export and import share one definition of the layout.
    """
    p = flat.shape[0]
    # [P, L*2*H*D] -> [P, L, 2, H, D] -> [2, L, H, P, D]
    kv = flat.view(p, spec.num_layers, 2, spec.num_kv_heads, spec.head_dim).permute(2, 1, 3, 0, 4)
    return kv[0], kv[1]


def kv_to_flat(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The inverse of `flat_to_kv`: keys/values [L, kv_heads, P, head_dim] -> [P, L*2*kv_heads*head_dim]."""
    layers, heads, p, head_dim = keys.shape
    # [L, H, P, D] x2 -> [L, 2, H, P, D] -> [P, L, 2, H, D] -> [P, L*2*H*D]
    flat = torch.stack([keys, values], dim=1).permute(3, 0, 1, 2, 4)
    return flat.reshape(p, layers * 2 * heads * head_dim)


def parse_config_object(config_json: bytes) -> dict[str, object]:
    """adapter_config.json as a dict (any peft_type); PrefixError when it is not a JSON object."""
    try:
        cfg = json.loads(config_json.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise PrefixError(f"PEFT {CONFIG_NAME} is not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise PrefixError(f"PEFT {CONFIG_NAME} must be a JSON object, found {type(cfg).__name__}")
    return cfg


def _parse_config(config_json: bytes) -> dict[str, object]:
    cfg = parse_config_object(config_json)
    if cfg.get("peft_type") != "PREFIX_TUNING":
        raise PrefixError(f"PEFT adapter peft_type is {cfg.get('peft_type')!r}, expected 'PREFIX_TUNING'")
    check_decoder_only(cfg)
    return cfg


def check_decoder_only(cfg: dict[str, object]) -> None:
    """task_type CAUSAL_LM (or absent) and one transformer submodule: an adapter for a decoder-only model."""
    if cfg.get("task_type") not in ("CAUSAL_LM", None):
        raise PrefixError(f"PEFT adapter task_type is {cfg.get('task_type')!r}, expected 'CAUSAL_LM'")
    if cfg.get("num_transformer_submodules") not in (1, None):
        raise PrefixError(
            f"PEFT adapter num_transformer_submodules is {cfg.get('num_transformer_submodules')!r}, "
            "expected 1 (decoder-only model)"
        )


def cfg_int(cfg: dict[str, object], field: str) -> int:
    value = cfg.get(field)
    if not isinstance(value, int) or isinstance(value, bool):
        raise PrefixError(f"PEFT adapter {field} must be an integer, found {value!r}")
    return value


def encode_peft(prefix: PrefixKV, *, spec: ModelSpec, base_model_name_or_path: str) -> dict[str, bytes]:
    """Export a prefix as a PEFT adapter directory loadable by `PeftModel.from_pretrained`.

    Returns {file name: bytes}. prompt_embeddings is float32 [P, L*2*token_dim] (f16/bf16 prefixes are
    widened exactly); prefix_projection is false because only the KV prefix exists.
    """
    check_kv(prefix.keys, prefix.values, spec)
    p = prefix.num_virtual_tokens
    flat = kv_to_flat(prefix.keys, prefix.values).to(torch.float32).contiguous()
    config = {
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "encoder_hidden_size": spec.token_dim,
        "inference_mode": True,
        "init_weights": None,
        "modules_to_save": None,
        "num_attention_heads": spec.num_kv_heads,
        "num_layers": spec.num_layers,
        "num_transformer_submodules": 1,
        "num_virtual_tokens": p,
        "peft_type": "PREFIX_TUNING",
        "peft_version": PEFT_FORMAT_VERSION,
        "prefix_projection": False,
        "revision": None,
        "task_type": "CAUSAL_LM",
        "token_dim": spec.token_dim,
    }
    return {
        CONFIG_NAME: json.dumps(config, indent=2, sort_keys=True).encode("utf-8"),
        WEIGHTS_NAME: dump_safetensors({WEIGHTS_KEY: flat}, {"format": "pt"}),
    }


def encode_peft_zip(
    prefix: PrefixKV, *, spec: ModelSpec, base_model_name_or_path: str, folder: str = ""
) -> bytes:
    """`encode_peft` as one deterministic zip; members at the root, or under `folder/` when given."""
    files = encode_peft(prefix, spec=spec, base_model_name_or_path=base_model_name_or_path)
    return zip_files(files, folder=folder)


def decode_peft_zip(
    data: bytes, *, spec: ModelSpec, max_virtual_tokens: int, max_bytes: int
) -> tuple[PrefixKV, PeftInfo]:
    """Decode a zipped PEFT adapter directory (possibly inside one subfolder).

    Only adapter_config.json and adapter_model.safetensors are read. Refused: unsafe member names (zip slip),
    encrypted members, declared or actual uncompressed sizes above max_bytes (zip bombs), ambiguous archives.
    """
    config_json, weights = read_peft_zip(data, max_bytes=max_bytes)
    return decode_peft(
        config_json, weights, spec=spec, max_virtual_tokens=max_virtual_tokens, max_bytes=max_bytes
    )
