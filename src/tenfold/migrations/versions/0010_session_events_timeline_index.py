"""Sessions: the timeline index as the table declares it, (session_id, at_ms, event_id).

Revision 0005 created it on (session_id, event_id); the timeline pages by (at_ms, event_id)
within a session, which the declared index serves without a sort.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-28 09:20:00
"""

from __future__ import annotations

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("session_events", schema=None) as batch_op:
        batch_op.drop_index("ix_session_events_session")
        batch_op.create_index(
            "ix_session_events_session", ["session_id", "at_ms", "event_id"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("session_events", schema=None) as batch_op:
        batch_op.drop_index("ix_session_events_session")
        batch_op.create_index("ix_session_events_session", ["session_id", "event_id"], unique=False)
