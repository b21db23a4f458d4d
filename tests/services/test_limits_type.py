"""The enforced limits (`Limits`) and the admin API's wire form (`TenantLimitValues`) name the same fields, and
the columns of `tenant_limits` hold each of them: a limit added to one but not the others is caught here."""

from __future__ import annotations

from app.db.models import TenantLimits
from app.protocol.admin import TenantLimitValues
from app.services.limits import LIMIT_FIELDS


def test_limits_wire_form_and_table_agree() -> None:
    assert tuple(TenantLimitValues.model_fields) == LIMIT_FIELDS
    assert set(LIMIT_FIELDS) <= set(TenantLimits.__table__.columns.keys())
