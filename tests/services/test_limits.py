"""Per-tenant limits below the HTTP layer: the counter store on real Redis and in memory (rates, slots, leaked
slots expiring, Redis down failing open), and the count/byte quotas on a real PostgreSQL database."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import pytest
from sqlalchemy.orm import Session

from app.config import Settings
from app.db.migrate import upgrade
from app.db.models import EndUser, File, Prefix, PrefixVersion, Tenant, TrainingJob, UserExample
from app.db.session import make_engine, make_session_factory
from app.errors import RateLimited
from app.protocol.admin import TenantLimitValues
from app.services import limits
from app.services.limit_store import CounterStore

UNREACHABLE_REDIS = "redis://127.0.0.1:1/0"  # nothing listens on port 1: connection refused at once


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest) -> Iterator[CounterStore]:
    url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    s = CounterStore(url, slot_ttl_s=60)
    yield s
    s.close()


def test_rate_counts_and_refuses_with_retry_after(store: CounterStore) -> None:
    assert [store.hit("requests:t1", 3).allowed for _ in range(3)] == [True, True, True]
    refused = store.hit("requests:t1", 3)
    assert not refused.allowed and 1 <= refused.retry_after_s <= 60
    assert store.hit("requests:t2", 3).allowed  # another key has its own window


def test_token_window_records_past_the_limit(store: CounterStore) -> None:
    assert store.test("tokens:t", 10).allowed
    store.add("tokens:t", 10, 9)
    assert store.test("tokens:t", 10).allowed  # one token of room left
    store.add("tokens:t", 10, 500)  # a request that overshot still counts in full
    answer = store.test("tokens:t", 10)
    assert not answer.allowed and answer.retry_after_s >= 1


def test_zero_allows_nothing(store: CounterStore) -> None:
    assert not store.hit("requests:z", 0).allowed
    assert store.acquire("slots:z", 0) is None


def test_slots_acquire_release(store: CounterStore) -> None:
    a, b = store.acquire("k", 2), store.acquire("k", 2)
    assert a is not None and b is not None and a != b
    assert store.acquire("k", 2) is None
    store.release("k", a)
    c = store.acquire("k", 2)
    assert c is not None
    store.release("k", b)
    store.release("k", c)
    store.release("k", c)  # releasing twice is harmless
    assert store.acquire("k", 1) is not None


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_leaked_slots_expire(backend: str, request: pytest.FixtureRequest) -> None:
    """A slot whose request never released it (its replica crashed) stops counting after slot_ttl_s."""
    url = request.getfixturevalue("redis_url") if backend == "redis" else None
    # The slots' clock is the test's: the TTL passes when the test says so, however slow the machine.
    now = [time.time()]
    store = CounterStore(url, slot_ttl_s=60, clock=lambda: now[0])
    assert store.acquire("k", 1) is not None  # never released
    now[0] += 59
    assert store.acquire("k", 1) is None  # still counted just before the TTL
    now[0] += 2
    assert store.acquire("k", 1) is not None
    store.close()


def test_replicas_share_redis_counters(redis_url: str) -> None:
    one, two = CounterStore(redis_url, slot_ttl_s=60), CounterStore(redis_url, slot_ttl_s=60)
    assert one.hit("requests:t", 2).allowed and two.hit("requests:t", 2).allowed
    assert not one.hit("requests:t", 2).allowed and not two.hit("requests:t", 2).allowed
    assert one.acquire("k", 1) is not None and two.acquire("k", 1) is None
    one.close()
    two.close()


def test_redis_down_fails_open_and_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    store = CounterStore(UNREACHABLE_REDIS, slot_ttl_s=60, retry_interval_s=0.05)
    with caplog.at_level(logging.WARNING, logger="app.services.limit_store"):
        for _ in range(5):
            assert store.hit("requests:t", 1).allowed
            assert store.test("tokens:t", 1).allowed
            store.add("tokens:t", 1, 100)
            token = store.acquire("k", 1)
            assert token is not None
            store.release("k", token)
            time.sleep(0.06)  # past the back-off: Redis is tried (and fails) again
    warnings = [r for r in caplog.records if "limit counters unavailable" in r.getMessage()]
    assert len(warnings) == 1


# ---- quotas on PostgreSQL --------------------------------------------------------------------------------------
@pytest.fixture
def session(postgres_url: str) -> Iterator[Session]:
    upgrade(postgres_url)
    engine = make_engine(postgres_url)
    with make_session_factory(engine)() as s:
        yield s
    engine.dispose()


def _tenant(session: Session) -> str:
    t = Tenant(name="acme")
    session.add(t)
    session.commit()
    return t.id


def _prefix(session: Session, tenant_id: str, name: str, size: int, end_user_id: str | None = None) -> None:
    p = Prefix(tenant_id=tenant_id, name=name, end_user_id=end_user_id)
    session.add(p)
    session.flush()
    session.add(PrefixVersion(prefix_id=p.id, version=1, sha256="0" * 64, size_bytes=size, num_virtual_tokens=4,
                              source_format="native", base_model_fingerprint="f"))
    session.commit()


def test_effective_limits_merge_tenant_values_over_settings(session: Session) -> None:
    tenant_id = _tenant(session)
    settings = Settings(tenant_requests_per_minute=100, tenant_max_prefixes=None)
    got = limits.effective_limits(session=session, settings=settings, tenant_id=tenant_id)
    assert got.requests_per_minute == 100 and got.max_prefixes is None
    out = limits.set_tenant_limits(session=session, settings=settings, tenant_id=tenant_id,
                                   values=TenantLimitValues(requests_per_minute=5, max_prefixes=2))
    assert out.configured.requests_per_minute == 5 and out.configured.tokens_per_minute is None
    assert out.effective.tokens_per_minute == settings.tenant_tokens_per_minute
    got = limits.effective_limits(session=session, settings=settings, tenant_id=tenant_id)
    assert (got.requests_per_minute, got.max_prefixes) == (5, 2)
    limits.set_tenant_limits(session=session, settings=settings, tenant_id=tenant_id, values=TenantLimitValues())
    assert limits.effective_limits(session=session, settings=settings, tenant_id=tenant_id).max_prefixes is None


def test_prefix_count_and_bytes(session: Session) -> None:
    tenant_id = _tenant(session)
    cap = TenantLimitValues(max_prefixes=2, max_stored_bytes=1000)
    _prefix(session, tenant_id, "a", 300)
    user = EndUser(tenant_id=tenant_id, external_id="bob")
    session.add(user)
    session.flush()
    _prefix(session, tenant_id, "user:bob", 300, end_user_id=user.id)  # personal: bytes count, not the number
    limits.check_new_prefix(session=session, limits=cap, tenant_id=tenant_id, name="b", new_bytes=100)
    _prefix(session, tenant_id, "b", 100)
    with pytest.raises(RateLimited, match="max_prefixes limit of 2 reached") as exc:
        limits.check_new_prefix(session=session, limits=cap, tenant_id=tenant_id, name="c", new_bytes=1)
    assert exc.value.headers is not None and exc.value.headers["Retry-After"] == "60"
    # A new version of an existing name is not a new prefix; bytes: 700 stored + 300 fits, + 301 does not.
    limits.check_new_prefix(session=session, limits=cap, tenant_id=tenant_id, name="a", new_bytes=300)
    session.add(File(tenant_id=tenant_id, filename="f.jsonl", purpose="fine-tune", bytes=1, sha256="1" * 64,
                     line_count=1, status="processed"))
    session.commit()
    with pytest.raises(RateLimited, match="max_stored_bytes limit of 1000 reached"):
        limits.check_new_prefix(session=session, limits=cap, tenant_id=tenant_id, name="a", new_bytes=300)
    limits.check_storage(session=session, limits=cap, tenant_id=tenant_id, new_bytes=299)
    limits.check_new_prefix(session=session, limits=TenantLimitValues(), tenant_id=tenant_id, name="z",
                            new_bytes=10**12)  # unlimited


def test_jobs_and_examples(session: Session) -> None:
    tenant_id = _tenant(session)
    cap = TenantLimitValues(max_concurrent_jobs=1, max_examples_per_user=2)
    job = dict(tenant_id=tenant_id, model="m", prefix_name="p", hyperparameters={}, options={})
    session.add(TrainingJob(status="succeeded", **job))
    session.commit()
    limits.check_new_job(session=session, limits=cap, tenant_id=tenant_id)  # finished jobs do not count
    session.add(TrainingJob(status="queued", **job))
    session.commit()
    with pytest.raises(RateLimited, match="max_concurrent_jobs limit of 1 reached"):
        limits.check_new_job(session=session, limits=cap, tenant_id=tenant_id)

    limits.check_new_examples(session=session, limits=cap, end_user_id=None, adding=2)
    with pytest.raises(RateLimited, match="max_examples_per_user limit of 2 reached"):
        limits.check_new_examples(session=session, limits=cap, end_user_id=None, adding=3)
    user = EndUser(tenant_id=tenant_id, external_id="bob")
    session.add(user)
    session.flush()
    session.add(UserExample(end_user_id=user.id, data={"prompt": "x"}))
    session.commit()
    limits.check_new_examples(session=session, limits=cap, end_user_id=user.id, adding=1)
    with pytest.raises(RateLimited, match="max_examples_per_user"):
        limits.check_new_examples(session=session, limits=cap, end_user_id=user.id, adding=2)
