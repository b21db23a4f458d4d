"""Hostile uploads to both upload endpoints (`POST /v1/prefixes`, `POST /v1/files`): forged and truncated
safetensors headers, huge declared sizes, pickles, zip slip and zip bombs, NaN/Inf, wrong dtypes and shapes,
JSON bombs. Each must get a 4xx and leave nothing behind: no database row, no blob (no temp file either).
A body over the limit sent without Content-Length is cut off while it streams, on a real server.

This extends the per-format cases of tests/api/test_prefixes.py (BAD_FILES) and tests/prefix_store with
forged containers; it does not repeat them.
"""

from __future__ import annotations

import io
import json
import pickle
import select
import socket
import struct
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
import torch
import uvicorn
from safetensors.torch import load as st_load

from app.config import Settings
from app.db.models import File
from app.main import create_app
from prefix_store.codec import encode_native
from prefix_store.peft_codec import encode_peft
from prefix_store.types import ModelSpec
from tests.api.fixtures_admin import ADMIN, ADMIN_KEY, Api, api_fixture, bearer, native_bytes, random_prefix  # noqa: F401
from tests.api.fixtures_admin import zip_bytes as make_zip


def forge(header: object, data: bytes = b"", *, declared: int | None = None) -> bytes:
    """A safetensors container with this JSON header (its 8-byte length may lie: `declared`)."""
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(raw) if declared is None else declared) + raw + data


def _native_header(spec: ModelSpec) -> tuple[dict[str, object], bytes]:
    """The header and data section of a valid native prefix, to be tampered with."""
    blob = native_bytes(spec)
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def _tamper(spec: ModelSpec, change: Callable[[dict[str, object]], None]) -> bytes:
    header, data = _native_header(spec)
    change(header)
    return forge(header, data)


def _retyped(spec: ModelSpec, dtype: torch.dtype) -> bytes:
    """A native prefix whose tensors were re-saved in another dtype (metadata unchanged)."""
    from safetensors.torch import save

    blob = native_bytes(spec)
    (n,) = struct.unpack("<Q", blob[:8])
    meta = json.loads(blob[8:8 + n])["__metadata__"]
    tensors = {k: v.to(dtype) for k, v in st_load(blob).items()}
    return save(tensors, metadata=meta)


def _inf_prefix(spec: ModelSpec) -> bytes:
    kv = random_prefix(spec)
    kv.values[-1, -1, -1, -1] = float("-inf")
    return encode_native(kv)


def _peft(spec: ModelSpec, weights: Callable[[torch.Tensor], torch.Tensor] | None = None,
          config: bytes | None = None) -> bytes:
    files = encode_peft(random_prefix(spec), spec=spec, base_model_name_or_path="m")
    if weights is not None:
        from safetensors.torch import save

        t = st_load(files["adapter_model.safetensors"])["prompt_embeddings"]
        files["adapter_model.safetensors"] = save({"prompt_embeddings": weights(t)})
    if config is not None:
        files["adapter_config.json"] = config
    return make_zip(files)


def _nested_zip(spec: ModelSpec) -> bytes:
    inner = make_zip(encode_peft(random_prefix(spec), spec=spec, base_model_name_or_path="m"))
    return make_zip({"adapter.zip": inner})


def _duplicate_names(spec: ModelSpec) -> bytes:
    buf = io.BytesIO()
    good = encode_peft(random_prefix(spec), spec=spec, base_model_name_or_path="m")
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in good.items():
            zf.writestr(name, data)
        with pytest.warns(UserWarning):
            zf.writestr("adapter_model.safetensors", b"\x80\x04N.")  # a second member of the same name
    return buf.getvalue()


DEEP_JSON = b"[" * 200_000 + b"]" * 200_000

# (what, bytes factory, filename)
PREFIX_CORPUS: list[tuple[str, Callable[[ModelSpec], bytes], str]] = [
    ("header length past the file", lambda s: forge({"keys": {}}, declared=10_000), "p.safetensors"),
    ("header length 2**60", lambda s: forge(b"{", declared=2**60), "p.safetensors"),
    ("header not JSON", lambda s: forge(b"{not json at all}" + b" " * 8), "p.safetensors"),
    ("header is a JSON bomb", lambda s: forge(DEEP_JSON), "p.safetensors"),
    ("offsets past the data", lambda s: _tamper(s, lambda h: h["keys"].update(  # type: ignore[attr-defined]
        data_offsets=[0, 10**12])), "p.safetensors"),
    ("overlapping offsets", lambda s: _tamper(s, lambda h: h["values"].update(  # type: ignore[attr-defined]
        data_offsets=h["keys"]["data_offsets"])), "p.safetensors"),  # type: ignore[index]
    ("huge declared shape", lambda s: _tamper(s, lambda h: h["keys"].update(  # type: ignore[attr-defined]
        shape=[2, 2, 10**9, 16])), "p.safetensors"),
    ("negative shape", lambda s: _tamper(s, lambda h: h["keys"].update(shape=[-2, 2, 4, 16])),  # type: ignore[attr-defined]
     "p.safetensors"),
    ("unknown dtype", lambda s: _tamper(s, lambda h: h["keys"].update(dtype="Q7")), "p.safetensors"),  # type: ignore[attr-defined]
    ("float64 tensors", lambda s: _retyped(s, torch.float64), "p.safetensors"),
    ("int32 tensors", lambda s: _retyped(s, torch.int32), "p.safetensors"),
    ("Inf", _inf_prefix, "p.safetensors"),
    ("pickle protocol 2", lambda s: pickle.dumps({"keys": torch.zeros(2)}, protocol=2), "p.bin"),
    ("pickle named .safetensors", lambda s: pickle.dumps([1, 2, 3]), "adapter_model.safetensors"),
    ("PEFT NaN weights", lambda s: _peft(s, lambda t: t.fill_(float("nan"))), "a.zip"),
    ("PEFT int weights", lambda s: _peft(s, lambda t: t.to(torch.int64)), "a.zip"),
    ("PEFT transposed weights", lambda s: _peft(s, lambda t: t.t().contiguous()), "a.zip"),
    ("PEFT config JSON bomb", lambda s: _peft(s, config=DEEP_JSON), "a.zip"),
    ("PEFT config huge num_virtual_tokens", lambda s: _peft(s, config=json.dumps(
        {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 10**12, "num_layers": 2, "token_dim": 32,
         "num_attention_heads": 2}).encode()), "a.zip"),
    ("zip slip, absolute", lambda s: make_zip({"/tmp/adapter_config.json": b"{}",
                                                "/tmp/adapter_model.safetensors": b"{}"}), "a.zip"),
    ("zip in a zip", _nested_zip, "a.zip"),
    ("zip with duplicate names", _duplicate_names, "a.zip"),
    ("truncated zip", lambda s: _peft(s)[:-40], "a.zip"),
]


@pytest.mark.parametrize(("what", "make", "filename"), PREFIX_CORPUS, ids=[c[0] for c in PREFIX_CORPUS])
def test_prefix_upload_corpus(api: Api, what: str, make: Callable[[ModelSpec], bytes], filename: str) -> None:
    _, key = api.tenant("acme")
    r = api.upload(key, "p", make(api.spec), filename)
    assert 400 <= r.status_code < 500, (what, r.status_code, r.text)
    assert r.json()["error"]["message"], r.text
    assert api.prefix_rows() == (0, 0) and api.blob_files() == []
    assert api.upload(key, "p", native_bytes(api.spec)).status_code == 201  # the tenant is not stuck


def _file_rows(api: Api) -> int:
    with api.runtime.sessions() as s:
        return int(s.scalar(sa.select(sa.func.count()).select_from(File)) or 0)


FILE_CORPUS: list[tuple[str, bytes]] = [
    ("binary garbage", bytes(range(256)) * 4),
    ("pickle", pickle.dumps({"prompt": "a", "completion": "b"})),
    ("not UTF-8", b'{"prompt": "\xff\xfe", "completion": "x"}\n'),
    ("JSON bomb line", DEEP_JSON + b"\n"),
    ("NaN literal", b'{"prompt": NaN, "completion": "x"}\n'),
    ("number as text", b'{"prompt": 1e999, "completion": "x"}\n'),
    ("array line", b'[{"prompt": "a", "completion": "b"}]\n'),
    ("zip bomb", make_zip({"train.jsonl": b"\n" * (8 << 20)})),
    ("gzip", b"\x1f\x8b\x08\x00" + b"\x00" * 64),
    ("safetensors", forge({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0\0\0\0")),
    ("only blank lines", b"\n\n   \n"),
    ("a 1 MB prompt then junk", json.dumps({"prompt": "a" * (1 << 20), "completion": "b"}).encode() + b"\n{"),
]


@pytest.mark.parametrize(("what", "data"), FILE_CORPUS, ids=[c[0] for c in FILE_CORPUS])
def test_file_upload_corpus(api: Api, what: str, data: bytes) -> None:
    _, key = api.tenant("acme")
    r = api.client.post("/v1/files", headers=bearer(key), data={"purpose": "fine-tune"},
                        files={"file": ("train.jsonl", data, "application/jsonl")})
    assert r.status_code in (400, 413), (what, r.status_code, r.text)  # refused as bad input, not 401/404
    assert r.json()["error"]["message"], r.text
    assert _file_rows(api) == 0 and api.blob_files() == []
    good = b'{"prompt": "a", "completion": "b"}\n'
    r = api.client.post("/v1/files", headers=bearer(key), data={"purpose": "fine-tune"},
                        files={"file": ("train.jsonl", good, "application/jsonl")})
    assert r.status_code == 200, r.text  # the same key and route accept a valid file


# ---- oversized bodies without Content-Length, on a real server ----------------------------------------------------
@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, int]]:
    settings = Settings(data_dir=tmp_path / "data", model="random:tiny-llama", admin_key=ADMIN_KEY,
                        max_upload_bytes=64 << 10, max_file_bytes=64 << 10, job_queue="none")
    srv = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield "127.0.0.1", srv.servers[0].sockets[0].getsockname()[1]
    srv.should_exit = True
    thread.join(10)


def _stream_until_answered(host: str, port: int, path: str, key: str, fields: bytes, total: int) -> tuple[int, int]:
    """POST a chunked multipart body of `total` file bytes, a 16 KiB chunk at a time, until the server
    answers. Returns (status, file bytes sent by then)."""
    sock = socket.create_connection((host, port))
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                 "Content-Type: multipart/form-data; boundary=b\r\nTransfer-Encoding: chunked\r\n\r\n".encode())

    def chunk(data: bytes) -> None:
        sock.sendall(f"{len(data):x}\r\n".encode() + data + b"\r\n")

    chunk(fields + b'--b\r\nContent-Disposition: form-data; name="file"; filename="x"\r\n\r\n')
    sent = 0
    try:
        while sent < total:
            if select.select([sock], [], [], 0)[0]:
                break  # the server has answered
            chunk(b"\0" * (16 << 10))
            sent += 16 << 10
        sock.settimeout(10)
        head = sock.recv(4096)
    except (BrokenPipeError, ConnectionResetError):
        head = sock.recv(4096)
    finally:
        sock.close()
    return int(head.split(b" ", 2)[1]), sent


@pytest.mark.parametrize("endpoint", ["/v1/prefixes", "/v1/files"])
def test_oversized_stream_is_cut_off(server: tuple[str, int], endpoint: str) -> None:
    import httpx

    host, port = server
    with httpx.Client(base_url=f"http://{host}:{port}") as c:
        key = c.post("/admin/tenants", json={"name": "acme"}, headers=ADMIN).json()["api_key"]
    fields = (b'--b\r\nContent-Disposition: form-data; name="name"\r\n\r\np\r\n' if endpoint == "/v1/prefixes"
              else b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n')
    total = 256 << 20  # 256 MiB offered; the limit is 64 KiB
    status, sent = _stream_until_answered(host, port, endpoint, key, fields, total)
    assert status == 413
    assert sent < 16 << 20, f"{sent} bytes were taken before the refusal"
    print(f"{endpoint}: 413 after {sent >> 10} KiB of {total >> 20} MiB")
    with httpx.Client(base_url=f"http://{host}:{port}") as c:  # nothing stored
        listed = c.get(endpoint, headers=bearer(key)).json()
        assert listed["data"] == []
