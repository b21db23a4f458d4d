"""`prefixserve train` on random:tiny-llama: in-process on the local deployment, and against a real
`prefixserve serve` subprocess (whose in-process worker trains the job); the trained prefix is then served."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from app.cli import cli
from app.config import Settings
from app.main import create_app

ADMIN = "adm-cli-test"
STEPS = ["--max-steps", "12", "--batch-size", "4", "--num-virtual-tokens", "4"]


def _write_examples(path: Path, n: int = 16, bad_line: int | None = None) -> Path:
    lines = [json.dumps({"prompt": f"item {i}:", "completion": f" <{i % 3}>"}) for i in range(n)]
    if bad_line is not None:
        lines[bad_line - 1] = json.dumps({"prompt": "no completion"})
    path.write_text("\n".join(lines) + "\n")
    return path


def _env(tmp: Path) -> dict[str, str]:
    return {"PREFIXSERVE_DATA_DIR": str(tmp / "data"), "PREFIXSERVE_MODEL": "random:tiny-llama",
            "PREFIXSERVE_ADMIN_KEY": ADMIN}


def test_train_in_process_then_serve_the_prefix(tmp_path: Path) -> None:
    data = _write_examples(tmp_path / "train.jsonl")
    result = CliRunner().invoke(cli, ["train", "--data", str(data), "--name", "demo", *STEPS], env=_env(tmp_path))
    assert result.exit_code == 0, result.output
    assert "training" in result.output and "12/12" in result.output  # the progress bar's last state
    assert re.search(r"succeeded after [\d.]+ s", result.output)
    assert "steps: 12/12; final train loss" in result.output and 'use it with: model = "demo@1"' in result.output
    key = re.search(r"API key \(shown once\): (\S+)", result.output)
    assert key is not None

    # The same data dir is the embedded server's: it serves the new prefix to the tenant's key.
    settings = Settings(data_dir=tmp_path / "data", model="random:tiny-llama", admin_key=ADMIN, job_queue="none")
    with TestClient(create_app(settings)) as client:
        r = client.post("/v1/completions", headers={"Authorization": f"Bearer {key.group(1)}"},
                        json={"model": "demo@1", "prompt": "item 4:", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200, r.text

    # A second run trains version 2 for the same tenant (no new key is printed).
    again = CliRunner().invoke(cli, ["train", "--data", str(data), "--name", "demo", *STEPS], env=_env(tmp_path))
    assert again.exit_code == 0, again.output
    assert 'model = "demo@2"' in again.output and "API key" not in again.output


def test_train_in_process_a_soft_prompt(tmp_path: Path) -> None:
    data = _write_examples(tmp_path / "train.jsonl")
    result = CliRunner().invoke(cli, ["train", "--data", str(data), "--name", "soft", "--kind", "prompt_tuning",
                                      *STEPS], env=_env(tmp_path))
    assert result.exit_code == 0, result.output
    settings = Settings(data_dir=tmp_path / "data", model="random:tiny-llama", admin_key=ADMIN, job_queue="none")
    key = re.search(r"API key \(shown once\): (\S+)", result.output)
    assert key is not None
    with TestClient(create_app(settings)) as client:
        card = client.get("/v1/models/soft@1", headers={"Authorization": f"Bearer {key.group(1)}"})
        assert card.status_code == 200 and card.json()["kind"] == "prompt_tuning", card.text

    wrong = CliRunner().invoke(cli, ["train", "--data", str(data), "--name", "x", "--kind", "lora"],
                               env=_env(tmp_path))
    assert wrong.exit_code == 2 and "lora" in wrong.output


def test_train_in_process_refuses_bad_data_with_the_line(tmp_path: Path) -> None:
    data = _write_examples(tmp_path / "bad.jsonl", bad_line=3)
    result = CliRunner().invoke(cli, ["train", "--data", str(data), "--name", "demo"], env=_env(tmp_path))
    assert result.exit_code == 1
    assert "line 3" in result.output and "completion" in result.output


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    """A `prefixserve serve` subprocess on the embedded defaults with random:tiny-llama."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFIXSERVE_")}
    env |= _env(tmp_path) | {"PREFIXSERVE_PORT": str(port)}
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve"], env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise AssertionError("the server did not become ready:\n" + (tmp_path / "serve.log").read_text())
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def test_train_against_a_server(server: str, tmp_path: Path) -> None:
    r = httpx.post(f"{server}/admin/tenants", headers={"Authorization": f"Bearer {ADMIN}"}, json={"name": "acme"})
    assert r.status_code in (200, 201), r.text
    key = r.json()["api_key"]
    data = _write_examples(tmp_path / "train.jsonl")
    args = ["train", "--data", str(data), "--name", "remote", "--server", server, "--api-key", key, *STEPS]

    result = CliRunner().invoke(cli, args, env={"PREFIXSERVE_DATA_DIR": str(tmp_path / "client")})
    assert result.exit_code == 0, result.output
    assert "12/12" in result.output and 'use it with: model = "remote@1"' in result.output
    assert "job started (attempt 1)" in result.output  # lifecycle events printed above the bar

    r = httpx.post(f"{server}/v1/completions", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                   json={"model": "remote@1", "prompt": "item 4:", "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text

    bad = _write_examples(tmp_path / "bad.jsonl", bad_line=2)
    args = ["train", "--data", str(bad), "--name", "remote", "--server", server, "--api-key", key]
    result = CliRunner().invoke(cli, args, env={"PREFIXSERVE_DATA_DIR": str(tmp_path / "client")})
    assert result.exit_code == 1 and "HTTP 400" in result.output and "line 2" in result.output
