"""The flags tables (the spec's four, plus state, segments, approvals, usage and experiments).

Times are whole milliseconds since the epoch (UTC); JSON documents are stored as text.
"""

from __future__ import annotations

import sqlalchemy as sa

from tenfold.kernel.sql import metadata

MS = sa.BigInteger
ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # SQLite: the rowid alias

environments = sa.Table(
    "flag_environments",
    metadata,
    sa.Column("environment_id", ID, primary_key=True, autoincrement=True),
    sa.Column("environment_key", sa.String(100), nullable=False, unique=True),
    sa.Column("name", sa.String(255), nullable=False),
    sa.Column("is_production", sa.Boolean, nullable=False),
    sa.Column("approval_required", sa.Boolean, nullable=False),
    sa.Column("required_approvals", sa.Integer, nullable=False),
    sa.Column("revision", sa.BigInteger, nullable=False),  # bumped by every change seen there
    sa.Column("created_at_ms", MS, nullable=False),
)

flags = sa.Table(
    "feature_flags",
    metadata,
    sa.Column("flag_id", ID, primary_key=True, autoincrement=True),
    sa.Column("flag_key", sa.String(200), nullable=False, unique=True),
    sa.Column("name", sa.String(255), nullable=False),
    sa.Column("description", sa.Text, nullable=False),
    sa.Column("flag_type", sa.String(50), nullable=False),
    sa.Column("default_value", sa.Text, nullable=False),
    sa.Column("variations", sa.Text, nullable=False),
    sa.Column("bucket_by", sa.String(100), nullable=False),
    sa.Column("salt", sa.String(200), nullable=False),
    sa.Column("tags", sa.Text, nullable=False),
    sa.Column("is_active", sa.Boolean, nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("created_at_ms", MS, nullable=False),
    sa.Column("updated_at_ms", MS, nullable=False),
    sa.Column("created_by", sa.String(255), nullable=False),
)

states = sa.Table(
    "flag_states",
    metadata,
    sa.Column(
        "flag_id", ID, sa.ForeignKey("feature_flags.flag_id", ondelete="CASCADE"), primary_key=True
    ),
    sa.Column(
        "environment_id",
        ID,
        sa.ForeignKey("flag_environments.environment_id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("enabled", sa.Boolean, nullable=False),
    sa.Column("default_rule", sa.Text),
    sa.Column("off_variation", sa.String(200)),
    sa.Column("prerequisites", sa.Text, nullable=False),
    sa.Column("guard", sa.Text),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("updated_at_ms", MS, nullable=False),
)

rules = sa.Table(
    "flag_rules",
    metadata,
    sa.Column("rule_id", ID, primary_key=True, autoincrement=True),
    sa.Column(
        "flag_id", ID, sa.ForeignKey("feature_flags.flag_id", ondelete="CASCADE"), nullable=False
    ),
    sa.Column(
        "environment_id",
        ID,
        sa.ForeignKey("flag_environments.environment_id", ondelete="CASCADE"),
        nullable=False,
    ),
    sa.Column("rule_order", sa.Integer, nullable=False),
    sa.Column("rule_key", sa.String(100), nullable=False),
    sa.Column("description", sa.Text, nullable=False),
    sa.Column("conditions", sa.Text, nullable=False),
    sa.Column("variation", sa.Text, nullable=False),  # {"variation": k} or {"split": [...]}
    sa.Column("rollout_percentage", sa.Float, nullable=False),
    sa.Column("is_active", sa.Boolean, nullable=False),
    sa.Index("ix_flag_rules_flag_env", "flag_id", "environment_id", "rule_order"),
)

segments = sa.Table(
    "flag_segments",
    metadata,
    sa.Column("segment_key", sa.String(200), primary_key=True),
    sa.Column("document", sa.Text, nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("updated_at_ms", MS, nullable=False),
)

audit_log = sa.Table(
    "flag_audit_log",
    metadata,
    sa.Column("audit_id", ID, primary_key=True, autoincrement=True),
    sa.Column("flag_id", ID),  # no foreign key: the history outlives a deleted flag
    sa.Column("environment_id", ID),
    sa.Column("subject", sa.String(200), nullable=False),  # the flag or segment key
    sa.Column("action", sa.String(100), nullable=False),
    sa.Column("old_value", sa.Text),
    sa.Column("new_value", sa.Text),
    sa.Column("user_id", sa.String(255), nullable=False),
    sa.Column("timestamp_ms", MS, nullable=False),
    sa.Index("ix_flag_audit_log_subject", "subject", "audit_id"),
)

change_requests = sa.Table(
    "flag_change_requests",
    metadata,
    sa.Column("request_id", sa.String(32), primary_key=True),
    sa.Column("flag_key", sa.String(200), nullable=False),
    sa.Column("environment_key", sa.String(100), nullable=False),
    sa.Column("kind", sa.String(20), nullable=False),  # "targeting"
    sa.Column("payload", sa.Text, nullable=False),
    sa.Column("base_version", sa.Integer, nullable=False),
    sa.Column("author", sa.String(255), nullable=False),
    sa.Column("comment", sa.Text, nullable=False),
    sa.Column("status", sa.String(20), nullable=False),  # pending applied rejected cancelled
    sa.Column("required_approvals", sa.Integer, nullable=False),
    sa.Column("created_at_ms", MS, nullable=False),
    sa.Column("decided_at_ms", MS),
    sa.Index("ix_flag_change_requests_status", "status", "created_at_ms"),
)

approvals = sa.Table(
    "flag_approvals",
    metadata,
    sa.Column("request_id", sa.String(32), primary_key=True),
    sa.Column("approver", sa.String(255), primary_key=True),
    sa.Column("decision", sa.String(20), nullable=False),  # approve or reject
    sa.Column("comment", sa.Text, nullable=False),
    sa.Column("decided_at_ms", MS, nullable=False),
)

sdk_keys = sa.Table(
    "flag_sdk_keys",
    metadata,
    sa.Column("key_id", sa.String(16), primary_key=True),
    sa.Column("environment_key", sa.String(100), nullable=False),
)

usage = sa.Table(
    "flag_usage",
    metadata,
    sa.Column("flag_key", sa.String(200), primary_key=True),
    sa.Column("environment_key", sa.String(100), primary_key=True),
    sa.Column("day", sa.String(10), primary_key=True),  # YYYY-MM-DD (UTC)
    sa.Column("variation", sa.String(200), primary_key=True),
    sa.Column("evaluations", sa.BigInteger, nullable=False),
    sa.Column("last_evaluated_ms", MS, nullable=False),
)

experiments = sa.Table(
    "flag_experiments",
    metadata,
    sa.Column("experiment_key", sa.String(200), primary_key=True),
    sa.Column("flag_key", sa.String(200), nullable=False),
    sa.Column("environment_key", sa.String(100), nullable=False),
    sa.Column("control", sa.String(200), nullable=False),
    sa.Column("metric", sa.String(200), nullable=False),
    sa.Column("sample_rate", sa.Float, nullable=False),
    sa.Column("status", sa.String(20), nullable=False),  # running stopped
    sa.Column("started_at_ms", MS, nullable=False),
    sa.Column("stopped_at_ms", MS),
    sa.Column("created_by", sa.String(255), nullable=False),
)

exposures = sa.Table(
    "flag_exposures",
    metadata,
    # One row per user and experiment: the first variation the user was served counts.
    sa.Column("experiment_key", sa.String(200), primary_key=True),
    sa.Column("user_id", sa.String(200), primary_key=True),
    sa.Column("variation", sa.String(200), nullable=False),
    sa.Column("first_seen_ms", MS, nullable=False),
)

conversions = sa.Table(
    "flag_conversions",
    metadata,
    # One row per user and metric in an environment: the first conversion, and a running sum.
    sa.Column("environment_key", sa.String(100), primary_key=True),
    sa.Column("metric", sa.String(200), primary_key=True),
    sa.Column("user_id", sa.String(200), primary_key=True),
    sa.Column("first_ms", MS, nullable=False),
    sa.Column("count", sa.BigInteger, nullable=False),
    sa.Column("value_sum", sa.Float, nullable=False),
)
