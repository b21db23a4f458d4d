"""Set-up for the load benchmarks (bench/load.py, bench/http_vs_engine.py): the target servers, a tenant,
P uploaded prefixes, the requests.

The prefixes are random ones of the served model's shape and fingerprint (native format), so the bench needs
the model the servers run (`--model`, the same string as PREFIXSERVE_MODEL) to read its shape; the cluster
target starts `scripts/cluster.sh` and takes everything from the cluster's env file; the embedded target starts
one `prefixserve serve` with default settings (SQLite, in-process cache, local blobs) on a free port.
"""

from __future__ import annotations

import logging
import os
import random
import secrets
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

log = logging.getLogger("bench.load")
ROOT = Path(__file__).resolve().parents[1]
WORDS = ("river", "stone", "light", "quiet", "morning", "signal", "paper", "garden", "winter", "copper", "orbit",
         "lantern", "harbor", "velvet", "meadow", "engine", "violet", "canyon", "thunder", "marble")
# Limits far above any load this bench can make, so it measures the servers, not the tenant's quotas.
UNLIMITED = {"requests_per_minute": 10**9, "tokens_per_minute": 10**12, "max_concurrent_requests": 10**6,
             "max_prefixes": 10**6, "max_stored_bytes": 10**15}


@dataclass(frozen=True)
class Target:
    urls: list[str]
    admin_key: str
    model: str  # the PREFIXSERVE_MODEL the servers run


@dataclass(frozen=True)
class RequestSpec:
    model: str  # a prefix name, or the base model id
    prompt: str


@dataclass
class Workload:
    tenant_id: str
    api_key: str
    requests: list[RequestSpec]

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}


def start_cluster(run_dir: Path, model: str) -> tuple[Target, Callable[[], None]]:
    """Start the local cluster (scripts/cluster.sh) on `model`; returns the target and its stop function."""
    env = {**os.environ, "CLUSTER_DIR": str(run_dir), "PREFIXSERVE_MODEL": model}

    def stop() -> None:
        subprocess.run(["bash", "scripts/cluster.sh", "stop"], cwd=ROOT, env=env, check=False, timeout=120)

    try:
        subprocess.run(["bash", "scripts/cluster.sh", "start"], cwd=ROOT, env=env, check=True, timeout=900)
    except BaseException:
        stop()
        raise
    values = {}
    for line in (run_dir / "cluster.env").read_text().splitlines():
        key, _, value = line.partition("=")
        values[key] = " ".join(shlex.split(value))
    return Target(values["CLUSTER_API_URLS"].split(), values["PREFIXSERVE_ADMIN_KEY"], model), stop


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class EmbeddedServer:
    """One `prefixserve serve` process started by a bench (its pid is what a profiler attaches to)."""

    proc: subprocess.Popen[bytes]
    target: Target
    log_path: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)


def start_embedded(run_dir: Path, model: str, *, ready_timeout_s: float = 300.0,
                   extra_env: dict[str, str] | None = None) -> EmbeddedServer:
    """`prefixserve serve` with default settings: SQLite, blobs and the admin key under `run_dir`, a free port.

    Every PREFIXSERVE_* variable of the calling shell is dropped so the server runs on its defaults; only the
    data dir, port, admin key and model are set. `run_dir/models` links to the repository's converted-model
    cache so the GGUF is not dequantized again (~30 s, app/engine/gguf_cache.py).
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    shared_models = ROOT / "data" / "models"
    if shared_models.is_dir() and not (run_dir / "models").exists():
        (run_dir / "models").symlink_to(shared_models, target_is_directory=True)
    port = free_port()
    admin_key = "psk-admin-" + secrets.token_urlsafe(24)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFIXSERVE_")}
    env |= {"PREFIXSERVE_DATA_DIR": str(run_dir), "PREFIXSERVE_MODEL": model, "PREFIXSERVE_ADMIN_KEY": admin_key,
            **(extra_env or {})}
    log_path = run_dir / "server.log"
    with log_path.open("ab") as out:
        proc = subprocess.Popen([str(ROOT / ".venv" / "bin" / "prefixserve"), "serve", "--host", "127.0.0.1",
                                 "--port", str(port)], cwd=run_dir, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    server = EmbeddedServer(proc, Target([f"http://127.0.0.1:{port}"], admin_key, model), log_path)
    deadline = time.monotonic() + ready_timeout_s
    try:
        with httpx.Client(timeout=2) as client:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"prefixserve serve exited ({proc.returncode}); log: {log_path}")
                try:
                    if client.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass  # not listening yet
                if time.monotonic() > deadline:
                    raise RuntimeError(f"prefixserve serve not ready after {ready_timeout_s:.0f} s; log: {log_path}")
                time.sleep(0.5)
    except BaseException:
        server.stop()
        raise
    log.info("embedded server pid %d at %s (data dir %s)", proc.pid, server.target.urls[0], run_dir)
    return server


def create_tenant(client: httpx.Client, target: Target, name: str) -> tuple[str, str]:
    """A fresh tenant (id, API key) with limits out of the way (servers without the limits API: skipped)."""
    admin = {"Authorization": f"Bearer {target.admin_key}"}
    r = client.post(f"{target.urls[0]}/admin/tenants", json={"name": name}, headers=admin)
    r.raise_for_status()
    tenant_id, key = r.json()["id"], r.json()["api_key"]
    r = client.put(f"{target.urls[0]}/admin/tenants/{tenant_id}/limits", json=UNLIMITED, headers=admin)
    if r.status_code not in (200, 404, 405):
        r.raise_for_status()
    return tenant_id, key


def delete_tenant(client: httpx.Client, target: Target, tenant_id: str) -> None:
    r = client.delete(f"{target.urls[0]}/admin/tenants/{tenant_id}",
                      headers={"Authorization": f"Bearer {target.admin_key}"})
    if r.status_code != 200:
        log.warning("could not delete the bench tenant %s: %s %s", tenant_id, r.status_code, r.text[:200])


def prefix_blobs(model: str, n: int, virtual_tokens: int, seed: int) -> list[bytes]:
    """n random prefixes for `model` in the native format: keys/values [L, H_kv, P, head_dim], N(0, 1)."""
    import torch

    from app.engine.model import load_model
    from prefix_store.codec import encode_native
    from prefix_store.types import PrefixKV

    spec = load_model(model, data_dir=ROOT / "data").spec  # the converted-model cache the servers share
    gen = torch.Generator().manual_seed(seed)
    shape = (spec.num_layers, spec.num_kv_heads, virtual_tokens, spec.head_dim)
    return [encode_native(PrefixKV(keys=torch.randn(shape, generator=gen), values=torch.randn(shape, generator=gen),
                                   base_fingerprint=spec.fingerprint, created_by="bench.load"))
            for _ in range(n)]


def prepare(client: httpx.Client, target: Target, *, prefixes: int, virtual_tokens: int, seed: int) -> Workload:
    """Tenant, `prefixes` uploads (round-robin over the replicas), and one request per prefix plus a few on the
    base model, each with its own prompt."""
    tenant_id, key = create_tenant(client, target, f"bench-load-{seed}-{os.getpid()}")
    work = Workload(tenant_id, key, [])
    rng = random.Random(seed)
    for i, blob in enumerate(prefix_blobs(target.model, prefixes, virtual_tokens, seed)):
        name = f"load-{i}"
        r = client.post(f"{target.urls[i % len(target.urls)]}/v1/prefixes", headers=work.headers,
                        data={"name": name}, files={"file": (f"{name}.safetensors", blob, "application/octet-stream")})
        r.raise_for_status()
        work.requests.append(RequestSpec(name, " ".join(rng.choices(WORDS, k=rng.randint(4, 12)))))
    r = client.get(f"{target.urls[0]}/v1/models", headers=work.headers)
    r.raise_for_status()
    base = next(m["id"] for m in r.json()["data"] if m.get("parent") in (None, ""))
    for _ in range(max(1, prefixes // 20)):
        work.requests.append(RequestSpec(base, " ".join(rng.choices(WORDS, k=rng.randint(4, 12)))))
    log.info("tenant %s: %d prefixes of %d virtual tokens, %d distinct requests", tenant_id, prefixes,
             virtual_tokens, len(work.requests))
    return work
