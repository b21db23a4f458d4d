"""Prefix versions: which kind of virtual tokens a version holds (`prefix_tuning` per-layer keys/values, or a soft
prompt: `prompt_tuning` / `p_tuning` learned input embeddings). Existing versions are all KV prefixes.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

KINDS = ("prefix_tuning", "prompt_tuning", "p_tuning")


def upgrade() -> None:
    with op.batch_alter_table("prefix_versions") as batch:
        batch.add_column(sa.Column("kind", sa.String(length=16), server_default="prefix_tuning", nullable=False))
        batch.create_check_constraint("kind", f"kind IN {KINDS!r}")


def downgrade() -> None:
    with op.batch_alter_table("prefix_versions") as batch:
        batch.drop_constraint("kind", type_="check")
        batch.drop_column("kind")
