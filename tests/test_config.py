"""Settings: env prefix, defaults of the embedded deployment, one clear line for a bad value."""

from __future__ import annotations

import subprocess
import sys

import pytest

from app.config import SettingsError, load_settings
from app.engine.sources import EMBEDDED_MODEL


def test_defaults_are_the_embedded_deployment(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PREFIXSERVE_DATA_DIR", str(tmp_path))
    s = load_settings()
    assert s.model == EMBEDDED_MODEL
    assert s.resolved_database_url == f"sqlite:///{tmp_path.resolve()}/prefixserve.db"
    assert s.resolved_object_store_url == f"file://{tmp_path.resolve()}/blobs"
    assert s.redis_url is None


def test_environment_overrides(monkeypatch) -> None:
    monkeypatch.setenv("PREFIXSERVE_REDIS_URL", "redis://127.0.0.1:6379/3")
    monkeypatch.setenv("PREFIXSERVE_MAX_BATCH_ROWS", "7")
    monkeypatch.setenv("PREFIXSERVE_OBJECT_STORE_URL", "s3://bucket/pfx")
    s = load_settings()
    assert (s.redis_url, s.max_batch_rows, s.object_store_url) == (
        "redis://127.0.0.1:6379/3",
        7,
        "s3://bucket/pfx",
    )


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("PREFIXSERVE_PORT", "0"),
        ("PREFIXSERVE_MAX_BATCH_ROWS", "many"),
        ("PREFIXSERVE_DTYPE", "int8"),
        ("PREFIXSERVE_OBJECT_STORE_URL", "ftp://x"),
        ("PREFIXSERVE_LOG_LEVEL", "LOUD"),
    ],
)
def test_invalid_setting_names_the_variable(monkeypatch, var: str, value: str) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(SettingsError, match=var):
        load_settings()


def test_serve_fails_at_start_with_one_line(tmp_path) -> None:
    env = {"PREFIXSERVE_PORT": "70000", "PREFIXSERVE_DATA_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-m", "app.cli", "serve"], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "PREFIXSERVE_PORT" in lines[0]
