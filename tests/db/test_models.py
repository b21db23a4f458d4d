"""The models on migrated real databases (SQLite and PostgreSQL): constraints, cascades, UTC, JSON, ids."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from app.db import migrate
from app.db.models import (
    ApiKey,
    Base,
    Batch,
    BatchResult,
    EndUser,
    File,
    JobCheckpoint,
    JobEvent,
    Prefix,
    PrefixVersion,
    Tenant,
    TenantLimits,
    TrainingJob,
    UserExample,
    personal_prefix_name,
    utcnow,
)
from app.db.session import ID_PREFIXES, ID_RANDOM_CHARS, make_engine, make_session_factory, new_id


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    """A session factory on a freshly migrated database of each kind."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'db' / 'prefixserve.db'}"
    else:
        url = str(request.getfixturevalue("postgres_url"))
    migrate.upgrade(url)
    engine = make_engine(url)
    yield make_session_factory(engine)
    engine.dispose()


def _tenant(s: Session, name: str) -> Tenant:
    t = Tenant(name=name)
    s.add(t)
    s.flush()
    return t


def _prefix(s: Session, tenant: Tenant, name: str, *versions: int) -> Prefix:
    p = Prefix(tenant_id=tenant.id, name=name)
    s.add(p)
    s.flush()
    for v in versions:
        s.add(_version(p, v))
    s.flush()
    return p


def _version(p: Prefix, version: int, fmt: str = "native") -> PrefixVersion:
    return PrefixVersion(
        prefix_id=p.id,
        version=version,
        sha256="ab" * 32,
        size_bytes=1234,
        num_virtual_tokens=8,
        source_format=fmt,
        base_model_fingerprint="fp",
    )


def _populate(s: Session, tenant: Tenant) -> None:
    """One row in every table, all owned by `tenant`."""
    s.add(ApiKey(tenant_id=tenant.id, key_hash=new_id("api_key"), key_prefix="sk-abcde", scopes="inference"))
    s.add(TenantLimits(tenant_id=tenant.id, requests_per_minute=60))
    prefix = _prefix(s, tenant, "support", 1)
    user = EndUser(tenant_id=tenant.id, external_id="u1")
    s.add(user)
    s.flush()
    s.add(UserExample(end_user_id=user.id, data={"prompt": "hi", "completion": "there"}))
    s.add(Prefix(tenant_id=tenant.id, name=personal_prefix_name("u1"), end_user_id=user.id))
    f = File(tenant_id=tenant.id, filename="t.jsonl", purpose="fine-tune", bytes=10, sha256="cd" * 32)
    f.line_count, f.status = 2, "processed"
    s.add(f)
    s.flush()
    job = TrainingJob(
        tenant_id=tenant.id,
        status="succeeded",
        model="base",
        training_file_id=f.id,
        end_user_id=user.id,
        prefix_name="support",
        hyperparameters={"n_epochs": 1},
        options={"num_virtual_tokens": 8},
        result_prefix_version_id=prefix.versions[0].id,
    )
    s.add(job)
    s.flush()
    s.add(JobEvent(job_id=job.id, level="info", message="done", data={"step": 1}))
    s.add(JobCheckpoint(job_id=job.id, step=1, metrics={"loss": 0.5}, sha256="ef" * 32))
    batch = Batch(tenant_id=tenant.id, endpoint="/v1/completions", input_file_id=f.id, input_sha256=f.sha256,
                  completion_window="24h", status="in_progress", total=1, expires_at=utcnow())
    s.add(batch)
    s.flush()
    s.add(BatchResult(batch_id=batch.id, line=1, ok=True, record="{}"))
    s.flush()


def _counts(s: Session) -> dict[str, int]:
    return {
        t.name: s.scalar(sa.select(sa.func.count()).select_from(t)) or 0 for t in Base.metadata.sorted_tables
    }


def test_new_id_formats() -> None:
    for kind, prefix in ID_PREFIXES.items():
        ids = {new_id(kind) for _ in range(200)}
        assert len(ids) == 200
        for i in ids:
            assert re.fullmatch(re.escape(prefix) + f"[A-Za-z0-9]{{{ID_RANDOM_CHARS}}}", i), i
    assert new_id("file").startswith("file-") and new_id("training_job").startswith("ftjob-")
    assert new_id("tenant").startswith("ten_") and new_id("prefix_version").startswith("pfv_")
    with pytest.raises(ValueError, match="unknown id kind"):
        new_id("nope")  # type: ignore[arg-type]


def test_ids_and_utc_timestamps_are_filled_in(db: sessionmaker[Session]) -> None:
    with db.begin() as s:
        t = _tenant(s, "acme")
        tid = t.id
    with db() as s:
        t = s.get_one(Tenant, tid)
        assert tid.startswith("ten_")
        assert t.created_at.tzinfo is not None and t.created_at.utcoffset() == timedelta(0)
        assert abs(datetime.now(UTC) - t.created_at) < timedelta(minutes=1)


def test_timestamps_are_stored_as_utc_instants(db: sessionmaker[Session]) -> None:
    plus2 = datetime(2025, 1, 2, 12, 0, tzinfo=timezone(timedelta(hours=2)))
    with db.begin() as s:
        s.add(Tenant(id="ten_tz", name="tz", created_at=plus2))
    with db() as s:
        got = s.get_one(Tenant, "ten_tz").created_at
        assert got == plus2 and got.tzinfo == UTC and got.hour == 10
        # Comparisons in SQL go through the same conversion.
        later = datetime(2025, 1, 2, 10, 30, tzinfo=UTC)
        assert s.scalar(sa.select(Tenant.id).where(Tenant.created_at < later)) == "ten_tz"
        assert s.scalar(sa.select(Tenant.id).where(Tenant.created_at > later)) is None
    with db() as s, pytest.raises(sa.exc.StatementError, match="naive datetime"):
        s.add(Tenant(name="naive", created_at=datetime(2025, 1, 1)))
        s.flush()


def test_json_none_is_sql_null(db: sessionmaker[Session]) -> None:
    with db.begin() as s:
        _populate(s, _tenant(s, "acme"))
    with db() as s:
        job = s.scalars(sa.select(TrainingJob)).one()
        assert job.error is None and job.cancel_requested is False
        assert job.hyperparameters == {"n_epochs": 1}
        assert s.scalar(sa.text("SELECT count(*) FROM training_jobs WHERE error IS NULL")) == 1
        job.error = {"code": "boom", "message": "x"}
        s.commit()
        assert s.scalar(sa.text("SELECT count(*) FROM training_jobs WHERE error IS NULL")) == 0


def test_tenant_names_are_unique(db: sessionmaker[Session]) -> None:
    with db.begin() as s:
        _tenant(s, "acme")
    with db() as s, pytest.raises(sa.exc.IntegrityError):
        _tenant(s, "acme")


def test_prefix_names_are_unique_per_tenant(db: sessionmaker[Session]) -> None:
    with db.begin() as s:
        a, b = _tenant(s, "a"), _tenant(s, "b")
        _prefix(s, a, "support")
        _prefix(s, b, "support")  # same name in another tenant: allowed
        a_id = a.id
    with db() as s, pytest.raises(sa.exc.IntegrityError):
        _prefix(s, s.get_one(Tenant, a_id), "support")


def test_versions_are_unique_per_prefix(db: sessionmaker[Session]) -> None:
    with db.begin() as s:
        p = _prefix(s, _tenant(s, "a"), "support", 1, 2)
        pid = p.id
    with db() as s:
        assert [v.version for v in s.get_one(Prefix, pid).versions] == [1, 2]
    with db() as s, pytest.raises(sa.exc.IntegrityError):
        s.add(_version(s.get_one(Prefix, pid), 2))
        s.flush()


def _bad_row(kind: str, p: Prefix) -> object:
    if kind == "version0":  # versions start at 1
        return _version(p, 0)
    if kind == "format":
        return _version(p, 3, fmt="pickle")
    if kind == "reserved-name":  # `user:` names belong to personal prefixes only
        return Prefix(tenant_id=p.tenant_id, name="user:someone")
    assert kind == "job-status"
    return TrainingJob(
        tenant_id=p.tenant_id, status="paused", model="m", prefix_name="n", hyperparameters={}, options={}
    )


@pytest.mark.parametrize("kind", ["version0", "format", "reserved-name", "job-status"])
def test_check_constraints(db: sessionmaker[Session], kind: str) -> None:
    with db.begin() as s:
        pid = _prefix(s, _tenant(s, "a"), "support", 1).id
    with db() as s, pytest.raises(sa.exc.IntegrityError):
        s.add(_bad_row(kind, s.get_one(Prefix, pid)))
        s.flush()


def test_personal_prefix_needs_its_end_user(db: sessionmaker[Session]) -> None:
    with db.begin() as s:
        t = _tenant(s, "a")
        user = EndUser(tenant_id=t.id, external_id="u1")
        s.add(user)
        s.flush()
        s.add(Prefix(tenant_id=t.id, name=personal_prefix_name("u1"), end_user_id=user.id))
        s.add(Prefix(tenant_id=t.id, name="USER:shouting"))  # case matters: not the reserved form
        uid, tid = user.id, t.id
    with db() as s, pytest.raises(sa.exc.IntegrityError):
        s.add(Prefix(tenant_id=tid, name="plain", end_user_id=uid))
        s.flush()


def test_foreign_keys_are_enforced(db: sessionmaker[Session]) -> None:
    with db() as s, pytest.raises(sa.exc.IntegrityError):
        s.add(Prefix(tenant_id="ten_missing", name="orphan"))
        s.flush()


def test_deleting_a_tenant_cascades_to_everything_it_owns(db: sessionmaker[Session]) -> None:
    with db.begin() as s:
        doomed, kept = _tenant(s, "doomed"), _tenant(s, "kept")
        _populate(s, doomed)
        _populate(s, kept)
        doomed_id = doomed.id
    with db() as s:
        per_tenant = {t.name: 1 for t in Base.metadata.sorted_tables} | {"prefixes": 2}  # + personal one
        assert _counts(s) == {t: 2 * n for t, n in per_tenant.items()}
        s.delete(s.get_one(Tenant, doomed_id))
        s.commit()
        assert _counts(s) == per_tenant
        assert s.scalars(sa.select(Tenant.name)).all() == ["kept"]


def test_deleting_an_end_user_or_file_keeps_the_job(db: sessionmaker[Session]) -> None:
    with db.begin() as s:
        _populate(s, _tenant(s, "acme"))
    with db() as s:
        job = s.scalars(sa.select(TrainingJob)).one()
        s.delete(s.get_one(EndUser, job.end_user_id))
        s.delete(s.get_one(File, job.training_file_id))
        s.delete(s.get_one(PrefixVersion, job.result_prefix_version_id))
        s.commit()
        s.refresh(job)
        assert (job.end_user_id, job.training_file_id, job.result_prefix_version_id) == (None, None, None)
        # The personal prefix and the examples went with the end user.
        assert s.scalars(sa.select(Prefix.name)).all() == ["support"]
        assert s.scalar(sa.select(sa.func.count()).select_from(UserExample)) == 0


def test_sqlite_pragmas(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'x' / 'p.db'}")
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30_000
    finally:
        engine.dispose()
