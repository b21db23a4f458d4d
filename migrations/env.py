"""Alembic environment: runs the migrations in `versions/` against one database.

The URL comes from, in order: `config.attributes["url"]` (set by app.db.migrate), `alembic -x url=...`,
`sqlalchemy.url` in the config, and finally the service settings (`PREFIXSERVE_DATABASE_URL` or the SQLite
file under the data directory). Offline (`--sql`) mode is not supported: migrations run against a database.
"""

from __future__ import annotations

import logging.config
from typing import Literal

import sqlalchemy as sa
from alembic import context
from alembic.autogenerate.api import AutogenContext

from app.db.models import Base, UTCDateTime
from app.db.session import make_engine

# An arbitrary constant: the PostgreSQL advisory lock that serializes replicas migrating at the same time.
MIGRATION_LOCK_ID = 0x70726566  # "pref"

config = context.config
target_metadata = Base.metadata


def _database_url() -> str:
    url = config.attributes.get("url") or context.get_x_argument(as_dictionary=True).get("url")
    url = url or config.get_main_option("sqlalchemy.url")
    if not url:
        from app.config import load_settings

        url = load_settings().resolved_database_url
    return str(url)


def _render_item(type_: str, obj: object, autogen_context: AutogenContext) -> str | Literal[False]:
    """Autogenerate writes the app's column types as plain SQLAlchemy ones: migrations never import app
    types (a later change to a model type must not change what an old migration does)."""
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    if type_ == "type" and isinstance(obj, sa.JSON):
        return "sa.JSON()"
    return False


def run_migrations_online() -> None:
    url = _database_url()
    # Foreign keys off on SQLite while migrating: batch table rebuilds drop tables, which would otherwise run
    # ON DELETE CASCADE on the children. They are checked once the migration is done.
    engine = make_engine(url, sqlite_foreign_keys=False)
    is_sqlite = engine.dialect.name == "sqlite"
    try:
        with engine.connect() as connection:
            context.configure(
                connection=connection,
                target_metadata=target_metadata,
                render_as_batch=is_sqlite,  # SQLite has almost no ALTER TABLE
                compare_type=True,
                render_item=_render_item,
            )
            with context.begin_transaction():
                if connection.dialect.name == "postgresql":
                    connection.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK_ID})
                context.run_migrations()
                if is_sqlite:
                    bad = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                    if bad:
                        raise RuntimeError(f"migration left rows violating foreign keys: {bad[:10]}")
    finally:
        engine.dispose()


# Configure logging from alembic.ini only for the CLI; app.db.migrate leaves the service's logging alone.
if config.config_file_name is not None and not config.attributes.get("skip_logging_config"):
    logging.config.fileConfig(config.config_file_name, disable_existing_loggers=False)

if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported; run against a database")
run_migrations_online()
