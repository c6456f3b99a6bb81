"""Sessions: a short log of changed sessions, so every process drops stale copies by polling it.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28 03:35:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "session_changes",
        sa.Column(
            "change_id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("session_id", sa.String(length=32), nullable=False),
        sa.Column("at_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("change_id", name=op.f("pk_session_changes")),
    )
    with op.batch_alter_table("session_changes", schema=None) as batch_op:
        batch_op.create_index("ix_session_changes_at", ["at_ms"], unique=False)


def downgrade() -> None:
    op.drop_table("session_changes")
