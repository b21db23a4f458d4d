"""The caller's PREFIXSERVE_* settings never reach the tests: the suite runs against what its fixtures say, not
against whatever a developer's shell exports."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from app.config import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_fixture_settings_ignore_the_environment(settings: Settings) -> None:
    """Trivially true in a clean shell; the next test runs it with the variables exported."""
    assert "PREFIXSERVE_MAX_BATCH_ROWS" not in os.environ
    assert settings.max_batch_rows != 1
    assert settings.request_timeout_s != 0.001


def test_a_shell_exporting_settings_changes_nothing() -> None:
    env = {**os.environ, "PREFIXSERVE_MAX_BATCH_ROWS": "1", "PREFIXSERVE_REQUEST_TIMEOUT_S": "0.001"}
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         f"{__file__}::test_fixture_settings_ignore_the_environment"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert out.returncode == 0 and "1 passed" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]
