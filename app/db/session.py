"""Engines, sessions and ids.

`make_engine` is the one place a database URL becomes an Engine, so every SQLite connection gets the same
pragmas: foreign keys enforced (SQLite ignores them unless asked, per connection), WAL so readers never block
the writer, and a busy timeout so concurrent writers wait instead of failing with "database is locked".
"""

from __future__ import annotations

import secrets
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BUSY_TIMEOUT_MS: Final = 30_000

IdKind = Literal[
    "tenant",
    "api_key",
    "prefix",
    "prefix_version",
    "end_user",
    "user_example",
    "file",
    "training_job",
    "job_event",
    "job_checkpoint",
    "batch",
]

# Readable, OpenAI-style id prefixes. The API shows these ids as they are; never change one once rows exist.
ID_PREFIXES: Final[dict[IdKind, str]] = {
    "tenant": "ten_",
    "api_key": "key_",
    "prefix": "pfx_",
    "prefix_version": "pfv_",
    "end_user": "usr_",
    "user_example": "ex_",
    "file": "file-",
    "training_job": "ftjob-",
    "job_event": "ftevent-",
    "job_checkpoint": "ftckpt-",
    "batch": "batch_",
}
ID_RANDOM_CHARS: Final = 24  # base62: ~143 bits, unguessable and collision-free in practice
_ALPHABET: Final = string.ascii_letters + string.digits


def new_id(kind: IdKind) -> str:
    """A fresh primary key for `kind`, e.g. `new_id("training_job") == "ftjob-3kQ..."` (24 random base62)."""
    try:
        prefix = ID_PREFIXES[kind]
    except KeyError:
        raise ValueError(f"unknown id kind {kind!r}; expected one of {sorted(ID_PREFIXES)}") from None
    return prefix + "".join(secrets.choice(_ALPHABET) for _ in range(ID_RANDOM_CHARS))


def sqlite_file(url: str | URL) -> Path | None:
    """The file of a file-backed SQLite URL; None for other databases, in-memory and `file:` URI ones."""
    u = sa.make_url(url)
    db = u.database
    if u.get_backend_name() != "sqlite" or not db or db == ":memory:" or db.startswith("file:"):
        return None
    return Path(db).expanduser()


def ensure_sqlite_parent_dir(url: str | URL) -> None:
    """Create the directory that will hold a file-backed SQLite database; no-op for other databases."""
    path = sqlite_file(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)


@dataclass(frozen=True)
class PoolLimits:
    """The connection pool: `size` kept open, up to `overflow` more under load, `timeout_s` to wait for one."""

    size: int = 5
    overflow: int = 10
    timeout_s: float = 30.0

    def options(self) -> dict[str, Any]:
        return {"pool_size": self.size, "max_overflow": self.overflow, "pool_timeout": self.timeout_s}


def make_engine(url: str | URL, *, echo: bool = False, sqlite_foreign_keys: bool = True,
                pool: PoolLimits | None = None) -> Engine:
    """Engine for `url`. SQLite: creates the file's directory and sets the pragmas on every connection.

    `sqlite_foreign_keys=False` is only for migrations: SQLite "batch" table rebuilds drop and recreate
    tables, and with foreign keys on, dropping a parent table silently runs its ON DELETE CASCADE.
    """
    u = sa.make_url(url)
    pool_options = (pool or PoolLimits()).options()
    if u.get_backend_name() != "sqlite":
        return sa.create_engine(u, echo=echo, pool_pre_ping=True, **pool_options)

    ensure_sqlite_parent_dir(u)
    in_memory = not u.database or u.database == ":memory:" or "mode=memory" in str(u.database)
    # An in-memory database lives in one connection (a static pool): no pool options apply.
    engine = sa.create_engine(u, echo=echo, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
                              **({} if in_memory else pool_options))

    @sa.event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
        # Runs before the driver opens any transaction: `PRAGMA foreign_keys` is a no-op inside one.
        cur = dbapi_conn.cursor()
        try:
            cur.execute(f"PRAGMA foreign_keys={'ON' if sqlite_foreign_keys else 'OFF'}")
            cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            if not in_memory:
                cur.execute("PRAGMA journal_mode=WAL")
                # Safe with WAL: a power loss may lose the last commits, never corrupt the file.
                cur.execute("PRAGMA synchronous=NORMAL")
        finally:
            cur.close()

    return engine


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions bound to `engine`. `expire_on_commit=False`: rows stay readable after commit (the API layer
    serializes them after the transaction ends)."""
    return sessionmaker(bind=engine, expire_on_commit=False)
