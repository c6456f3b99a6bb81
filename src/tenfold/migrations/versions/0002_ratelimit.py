"""Rate limiter: policies, client assignments, tiers, sampled decision events.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "rate_limit_policies",
        sa.Column("policy_id", sa.Integer, autoincrement=True, nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("algorithm", sa.String(50), nullable=False),
        sa.Column("rate_limit", sa.BigInteger, nullable=False),
        sa.Column("time_window", sa.Integer, nullable=False),
        sa.Column("burst_capacity", sa.BigInteger, nullable=False),
        sa.Column("key_by", sa.String(200), nullable=False),
        sa.Column("match_resource", sa.String(200)),
        sa.Column("match_region", sa.String(100)),
        sa.Column("tier", sa.String(100)),
        sa.Column("applies_to_all", sa.Boolean, nullable=False),
        sa.Column("shadow", sa.Boolean, nullable=False),
        sa.Column("failure_mode", sa.String(20), nullable=False),
        sa.Column("is_active", sa.Boolean, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("updated_at", TZ, nullable=False),
        sa.PrimaryKeyConstraint("policy_id", name="pk_rate_limit_policies"),
        sa.UniqueConstraint("name", name="uq_rate_limit_policies_name"),
    )
    op.create_table(
        "client_policies",
        sa.Column("client_id", sa.String(255), nullable=False),
        sa.Column("policy_id", sa.Integer, nullable=False),
        sa.Column("effective_from", TZ, nullable=False),
        sa.Column("override_rate_limit", sa.BigInteger),
        sa.Column("priority", sa.Integer, nullable=False),
        sa.Column("effective_to", TZ),
        sa.PrimaryKeyConstraint(
            "client_id", "policy_id", "effective_from", name="pk_client_policies"
        ),
        sa.ForeignKeyConstraint(
            ["policy_id"],
            ["rate_limit_policies.policy_id"],
            ondelete="CASCADE",
            name="fk_client_policies_policy_id_rate_limit_policies",
        ),
    )
    op.create_index("ix_client_policies_policy_id", "client_policies", ["policy_id"])
    op.create_table(
        "rate_limit_client_tiers",
        sa.Column("client_id", sa.String(255), nullable=False),
        sa.Column("tier", sa.String(100), nullable=False),
        sa.PrimaryKeyConstraint("client_id", name="pk_rate_limit_client_tiers"),
    )
    op.create_table(
        "rate_limit_events",
        sa.Column(
            "event_id",
            sa.BigInteger().with_variant(sa.Integer, "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("client_id", sa.String(255), nullable=False),
        sa.Column("policy_id", sa.Integer, nullable=False),
        sa.Column("action", sa.String(20), nullable=False),
        sa.Column("timestamp", TZ, nullable=False),
        sa.Column("remaining_quota", sa.BigInteger),
        sa.Column("request_metadata", sa.JSON),
        sa.PrimaryKeyConstraint("event_id", name="pk_rate_limit_events"),
    )
    op.create_index("idx_rate_limit_events_timestamp", "rate_limit_events", ["timestamp"])
    op.create_index(
        "idx_rate_limit_events_client_policy", "rate_limit_events", ["client_id", "policy_id"]
    )
    op.create_table(
        "rate_limit_meta",
        sa.Column("id", sa.Integer, nullable=False),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_rate_limit_meta"),
    )


def downgrade() -> None:
    for table in (
        "rate_limit_meta",
        "rate_limit_events",
        "rate_limit_client_tiers",
        "client_policies",
        "rate_limit_policies",
    ):
        op.drop_table(table)
