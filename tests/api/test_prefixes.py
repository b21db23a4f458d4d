"""Prefix management API against the real app: uploads (native, PEFT zip, PEFT file pair), versions, list,
get, download round trips (PEFT export loads in peft), deletes, limits, bad input (4xx, nothing stored)."""

from __future__ import annotations

import copy
import io
import json
import pickle
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
import torch
from peft import PeftModel, PrefixTuningConfig, get_peft_model

from app.config import Settings
from app.main import create_app
from app.runtime import open_runtime
from prefix_store.codec import decode_native
from prefix_store.resolver import PrefixNotFound
from prefix_store.types import ModelSpec
from tests.api.fixtures_admin import (  # noqa: F401
    ADMIN_KEY,
    Api,
    api_fixture,
    bearer,
    make_api,
    native_bytes,
    random_prefix,
    zip_bytes,
)

pytestmark = pytest.mark.both_databases  # the requests reach the database: run on both

P = 5


def peft_kv(pm: PeftModel) -> tuple[torch.Tensor, torch.Tensor]:
    """The prefix cache peft builds for one row: keys/values stacked [L, kv_heads, P, head_dim]."""
    with torch.no_grad():
        layers = pm.get_prompt(batch_size=1).layers
    return torch.stack([x.keys[0] for x in layers]), torch.stack([x.values[0] for x in layers])


@pytest.fixture
def adapter(api: Api, tmp_path: Path) -> tuple[PeftModel, Path]:
    """A real peft prefix-tuning adapter (random weights) on a copy of the served tiny model, saved."""
    assert api.runtime.model is not None
    base = copy.deepcopy(api.runtime.model.model)
    pm = get_peft_model(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    torch.manual_seed(7)
    with torch.no_grad():
        for param in pm.prompt_encoder["default"].parameters():
            param.normal_(0.0, 0.5)
    out = tmp_path / "adapter"
    pm.eval().save_pretrained(str(out))
    # Record a hub id other than the served model's (set after saving: peft would try to reach the hub).
    cfg_path = out / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"}))
    return pm, out


def test_native_upload_versions_list_get_download(api: Api) -> None:
    _, key = api.tenant("acme")
    v1, v2 = native_bytes(api.spec, seed=1), native_bytes(api.spec, 6, seed=2, dtype=torch.bfloat16)
    r = api.upload(key, "support-bot", v1)
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["name"] == "support-bot" and body["version"] == 1 and body["num_virtual_tokens"] == 4
    assert body["base_model"] == api.spec.model_id and body["source_format"] == "native"
    assert body["warnings"] == [] and body["id"].startswith("pfx_") and len(body["sha256"]) == 64
    r2 = api.upload(key, "support-bot", v2).json()
    assert (r2["version"], r2["id"], r2["num_virtual_tokens"]) == (2, body["id"], 6)
    api.upload(key, "another", v1)

    listed = api.client.get("/v1/prefixes", headers=bearer(key)).json()["data"]
    assert [(p["name"], p["latest_version"]) for p in listed] == [("another", 1), ("support-bot", 2)]
    got = api.client.get("/v1/prefixes/support-bot", headers=bearer(key)).json()
    assert [v["version"] for v in got["versions"]] == [1, 2] and got["latest_version"] == 2
    assert got["versions"][0]["source_format"] == "native" and got["versions"][1]["size_bytes"] == len(v2)
    one = api.client.get("/v1/prefixes/support-bot@1", headers=bearer(key)).json()
    assert [v["version"] for v in one["versions"]] == [1]

    # Native download is the stored bytes (our encoder is canonical, so the uploaded bytes).
    latest = api.client.get("/v1/prefixes/support-bot/download?format=native", headers=bearer(key))
    assert latest.status_code == 200 and latest.content == v2
    assert 'filename="support-bot-v2.safetensors"' in latest.headers["content-disposition"]
    assert api.client.get("/v1/prefixes/support-bot@1/download", headers=bearer(key)).content == v1
    assert len(api.blob_files()) == 2  # `another` shares v1's blob


def test_peft_zip_and_pair_uploads_round_trip_through_peft(
    api: Api, adapter: tuple[PeftModel, Path], tmp_path: Path
) -> None:
    pm, out = adapter
    _, key = api.tenant("acme")
    files = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix != ".md"}  # peft adds a README.md
    r = api.upload(key, "imported", zip_bytes({f"adapter/{n}": d for n, d in files.items()}), "adapter.zip")
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["source_format"] == "peft" and body["num_virtual_tokens"] == P
    assert len(body["warnings"]) == 1 and "HuggingFaceTB/SmolLM2-135M-Instruct" in body["warnings"][0]

    pair = [("files", (n, d, "application/octet-stream")) for n, d in files.items()]
    r = api.client.post("/v1/prefixes", headers=bearer(key), data={"name": "imported"}, files=pair)
    assert r.status_code == 201 and r.json()["version"] == 2 and r.json()["sha256"] == body["sha256"]
    info = api.client.get("/v1/prefixes/imported", headers=bearer(key)).json()["versions"][0]
    assert info["recorded_base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert info["base_model_fingerprint"] == api.spec.fingerprint

    # Stored natively with the served model's fingerprint: the resolver's decoder reads it.
    ref_k, ref_v = peft_kv(pm)
    native = api.client.get("/v1/prefixes/imported/download?format=native", headers=bearer(key)).content
    kv = decode_native(native, spec=api.spec, max_virtual_tokens=256, max_bytes=1 << 20)
    torch.testing.assert_close(kv.keys, ref_k, rtol=0, atol=0)
    torch.testing.assert_close(kv.values, ref_v, rtol=0, atol=0)

    # The PEFT export loads in peft and gives the same prompt cache.
    z = api.client.get("/v1/prefixes/imported@1/download?format=peft", headers=bearer(key))
    assert z.status_code == 200 and z.headers["content-type"] == "application/zip"
    exported = tmp_path / "exported"
    zipfile.ZipFile(io.BytesIO(z.content)).extractall(exported)
    assert api.runtime.model is not None
    loaded = PeftModel.from_pretrained(copy.deepcopy(api.runtime.model.model), str(exported)).eval()
    got_k, got_v = peft_kv(loaded)
    torch.testing.assert_close(got_k, ref_k, rtol=0, atol=0)
    torch.testing.assert_close(got_v, ref_v, rtol=0, atol=0)
    cfg = json.loads((exported / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


def _other_spec(spec: ModelSpec) -> ModelSpec:
    return ModelSpec(model_id="x", fingerprint=spec.fingerprint, num_layers=spec.num_layers,
                     num_kv_heads=spec.num_kv_heads * 2, head_dim=spec.head_dim, dtype="float32")


def _nan_prefix(spec: ModelSpec) -> bytes:
    from prefix_store.codec import encode_native

    kv = random_prefix(spec)
    kv.keys[0, 0, 0, 0] = float("nan")
    return encode_native(kv)


def _peft_files(spec: ModelSpec, **cfg_changes: object) -> dict[str, bytes]:
    from prefix_store.peft_codec import encode_peft

    files = encode_peft(random_prefix(spec), spec=spec, base_model_name_or_path="m")
    cfg = json.loads(files["adapter_config.json"])
    files["adapter_config.json"] = json.dumps({**cfg, **cfg_changes}).encode()
    return files


# (what, file bytes factory, expected message fragment)
BAD_FILES = [
    ("not safetensors", lambda s: b"hello, this is not a prefix at all", "neither a safetensors"),
    ("pickle", lambda s: pickle.dumps({"keys": [1.0]}, protocol=4), "pickle"),
    ("torch.save zip", lambda s: zip_bytes({"archive/data.pkl": b"\x80\x04N."}), "adapter_config.json"),
    ("truncated header", lambda s: native_bytes(s)[:40], "header"),
    ("truncated data", lambda s: native_bytes(s)[:-16], ""),
    ("wrong shapes", lambda s: native_bytes(_other_spec(s)), "expected [2, 2, 4, 16]"),
    ("other base model", lambda s: native_bytes(s, fingerprint="f" * 64), "fingerprint"),
    ("NaN", _nan_prefix, "NaN"),
    ("too many virtual tokens", lambda s: native_bytes(s, 257), "256"),
    ("zip slip", lambda s: zip_bytes({f"../{n}": d for n, d in _peft_files(s).items()}), "unsafe"),
    ("wrong peft_type", lambda s: zip_bytes(_peft_files(s, peft_type="LORA")), "peft_type"),
    ("peft shapes", lambda s: zip_bytes(_peft_files(s, num_layers=7)), "num_layers"),
    ("pickled peft weights",
     lambda s: zip_bytes({"adapter_config.json": b"{}", "adapter_model.bin": b"\x80"}), "pickled"),
    ("zip bomb", lambda s: zip_bytes({"adapter_config.json": b"{}",
                                      "adapter_model.safetensors": b"\0" * (65 << 20)}), "limit"),
]


@pytest.mark.sqlite_only
@pytest.mark.parametrize(("what", "make", "fragment"), BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_files_are_refused_and_nothing_is_stored(api: Api, what: str, make, fragment: str) -> None:  # type: ignore[no-untyped-def]
    _, key = api.tenant("acme")
    r = api.upload(key, "p", make(api.spec))
    assert 400 <= r.status_code < 500, (what, r.status_code, r.text)
    assert fragment.lower() in r.json()["error"]["message"].lower(), r.json()
    assert api.prefix_rows() == (0, 0) and api.blob_files() == []


def _form(api: Api, key: str, data: dict[str, str], files: list[tuple[str, tuple[str, bytes]]]) -> dict:  # type: ignore[type-arg]
    r = api.client.post("/v1/prefixes", headers=bearer(key), data=data, files=files)
    assert 400 <= r.status_code < 500, r.text
    assert api.prefix_rows() == (0, 0) and api.blob_files() == []
    return r.json()["error"]  # type: ignore[no-any-return]


def test_bad_forms_and_names(api: Api) -> None:
    _, key = api.tenant("acme")
    good = native_bytes(api.spec)
    peft = _peft_files(api.spec)
    assert "name" in _form(api, key, {}, [("file", ("p.safetensors", good))])["message"]
    both = [("file", ("p.safetensors", good)), *[("files", (n, d)) for n, d in peft.items()]]
    assert "not both" in _form(api, key, {"name": "p"}, both)["message"]
    assert "missing `file`" in _form(api, key, {"name": "p"}, [("other", ("x", b"1"))])["message"]
    assert "multipart/form-data" in _form(api, key, {"name": "p"}, [])["message"]  # urlencoded
    one = [("files", ("adapter_config.json", peft["adapter_config.json"]))]
    assert "exactly twice" in _form(api, key, {"name": "p"}, one)["message"]
    wrong = [("files", ("config.json", b"{}")), ("files", ("adapter_model.bin", b"\x80"))]
    assert "never loaded" in _form(api, key, {"name": "p"}, wrong)["message"]
    assert "empty" in _form(api, key, {"name": "p"}, [("file", ("p.safetensors", b""))])["message"]
    extra = _form(api, key, {"name": "p", "description": "x"}, [("file", ("p.safetensors", good))])
    assert extra == {"message": "`description` is not supported", "type": "invalid_request_error",
                     "param": "description", "code": "unsupported_parameter"}
    for name, fragment in [("Bad Name", "invalid prefix name"), ("user:bob", "reserved"),
                           ("a" * 65, "1-64"), ("-x", "starting with"), ("a@1", "invalid prefix name")]:
        err = _form(api, key, {"name": name}, [("file", ("p.safetensors", good))])
        assert fragment in err["message"] and err["param"] == "name", (name, err)
    r = api.client.post("/v1/prefixes", headers=bearer(key), json={"name": "p"})
    assert r.status_code == 400 and "multipart/form-data" in r.json()["error"]["message"]
    assert api.upload(key, "a" * 64, good).status_code == 201  # the longest allowed name


def test_refs_and_formats(api: Api) -> None:
    _, key = api.tenant("acme")
    api.upload(key, "p", native_bytes(api.spec))
    for ref in ("p@0", "p@-1", "p@abc", "p@"):
        for r in (api.client.get(f"/v1/prefixes/{ref}", headers=bearer(key)),
                  api.client.delete(f"/v1/prefixes/{ref}", headers=bearer(key))):
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_name", (ref, r.text)
            assert "invalid version" in r.json()["error"]["message"]
    for path, status in [("/v1/prefixes/p@x", 400), ("/v1/prefixes/p@0", 400), ("/v1/prefixes/p@2", 404),
                         ("/v1/prefixes/nope", 404), ("/v1/prefixes/p/download?format=gguf", 400),
                         ("/v1/prefixes/user:bob", 400), ("/v1/prefixes/p@2/download", 404)]:
        assert api.client.get(path, headers=bearer(key)).status_code == status, path
    assert api.client.delete("/v1/prefixes/p@2", headers=bearer(key)).status_code == 404


def test_delete_versions_and_all(api: Api) -> None:
    tenant_id, key = api.tenant("acme")
    for seed in (1, 2, 3):
        api.upload(key, "p", native_bytes(api.spec, seed=seed))
    resolver = api.runtime.resolver
    assert resolver is not None
    assert resolver.get(tenant_id, "p").ref.version == 3
    assert len(api.blob_files()) == 3
    r = api.client.delete("/v1/prefixes/p@3", headers=bearer(key))
    assert r.status_code == 200 and r.json()["version"] == 3 and r.json()["deleted"] is True
    # Deleting the newest version makes the previous one current at once; its blob is gone.
    assert resolver.get(tenant_id, "p").ref.version == 2
    assert len(api.blob_files()) == 2
    versions = api.client.get("/v1/prefixes/p", headers=bearer(key)).json()["versions"]
    assert [v["version"] for v in versions] == [1, 2]
    r = api.client.delete("/v1/prefixes/p", headers=bearer(key))
    assert r.status_code == 200 and r.json()["version"] is None
    with pytest.raises(PrefixNotFound):
        resolver.get(tenant_id, "p")
    assert len(resolver.pool) == 0 and api.blob_files() == [] and api.prefix_rows() == (0, 0)
    assert api.client.get("/v1/prefixes/p", headers=bearer(key)).status_code == 404
    # Deleting the last remaining version deletes the prefix.
    api.upload(key, "q", native_bytes(api.spec))
    assert api.client.delete("/v1/prefixes/q@1", headers=bearer(key)).status_code == 200
    assert api.prefix_rows() == (0, 0)


def test_version_made_for_another_base_model_is_refused_before_serving(api: Api) -> None:
    """A prefix stored while another base model was served (PREFIXSERVE_MODEL changed since): the row and the
    blob carry the old fingerprint. Serving answers 409 up front instead of the engine's 503 at load time."""
    from app.db.models import PrefixVersion

    _, key = api.tenant("acme")
    assert api.upload(key, "p", native_bytes(api.spec)).status_code == 201
    old = native_bytes(api.spec, seed=1, fingerprint="fp-of-the-old-model")
    with api.runtime.sessions() as s:
        s.execute(sa.update(PrefixVersion).values(sha256=api.runtime.blobs.put(old), size_bytes=len(old),
                                                  base_model_fingerprint="fp-of-the-old-model"))
        s.commit()
    r = api.client.post("/v1/completions", headers=bearer(key), json={"model": "p", "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 409, r.text
    err = r.json()["error"]
    assert (err["code"], err["param"]) == ("model_mismatch", "model")
    assert all(s in err["message"] for s in ("p@1", "fp-of-the-old-model", api.spec.fingerprint))


@pytest.fixture
def small_api(tmp_path: Path) -> Iterator[Api]:
    yield from make_api(tmp_path, max_upload_bytes=4096)


def test_upload_size_limit(small_api: Api) -> None:
    api = small_api
    _, key = api.tenant("acme")
    assert api.upload(key, "ok", native_bytes(api.spec, 2)).status_code == 201  # ~1.2 KB
    api.client.delete("/v1/prefixes/ok", headers=bearer(key))
    r = api.upload(key, "big", native_bytes(api.spec, 10))  # ~5.4 KB
    assert r.status_code == 413 and "4096" in r.json()["error"]["message"]
    # Content-Length far above the limit: refused before the body is read.
    r = api.upload(key, "big", b"\0" * (200 << 10))
    assert r.status_code == 413

    def chunked() -> Iterator[bytes]:  # no Content-Length: counted while streaming
        yield b'--b\r\nContent-Disposition: form-data; name="name"\r\n\r\nbig\r\n'
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="x"\r\n\r\n'
        for _ in range(200):
            yield b"\0" * 1024
        yield b"\r\n--b--\r\n"

    r = api.client.post("/v1/prefixes", content=chunked(),
                        headers={**bearer(key), "content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413
    assert api.prefix_rows() == (0, 0) and api.blob_files() == []


def test_model_not_loaded_is_503(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    settings = Settings(data_dir=tmp_path, model="random:tiny-llama", admin_key=ADMIN_KEY)
    app = create_app(settings, runtime_factory=lambda s: open_runtime(s, load_model=False))
    with TestClient(app) as client:
        api = Api(client, tmp_path)
        _, key = api.tenant("acme")
        r = api.upload(key, "p", b"anything")
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
        assert api.client.get("/v1/prefixes", headers=bearer(key)).status_code == 200
