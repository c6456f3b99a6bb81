"""Sessions: sessions (digests and sealed device data only), their events, handoff codes.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28 02:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sessions",
        sa.Column("session_id", sa.String(length=32), nullable=False),
        sa.Column("user_id", sa.String(length=255), nullable=False),
        sa.Column("session_type", sa.String(length=10), nullable=False),
        sa.Column("permissions", sa.Text(), nullable=False),
        sa.Column("remember_me", sa.Boolean(), nullable=False),
        sa.Column("token_digest", sa.LargeBinary(length=32), nullable=False),
        sa.Column("refresh_digest", sa.LargeBinary(length=32), nullable=False),
        sa.Column("refresh_generation", sa.Integer(), nullable=False),
        sa.Column("previous_digest", sa.LargeBinary(length=32), nullable=True),
        sa.Column("rotated_at_ms", sa.BigInteger(), nullable=True),
        sa.Column("hmac_key_id", sa.String(length=32), nullable=False),
        sa.Column("created_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("last_seen_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("idle_timeout_s", sa.Integer(), nullable=False),
        sa.Column("expires_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("revoked_at_ms", sa.BigInteger(), nullable=True),
        sa.Column("revoke_reason", sa.String(length=40), nullable=True),
        sa.Column("device_network", sa.String(length=32), nullable=False),
        sa.Column("device_fingerprint", sa.String(length=32), nullable=False),
        sa.Column("country", sa.String(length=2), nullable=False),
        sa.Column("key_id", sa.String(length=32), nullable=False),
        sa.Column("sealed", sa.LargeBinary(), nullable=False),
        sa.Column("origin_session_id", sa.String(length=32), nullable=True),
        sa.PrimaryKeyConstraint("session_id", name=op.f("pk_sessions")),
    )
    with op.batch_alter_table("sessions", schema=None) as batch_op:
        batch_op.create_index(
            "ix_sessions_user", ["user_id", "session_type", "created_at_ms"], unique=False
        )
        batch_op.create_index("ix_sessions_created", ["created_at_ms"], unique=False)
        batch_op.create_index("ix_sessions_expires", ["expires_at_ms"], unique=False)

    op.create_table(
        "session_events",
        sa.Column(
            "event_id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("session_id", sa.String(length=32), nullable=False),
        sa.Column("user_id", sa.String(length=255), nullable=False),
        sa.Column("at_ms", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.String(length=40), nullable=False),
        sa.Column("actor", sa.String(length=100), nullable=True),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("event_id", name=op.f("pk_session_events")),
    )
    with op.batch_alter_table("session_events", schema=None) as batch_op:
        batch_op.create_index("ix_session_events_session", ["session_id", "event_id"], unique=False)
        batch_op.create_index("ix_session_events_kind", ["kind", "at_ms"], unique=False)

    op.create_table(
        "session_handoffs",
        sa.Column("code_digest", sa.LargeBinary(length=32), nullable=False),
        sa.Column("session_id", sa.String(length=32), nullable=False),
        sa.Column("audience", sa.String(length=255), nullable=False),
        sa.Column("created_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("expires_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("used_at_ms", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("code_digest", name=op.f("pk_session_handoffs")),
    )
    with op.batch_alter_table("session_handoffs", schema=None) as batch_op:
        batch_op.create_index("ix_session_handoffs_expires", ["expires_at_ms"], unique=False)


def downgrade() -> None:
    op.drop_table("session_handoffs")
    op.drop_table("session_events")
    op.drop_table("sessions")
