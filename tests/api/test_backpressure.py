"""Backpressure over HTTP. With the real engine (tiny Llama, one batch row, one waiting slot): a request beyond
the waiting queue is refused at once (429 + Retry-After), not queued behind the others; a request past the
request timeout gets a 504 (an error chunk when streaming) and leaves the engine. With a real server on
loopback: a streaming client that stops reading is disconnected and its generation cancelled."""

from __future__ import annotations

import dataclasses
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
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
from tests.engine.helpers import StepProbe

LONG = {"prompt": "hi", "max_tokens": 1000, "temperature": 0}  # >= 5 s with the slowed model below


@dataclasses.dataclass
class Tight:
    api: Api
    probe: StepProbe


@pytest.fixture
def tight(tmp_path: Path) -> Iterator[Tight]:
    for api in make_api(tmp_path, max_batch_rows=1, max_waiting=1, request_timeout_s=0.6):
        # The tiny model decodes 1000 tokens in well under a second: 5 ms a step makes LONG take at least 5 s
        # whatever the machine's speed, so it surely outlives the 0.6 s timeout.
        engine = api.runtime.engine
        assert engine is not None
        yield Tight(api, StepProbe(engine, step_delay_s=0.005))


def _wait(predicate: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    """Wait for `predicate`; the deadline only turns an event that never comes into a failure, not a hang."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.005)


def _engine_idle(api: Api) -> bool:
    engine = api.runtime.engine
    assert engine is not None
    return engine.requests.active == {} and engine.stats.running_rows == 0 and engine.stats.waiting == 0


def test_overload_is_refused_at_once_and_timeouts_free_the_engine(tight: Tight) -> None:
    api, probe = tight.api, tight.probe
    engine = api.runtime.engine
    assert engine is not None
    _, key = api.tenant("acme")
    body = {**LONG, "model": api.spec.model_id}

    def post() -> tuple[int, dict[str, str], dict[str, object]]:
        r = api.client.post("/v1/completions", headers=bearer(key), json=body)
        return r.status_code, dict(r.headers), r.json()

    # Decoding is held while the three requests arrive: one runs, one waits, the third finds the queue full.
    # Steps instead of delays: a loaded machine cannot reorder them, a fast one cannot finish the first early.
    probe.hold()
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(post)
        _wait(probe.decoding.is_set, "the first request decoding")
        second = pool.submit(post)
        _wait(lambda: engine.stats.waiting == 1, "the second request waiting")
        # Answered while the engine is held: queued behind the others, it could only have ended after the
        # release, by timing out (504). So a 429 here is a refusal that did not wait in line.
        s3, h3, b3 = post()
        probe.release()
        (s1, _, b1), (s2, _, b2) = first.result(), second.result()
    assert s3 == 429 and h3["retry-after"] == "1" and b3["error"]["code"] == "overloaded"  # type: ignore[index]
    for status, err in ((s1, b1), (s2, b2)):  # the running and the waiting request both time out
        assert status == 504, err
        assert err["error"]["type"] == "timeout_error" and "timed out" in err["error"]["message"]  # type: ignore[index]
    assert _engine_idle(api)


def test_streaming_timeout_sends_an_error_chunk(tight: Tight) -> None:
    """The deadline passes while the stream is under way. The real 0.6 s could run out before the first prefill
    on a loaded machine (no token would be streamed): the timeout is made generous, decoding is held after the
    first token, and the test moves the request's deadline to now, as if the timeout had run out."""
    api, probe = tight.api, tight.probe
    engine = api.runtime.engine
    assert engine is not None
    engine.limits = dataclasses.replace(engine.limits, request_timeout_s=30)
    _, key = api.tenant("acme")
    probe.hold()
    out: dict[str, object] = {}

    def read() -> None:
        with api.client.stream("POST", "/v1/completions", headers=bearer(key),
                               json={**LONG, "model": api.spec.model_id, "stream": True}) as r:
            out["status"] = r.status_code
            out["payloads"] = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]

    reader = threading.Thread(target=read)
    reader.start()
    _wait(probe.decoding.is_set, "the request decoding")
    (active,) = engine.requests.active.values()
    active.deadline = time.monotonic()
    probe.release()
    reader.join(60)
    assert out["status"] == 200  # the stream had started
    payloads: list[str] = out["payloads"]  # type: ignore[assignment]
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
        return replace(open_runtime(s, load_model=False), engine_client=fake)

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
    sock = _raw_post(host, port, "/v1/completions",
                     {"model": "fake-base", "prompt": "hi", "max_tokens": 150_000, "stream": True}, key)
    try:
        # The generous deadline only fails a reader that is never disconnected; how soon it is (0.5 s send
        # timeout + buffers filling) depends on the machine and is not what is tested.
        _wait(lambda: bool(fake.cancelled), f"the stalled reader's generation cancelled ({fake.produced} events)")
        # The cancelled generation was closed: what it cost is the events that filled the socket buffers and
        # the bounded queues, nowhere near all of them.
        assert fake.calls[0].cancelled and not fake.calls[0].finished
        assert fake.produced < 100_000, fake.produced
    finally:
        sock.close()
