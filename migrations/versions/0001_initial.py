"""Initial schema: tenants, API keys, prefixes and versions, end users and examples, files, training jobs.

Revision ID: 0001
Revises:
Create Date: 2026-11-26

Hand-written and checked against app/db/models/ (tests/db/test_migrations.py compares the two). It uses
plain SQLAlchemy types only, never the app's: a migration must keep working when the models change later.
Constraint names follow app.db.models.NAMING_CONVENTION.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID = sa.String(length=64)
SHA256 = sa.String(length=64)


def _id() -> sa.Column[str]:
    return sa.Column("id", ID, nullable=False)


def _ts(name: str, *, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _fk(table: str, col: str, target: str, ondelete: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        [col], [f"{target}.id"], name=op.f(f"fk_{table}_{col}_{target}"), ondelete=ondelete
    )


def _pk(table: str) -> sa.PrimaryKeyConstraint:
    return sa.PrimaryKeyConstraint("id", name=op.f(f"pk_{table}"))


def _index(table: str, *cols: str) -> None:
    op.create_index(op.f(f"ix_{table}_{'_'.join(cols)}"), table, list(cols), unique=False)


def upgrade() -> None:
    op.create_table(
        "tenants",
        _id(),
        sa.Column("name", sa.String(length=200), nullable=False),
        _ts("created_at"),
        _pk("tenants"),
        sa.UniqueConstraint("name", name=op.f("uq_tenants_name")),
    )
    op.create_table(
        "api_keys",
        _id(),
        sa.Column("tenant_id", ID, nullable=False),
        sa.Column("key_hash", SHA256, nullable=False),
        sa.Column("key_prefix", sa.String(length=16), nullable=False),
        sa.Column("scopes", sa.String(length=200), nullable=False),
        _ts("created_at"),
        _ts("revoked_at", nullable=True),
        _ts("last_used_at", nullable=True),
        _fk("api_keys", "tenant_id", "tenants", "CASCADE"),
        _pk("api_keys"),
        sa.UniqueConstraint("key_hash", name=op.f("uq_api_keys_key_hash")),
    )
    _index("api_keys", "tenant_id")
    op.create_table(
        "end_users",
        _id(),
        sa.Column("tenant_id", ID, nullable=False),
        sa.Column("external_id", sa.String(length=200), nullable=False),
        _ts("created_at"),
        _fk("end_users", "tenant_id", "tenants", "CASCADE"),
        _pk("end_users"),
        sa.UniqueConstraint("tenant_id", "external_id", name=op.f("uq_end_users_tenant_id_external_id")),
    )
    op.create_table(
        "files",
        _id(),
        sa.Column("tenant_id", ID, nullable=False),
        sa.Column("filename", sa.String(length=255), nullable=False),
        sa.Column("purpose", sa.String(length=32), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("sha256", SHA256, nullable=False),
        sa.Column("line_count", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=False),
        _ts("created_at"),
        _fk("files", "tenant_id", "tenants", "CASCADE"),
        _pk("files"),
    )
    _index("files", "sha256")
    _index("files", "tenant_id", "created_at")
    op.create_table(
        "prefixes",
        _id(),
        sa.Column("tenant_id", ID, nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("end_user_id", ID, nullable=True),
        _ts("created_at"),
        # `user:<external id>` names are reserved for personal prefixes (and personal prefixes must use them).
        sa.CheckConstraint(
            "(end_user_id IS NULL) = (substr(name, 1, 5) <> 'user:')", name=op.f("ck_prefixes_personal_name")
        ),
        _fk("prefixes", "end_user_id", "end_users", "CASCADE"),
        _fk("prefixes", "tenant_id", "tenants", "CASCADE"),
        _pk("prefixes"),
        sa.UniqueConstraint("tenant_id", "name", name=op.f("uq_prefixes_tenant_id_name")),
    )
    _index("prefixes", "end_user_id")
    op.create_table(
        "user_examples",
        _id(),
        sa.Column("end_user_id", ID, nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        _ts("created_at"),
        _fk("user_examples", "end_user_id", "end_users", "CASCADE"),
        _pk("user_examples"),
    )
    _index("user_examples", "end_user_id")
    op.create_table(
        "prefix_versions",
        _id(),
        sa.Column("prefix_id", ID, nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("sha256", SHA256, nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("num_virtual_tokens", sa.Integer(), nullable=False),
        sa.Column("source_format", sa.String(length=16), nullable=False),
        sa.Column("base_model_fingerprint", sa.String(length=128), nullable=False),
        sa.Column("recorded_base_model", sa.String(length=500), nullable=True),
        _ts("created_at"),
        sa.Column("training_job_id", ID, nullable=True),  # provenance; no FK (see the model)
        sa.CheckConstraint(
            "source_format IN ('native', 'peft', 'trained')", name=op.f("ck_prefix_versions_source_format")
        ),
        sa.CheckConstraint("version >= 1", name=op.f("ck_prefix_versions_version_positive")),
        _fk("prefix_versions", "prefix_id", "prefixes", "CASCADE"),
        _pk("prefix_versions"),
        sa.UniqueConstraint("prefix_id", "version", name=op.f("uq_prefix_versions_prefix_id_version")),
    )
    _index("prefix_versions", "sha256")
    op.create_table(
        "training_jobs",
        _id(),
        sa.Column("tenant_id", ID, nullable=False),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("training_file_id", ID, nullable=True),
        sa.Column("validation_file_id", ID, nullable=True),
        sa.Column("end_user_id", ID, nullable=True),
        sa.Column("prefix_name", sa.String(length=200), nullable=False),
        sa.Column("hyperparameters", sa.JSON(), nullable=False),
        sa.Column("options", sa.JSON(), nullable=False),
        sa.Column("result_prefix_version_id", ID, nullable=True),
        sa.Column("error", sa.JSON(), nullable=True),
        sa.Column("trained_tokens", sa.BigInteger(), nullable=True),
        sa.Column("queue_job_id", sa.String(length=200), nullable=True),
        _ts("created_at"),
        _ts("started_at", nullable=True),
        _ts("finished_at", nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.CheckConstraint(
            "status IN ('validating_files', 'queued', 'running', 'succeeded', 'failed', 'cancelled')",
            name=op.f("ck_training_jobs_status"),
        ),
        _fk("training_jobs", "end_user_id", "end_users", "SET NULL"),
        _fk("training_jobs", "result_prefix_version_id", "prefix_versions", "SET NULL"),
        _fk("training_jobs", "tenant_id", "tenants", "CASCADE"),
        _fk("training_jobs", "training_file_id", "files", "SET NULL"),
        _fk("training_jobs", "validation_file_id", "files", "SET NULL"),
        _pk("training_jobs"),
    )
    _index("training_jobs", "status", "created_at")
    _index("training_jobs", "tenant_id", "created_at")
    op.create_table(
        "job_checkpoints",
        _id(),
        sa.Column("job_id", ID, nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("sha256", SHA256, nullable=False),
        _ts("created_at"),
        _fk("job_checkpoints", "job_id", "training_jobs", "CASCADE"),
        _pk("job_checkpoints"),
        sa.UniqueConstraint("job_id", "step", name=op.f("uq_job_checkpoints_job_id_step")),
    )
    _index("job_checkpoints", "sha256")
    op.create_table(
        "job_events",
        _id(),
        sa.Column("job_id", ID, nullable=False),
        _ts("created_at"),
        sa.Column("level", sa.String(length=16), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("data", sa.JSON(), nullable=True),
        _fk("job_events", "job_id", "training_jobs", "CASCADE"),
        _pk("job_events"),
    )
    _index("job_events", "job_id", "created_at")


def downgrade() -> None:
    # Children before parents; dropping a table drops its indexes and constraints with it.
    for table in (
        "job_events",
        "job_checkpoints",
        "training_jobs",
        "prefix_versions",
        "user_examples",
        "prefixes",
        "files",
        "end_users",
        "api_keys",
        "tenants",
    ):
        op.drop_table(table)
