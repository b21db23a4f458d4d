"""The native soft-prompt format: one safetensors file, `prefixserve-soft-prompt/1` (docs/prefix-format.md).

Tensor: `embeddings`, [num_virtual_tokens, hidden_size], contiguous, float16, bfloat16 or float32.
`__metadata__` (all str): format, kind (prompt_tuning | p_tuning), base_fingerprint, num_virtual_tokens,
hidden_size, dtype, created_by, plus the soft prompt's own metadata entries (which may not reuse those names).

Deterministic like the KV-prefix format (prefix_store/codec.py): equal soft prompts give equal bytes.
"""

from __future__ import annotations

import torch

from prefix_store.types import SOFT_PROMPT_KINDS, ModelSpec, PrefixError, PrefixKind, SoftPrompt
from prefix_store.validate import (
    DTYPE_CODES,
    check_finite,
    check_size,
    check_virtual_tokens,
    dump_safetensors,
    load_checked,
    parse_header,
    require_names,
)

SOFT_FORMAT = "prefixserve-soft-prompt/1"
SOFT_DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_INT_FIELDS = ("num_virtual_tokens", "hidden_size")
RESERVED_METADATA = frozenset({"format", "kind", "base_fingerprint", "dtype", "created_by", *_INT_FIELDS})
_WHAT = "native soft prompt"


def check_embeddings(embeddings: torch.Tensor, spec: ModelSpec | None) -> None:
    """embeddings: [P, hidden], a float dtype; hidden equal to the served model's embedding width when given."""
    if embeddings.dim() != 2:
        raise PrefixError(f"soft prompt embeddings must be 2-D [P, hidden], found shape {list(embeddings.shape)}")
    if embeddings.dtype not in DTYPE_CODES:
        raise PrefixError(f"soft prompt embeddings must be a float dtype, found {embeddings.dtype}")
    if spec is not None:
        if spec.hidden_size < 1:
            raise PrefixError(f"the served model {spec.model_id!r} does not declare its hidden size; soft prompts "
                              "cannot be checked against it")
        if int(embeddings.shape[1]) != spec.hidden_size:
            raise PrefixError(
                f"soft prompt embeddings [P, hidden] = {list(embeddings.shape)} do not fit base model "
                f"{spec.model_id!r}: expected hidden = {spec.hidden_size}"
            )


def encode_soft(prompt: SoftPrompt) -> bytes:
    """Serialize a soft prompt: embeddings [P, hidden] plus metadata, as safetensors bytes."""
    check_embeddings(prompt.embeddings, None)
    dtype_name = str(prompt.embeddings.dtype).removeprefix("torch.")
    if dtype_name not in SOFT_DTYPES:
        raise PrefixError(f"native soft prompts are {', '.join(SOFT_DTYPES)}, found {dtype_name}")
    if not prompt.base_fingerprint:
        raise PrefixError("a native soft prompt needs base_fingerprint (the base model it belongs to), found none")
    if prompt.kind not in SOFT_PROMPT_KINDS:
        raise PrefixError(f"a soft prompt's kind is one of {sorted(SOFT_PROMPT_KINDS)}, found {prompt.kind!r}")
    clash = RESERVED_METADATA & prompt.metadata.keys()
    if clash:
        raise PrefixError(f"soft prompt metadata may not use the reserved names {sorted(clash)}")
    p, hidden = (int(d) for d in prompt.embeddings.shape)
    metadata = {
        **prompt.metadata,
        "format": SOFT_FORMAT,
        "kind": prompt.kind,
        "base_fingerprint": prompt.base_fingerprint,
        "num_virtual_tokens": str(p),
        "hidden_size": str(hidden),
        "dtype": dtype_name,
        "created_by": prompt.created_by,
    }
    return dump_safetensors({"embeddings": prompt.embeddings}, metadata)


def decode_soft(
    data: bytes, *, spec: ModelSpec | None, max_virtual_tokens: int, max_bytes: int
) -> SoftPrompt:
    """Parse and check a native soft prompt; return its embeddings [P, hidden] in the stored dtype.

    spec None: structural checks only. With a spec: the fingerprint must equal the served model's and hidden the
    model's embedding width.
    """
    check_size(len(data), max_bytes, _WHAT)
    tensors, meta = parse_header(data, _WHAT)
    require_names(tensors, {"embeddings"}, _WHAT)
    if meta.get("format") != SOFT_FORMAT:
        raise PrefixError(f"{_WHAT}: metadata format is {meta.get('format')!r}, expected {SOFT_FORMAT!r}")
    missing = sorted((RESERVED_METADATA - {"created_by"}) - meta.keys())
    if missing:
        raise PrefixError(f"{_WHAT}: metadata lacks {missing}")
    kind = meta["kind"]
    if kind not in SOFT_PROMPT_KINDS:
        raise PrefixError(f"{_WHAT}: metadata kind is {kind!r}, expected one of {sorted(SOFT_PROMPT_KINDS)}")
    dims = {name: _meta_int(meta, name) for name in _INT_FIELDS}
    dtype_name = meta["dtype"]
    if dtype_name not in SOFT_DTYPES:
        raise PrefixError(f"{_WHAT}: metadata dtype is {dtype_name!r}, expected one of {list(SOFT_DTYPES)}")
    info = tensors["embeddings"]
    expected_shape = (dims["num_virtual_tokens"], dims["hidden_size"])
    if info.dtype != DTYPE_CODES[SOFT_DTYPES[dtype_name]]:
        raise PrefixError(f"{_WHAT}: tensor 'embeddings' is {info.dtype}, metadata says {dtype_name}")
    if info.shape != expected_shape:
        raise PrefixError(f"{_WHAT}: tensor 'embeddings' has shape {list(info.shape)}, metadata says "
                          f"[num_virtual_tokens, hidden_size] = {list(expected_shape)}")
    check_virtual_tokens(dims["num_virtual_tokens"], max_virtual_tokens)
    if spec is not None and meta["base_fingerprint"] != spec.fingerprint:
        raise PrefixError(f"{_WHAT} belongs to base model fingerprint {meta['base_fingerprint']!r}, the served "
                          f"model {spec.model_id!r} has fingerprint {spec.fingerprint!r}")
    embeddings = load_checked(data)["embeddings"]
    check_embeddings(embeddings, spec)
    check_finite("embeddings", embeddings)
    soft_kind: PrefixKind = "p_tuning" if kind == "p_tuning" else "prompt_tuning"
    return SoftPrompt(
        embeddings=embeddings,
        kind=soft_kind,
        base_fingerprint=meta["base_fingerprint"],
        created_by=meta.get("created_by", ""),
        metadata={k: v for k, v in meta.items() if k not in RESERVED_METADATA},
    )


def _meta_int(meta: dict[str, str], name: str) -> int:
    raw = meta[name]
    if not (raw.isascii() and raw.isdigit()):
        raise PrefixError(f"{_WHAT}: metadata {name} must be a non-negative integer, found {raw!r}")
    return int(raw)
