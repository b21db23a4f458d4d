"""`prefixserve serve` as a real subprocess for the shutdown and fault tests: start, wait for readiness, stop.

Each server gets its own free loopback port, its own log file (tailed to stderr by the fixtures on failure) and
its own process group, so a stop never reaches anything else; nothing is ever killed by name.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.conftest import without_app_settings
from tests.s3_server import closed_port

MODEL = "random:tiny-llama"
START_TIMEOUT_S = 180.0  # imports torch and builds the model: slow on a busy 2-core machine


class ServerProcess:
    """One `python -m app.cli serve` process on `random:tiny-llama` with the given PREFIXSERVE_* settings."""

    def __init__(self, log_path: Path, settings: dict[str, str]) -> None:
        self.port = closed_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        # Explicit: none of the caller's PREFIXSERVE_* settings, only the ones given here.
        env = {**without_app_settings(os.environ), "PREFIXSERVE_MODEL": MODEL, "PREFIXSERVE_HOST": "127.0.0.1",
               "PREFIXSERVE_PORT": str(self.port), "PREFIXSERVE_TORCH_THREADS": "1", **settings}
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve"], env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"the server exited ({self.proc.returncode}):\n{self.log_tail()}"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            time.sleep(0.3)
        raise AssertionError(f"the server was not ready in {timeout_s:.0f} s:\n{self.log_tail()}")

    def terminate(self) -> None:
        """SIGTERM (a graceful stop), as an orchestrator sends it."""
        self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        """Make sure it is gone: SIGTERM, then SIGKILL to its process group after 30 s."""
        if self.proc.poll() is None:
            self.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()

    def log_tail(self, n: int = 4000) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_bytes()[-n:].decode(errors="replace")
