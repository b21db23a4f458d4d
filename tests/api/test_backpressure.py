"""Backpressure over HTTP. With the real engine (tiny Llama, one batch row, one waiting slot): a request beyond
the waiting queue is refused at once (429 + Retry-After), not queued behind the others; a request past the
request timeout gets a 504 (an error chunk when streaming) and leaves the engine. With a real server on
loopback: a streaming client that stops reading is disconnected and its generation cancelled."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import uvicorn

from app.config import Settings
from app.engine.sampling import SamplingParams
from app.main import create_app
from app.runtime import Runtime, open_runtime
from prefix_store.ref import PrefixRef
from tests.api.conftest import ADMIN_KEY
from tests.api.fake_engine import FakeEngineClient, with_fake_model
from tests.api.fixtures_admin import Api, bearer, make_api

LONG = {"prompt": "hi", "max_tokens": 1000, "temperature": 0}  # >= 5 s with the slowed model below


@pytest.fixture
def tight(tmp_path: Path) -> Iterator[Api]:
    for api in make_api(tmp_path, max_batch_rows=1, max_waiting=1, request_timeout_s=0.6):
        # The tiny model decodes 1000 tokens in well under a second now: make each step take 5 ms, so that
        # LONG surely outlives the 0.6 s timeout whatever the machine's speed.
        engine = api.runtime.engine
        assert engine is not None
        forward = engine.runner.forward

        def slow(batch, _forward=forward):  # type: ignore[no-untyped-def]
            time.sleep(0.005)
            return _forward(batch)

        engine.runner.forward = slow  # type: ignore[method-assign]
        yield api


def _engine_idle(api: Api) -> bool:
    engine = api.runtime.engine
    assert engine is not None
    return engine._active == {} and engine.stats.running_rows == 0 and engine.stats.waiting == 0


def test_overload_is_refused_at_once_and_timeouts_free_the_engine(tight: Api) -> None:
    api = tight
    _, key = api.tenant("acme")
    body = {**LONG, "model": api.spec.model_id}

    def post(delay: float) -> tuple[int, dict[str, str], dict[str, object], float]:
        time.sleep(delay)
        t0 = time.monotonic()
        r = api.client.post("/v1/completions", headers=bearer(key), json=body)
        return r.status_code, dict(r.headers), r.json(), time.monotonic() - t0

    with ThreadPoolExecutor(3) as pool:  # one runs, one waits, the third finds the queue full
        results = list(pool.map(post, [0.0, 0.1, 0.3]))
    (s1, _, b1, t1), (s2, _, b2, _), (s3, h3, b3, t3) = results
    assert s3 == 429 and h3["retry-after"] == "1" and b3["error"]["code"] == "overloaded"  # type: ignore[index]
    assert t3 < 0.6, f"the refusal took {t3:.2f} s: it waited in line instead"  # under the request timeout
    for status, err in ((s1, b1), (s2, b2)):  # the running and the waiting request both time out
        assert status == 504, err
        assert err["error"]["type"] == "timeout_error" and "timed out" in err["error"]["message"]  # type: ignore[index]
    assert 0.5 < t1 < 5.0
    assert _engine_idle(api)


def test_streaming_timeout_sends_an_error_chunk(tight: Api) -> None:
    api = tight
    _, key = api.tenant("acme")
    with api.client.stream("POST", "/v1/completions", headers=bearer(key),
                           json={**LONG, "model": api.spec.model_id, "stream": True}) as r:
        assert r.status_code == 200  # the stream had started
        payloads = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert payloads[-1] == "[DONE]"
    err = json.loads(payloads[-2])["error"]
    assert err["type"] == "timeout_error" and err["code"] == "timeout"
    assert "choices" in json.loads(payloads[0])  # the stream began with tokens before the timeout
    assert _engine_idle(api)


# ---- a client that stops reading its stream --------------------------------------------------------------------
class EndlessEngine(FakeEngineClient):
    """Streams a text far longer than any socket buffer; counts the events it produced."""

    produced: int = 0

    def script(self, prefix: PrefixRef | None, sampling: SamplingParams) -> str:
        return "x" * 200_000

    async def generate(self, **kw):  # type: ignore[no-untyped-def,override]
        async for ev in super().generate(**kw):
            self.produced += 1
            yield ev


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, int, EndlessEngine]]:
    """A real uvicorn server on loopback serving EndlessEngine, stream send timeout 0.5 s."""
    fake = EndlessEngine(context_length=10**6)
    settings = Settings(data_dir=tmp_path / "data", admin_key=ADMIN_KEY, stream_send_timeout_s=0.5)

    def factory(s: Settings) -> Runtime:
        runtime = open_runtime(s, load_model=False)
        runtime.engine_client = fake  # type: ignore[assignment]
        return runtime

    config = uvicorn.Config(with_fake_model(create_app(settings, runtime_factory=factory)), host="127.0.0.1", port=0,
                            log_level="warning", lifespan="on")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    port = srv.servers[0].sockets[0].getsockname()[1]
    yield "127.0.0.1", port, fake
    srv.should_exit = True
    thread.join(10)


def _raw_post(host: str, port: int, path: str, body: dict[str, object], key: str) -> socket.socket:
    """Send a request on a socket with a small receive buffer and never read the answer."""
    data = json.dumps(body).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, port))
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def test_stalled_stream_reader_is_disconnected_and_cancelled(server: tuple[str, int, EndlessEngine]) -> None:
    import httpx

    host, port, fake = server
    with httpx.Client(base_url=f"http://{host}:{port}") as c:
        key = c.post("/admin/tenants", json={"name": "acme"},
                     headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()["api_key"]
    t0 = time.monotonic()
    sock = _raw_post(host, port, "/v1/completions",
                     {"model": "fake-base", "prompt": "hi", "max_tokens": 150_000, "stream": True}, key)
    try:
        while not fake.cancelled:
            assert time.monotonic() - t0 < 20, f"still generating for a stalled reader ({fake.produced} events)"
            time.sleep(0.05)
        elapsed = time.monotonic() - t0
        produced = fake.produced
        time.sleep(0.3)
        assert fake.produced == produced  # nothing more is generated
        # What it cost: the events that filled the socket buffers and the bounded queues, nowhere near all.
        assert produced < 100_000, produced
        assert elapsed < 10
        print(f"stalled reader: cancelled after {elapsed:.2f} s, {produced} events produced")
    finally:
        sock.close()
