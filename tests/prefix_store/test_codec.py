"""Native prefix format: round trips and every refusal."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from prefix_store.codec import NATIVE_FORMAT, decode_native, encode_native, is_safetensors, sha256_hex
from prefix_store.types import ModelSpec, PrefixError, PrefixKV
from prefix_store.validate import dump_safetensors
from tests.prefix_store.conftest import random_prefix

MAX_P = 64
MAX_BYTES = 1 << 20


def decode(data: bytes, spec: ModelSpec | None, **kw: int) -> PrefixKV:
    args = {"max_virtual_tokens": MAX_P, "max_bytes": MAX_BYTES, **kw}
    return decode_native(data, spec=spec, **args)


def native_meta(spec: ModelSpec, p: int, **over: str) -> dict[str, str]:
    meta = {
        "format": NATIVE_FORMAT,
        "base_fingerprint": spec.fingerprint,
        "num_virtual_tokens": str(p),
        "num_layers": str(spec.num_layers),
        "num_kv_heads": str(spec.num_kv_heads),
        "head_dim": str(spec.head_dim),
        "dtype": "float32",
        "created_by": "test",
    }
    meta.update(over)
    return meta


def raw_file(header: object, payload: bytes = b"", length: int | None = None) -> bytes:
    blob = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(blob) if length is None else length) + blob + payload


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_is_bit_exact_and_deterministic(llama_spec: ModelSpec, dtype: torch.dtype) -> None:
    prefix = random_prefix(llama_spec, p=7, dtype=dtype, created_by="trainer", metadata={"note": "hi"})
    data = encode_native(prefix)
    assert is_safetensors(data)
    out = decode(data, llama_spec)
    assert out.keys.dtype == dtype and out.keys.shape == (2, 2, 7, 16)
    assert torch.equal(out.keys, prefix.keys) and torch.equal(out.values, prefix.values)
    assert out.keys.is_contiguous() and out.values.is_contiguous()
    assert out.base_fingerprint == llama_spec.fingerprint
    assert out.created_by == "trainer" and out.metadata == {"note": "hi"}
    assert encode_native(out) == data
    assert sha256_hex(encode_native(out)) == sha256_hex(data)
    assert decode(data, None).num_virtual_tokens == 7  # structural-only mode


def test_native_file_is_standard_safetensors(llama_spec: ModelSpec, tmp_path: object) -> None:
    prefix = random_prefix(llama_spec, p=3)
    data = encode_native(prefix)
    from pathlib import Path

    path = Path(str(tmp_path)) / "p.safetensors"
    path.write_bytes(data)
    with safe_open(str(path), "pt") as f:
        assert sorted(f.keys()) == ["keys", "values"]
        assert torch.equal(f.get_tensor("keys"), prefix.keys)
        meta = f.metadata()
    assert meta == native_meta(llama_spec, 3, created_by="")


def test_sha256_and_sniff() -> None:
    assert sha256_hex(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert not is_safetensors(b"PK\x03\x04" + b"\x00" * 40)
    assert not is_safetensors(b"short")
    assert not is_safetensors(raw_file({}, length=10_000))


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"hello", "at least 8"),
        (b"PK\x03\x04" + b"\x00" * 100, "header length .* exceeds"),
        (raw_file({"keys": {}}, length=1 << 40), "header length .* exceeds"),
        (raw_file(b"{not json"), "not valid JSON"),
        (raw_file(b"\xff\xfe"), "not valid JSON"),
        (raw_file([1, 2]), "must be a JSON object"),
        (raw_file(b"[" * 100_000), "not valid JSON"),
        (raw_file({"keys": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}), "outside"),
        (
            raw_file({"keys": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12),
            "starts at",
        ),
        (raw_file({"keys": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8), "needs 12"),
        (raw_file({"keys": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8), "cover 4"),
        (raw_file({"keys": {"dtype": "F32", "shape": "x", "data_offsets": [0, 0]}}), "invalid shape"),
        (raw_file({"keys": {"dtype": "I32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4), "float type"),
        (raw_file({"__metadata__": {"a": 1}}), "strings to strings"),
    ],
)
def test_malformed_safetensors_refused(data: bytes, match: str) -> None:
    with pytest.raises(PrefixError, match=match):
        decode(data, None)


def test_oversized_refused(llama_spec: ModelSpec) -> None:
    data = encode_native(random_prefix(llama_spec))
    with pytest.raises(PrefixError, match=f"too large: {len(data)} bytes, the limit is 100"):
        decode(data, llama_spec, max_bytes=100)


def test_missing_and_extra_tensors(llama_spec: ModelSpec) -> None:
    k = random_prefix(llama_spec, p=2).keys
    meta = native_meta(llama_spec, 2)
    with pytest.raises(PrefixError, match=r"missing \['values'\]"):
        decode(dump_safetensors({"keys": k}, meta), None)
    with pytest.raises(PrefixError, match=r"unexpected \['extra'\]"):
        decode(dump_safetensors({"keys": k, "values": k, "extra": k}, meta), None)


def test_int_tensors_refused(llama_spec: ModelSpec) -> None:
    t = torch.zeros(2, 2, 2, 16, dtype=torch.int32)
    data = st_save({"keys": t, "values": t.clone()}, metadata=native_meta(llama_spec, 2))
    with pytest.raises(PrefixError, match="dtype 'I32', expected a float type"):
        decode(data, llama_spec)


def test_tensor_dtype_must_match_metadata(llama_spec: ModelSpec) -> None:
    prefix = random_prefix(llama_spec, p=2, dtype=torch.float16)
    data = dump_safetensors(
        {"keys": prefix.keys, "values": prefix.values}, native_meta(llama_spec, 2, dtype="float32")
    )
    with pytest.raises(PrefixError, match="'keys' is F16, metadata says float32"):
        decode(data, llama_spec)
    bad = dump_safetensors(
        {"keys": prefix.keys, "values": prefix.values}, native_meta(llama_spec, 2, dtype="int8")
    )
    with pytest.raises(PrefixError, match="metadata dtype is 'int8'"):
        decode(bad, llama_spec)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_refused(llama_spec: ModelSpec, bad: float) -> None:
    prefix = random_prefix(llama_spec, p=2)
    prefix.values[1, 0, 1, 3] = bad
    with pytest.raises(PrefixError, match="values holds 1 NaN/Inf"):
        decode(encode_native(prefix), llama_spec)


def test_virtual_token_bounds(llama_spec: ModelSpec) -> None:
    with pytest.raises(PrefixError, match="between 1 and 64, found 0"):
        decode(encode_native(random_prefix(llama_spec, p=0)), llama_spec)
    with pytest.raises(PrefixError, match="between 1 and 4, found 5"):
        decode(encode_native(random_prefix(llama_spec, p=5)), llama_spec, max_virtual_tokens=4)


def test_fingerprint_mismatch(llama_spec: ModelSpec) -> None:
    data = encode_native(random_prefix(llama_spec))
    other = ModelSpec("other", "fp-other", 2, 2, 16, "float32")
    with pytest.raises(PrefixError, match=r"fingerprint 'fp-llama'.*'other' has fingerprint 'fp-other'"):
        decode(data, other)
    assert decode(data, None).base_fingerprint == "fp-llama"


@pytest.mark.parametrize(
    ("layers", "heads", "head_dim"),
    [(3, 2, 16), (2, 4, 16), (2, 2, 8)],
)
def test_shape_mismatch_vs_model(llama_spec: ModelSpec, layers: int, heads: int, head_dim: int) -> None:
    spec = ModelSpec("tiny-llama", "fp-llama", layers, heads, head_dim, "float32")
    data = encode_native(random_prefix(llama_spec, p=3))
    with pytest.raises(PrefixError, match=rf"\[2, 2, 3, 16\].*expected \[{layers}, {heads}, 3, {head_dim}\]"):
        decode(data, spec)


def test_keys_values_shape_differ(llama_spec: ModelSpec) -> None:
    prefix = random_prefix(llama_spec, p=3)
    values = prefix.values[:, :, :2].contiguous()
    data = dump_safetensors({"keys": prefix.keys, "values": values}, native_meta(llama_spec, 3))
    with pytest.raises(PrefixError, match=r"'values' has shape \[2, 2, 2, 16\], metadata says"):
        decode(data, None)
    with pytest.raises(PrefixError, match="keys and values differ in shape"):
        encode_native(PrefixKV(keys=prefix.keys, values=values, base_fingerprint="x"))


def test_metadata_checks(llama_spec: ModelSpec) -> None:
    prefix = random_prefix(llama_spec, p=3)
    tensors = {"keys": prefix.keys, "values": prefix.values}
    with pytest.raises(PrefixError, match="format is 'other/1'"):
        decode(dump_safetensors(tensors, native_meta(llama_spec, 3, format="other/1")), None)
    meta = native_meta(llama_spec, 3)
    del meta["head_dim"]
    with pytest.raises(PrefixError, match=r"lacks \['head_dim'\]"):
        decode(dump_safetensors(tensors, meta), None)
    with pytest.raises(PrefixError, match="num_layers must be a non-negative integer"):
        decode(dump_safetensors(tensors, native_meta(llama_spec, 3, num_layers="two")), None)
    with pytest.raises(PrefixError, match=r"metadata says .* \[2, 2, 4, 16\]"):
        decode(dump_safetensors(tensors, native_meta(llama_spec, 4)), None)


def test_encode_refusals(llama_spec: ModelSpec) -> None:
    prefix = random_prefix(llama_spec, p=2)
    with pytest.raises(PrefixError, match="needs base_fingerprint"):
        encode_native(PrefixKV(keys=prefix.keys, values=prefix.values))
    with pytest.raises(PrefixError, match=r"reserved names \['format'\]"):
        encode_native(PrefixKV(prefix.keys, prefix.values, "fp", metadata={"format": "x"}))
    k64 = prefix.keys.double()
    with pytest.raises(PrefixError, match="found float64"):
        encode_native(PrefixKV(k64, prefix.values.double(), "fp"))
