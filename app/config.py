"""The one Settings class: every knob of the service, read from `PREFIXSERVE_*` environment variables.

Nothing else in the code base reads the environment. Invalid values fail at start-up with one line naming the
variable (see `load_settings`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.engine.sources import EMBEDDED_MODEL


class SettingsError(Exception):
    """A setting has an invalid value; the message names the environment variable."""


class Settings(BaseSettings):
    """Service configuration. Defaults give the embedded single-machine deployment (docs/operations.md)."""

    model_config = SettingsConfigDict(env_prefix="PREFIXSERVE_", extra="ignore", frozen=True)

    data_dir: Path = Path("data")
    # Local HF directory, hub id, path to a .gguf file, `random:<preset>`, or the embedded SmolLM2.
    model: str = EMBEDDED_MODEL
    # The id clients use for the base model in `model`; default: derived from `model`.
    model_name: str | None = None
    allow_hub_download: bool = False
    device: str = "cpu"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"

    database_url: str | None = None  # default: SQLite under data_dir
    # Migrate PREFIXSERVE_DATABASE_URL to this build's schema at start-up (the embedded SQLite default always
    # is). Off by default: a shared database is migrated by `prefixserve migrate`, not behind the operator's
    # back; replicas starting together with it on take turns on the migrations' advisory lock.
    migrate_on_start: bool = False
    # Connections: a request holds one only for its queries (milliseconds); waiting longer than the timeout for
    # one (or for a database thread) is a 503 with Retry-After, never a 30 s hang.
    database_pool_size: int = Field(default=10, ge=1)
    database_max_overflow: int = Field(default=20, ge=0)
    database_pool_timeout_s: float = Field(default=1.0, gt=0)
    redis_url: str | None = None  # default: in-process cache
    object_store_url: str | None = None  # default: local directory under data_dir; or s3://bucket/prefix
    s3_endpoint_url: str | None = None
    s3_access_key_id: str | None = None
    s3_secret_access_key: str | None = None
    s3_region: str = "us-east-1"

    admin_key: str | None = None
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)

    device_pool_bytes: int = Field(default=512 * 2**20, ge=0)
    redis_ttl_s: int = Field(default=24 * 3600, ge=1)
    redis_max_value_bytes: int = Field(default=16 * 2**20, ge=1)
    max_virtual_tokens: int = Field(default=256, ge=1)
    # A stack of prefixes in one request (`support-bot+user:ann`): the most parts, and the most virtual tokens
    # of all its parts together (each part is within max_virtual_tokens already).
    max_stack_prefixes: int = Field(default=4, ge=1)
    max_stack_virtual_tokens: int = Field(default=512, ge=1)
    max_upload_bytes: int = Field(default=64 * 2**20, ge=1)
    # Training files (`POST /v1/files`): the largest accepted, and the most examples (lines) one may hold.
    max_file_bytes: int = Field(default=64 * 2**20, ge=1)
    max_file_examples: int = Field(default=100_000, ge=1)

    max_batch_rows: int = Field(default=64, ge=1)
    max_batch_tokens: int = Field(default=32768, ge=1)
    max_waiting: int = Field(default=1024, ge=1)
    torch_threads: int | None = Field(default=None, ge=1)
    # CPU, float32 only: serve with oneDNN-prepacked linear weights (app/engine/packed_linear.py; about 1.5x
    # faster decode steps on the machines we measured, one more copy of the linear weights in memory).
    cpu_packed_linears: bool = True
    # Serving weights: "fp32" the model as loaded; "int4" / "int8" a weight-only quantized serving copy of its
    # linear layers (CPU, Llama family; int4 keeps a GGUF's own 4-bit blocks) run by a leaner forward
    # (app/engine/quantized_decoder.py). Training always uses the float weights. See README "Settings".
    weights: Literal["fp32", "int4", "int8"] = "fp32"

    # Training jobs. "auto": arq over Redis when redis_url is set, else the in-process worker thread;
    # "none": this process runs no jobs (API replicas; a worker's recovery sweep picks queued jobs up).
    job_queue: Literal["auto", "arq", "inprocess", "none"] = "auto"
    # How often a training worker refreshes its job's heartbeat and polls the job's cancel flag.
    job_heartbeat_s: float = Field(default=2.0, gt=0)
    # A running job whose heartbeat is older than this lost its worker: the sweep re-queues or fails it.
    job_stale_after_s: float = Field(default=60.0, gt=0)
    # Attempts (claims by a worker) before a job whose workers keep dying is failed.
    job_max_attempts: int = Field(default=3, ge=1)
    # The longest one training job may run in an arq worker before it is interrupted.
    job_timeout_s: int = Field(default=6 * 3600, ge=1)
    # How often workers sweep for stale running jobs and queued jobs that no queue carries.
    job_sweep_interval_s: float = Field(default=15.0, gt=0)
    # Batch API: requests of batches in flight in one server process (all its batches together; 0: this process
    # runs no batches, another replica does). Batches use the job heartbeat, staleness and sweep settings above.
    batch_concurrency: int = Field(default=16, ge=0)
    # Intra-op threads of a `prefixserve worker` / `prefixserve train` process (default: torch's choice).
    training_torch_threads: int | None = Field(default=None, ge=1)

    # Per-tenant limits: the default of each `tenant_limits` column a tenant leaves NULL; None here
    # means unlimited. Rates are per minute (fixed windows); generated tokens are counted after generation.
    tenant_requests_per_minute: int | None = Field(default=600, ge=0)
    tenant_tokens_per_minute: int | None = Field(default=1_000_000, ge=0)
    tenant_max_concurrent_requests: int | None = Field(default=64, ge=0)
    tenant_max_prefixes: int | None = Field(default=10_000, ge=0)
    tenant_max_stored_bytes: int | None = Field(default=10 * 2**30, ge=0)  # prefix versions + files
    tenant_max_concurrent_jobs: int | None = Field(default=4, ge=0)
    tenant_max_examples_per_user: int | None = Field(default=10_000, ge=0)
    tenant_max_concurrent_batches: int | None = Field(default=4, ge=0)
    # A generation still queued or running this long is ended with a 504 and its engine row freed.
    request_timeout_s: float = Field(default=600.0, gt=0)
    # A streaming client that has not taken one SSE message for this long is disconnected (its rows cancelled).
    stream_send_timeout_s: float = Field(default=30.0, gt=0)
    # Graceful shutdown (SIGTERM): in-flight requests get this long to finish, then the engine ends the rest with
    # an error (a stream gets its error chunk and [DONE]); the in-process training job is handed back as queued.
    shutdown_grace_s: float = Field(default=30.0, ge=0)
    # Browser origins allowed by CORS, comma-separated; empty (the default) sends no CORS headers at all.
    cors_allow_origins: str = ""

    log_level: str = "INFO"
    log_json: bool = False
    # Prompt text in the access log: a debugging aid only (prompts may hold personal data), so off by default.
    log_prompts: bool = False
    # `/metrics` (Prometheus text format) is unauthenticated, so it can be switched off where the port is public.
    metrics_enabled: bool = True
    # The web console at /console: static pages that call this API from the browser with the user's key.
    console: bool = True

    @field_validator("object_store_url")
    @classmethod
    def _object_store_scheme(cls, v: str | None) -> str | None:
        if v is not None and not (v.startswith("s3://") or v.startswith("file://") or v.startswith("/")):
            raise ValueError("must be s3://bucket[/prefix], file:///path or an absolute path")
        return v

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, v: str) -> str:
        if v.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
        return v.upper()

    @field_validator("job_queue")
    @classmethod
    def _arq_needs_redis(cls, v: str, info: ValidationInfo) -> str:
        # redis_url is declared above job_queue, so it is validated (and in info.data) first.
        if v == "arq" and not info.data.get("redis_url"):
            raise ValueError("arq needs PREFIXSERVE_REDIS_URL")
        return v

    @property
    def cors_origins(self) -> list[str]:
        return [o.strip() for o in self.cors_allow_origins.split(",") if o.strip()]

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'prefixserve.db').resolve()}"

    @property
    def resolved_object_store_url(self) -> str:
        return self.object_store_url or f"file://{(self.data_dir / 'blobs').resolve()}"

    @property
    def resolved_job_queue(self) -> Literal["arq", "inprocess", "none"]:
        """The job queue this process uses: `auto` is arq when Redis is configured, else in-process."""
        if self.job_queue == "auto":
            return "arq" if self.redis_url else "inprocess"
        return self.job_queue


def load_settings(**overrides: object) -> Settings:
    """Build Settings from the environment (plus overrides); raise SettingsError naming the bad variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else "?"
        raise SettingsError(f"invalid setting PREFIXSERVE_{field.upper()}: {err['msg']}") from None
