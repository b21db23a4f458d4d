"""Alembic migrations on real SQLite and PostgreSQL: round trips; the migrated schema equals the models."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from app.db import migrate
from app.db.models import Base
from app.db.session import make_engine

REPO_ROOT = Path(__file__).resolve().parents[2]
APP_TABLES = {
    "tenants",
    "api_keys",
    "prefixes",
    "prefix_versions",
    "end_users",
    "user_examples",
    "files",
    "training_jobs",
    "job_events",
    "job_checkpoints",
    "tenant_limits",
    "batches",
    "batch_results",
}


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database of each kind; the SQLite file's directory does not exist yet."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'not' / 'yet' / 'prefixserve.db'}"
    return str(request.getfixturevalue("postgres_url"))


def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_round_trip(db_url: str) -> None:
    assert migrate.current(db_url) is None

    migrate.upgrade(db_url)
    assert _tables(db_url) == APP_TABLES | {"alembic_version"}
    assert migrate.current(db_url) == migrate.head()
    assert migrate.is_current(db_url)

    migrate.downgrade(db_url, "base")
    assert _tables(db_url) == {"alembic_version"}
    assert migrate.current(db_url) is None
    assert not migrate.is_current(db_url)

    migrate.upgrade(db_url)
    assert _tables(db_url) == APP_TABLES | {"alembic_version"}
    assert migrate.current(db_url) == migrate.head()

    migrate.upgrade(db_url)  # already at head: a no-op
    assert migrate.current(db_url) == migrate.head()


def test_models_cover_exactly_the_migrated_tables() -> None:
    assert set(Base.metadata.tables) == APP_TABLES


def test_migrated_schema_matches_models(db_url: str) -> None:
    migrate.upgrade(db_url)
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(
                conn, opts={"compare_type": True, "compare_server_default": True}
            )
            assert compare_metadata(ctx, Base.metadata) == []
            # Autogenerate does not compare CHECK constraints: compare their names here.
            insp = sa.inspect(conn)
            for table in Base.metadata.sorted_tables:
                want = {c.name for c in table.constraints if isinstance(c, sa.CheckConstraint)}
                got = {c["name"] for c in insp.get_check_constraints(table.name)}
                assert got == want, table.name
    finally:
        engine.dispose()


def test_schema_comparison_is_not_vacuous(db_url: str) -> None:
    """The comparison above would notice a model that drifted from the migration."""
    migrate.upgrade(db_url)
    drifted = sa.MetaData(naming_convention=Base.metadata.naming_convention)
    for table in Base.metadata.sorted_tables:
        table.to_metadata(drifted)
    drifted.tables["files"].c.purpose.nullable = True
    drifted.tables["prefix_versions"].c.recorded_base_model.type = sa.String(400)
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            diffs = compare_metadata(ctx, drifted)
    finally:
        engine.dispose()
    kinds = {(d[0][0], d[0][3]) for d in diffs if isinstance(d, list)}
    assert kinds == {("modify_nullable", "purpose"), ("modify_type", "recorded_base_model")}


def test_current_does_not_create_a_sqlite_file(tmp_path: Path) -> None:
    path = tmp_path / "absent" / "db.sqlite"
    assert migrate.current(f"sqlite:///{path}") is None
    assert not path.parent.exists()


def test_alembic_cli_uses_the_same_migrations(tmp_path: Path) -> None:
    """Developers' `alembic` command (alembic.ini at the repo root) migrates the same way."""
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    cmd = [sys.executable, "-m", "alembic", "-c", str(REPO_ROOT / "alembic.ini"), "-x", f"url={url}"]
    subprocess.run([*cmd, "upgrade", "head"], check=True, cwd=tmp_path, capture_output=True)
    assert migrate.current(url) == migrate.head()
    out = subprocess.run([*cmd, "check"], check=True, cwd=tmp_path, capture_output=True, text=True)
    assert "No new upgrade operations detected" in out.stdout + out.stderr


def test_concurrent_upgrades_on_postgresql_are_serialized(postgres_url: str) -> None:
    """Replicas starting together all run `upgrade`; an advisory lock makes the later ones no-ops.
    Processes, not threads: Alembic's `context` is module-global, so only one thread of a process may migrate.
    """
    code = "import sys; from app.db import migrate; migrate.upgrade(sys.argv[1])"
    procs = [
        subprocess.Popen([sys.executable, "-c", code, postgres_url], cwd=REPO_ROOT, stderr=subprocess.PIPE)
        for _ in range(4)
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
    assert migrate.current(postgres_url) == migrate.head()
    assert _tables(postgres_url) == APP_TABLES | {"alembic_version"}
