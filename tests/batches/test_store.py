"""A batch runner's claims on the database: one runner per batch (also when runners race), a live lease is never
taken, a stale one is, and a runner that lost its batch writes nothing more."""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from app.batches import store
from app.db.migrate import upgrade
from app.db.models import Batch, BatchResult, Tenant, utcnow
from app.db.session import make_engine, make_session_factory
from app.services.batch_lines import LineOutcome

STALE_S = 60.0


def _open(request: pytest.FixtureRequest, url: str) -> sessionmaker[Session]:
    upgrade(url)
    engine = make_engine(url)
    request.addfinalizer(engine.dispose)
    return make_session_factory(engine)


@pytest.fixture(params=["sqlite", "postgresql"])
def both(request: pytest.FixtureRequest, tmp_path: Path) -> sessionmaker[Session]:
    """Each kind of database: the claim's conditional UPDATE must hold under both's locking."""
    return _open(request, f"sqlite:///{tmp_path / 'b.db'}" if request.param == "sqlite"
                 else request.getfixturevalue("postgres_url"))


@pytest.fixture
def sessions(request: pytest.FixtureRequest, tmp_path: Path) -> sessionmaker[Session]:
    return _open(request, f"sqlite:///{tmp_path / 'b.db'}")


def _batch(sessions: sessionmaker[Session], **values: object) -> str:
    with sessions() as s:
        tenant = Tenant(name="acme")
        s.add(tenant)
        s.flush()
        row = Batch(tenant_id=tenant.id, endpoint="/v1/completions", input_file_id="file-x", input_sha256="0" * 64,
                    completion_window="24h", status="in_progress", total=3, expires_at=utcnow() + timedelta(hours=1),
                    **values)
        s.add(row)
        s.commit()
        return row.id


def _claim(sessions: sessionmaker[Session], **kw: object) -> list[store.Claim]:
    with sessions() as s:
        return store.claim(s, limit=4, stale_after_s=STALE_S, **kw)  # type: ignore[arg-type]


def test_racing_runners_claim_a_batch_once(both: sessionmaker[Session]) -> None:
    sessions = both
    batch_id = _batch(sessions)
    start = threading.Barrier(6)
    got: list[list[store.Claim]] = []

    def runner() -> None:
        start.wait()
        got.append(_claim(sessions))

    threads = [threading.Thread(target=runner) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(len(g) for g in got) == [0, 0, 0, 0, 0, 1]
    assert [c.batch_id for g in got for c in g] == [batch_id]


def test_a_live_lease_is_kept_a_stale_one_is_taken_over_and_the_loser_writes_nothing(
        sessions: sessionmaker[Session]) -> None:
    batch_id = _batch(sessions)
    (first,) = _claim(sessions)
    assert _claim(sessions) == []  # its heartbeat is fresh: nobody else gets it
    # Its runner died: once the heartbeat is older than the staleness limit, another runner claims it.
    (second,) = _claim(sessions, now=utcnow() + timedelta(seconds=STALE_S + 1))
    assert second.batch_id == batch_id and second.token != first.token
    done = LineOutcome(line=1, ok=True, record="{}", prompt_tokens=3, completion_tokens=4)
    with sessions() as s:
        assert store.record(s, first, [done]) is None  # the old runner learns it lost the batch...
        assert s.scalar(sa.select(sa.func.count()).select_from(BatchResult)) == 0  # ...and wrote nothing
        beat = store.record(s, second, [done])
        assert beat is not None and beat.status == "in_progress"
        row = s.get_one(Batch, batch_id)
        assert (row.completed, row.prompt_tokens, row.completion_tokens, row.attempts) == (1, 3, 4, 2)
        assert store.done_lines(s, batch_id) == {1}
        store.release(s, second)
    (third,) = _claim(sessions)  # handed back: claimable at once
    assert third.batch_id == batch_id
    assert _claim(sessions, skip=[batch_id]) == []
