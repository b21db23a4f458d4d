"""Set-up for the load test (bench/load.py): the target servers, a tenant, P uploaded prefixes, the requests.

The prefixes are random ones of the served model's shape and fingerprint (native format), so the bench needs
the model the servers run (`--model`, the same string as PREFIXSERVE_MODEL) to read its shape; with
`--cluster` it starts `scripts/cluster.sh` and takes everything from the cluster's env file.
"""

from __future__ import annotations

import logging
import os
import random
import shlex
import subprocess
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
