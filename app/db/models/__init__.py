"""The database schema (docs/storage.md), as SQLAlchemy 2 typed declarative models.

Tables are made only by the Alembic migrations in `migrations/versions/`; a test checks that the migrated
schema and these models agree. Every constraint is named (see `NAMING_CONVENTION`) so migrations can drop
and alter them by name on SQLite and PostgreSQL alike.

Conventions: string primary keys with a readable prefix (`app.db.session.new_id`, filled in on insert);
timestamps are timezone-aware UTC (`UTCDateTime`, base.py); deletes cascade in the database (`ON DELETE CASCADE`),
so ORM relationships use `passive_deletes=True` and deleting a tenant row removes everything it owns.
JSON columns are not mutation-tracked: assign a new dict/list, do not edit one in place.

One module per group of tables (tenants.py, prefixes.py, files.py, jobs.py, batches.py) over base.py; import from here.
"""

from app.db.models.base import (
    BATCH_STATUSES,
    BATCH_UNFINISHED_STATUSES,
    JOB_STATUSES,
    JOB_TERMINAL_STATUSES,
    NAMING_CONVENTION,
    PERSONAL_PREFIX_PREFIX,
    PREFIX_KINDS,
    SOURCE_FORMATS,
    Base,
    UTCDateTime,
    personal_prefix_name,
    utcnow,
)
from app.db.models.batches import Batch, BatchResult
from app.db.models.files import File
from app.db.models.jobs import JobCheckpoint, JobEvent, TrainingJob
from app.db.models.prefixes import Prefix, PrefixVersion
from app.db.models.tenants import ApiKey, EndUser, Tenant, TenantLimits, UserExample

__all__ = [
    "BATCH_STATUSES",
    "BATCH_UNFINISHED_STATUSES",
    "JOB_STATUSES",
    "JOB_TERMINAL_STATUSES",
    "NAMING_CONVENTION",
    "PERSONAL_PREFIX_PREFIX",
    "PREFIX_KINDS",
    "SOURCE_FORMATS",
    "ApiKey",
    "Base",
    "Batch",
    "BatchResult",
    "EndUser",
    "File",
    "JobCheckpoint",
    "JobEvent",
    "Prefix",
    "PrefixVersion",
    "Tenant",
    "TenantLimits",
    "TrainingJob",
    "UTCDateTime",
    "UserExample",
    "personal_prefix_name",
    "utcnow",
]
