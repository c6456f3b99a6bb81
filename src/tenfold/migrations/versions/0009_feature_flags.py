"""Feature flags: flags, environments, rules, state, segments, audit log, change requests,
SDK keys, usage and experiments.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-28 07:04:36.074748
"""

from __future__ import annotations

import time

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "feature_flags",
        sa.Column(
            "flag_id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("flag_key", sa.String(length=200), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("flag_type", sa.String(length=50), nullable=False),
        sa.Column("default_value", sa.Text(), nullable=False),
        sa.Column("variations", sa.Text(), nullable=False),
        sa.Column("bucket_by", sa.String(length=100), nullable=False),
        sa.Column("salt", sa.String(length=200), nullable=False),
        sa.Column("tags", sa.Text(), nullable=False),
        sa.Column("is_active", sa.Boolean(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("created_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("updated_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("created_by", sa.String(length=255), nullable=False),
        sa.PrimaryKeyConstraint("flag_id", name=op.f("pk_feature_flags")),
        sa.UniqueConstraint("flag_key", name=op.f("uq_feature_flags_flag_key")),
    )
    op.create_table(
        "flag_approvals",
        sa.Column("request_id", sa.String(length=32), nullable=False),
        sa.Column("approver", sa.String(length=255), nullable=False),
        sa.Column("decision", sa.String(length=20), nullable=False),
        sa.Column("comment", sa.Text(), nullable=False),
        sa.Column("decided_at_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("request_id", "approver", name=op.f("pk_flag_approvals")),
    )
    op.create_table(
        "flag_audit_log",
        sa.Column(
            "audit_id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("flag_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column(
            "environment_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column("subject", sa.String(length=200), nullable=False),
        sa.Column("action", sa.String(length=100), nullable=False),
        sa.Column("old_value", sa.Text(), nullable=True),
        sa.Column("new_value", sa.Text(), nullable=True),
        sa.Column("user_id", sa.String(length=255), nullable=False),
        sa.Column("timestamp_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("audit_id", name=op.f("pk_flag_audit_log")),
    )
    with op.batch_alter_table("flag_audit_log", schema=None) as batch_op:
        batch_op.create_index("ix_flag_audit_log_subject", ["subject", "audit_id"], unique=False)

    op.create_table(
        "flag_change_requests",
        sa.Column("request_id", sa.String(length=32), nullable=False),
        sa.Column("flag_key", sa.String(length=200), nullable=False),
        sa.Column("environment_key", sa.String(length=100), nullable=False),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("base_version", sa.Integer(), nullable=False),
        sa.Column("author", sa.String(length=255), nullable=False),
        sa.Column("comment", sa.Text(), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("required_approvals", sa.Integer(), nullable=False),
        sa.Column("created_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("decided_at_ms", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("request_id", name=op.f("pk_flag_change_requests")),
    )
    with op.batch_alter_table("flag_change_requests", schema=None) as batch_op:
        batch_op.create_index(
            "ix_flag_change_requests_status", ["status", "created_at_ms"], unique=False
        )

    op.create_table(
        "flag_conversions",
        sa.Column("environment_key", sa.String(length=100), nullable=False),
        sa.Column("metric", sa.String(length=200), nullable=False),
        sa.Column("user_id", sa.String(length=200), nullable=False),
        sa.Column("first_ms", sa.BigInteger(), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.Column("value_sum", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint(
            "environment_key", "metric", "user_id", name=op.f("pk_flag_conversions")
        ),
    )
    op.create_table(
        "flag_environments",
        sa.Column(
            "environment_id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("environment_key", sa.String(length=100), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("is_production", sa.Boolean(), nullable=False),
        sa.Column("approval_required", sa.Boolean(), nullable=False),
        sa.Column("required_approvals", sa.Integer(), nullable=False),
        sa.Column("revision", sa.BigInteger(), nullable=False),
        sa.Column("created_at_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("environment_id", name=op.f("pk_flag_environments")),
        sa.UniqueConstraint("environment_key", name=op.f("uq_flag_environments_environment_key")),
    )
    op.create_table(
        "flag_experiments",
        sa.Column("experiment_key", sa.String(length=200), nullable=False),
        sa.Column("flag_key", sa.String(length=200), nullable=False),
        sa.Column("environment_key", sa.String(length=100), nullable=False),
        sa.Column("control", sa.String(length=200), nullable=False),
        sa.Column("metric", sa.String(length=200), nullable=False),
        sa.Column("sample_rate", sa.Float(), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("started_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("stopped_at_ms", sa.BigInteger(), nullable=True),
        sa.Column("created_by", sa.String(length=255), nullable=False),
        sa.PrimaryKeyConstraint("experiment_key", name=op.f("pk_flag_experiments")),
    )
    op.create_table(
        "flag_exposures",
        sa.Column("experiment_key", sa.String(length=200), nullable=False),
        sa.Column("user_id", sa.String(length=200), nullable=False),
        sa.Column("variation", sa.String(length=200), nullable=False),
        sa.Column("first_seen_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("experiment_key", "user_id", name=op.f("pk_flag_exposures")),
    )
    op.create_table(
        "flag_sdk_keys",
        sa.Column("key_id", sa.String(length=16), nullable=False),
        sa.Column("environment_key", sa.String(length=100), nullable=False),
        sa.PrimaryKeyConstraint("key_id", name=op.f("pk_flag_sdk_keys")),
    )
    op.create_table(
        "flag_segments",
        sa.Column("segment_key", sa.String(length=200), nullable=False),
        sa.Column("document", sa.Text(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("updated_at_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("segment_key", name=op.f("pk_flag_segments")),
    )
    op.create_table(
        "flag_usage",
        sa.Column("flag_key", sa.String(length=200), nullable=False),
        sa.Column("environment_key", sa.String(length=100), nullable=False),
        sa.Column("day", sa.String(length=10), nullable=False),
        sa.Column("variation", sa.String(length=200), nullable=False),
        sa.Column("evaluations", sa.BigInteger(), nullable=False),
        sa.Column("last_evaluated_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint(
            "flag_key", "environment_key", "day", "variation", name=op.f("pk_flag_usage")
        ),
    )
    op.create_table(
        "flag_rules",
        sa.Column(
            "rule_id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("flag_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column(
            "environment_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("rule_order", sa.Integer(), nullable=False),
        sa.Column("rule_key", sa.String(length=100), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("conditions", sa.Text(), nullable=False),
        sa.Column("variation", sa.Text(), nullable=False),
        sa.Column("rollout_percentage", sa.Float(), nullable=False),
        sa.Column("is_active", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(
            ["environment_id"],
            ["flag_environments.environment_id"],
            name=op.f("fk_flag_rules_environment_id_flag_environments"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["flag_id"],
            ["feature_flags.flag_id"],
            name=op.f("fk_flag_rules_flag_id_feature_flags"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("rule_id", name=op.f("pk_flag_rules")),
    )
    with op.batch_alter_table("flag_rules", schema=None) as batch_op:
        batch_op.create_index(
            "ix_flag_rules_flag_env", ["flag_id", "environment_id", "rule_order"], unique=False
        )

    op.create_table(
        "flag_states",
        sa.Column("flag_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column(
            "environment_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("default_rule", sa.Text(), nullable=True),
        sa.Column("off_variation", sa.String(length=200), nullable=True),
        sa.Column("prerequisites", sa.Text(), nullable=False),
        sa.Column("guard", sa.Text(), nullable=True),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("updated_at_ms", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["environment_id"],
            ["flag_environments.environment_id"],
            name=op.f("fk_flag_states_environment_id_flag_environments"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["flag_id"],
            ["feature_flags.flag_id"],
            name=op.f("fk_flag_states_flag_id_feature_flags"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("flag_id", "environment_id", name=op.f("pk_flag_states")),
    )
    # The three environments every installation starts with; approvals stay off until an
    # admin turns them on.
    environments = sa.table(
        "flag_environments",
        sa.column("environment_key", sa.String),
        sa.column("name", sa.String),
        sa.column("is_production", sa.Boolean),
        sa.column("approval_required", sa.Boolean),
        sa.column("required_approvals", sa.Integer),
        sa.column("revision", sa.BigInteger),
        sa.column("created_at_ms", sa.BigInteger),
    )
    now_ms = int(time.time() * 1000)
    op.bulk_insert(
        environments,
        [
            {
                "environment_key": key,
                "name": name,
                "is_production": key == "production",
                "approval_required": False,
                "required_approvals": 1,
                "revision": 0,
                "created_at_ms": now_ms,
            }
            for key, name in (
                ("development", "Development"),
                ("staging", "Staging"),
                ("production", "Production"),
            )
        ],
    )


def downgrade() -> None:
    op.drop_table("flag_states")
    with op.batch_alter_table("flag_rules", schema=None) as batch_op:
        batch_op.drop_index("ix_flag_rules_flag_env")

    op.drop_table("flag_rules")
    op.drop_table("flag_usage")
    op.drop_table("flag_segments")
    op.drop_table("flag_sdk_keys")
    op.drop_table("flag_exposures")
    op.drop_table("flag_experiments")
    op.drop_table("flag_environments")
    op.drop_table("flag_conversions")
    with op.batch_alter_table("flag_change_requests", schema=None) as batch_op:
        batch_op.drop_index("ix_flag_change_requests_status")

    op.drop_table("flag_change_requests")
    with op.batch_alter_table("flag_audit_log", schema=None) as batch_op:
        batch_op.drop_index("ix_flag_audit_log_subject")

    op.drop_table("flag_audit_log")
    op.drop_table("flag_approvals")
    op.drop_table("feature_flags")
