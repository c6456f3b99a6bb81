"""The task queue's tables. Times are whole milliseconds since the epoch (UTC)."""

from __future__ import annotations

import sqlalchemy as sa

from tenfold.kernel.sql import metadata

MS = sa.BigInteger

tasks = sa.Table(
    "tasks",
    metadata,
    sa.Column("task_id", sa.String(36), primary_key=True),
    sa.Column("queue", sa.String(100), nullable=False),
    sa.Column("task_type", sa.String(100), nullable=False),
    sa.Column("payload", sa.Text, nullable=False),
    sa.Column("priority", sa.SmallInteger, nullable=False),
    sa.Column("status", sa.String(12), nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("max_retries", sa.Integer, nullable=False),
    sa.Column("timeout_seconds", sa.Integer, nullable=False),
    sa.Column("run_at_ms", MS, nullable=False),
    sa.Column("scheduled_at_ms", MS),
    sa.Column("created_at_ms", MS, nullable=False),
    sa.Column("started_at_ms", MS),
    sa.Column("completed_at_ms", MS),
    sa.Column("failed_at_ms", MS),
    sa.Column("worker_id", sa.String(200)),
    sa.Column("lease_token", sa.String(40)),
    sa.Column("lease_expires_ms", MS),
    sa.Column("error_message", sa.Text),
    sa.Column("traceback", sa.Text),
    sa.Column("result", sa.Text),
    sa.Column("idempotency_key", sa.String(200), unique=True),
    sa.Column("on_dependency_failure", sa.String(10), nullable=False),
    sa.Column("resources", sa.String(200), nullable=False),
    sa.Column("pending_deps", sa.Integer, nullable=False),
    sa.Column("cancel_requested", sa.Boolean, nullable=False),
    sa.Column("has_dependants", sa.Boolean, nullable=False),
    sa.Column("created_by", sa.String(200)),
    # Claims read ready rows in this order: the partial index serves them without a sort.
    sa.Index(
        "ix_tasks_ready",
        "queue",
        "priority",
        "run_at_ms",
        "task_id",
        postgresql_where=sa.text("status IN ('pending', 'scheduled')"),
        sqlite_where=sa.text("status IN ('pending', 'scheduled')"),
    ),
    sa.Index("ix_tasks_lease", "status", "lease_expires_ms"),
    sa.Index("ix_tasks_type_status", "task_type", "status"),
)

task_dependencies = sa.Table(
    "task_dependencies",
    metadata,
    sa.Column("task_id", sa.String(36), primary_key=True),
    sa.Column("depends_on", sa.String(36), primary_key=True),
    sa.Index("ix_task_dependencies_depends_on", "depends_on"),
)

task_execution_history = sa.Table(
    "task_execution_history",
    metadata,
    sa.Column("execution_id", sa.String(36), primary_key=True),
    sa.Column("task_id", sa.String(36), nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("worker_id", sa.String(200)),
    sa.Column("queue", sa.String(100), nullable=False),
    sa.Column("priority", sa.SmallInteger, nullable=False),
    sa.Column("started_at_ms", MS),
    sa.Column("completed_at_ms", MS, nullable=False),
    sa.Column("wait_ms", MS),
    sa.Column("execution_time_ms", MS),
    sa.Column("status", sa.String(12), nullable=False),  # succeeded, failed, lost, timeout, ...
    sa.Column("error_message", sa.Text),
    sa.Column("resource_usage", sa.Text),
    sa.Index("ix_task_execution_history_task", "task_id", "attempt"),
    sa.Index("ix_task_execution_history_completed", "completed_at_ms"),
)

task_workers = sa.Table(
    "task_workers",
    metadata,
    sa.Column("worker_id", sa.String(200), primary_key=True),
    sa.Column("pool_id", sa.String(100), nullable=False),
    sa.Column("queues", sa.Text, nullable=False),
    sa.Column("task_types", sa.Text, nullable=False),
    sa.Column("resources", sa.Text, nullable=False),
    sa.Column("status", sa.String(12), nullable=False),
    sa.Column("current_task", sa.String(36)),
    sa.Column("concurrency", sa.Integer, nullable=False),
    sa.Column("hostname", sa.String(200)),
    sa.Column("pid", sa.Integer),
    sa.Column("started_at_ms", MS, nullable=False),
    sa.Column("last_heartbeat_ms", MS, nullable=False),
)

worker_pools = sa.Table(
    "worker_pools",
    metadata,
    sa.Column("pool_id", sa.String(100), primary_key=True),
    sa.Column("task_types", sa.Text, nullable=False),
    sa.Column("min_workers", sa.Integer, nullable=False),
    sa.Column("max_workers", sa.Integer, nullable=False),
    sa.Column("worker_config", sa.Text, nullable=False),
    sa.Column("is_active", sa.Boolean, nullable=False),
    sa.Column("created_at_ms", MS, nullable=False),
)

task_queues = sa.Table(
    "task_queues",
    metadata,
    sa.Column("queue", sa.String(100), primary_key=True),
    sa.Column("paused", sa.Boolean, nullable=False),
    sa.Column("updated_at_ms", MS, nullable=False),
)

task_schedules = sa.Table(
    "task_schedules",
    metadata,
    sa.Column("name", sa.String(100), primary_key=True),
    sa.Column("cron", sa.String(100), nullable=False),
    sa.Column("timezone", sa.String(64), nullable=False),
    sa.Column("task_type", sa.String(100), nullable=False),
    sa.Column("payload", sa.Text, nullable=False),
    sa.Column("priority", sa.SmallInteger, nullable=False),
    sa.Column("queue", sa.String(100), nullable=False),
    sa.Column("max_retries", sa.Integer, nullable=False),
    sa.Column("timeout_seconds", sa.Integer, nullable=False),
    sa.Column("next_run_ms", MS, nullable=False),
    sa.Column("last_run_ms", MS),
    sa.Column("enabled", sa.Boolean, nullable=False),
    sa.Column("created_at_ms", MS, nullable=False),
)
