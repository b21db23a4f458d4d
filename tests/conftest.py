"""Shared fixtures: real PostgreSQL and Redis (URLs from the environment, loopback defaults).

A missing service is an error, never a skip: CI must fail loudly when PostgreSQL or Redis is not there.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

pytest_plugins = ["tests.s3_server"]

POSTGRES_ADMIN_URL = os.environ.get(
    "PREFIXSERVE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
# One Redis database per pytest-xdist worker (`make test` runs two): the `redis_url` fixture flushes its database,
# which must not be the one a test on the other worker is using. 13 and 14 are the local cluster's.
_WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
_REDIS_DB = 15 if _WORKER == 0 else 13 - _WORKER
REDIS_URL = os.environ.get("PREFIXSERVE_TEST_REDIS_URL", f"redis://127.0.0.1:6379/{_REDIS_DB}")


# The tests' own configuration (service URLs, which databases the API tests run on); every other PREFIXSERVE_*
# variable is an app setting.
TEST_VARIABLE_PREFIX = "PREFIXSERVE_TEST_"


def without_app_settings(environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` less the app's PREFIXSERVE_* settings: the base of a subprocess's explicit environment."""
    return {k: v for k, v in environ.items()
            if not k.startswith("PREFIXSERVE_") or k.startswith(TEST_VARIABLE_PREFIX)}


@pytest.fixture(scope="session", autouse=True)
def _no_app_settings_from_the_caller() -> Iterator[None]:
    """Settings (pydantic-settings) read PREFIXSERVE_* from the environment: a developer's shell (say
    PREFIXSERVE_MAX_BATCH_ROWS=1 left from a benchmark) would otherwise change what every test runs against,
    and subprocesses inherit the same. Removed for the session, restored afterwards."""
    with pytest.MonkeyPatch.context() as mp:
        for name in set(os.environ) - set(without_app_settings(os.environ)):
            mp.delenv(name)
        yield


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """URL of a fresh, empty PostgreSQL database, dropped after the test."""
    import sqlalchemy as sa

    admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"prefixserve_test_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError as exc:  # pragma: no cover - environment failure
        pytest.fail(f"PostgreSQL is required at {POSTGRES_ADMIN_URL}: {exc}")
    url = sa.engine.make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


# The database of the HTTP-layer tests (tests/api): SQLite (a single server's default) for every test; the tests
# of modules marked `both_databases` run a second time on PostgreSQL (what a cluster shares), so dialect
# differences (locking, constraint errors, types) in the request paths show up in CI, not in production.
# PREFIXSERVE_TEST_API_DATABASES narrows it: `make test` runs the SQLite pass and `make test-postgres` the
# PostgreSQL one (CI runs both), so that `make test` keeps within its time budget on a 2-core machine.
DATABASES = tuple(d for d in os.environ.get("PREFIXSERVE_TEST_API_DATABASES", "sqlite,postgresql").split(",") if d)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "both_databases: HTTP-layer tests run on SQLite and again on a fresh PostgreSQL database")
    config.addinivalue_line(
        "markers", "sqlite_only: in a both_databases module, a test whose requests are refused before any query "
        "(field validation): a second run on PostgreSQL would cost time and check nothing new")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    marked = metafunc.definition.get_closest_marker
    if "api_database" in metafunc.fixturenames and marked("both_databases") and not marked("sqlite_only"):
        metafunc.parametrize("api_database", DATABASES, indirect=True)


@pytest.fixture
def api_database(request: pytest.FixtureRequest) -> str:
    return str(getattr(request, "param", "sqlite"))


@pytest.fixture
def api_database_url(api_database: str, request: pytest.FixtureRequest) -> str | None:
    """None: SQLite under the test's data dir (the app migrates it itself). Otherwise the URL of a fresh
    PostgreSQL database of this test alone (`postgres_url`: created with a random name, dropped afterwards),
    migrated to head as an operator would before starting the servers."""
    if api_database == "sqlite":
        return None
    from app.db.migrate import upgrade

    url: str = request.getfixturevalue("postgres_url")
    upgrade(url)
    return url


@pytest.fixture
def redis_url() -> Iterator[str]:
    """URL of a real Redis database, flushed before and after the test."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.flushdb()
    except redis.exceptions.ConnectionError as exc:  # pragma: no cover - environment failure
        pytest.fail(f"Redis is required at {REDIS_URL}: {exc}")
    yield REDIS_URL
    client.flushdb()
    client.close()


@pytest.fixture(scope="session")
def embedded_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir shared by the session, so the embedded GGUF is converted only once (about 25 s on 2 cores);
    a test with its own data dir links its `models/` here (`shared_models`)."""
    return tmp_path_factory.mktemp("embedded-data")


def shared_models(data_dir: Path, embedded_data_dir: Path) -> None:
    """Make `data_dir`'s converted-model cache the session's one."""
    (embedded_data_dir / "models").mkdir(exist_ok=True)
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "models").symlink_to(embedded_data_dir / "models", target_is_directory=True)

