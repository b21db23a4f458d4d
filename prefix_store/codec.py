"""The native prefix format: one safetensors file, `prefixserve-prefix/1`.

Tensors: `keys` and `values`, each [num_layers, num_kv_heads, P, head_dim], contiguous, one float dtype
(float16, bfloat16 or float32). `__metadata__` (all str): format, base_fingerprint, num_virtual_tokens,
num_layers, num_kv_heads, head_dim, dtype, created_by, plus the prefix's own metadata entries (which may not
reuse those names).

Encoding is deterministic (sorted header, no timestamps), so equal prefixes give equal bytes and equal hashes.

A soft prompt (learned input embeddings) is stored in its own format, prefix_store/soft_codec.py;
`encode_stored` / `decode_stored` take either kind, told apart by the metadata's `format`.
"""

from __future__ import annotations

import struct

import torch

from prefix_store.blobs import sha256_hex as sha256_hex  # re-exported: an encoded prefix's address
from prefix_store.soft_codec import SOFT_FORMAT, decode_soft, encode_soft
from prefix_store.types import ModelSpec, PrefixError, PrefixKV, PrefixTensors, SoftPrompt
from prefix_store.validate import (
    DTYPE_CODES,
    check_finite,
    check_kv,
    check_size,
    check_virtual_tokens,
    dump_safetensors,
    load_checked,
    parse_header,
    require_names,
)

NATIVE_FORMAT = "prefixserve-prefix/1"
NATIVE_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}
_INT_FIELDS = ("num_virtual_tokens", "num_layers", "num_kv_heads", "head_dim")
RESERVED_METADATA = frozenset({"format", "base_fingerprint", "dtype", "created_by", *_INT_FIELDS})
_WHAT = "native prefix"


def is_safetensors(data: bytes) -> bool:
    """Cheap sniff: an 8-byte header length that fits in `data`, followed by a JSON object.

    Used only to route uploads (safetensors vs zip); the decoders check everything again.
    """
    if len(data) < 10:
        return False
    (n,) = struct.unpack("<Q", data[:8])
    return 2 <= n <= len(data) - 8 and data[8:9] == b"{"


def encode_native(prefix: PrefixKV) -> bytes:
    """Serialize a prefix: keys/values [L, kv_heads, P, head_dim] plus metadata, as safetensors bytes."""
    check_kv(prefix.keys, prefix.values, None)
    dtype_name = str(prefix.keys.dtype).removeprefix("torch.")
    if dtype_name not in NATIVE_DTYPES:
        raise PrefixError(f"native prefixes are {', '.join(NATIVE_DTYPES)}, found {dtype_name}")
    if not prefix.base_fingerprint:
        raise PrefixError("a native prefix needs base_fingerprint (the base model it belongs to), found none")
    clash = RESERVED_METADATA & prefix.metadata.keys()
    if clash:
        raise PrefixError(f"prefix metadata may not use the reserved names {sorted(clash)}")
    layers, heads, p, head_dim = (int(d) for d in prefix.keys.shape)
    metadata = {
        **prefix.metadata,
        "format": NATIVE_FORMAT,
        "base_fingerprint": prefix.base_fingerprint,
        "num_virtual_tokens": str(p),
        "num_layers": str(layers),
        "num_kv_heads": str(heads),
        "head_dim": str(head_dim),
        "dtype": dtype_name,
        "created_by": prefix.created_by,
    }
    return dump_safetensors({"keys": prefix.keys, "values": prefix.values}, metadata)


def decode_native(
    data: bytes, *, spec: ModelSpec | None, max_virtual_tokens: int, max_bytes: int
) -> PrefixKV:
    """Parse and check a native prefix file; return keys/values [L, kv_heads, P, head_dim], stored dtype.

    spec None: structural checks only (format, header, metadata vs tensors, values). With a spec: the
    fingerprint must equal spec.fingerprint and layers / kv heads / head_dim must match the model. The stored
    dtype may differ from spec.dtype (the engine casts when it copies the prefix into a cache).
    """
    check_size(len(data), max_bytes, _WHAT)
    tensors, meta = parse_header(data, _WHAT)
    require_names(tensors, {"keys", "values"}, _WHAT)
    fmt = meta.get("format")
    if fmt != NATIVE_FORMAT:
        raise PrefixError(f"{_WHAT}: metadata format is {fmt!r}, expected {NATIVE_FORMAT!r}")
    missing = sorted((RESERVED_METADATA - {"created_by"}) - meta.keys())
    if missing:
        raise PrefixError(f"{_WHAT}: metadata lacks {missing}")
    dims = {name: _meta_int(meta, name) for name in _INT_FIELDS}
    dtype_name = meta["dtype"]
    if dtype_name not in NATIVE_DTYPES:
        raise PrefixError(f"{_WHAT}: metadata dtype is {dtype_name!r}, expected one of {list(NATIVE_DTYPES)}")
    expected_code = DTYPE_CODES[NATIVE_DTYPES[dtype_name]]
    expected_shape = (dims["num_layers"], dims["num_kv_heads"], dims["num_virtual_tokens"], dims["head_dim"])
    for name in ("keys", "values"):
        info = tensors[name]
        if info.dtype != expected_code:
            raise PrefixError(
                f"{_WHAT}: tensor {name!r} is {info.dtype}, metadata says {dtype_name} ({expected_code})"
            )
        if info.shape != expected_shape:
            raise PrefixError(
                f"{_WHAT}: tensor {name!r} has shape {list(info.shape)}, metadata says "
                f"[num_layers, num_kv_heads, num_virtual_tokens, head_dim] = {list(expected_shape)}"
            )
    check_virtual_tokens(dims["num_virtual_tokens"], max_virtual_tokens)
    if spec is not None and meta["base_fingerprint"] != spec.fingerprint:
        raise PrefixError(
            f"{_WHAT} belongs to base model fingerprint {meta['base_fingerprint']!r}, the served model "
            f"{spec.model_id!r} has fingerprint {spec.fingerprint!r}"
        )
    loaded = load_checked(data)
    keys, values = loaded["keys"], loaded["values"]
    check_kv(keys, values, spec)
    check_finite("keys", keys)
    check_finite("values", values)
    return PrefixKV(
        keys=keys,
        values=values,
        base_fingerprint=meta["base_fingerprint"],
        created_by=meta.get("created_by", ""),
        metadata={k: v for k, v in meta.items() if k not in RESERVED_METADATA},
    )


def encode_stored(prefix: PrefixTensors) -> bytes:
    """A stored prefix version's bytes: the native KV format, or the soft-prompt format for a SoftPrompt."""
    return encode_soft(prefix) if isinstance(prefix, SoftPrompt) else encode_native(prefix)


def decode_stored(
    data: bytes, *, spec: ModelSpec | None, max_virtual_tokens: int, max_bytes: int
) -> PrefixTensors:
    """A stored prefix version of either kind (`format` in its metadata): PrefixKV or SoftPrompt, checked as
    `decode_native` / `decode_soft` check them."""
    check_size(len(data), max_bytes, _WHAT)
    _, meta = parse_header(data, _WHAT)
    if meta.get("format") == SOFT_FORMAT:
        return decode_soft(data, spec=spec, max_virtual_tokens=max_virtual_tokens, max_bytes=max_bytes)
    return decode_native(data, spec=spec, max_virtual_tokens=max_virtual_tokens, max_bytes=max_bytes)


def _meta_int(meta: dict[str, str], name: str) -> int:
    raw = meta[name]
    if not (raw.isascii() and raw.isdigit()):
        raise PrefixError(f"{_WHAT}: metadata {name} must be a non-negative integer, found {raw!r}")
    return int(raw)
