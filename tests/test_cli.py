"""The `prefixserve` app: logging is configured once, before any command runs, quieter for `train`."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

import app.cli
from app.cli import cli


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, bool]]:
    seen: list[tuple[str, bool]] = []
    monkeypatch.setattr(app.cli, "configure_logging", lambda level, *, json_format: seen.append((level, json_format)))
    return seen


def test_logging_is_configured_once_for_every_command(calls: list[tuple[str, bool]], tmp_path: Path) -> None:
    env = {"PREFIXSERVE_DATA_DIR": str(tmp_path), "PREFIXSERVE_REDIS_URL": ""}
    assert CliRunner().invoke(cli, ["worker"], env=env).exit_code == 2  # refuses: no Redis, after logging is set
    assert calls == [("INFO", False)]
    calls.clear()
    result = CliRunner().invoke(cli, ["train", "--data", str(tmp_path / "missing.jsonl"), "--name", "x"],
                                env={**env, "PREFIXSERVE_LOG_JSON": "true"})
    assert result.exit_code == 2 and calls == [("WARNING", True)]  # the progress bar is train's output


def test_bad_settings_do_not_hide_help(calls: list[tuple[str, bool]]) -> None:
    result = CliRunner().invoke(cli, ["migrate", "--help"], env={"PREFIXSERVE_PORT": "not a port"})
    assert result.exit_code == 0 and "Upgrade the database schema" in result.output and calls == []
    result = CliRunner().invoke(cli, ["migrate"], env={"PREFIXSERVE_PORT": "not a port"})
    assert result.exit_code == 2 and "error:" in result.output
