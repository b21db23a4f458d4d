"""The app skeleton: cheap import, lifespan loads the model and stores, health and readiness probes."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time

import httpx
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app


def test_import_is_light() -> None:
    code = (
        "import sys, app.main; app.main.create_app(); "
        "print(any(m in sys.modules for m in ('torch', 'transformers')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "False"


def test_health_and_readiness(tmp_path) -> None:
    settings = Settings(data_dir=tmp_path, model="random:tiny-llama", admin_key="adm")
    with TestClient(create_app(settings)) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.get("/health").json() == {"status": "ok"}  # the name vLLM/TGI/llama.cpp answer on
        r = client.get("/readyz")
        assert r.status_code == 200, r.json()
        assert r.json()["checks"] == {"model": True, "database": True, "schema": True, "object_store": True}
        assert r.json()["message"] == "ready"
        # the database goes away: not ready
        client.app.state.runtime.db.dispose()
        os.remove(tmp_path / "prefixserve.db")
        (tmp_path / "prefixserve.db").mkdir()  # a directory cannot be opened as SQLite
        r = client.get("/readyz")
        assert r.status_code == 503 and r.json()["checks"]["database"] is False
        assert r.json()["message"].startswith("database: the database sqlite:///")
        assert client.get("/health").status_code == 200  # alive all along: nothing to restart


def test_embedded_default_generates_admin_key_once(tmp_path, caplog) -> None:
    settings = Settings(data_dir=tmp_path, model="random:tiny-llama")
    with caplog.at_level(logging.DEBUG), TestClient(create_app(settings)):
        pass
    key_file = tmp_path / "admin_key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    first = key_file.read_text()
    # The log says where the key is and how to read it, never the key itself.
    assert first.strip() not in caplog.text
    assert f"cat {key_file.resolve()}" in caplog.text
    with TestClient(create_app(settings)) as client:
        assert client.app.state.runtime.admin_key == first.strip()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_prefixserve_serve_starts_with_no_other_service(tmp_path) -> None:
    port = _free_port()
    env = dict(
        os.environ,
        PREFIXSERVE_DATA_DIR=str(tmp_path),
        PREFIXSERVE_MODEL="random:tiny-llama",
        PREFIXSERVE_PORT=str(port),
    )
    env.pop("PREFIXSERVE_DATABASE_URL", None)
    env.pop("PREFIXSERVE_REDIS_URL", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        else:
            raise AssertionError("server did not become ready")
        assert (tmp_path / "prefixserve.db").exists()
    finally:
        proc.terminate()
        proc.wait(30)
