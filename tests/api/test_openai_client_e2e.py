"""End to end: a real uvicorn server on random:tiny-llama, driven by the official `openai` client.

A native prefix is stored for the tenant (blob + rows, as the prefix API would). Greedy output served with the
prefix must equal the same request run directly on an engine in this process, and differ from the base model.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch
import uvicorn
from openai import NotFoundError, OpenAI

from app.config import Settings
from app.db.migrate import upgrade
from app.db.models import ApiKey, Prefix, PrefixVersion, Tenant
from app.db.session import make_engine, make_session_factory
from app.engine.client import EngineClient
from app.engine.factory import build_engine, context_length
from app.engine.model import LoadedModel, load_model
from app.engine.sampling import SamplingParams
from app.engine.types import GenerationRequest
from app.main import create_app
from app.services.auth import generate_key, hash_key
from prefix_store.blobs import FileBlobStore
from prefix_store.codec import encode_native, sha256_hex
from prefix_store.types import PrefixKV

MODEL = "random:tiny-llama"
PROMPT = "The quick brown fox"
MESSAGES = [{"role": "user", "content": "Say something."}]
MAX_TOKENS = 12


@dataclass
class Server:
    base_url: str
    key: str
    model_id: str
    loaded: LoadedModel
    prefix: PrefixKV


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _store_prefix(settings: Settings, loaded: LoadedModel) -> tuple[str, PrefixKV]:
    """A tenant with an API key and a native prefix `poet` (version 1) stored as the prefix API would."""
    spec = loaded.spec
    gen = torch.Generator().manual_seed(0)
    shape = (spec.num_layers, spec.num_kv_heads, 6, spec.head_dim)
    keys, values = torch.randn(shape, generator=gen) * 2, torch.randn(shape, generator=gen) * 2
    prefix = PrefixKV(keys=keys, values=values, base_fingerprint=spec.fingerprint, created_by="test")
    blob = encode_native(prefix)
    sha = FileBlobStore(settings.data_dir / "blobs").put(blob)
    assert sha == sha256_hex(blob)
    url = settings.resolved_database_url
    upgrade(url)
    db = make_engine(url)
    key = generate_key()
    with make_session_factory(db)() as s:
        tenant = Tenant(name="e2e")
        s.add(tenant)
        s.flush()
        s.add(ApiKey(tenant_id=tenant.id, key_hash=hash_key(key), key_prefix=key[:8], scopes="inference"))
        row = Prefix(tenant_id=tenant.id, name="poet")
        s.add(row)
        s.flush()
        s.add(PrefixVersion(prefix_id=row.id, version=1, sha256=sha, size_bytes=len(blob),
                            num_virtual_tokens=6, source_format="native",
                            base_model_fingerprint=spec.fingerprint))
        s.commit()
    db.dispose()
    return key, prefix


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    data_dir = tmp_path_factory.mktemp("e2e-data")
    settings = Settings(data_dir=data_dir, model=MODEL, admin_key="psk-admin-e2e")
    loaded = load_model(MODEL, data_dir=data_dir)
    key, prefix = _store_prefix(settings, loaded)
    port = _free_port()
    config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not uv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    try:
        yield Server(f"http://127.0.0.1:{port}/v1", key, loaded.spec.model_id, loaded, prefix)
    finally:
        uv.should_exit = True
        thread.join(timeout=30)


def _direct(loaded: LoadedModel, prompt_ids: list[int], prefix: PrefixKV | None) -> str:
    """The same greedy request served directly by a fresh engine on the same weights."""

    async def run() -> str:
        engine = build_engine(loaded)
        engine.start()
        try:
            req = GenerationRequest(prompt_ids=prompt_ids, prefix=prefix,
                                    sampling=SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))
            return "".join([ev.text async for ev in engine.submit(req)])
        finally:
            engine.stop()

    return asyncio.run(run())


def _client(server: Server) -> EngineClient:
    return EngineClient(build_engine(server.loaded), server.loaded.tokenizer, None, server.model_id,
                        context_length(server.loaded))


def test_completions_with_prefix_match_the_engine(server: Server) -> None:
    client = OpenAI(base_url=server.base_url, api_key=server.key, max_retries=0)
    ids = _client(server).encode_prompt(PROMPT)
    texts = {}
    for model in (server.model_id, "poet", "poet@1"):
        r = client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
        assert r.usage is not None and r.usage.prompt_tokens == len(ids)
        texts[model] = r.choices[0].text
        stream = client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                           stream=True)
        assert "".join(c.choices[0].text for c in stream) == texts[model]
    assert texts["poet"] == texts["poet@1"] == _direct(server.loaded, ids, server.prefix)
    assert texts[server.model_id] == _direct(server.loaded, ids, None)
    assert texts["poet"] != texts[server.model_id]


def test_chat_with_prefix_match_the_engine(server: Server) -> None:
    client = OpenAI(base_url=server.base_url, api_key=server.key, max_retries=0)
    ids = _client(server).encode_chat(MESSAGES)
    texts = {}
    for model in (server.model_id, "poet"):
        r = client.chat.completions.create(model=model, messages=MESSAGES,  # type: ignore[arg-type]
                                           max_tokens=MAX_TOKENS, temperature=0)
        texts[model] = r.choices[0].message.content
        stream = client.chat.completions.create(model=model, messages=MESSAGES,  # type: ignore[arg-type]
                                                max_tokens=MAX_TOKENS, temperature=0, stream=True,
                                                stream_options={"include_usage": True})
        chunks = list(stream)
        assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == len(ids)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == texts[model]
    assert texts["poet"] == _direct(server.loaded, ids, server.prefix)
    assert texts[server.model_id] == _direct(server.loaded, ids, None)
    assert texts["poet"] != texts[server.model_id]


def test_models_and_not_found(server: Server) -> None:
    client = OpenAI(base_url=server.base_url, api_key=server.key, max_retries=0)
    models = client.models.list()
    assert [m.id for m in models.data] == [server.model_id, "poet"]
    assert client.models.retrieve("poet").id == "poet"
    with pytest.raises(NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=2)
