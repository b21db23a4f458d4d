"""Run the Alembic migrations from code: `upgrade(url)` at start-up or from `prefixserve migrate`.

Alembic is configured programmatically (no alembic.ini needed) and pointed at the `migrations/` directory at
the repository root, found next to this package: that holds for a source checkout and for an editable
install (`pip install -e .`), whose modules are the checkout's files.

Alembic keeps its migration context in module globals: call these from one thread at a time. Separate
processes may migrate the same PostgreSQL database at once (env.py serializes them with an advisory lock).
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection

from app.db.session import ensure_sqlite_parent_dir, make_engine, sqlite_file

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"
VERSION_TABLE = "alembic_version"  # Alembic's default; migrations/env.py keeps it


def alembic_config(url: str) -> Config:
    """An Alembic Config for `url`. The URL travels in `attributes`, not the ini options, so a password
    with `%` in it is not mangled by configparser interpolation."""
    if not (MIGRATIONS_DIR / "env.py").is_file():
        raise RuntimeError(
            f"Alembic migrations not found at {MIGRATIONS_DIR}; prefixserve must run from a source checkout "
            "or an editable install (pip install -e .)"
        )
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["url"] = url
    cfg.attributes["skip_logging_config"] = True
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate the database at `url` up to `revision` (creating a SQLite file and its directory if needed)."""
    ensure_sqlite_parent_dir(url)
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    """Migrate the database at `url` down to `revision` ("base" drops every table)."""
    command.downgrade(alembic_config(url), revision)


def current(url: str) -> str | None:
    """The revision the database at `url` is at; None when it has never been migrated (or, for SQLite,
    when the file does not exist: it is not created)."""
    path = sqlite_file(url)
    if path is not None and not path.exists():
        return None
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def head() -> str:
    """The newest revision in `migrations/versions` (what `upgrade(url)` migrates to)."""
    heads = ScriptDirectory.from_config(alembic_config("")).get_heads()
    if len(heads) != 1:
        raise RuntimeError(f"expected exactly one migration head, found {heads}")
    return heads[0]


def is_current(url: str) -> bool:
    """Whether the database at `url` is migrated to the newest revision."""
    return current(url) == head()


def known_revisions() -> frozenset[str]:
    """Every revision in `migrations/versions`: a database at one of them other than `head()` is behind this
    build; one at a revision not in here was migrated by a newer build."""
    script = ScriptDirectory.from_config(alembic_config(""))
    return frozenset(rev.revision for rev in script.walk_revisions())


def revision_of(conn: Connection) -> str | None:
    """The revision of the database `conn` is connected to; None when it was never migrated. Read directly
    (what MigrationContext.get_current_revision reads) because a MigrationContext logs two INFO lines each
    time it is made, and the schema gate reads this every second while the schema is behind."""
    if not sa.inspect(conn).has_table(VERSION_TABLE):
        return None
    versions = conn.execute(sa.text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars().all()
    if len(versions) > 1:
        raise RuntimeError(f"the database has several migration heads {versions}; expected one")
    return versions[0] if versions else None
