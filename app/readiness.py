"""What serving needs, checked for real: the database answers and its schema is at this build's head, the
object store takes a write, Redis (when configured) answers, the model is loaded.

`/readyz` and the start-up log use the same checks, so both say the same thing about the same deployment. Every
description of a service is built by `describe_url`, which drops user names, passwords and query strings: the
log and the probe body never carry credentials.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import redis

from app.config import Settings
from prefix_store.blobs import BlobStore, BlobStoreUnavailable, open_blob_store

if TYPE_CHECKING:
    from app.engine.loop import Engine
    from app.engine.model import LoadedModel
    from app.schema_gate import SchemaGate

log = logging.getLogger(__name__)

# A probe that has not answered by then reports "no answer": a readiness probe must answer within an
# orchestrator's timeout (Kubernetes' default is 1 s, compose's here 3 s) even when a service hangs.
PROBE_TIMEOUT_S = 2.5
_MAX_REASON_CHARS = 300


@dataclass(frozen=True)
class Check:
    ok: bool
    detail: str  # what was checked; when not ok, what is wrong and what to do


def describe_url(url: str) -> str:
    """`url` without credentials (user, password) or query string, for logs and probe bodies."""
    parts = urlsplit(url)
    if not parts.scheme:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    return f"{parts.scheme}://{host}{f':{port}' if port else ''}{parts.path}"


def describe_object_store(settings: Settings) -> str:
    where = describe_url(settings.resolved_object_store_url)
    if settings.resolved_object_store_url.startswith("s3://"):
        where += f" at {describe_url(settings.s3_endpoint_url) if settings.s3_endpoint_url else 'AWS'}"
    return where


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= _MAX_REASON_CHARS else text[:_MAX_REASON_CHARS] + "…"


class _Probe:
    """Runs a blocking check on a daemon thread and waits at most `timeout_s` for it; a check still running
    is waited on by the next call rather than started again, so a hung service never piles up threads."""

    def __init__(self, fn: Callable[[], None], timeout_s: float = PROBE_TIMEOUT_S) -> None:
        self._fn = fn
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._pending: tuple[threading.Event, list[str | None]] | None = None

    def run(self) -> str | None:
        """None when the check passed, else why it did not."""
        with self._lock:
            if self._pending is None:
                result: list[str | None] = [None]
                self._pending = (threading.Event(), result)
                threading.Thread(target=self._call, args=self._pending, name="readiness-probe",
                                 daemon=True).start()
            done, result = self._pending
        if not done.wait(self.timeout_s):
            return f"no answer within {self.timeout_s:g} s"
        with self._lock:
            if self._pending is not None and self._pending[0] is done:
                self._pending = None
        return result[0]

    def _call(self, done: threading.Event, result: list[str | None]) -> None:
        try:
            self._fn()
        except Exception as exc:  # any failure is a reason not to be ready, reported as such
            result[0] = _reason(exc)
        finally:
            done.set()


# Not a prefix (safetensors) nor a training file (JSONL): no upload can store these bytes, so deleting them
# never deletes anything real.
PROBE_BLOB = b"prefixserve readiness probe: written and deleted by /readyz\n"


def probe_blob_store(blobs: BlobStore) -> None:
    """Write a small blob and delete it. The same bytes every time, so a file store keeps no trail of empty
    fan-out directories; deleted after each probe, so the next `put` really writes (a content-addressed put of
    bytes already stored writes nothing)."""
    blobs.delete(blobs.put(PROBE_BLOB))


class StoreChecks:
    """The active checks of the shared stores: the object store takes a write; Redis answers a PING."""

    def __init__(self, settings: Settings, blobs: BlobStore) -> None:
        self.settings = settings
        self._object_store = _Probe(lambda: probe_blob_store(blobs))
        self._redis: _Probe | None = None
        self._redis_client: redis.Redis | None = None
        if settings.redis_url:
            client = redis.Redis.from_url(settings.redis_url, socket_timeout=1.0, socket_connect_timeout=1.0,
                                          client_name="prefixserve-readiness")

            def ping() -> None:
                client.ping()  # raises when Redis does not answer

            self._redis = _Probe(ping)
            self._redis_client = client

    def close(self) -> None:
        if self._redis_client is not None:
            self._redis_client.close()

    def object_store(self) -> Check:
        where = describe_object_store(self.settings)
        error = self._object_store.run()
        if error is None:
            return Check(True, f"{where}: writable")
        return Check(False, f"object store {where} is not writable ({error}): check that it is up and "
                            "PREFIXSERVE_OBJECT_STORE_URL and the PREFIXSERVE_S3_* settings")

    def cache(self) -> Check | None:
        """None without Redis (the in-process cache needs no check)."""
        if self._redis is None or self.settings.redis_url is None:
            return None
        where = describe_url(self.settings.redis_url)
        error = self._redis.run()
        if error is None:
            return Check(True, f"Redis {where}: answers")
        return Check(False, f"Redis {where} does not answer ({error}): check that it is up and "
                            "PREFIXSERVE_REDIS_URL")


class DeferredBlobStore:
    """The object store as it will be once it answers: S3 unreachable at start-up (or its bucket not yet
    creatable) must leave the server running and saying why it is not ready, not exit it. Opening is retried
    on use, at most once every `retry_interval_s`; until it succeeds every call raises BlobStoreUnavailable,
    which callers already turn into 503s."""

    def __init__(self, opener: Callable[[], BlobStore], error: str, *, retry_interval_s: float = 1.0) -> None:
        self._opener = opener
        self._error = error
        self.retry_interval_s = retry_interval_s
        self._next_try = time.monotonic() + retry_interval_s
        self._store: BlobStore | None = None
        self._lock = threading.Lock()

    def _opened(self) -> BlobStore:
        if self._store is not None:
            return self._store
        with self._lock:
            if self._store is None:
                if time.monotonic() < self._next_try:
                    raise BlobStoreUnavailable(self._error)
                try:
                    self._store = self._opener()
                except BlobStoreUnavailable as exc:
                    self._error = str(exc)
                    self._next_try = time.monotonic() + self.retry_interval_s
                    raise
                log.info("object store reachable: %r", self._store)
            return self._store

    def put(self, data: bytes) -> str:
        return self._opened().put(data)

    def get(self, sha256: str) -> bytes:
        return self._opened().get(sha256)

    def exists(self, sha256: str) -> bool:
        return self._opened().exists(sha256)

    def delete(self, sha256: str) -> None:
        self._opened().delete(sha256)


def open_blobs(settings: Settings) -> BlobStore:
    """The configured object store; a DeferredBlobStore when it cannot be reached now."""
    def opener() -> BlobStore:
        return open_blob_store(settings.resolved_object_store_url, endpoint_url=settings.s3_endpoint_url,
                               access_key=settings.s3_access_key_id, secret_key=settings.s3_secret_access_key,
                               region=settings.s3_region)

    try:
        return opener()
    except BlobStoreUnavailable as exc:
        return DeferredBlobStore(opener, str(exc))


def model_check(model: LoadedModel | None, engine: Engine | None) -> Check:
    if model is None or engine is None:
        return Check(False, "the model is not loaded")
    if not engine.alive:
        return Check(False, "the engine thread stopped: restart this process (its log says why)")
    return Check(True, f"{model.spec.model_id} on {model.device}")


def database_checks(settings: Settings, *, answers: bool, schema_gate: SchemaGate | None) -> dict[str, Check]:
    """`database` (it answers) and `schema` (at this build's head; re-read while it is not)."""
    where = describe_url(settings.resolved_database_url)
    out = {"database": Check(True, where) if answers else Check(
        False, f"the database {where} does not answer: check that it is up and PREFIXSERVE_DATABASE_URL")}
    if schema_gate is not None:
        state = schema_gate.check()
        out["schema"] = Check(True, f"at revision {state.revision}") if state.ok else Check(False, state.message)
    return out


def job_queue_line(settings: Settings, cache: Check | None) -> tuple[bool, str]:
    kind = settings.resolved_job_queue
    if kind == "arq":
        ok = cache is None or cache.ok
        where = describe_url(settings.redis_url or "")
        return ok, f"arq on Redis {where}" + ("" if ok else " (Redis does not answer: jobs stay queued)")
    if kind == "inprocess":
        return True, "in-process worker thread"
    return True, "none: this process runs no training jobs (a `prefixserve worker` picks them up)"


def log_start_up(s: Settings, db: dict[str, Check], store_checks: StoreChecks | None) -> None:
    """One line each for the database, object store, cache and job queue: what is used, whether it is ready.
    `db`: database_checks' answer."""
    if db["database"].ok and "schema" in db:
        db["database"] = Check(db["schema"].ok, f"{db['database'].detail}, {db['schema'].detail}")
    store = store_checks.object_store() if store_checks is not None else None
    cache = store_checks.cache() if store_checks is not None else None
    cache_line = cache or Check(True, "in-process (no PREFIXSERVE_REDIS_URL)")
    queue_ok, queue = job_queue_line(s, cache)
    for name, check in (("database", db["database"]), ("object store", store), ("cache", cache_line),
                        ("job queue", Check(queue_ok, queue))):
        if check is None:
            continue
        if check.ok:
            log.info("%s: %s: ready", name, check.detail)
        else:
            log.warning("%s: NOT READY: %s", name, check.detail)
