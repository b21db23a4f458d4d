"""The one `name@version` parser and the one name → version query, on PostgreSQL, and what their callers make of
them: serving (`resolve_model`: 404, 409 for another base model), prefix refs (400), the resolver's catalog."""

from __future__ import annotations

import pytest
from sqlalchemy.orm import Session, sessionmaker

from app.catalog.refs import DbCatalog, InvalidRef, find_version, split_ref
from app.db.models import EndUser, Prefix, PrefixVersion, Tenant
from app.errors import Conflict, InvalidRequest, NotFound
from app.services.prefixes import parse_ref
from app.services.targets import parse_model_name, resolve_model

FP = "fp-served"
BASE = "base-model"


def _tenant(sessions: sessionmaker[Session], name: str) -> str:
    with sessions() as s:
        tenant = Tenant(name=name)
        s.add(tenant)
        s.commit()
        return tenant.id


def _prefix(sessions: sessionmaker[Session], tenant_id: str, name: str, fingerprints: list[str], *,
            end_user_id: str | None = None) -> str:
    """A prefix with one version per fingerprint (version i + 1 made for fingerprints[i])."""
    with sessions() as s:
        prefix = Prefix(tenant_id=tenant_id, name=name, end_user_id=end_user_id)
        s.add(prefix)
        s.flush()
        for i, fp in enumerate(fingerprints, start=1):
            s.add(PrefixVersion(prefix_id=prefix.id, version=i, sha256=f"{i:064x}", size_bytes=1,
                                num_virtual_tokens=4 + i, source_format="native", base_model_fingerprint=fp))
        s.commit()
        return prefix.id


@pytest.mark.parametrize(("ref", "expected"), [
    ("p", ("p", None)), ("p@1", ("p", 1)), ("p@12", ("p", 12)), ("user:a@b.c", ("user:a@b.c", None)),
    ("user:a@b.c@2", ("user:a@b.c", 2)), ("user:bob@-1", ("user:bob@-1", None)),
])
def test_split_ref(ref: str, expected: tuple[str, int | None]) -> None:
    assert split_ref(ref) == expected


@pytest.mark.parametrize("ref", ["x@0", "x@-1", "x@abc", "x@", "x@1.5", "x@٣", "x@99999999999", "user:bob@0"])
def test_malformed_or_zero_versions(ref: str) -> None:
    """One parser, two answers: the `model` field's 404 (a model that does not exist), the prefix API's 400."""
    with pytest.raises(InvalidRef):
        split_ref(ref)
    with pytest.raises(NotFound) as missing:
        parse_model_name(ref)
    assert missing.value.code == "model_not_found" and missing.value.param == "model"
    with pytest.raises(InvalidRequest) as invalid:
        parse_ref(ref)
    assert invalid.value.code == "invalid_name" and "invalid version" in invalid.value.message


def test_find_version_newest_or_named_and_tenant_scoped(pg_sessions: sessionmaker[Session]) -> None:
    mine, theirs = _tenant(pg_sessions, "mine"), _tenant(pg_sessions, "theirs")
    prefix_id = _prefix(pg_sessions, mine, "p", [FP, FP, FP])
    _prefix(pg_sessions, theirs, "secret", [FP])
    with pg_sessions() as s:
        newest = find_version(s, tenant_id=mine, name="p", version=None)
        assert newest is not None and (newest.prefix_id, newest.version, newest.num_virtual_tokens) == (prefix_id, 3, 7)
        second = find_version(s, tenant_id=mine, name="p", version=2)
        assert second is not None and (second.version, second.sha256) == (2, f"{2:064x}")
        assert find_version(s, tenant_id=mine, name="p", version=4) is None
        assert find_version(s, tenant_id=mine, name="secret", version=None) is None  # another tenant's
        assert find_version(s, tenant_id=theirs, name="secret", version=1) is not None
    catalog = DbCatalog(pg_sessions)
    ref = catalog.lookup(mine, "p", None)
    assert ref is not None and (ref.prefix_id, ref.version, ref.sha256) == (prefix_id, 3, newest.sha256)
    assert catalog.lookup(mine, "secret", None) is None and catalog.lookup(mine, "p", 4) is None


def test_resolve_model_refuses_a_version_made_for_another_base_model(pg_sessions: sessionmaker[Session]) -> None:
    tenant = _tenant(pg_sessions, "acme")
    _prefix(pg_sessions, tenant, "p", [FP, "fp-old"])  # v1 for the served model, v2 for another
    with pg_sessions() as s:
        target = resolve_model(s, tenant_id=tenant, model="p@1", base_model_id=BASE, fingerprint=FP)
        assert target.ref is not None and target.ref.version == 1 and target.num_virtual_tokens == 5
        for model, version in (("p", 2), ("p@2", 2)):
            with pytest.raises(Conflict) as exc:
                resolve_model(s, tenant_id=tenant, model=model, base_model_id=BASE, fingerprint=FP)
            assert exc.value.status_code == 409 and exc.value.code == "model_mismatch" and exc.value.param == "model"
            assert f"p@{version}" in exc.value.message and "'fp-old'" in exc.value.message
            assert f"'{BASE}'" in exc.value.message and f"'{FP}'" in exc.value.message
        assert resolve_model(s, tenant_id=tenant, model=BASE, base_model_id=BASE, fingerprint=FP).ref is None
        with pytest.raises(NotFound):
            resolve_model(s, tenant_id=tenant, model="p@0", base_model_id=BASE, fingerprint=FP)


def test_personal_prefix_with_at_sign_in_its_id(pg_sessions: sessionmaker[Session]) -> None:
    """An end user's id may contain `@` (ids never end in `@<digits>`): its prefix name is not a version."""
    tenant = _tenant(pg_sessions, "acme")
    with pg_sessions() as s:
        user = EndUser(tenant_id=tenant, external_id="bob@example.com")
        s.add(user)
        s.commit()
        user_id = user.id
    _prefix(pg_sessions, tenant, "user:bob@example.com", [FP, FP], end_user_id=user_id)
    with pg_sessions() as s:
        for model, version in (("user:bob@example.com", 2), ("user:bob@example.com@1", 1)):
            target = resolve_model(s, tenant_id=tenant, model=model, base_model_id=BASE, fingerprint=FP)
            assert target.ref is not None
            assert (target.ref.name, target.ref.version) == ("user:bob@example.com", version)
