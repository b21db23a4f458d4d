"""The Batch API: batches, the results of their finished requests, and a per-tenant limit on unfinished batches.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03

Hand-written like 0001 (plain SQLAlchemy types; constraint names per app.db.models.NAMING_CONVENTION) and
checked against app/db/models/ by tests/db/test_migrations.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID = sa.String(length=64)
STATUSES = ("validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled")


def _ts(name: str, *, nullable: bool = True) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _count(name: str, kind: type[sa.Integer] = sa.Integer) -> sa.Column[object]:
    return sa.Column(name, kind(), server_default="0", nullable=False)


def upgrade() -> None:
    op.create_table(
        "batches",
        sa.Column("id", ID, nullable=False),
        sa.Column("tenant_id", ID, nullable=False),
        sa.Column("endpoint", sa.String(length=64), nullable=False),
        sa.Column("input_file_id", ID, nullable=False),
        sa.Column("input_sha256", sa.String(length=64), nullable=False),
        sa.Column("completion_window", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("user_metadata", sa.JSON(), nullable=True),
        sa.Column("errors", sa.JSON(), nullable=True),
        sa.Column("total", sa.Integer(), nullable=False),
        _count("completed"),
        _count("failed"),
        _count("prompt_tokens", sa.BigInteger),
        _count("completion_tokens", sa.BigInteger),
        sa.Column("output_file_id", ID, nullable=True),
        sa.Column("error_file_id", ID, nullable=True),
        _ts("created_at", nullable=False),
        _ts("in_progress_at"),
        _ts("expires_at", nullable=False),
        _ts("finalizing_at"),
        _ts("completed_at"),
        _ts("failed_at"),
        _ts("expired_at"),
        _ts("cancelling_at"),
        _ts("cancelled_at"),
        sa.Column("lease_token", ID, nullable=True),
        _ts("heartbeat_at"),
        _count("attempts"),
        sa.CheckConstraint(f"status IN {STATUSES!r}", name=op.f("ck_batches_status")),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name=op.f("fk_batches_tenant_id_tenants"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_batches")),
    )
    op.create_index(op.f("ix_batches_status_created_at"), "batches", ["status", "created_at"], unique=False)
    op.create_index(op.f("ix_batches_tenant_id_created_at"), "batches", ["tenant_id", "created_at"], unique=False)
    op.create_table(
        "batch_results",
        sa.Column("batch_id", ID, nullable=False),
        sa.Column("line", sa.Integer(), nullable=False),
        sa.Column("ok", sa.Boolean(), nullable=False),
        sa.Column("record", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["batch_id"], ["batches.id"], name=op.f("fk_batch_results_batch_id_batches"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("batch_id", "line", name=op.f("pk_batch_results")),
    )
    with op.batch_alter_table("tenant_limits") as batch:
        batch.add_column(sa.Column("max_concurrent_batches", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("tenant_limits") as batch:
        batch.drop_column("max_concurrent_batches")
    op.drop_table("batch_results")
    op.drop_index(op.f("ix_batches_tenant_id_created_at"), table_name="batches")
    op.drop_index(op.f("ix_batches_status_created_at"), table_name="batches")
    op.drop_table("batches")
