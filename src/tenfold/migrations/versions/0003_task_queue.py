"""Task queue: tasks, dependencies, execution history, workers, pools, queues, schedules.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27 23:34:35.714561
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "task_dependencies",
        sa.Column("task_id", sa.String(length=36), nullable=False),
        sa.Column("depends_on", sa.String(length=36), nullable=False),
        sa.PrimaryKeyConstraint("task_id", "depends_on", name=op.f("pk_task_dependencies")),
    )
    with op.batch_alter_table("task_dependencies", schema=None) as batch_op:
        batch_op.create_index("ix_task_dependencies_depends_on", ["depends_on"], unique=False)

    op.create_table(
        "task_execution_history",
        sa.Column("execution_id", sa.String(length=36), nullable=False),
        sa.Column("task_id", sa.String(length=36), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("worker_id", sa.String(length=200), nullable=True),
        sa.Column("queue", sa.String(length=100), nullable=False),
        sa.Column("priority", sa.SmallInteger(), nullable=False),
        sa.Column("started_at_ms", sa.BigInteger(), nullable=True),
        sa.Column("completed_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("wait_ms", sa.BigInteger(), nullable=True),
        sa.Column("execution_time_ms", sa.BigInteger(), nullable=True),
        sa.Column("status", sa.String(length=12), nullable=False),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("resource_usage", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("execution_id", name=op.f("pk_task_execution_history")),
    )
    with op.batch_alter_table("task_execution_history", schema=None) as batch_op:
        batch_op.create_index(
            "ix_task_execution_history_completed", ["completed_at_ms"], unique=False
        )
        batch_op.create_index(
            "ix_task_execution_history_task", ["task_id", "attempt"], unique=False
        )

    op.create_table(
        "task_queues",
        sa.Column("queue", sa.String(length=100), nullable=False),
        sa.Column("paused", sa.Boolean(), nullable=False),
        sa.Column("updated_at_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("queue", name=op.f("pk_task_queues")),
    )
    op.create_table(
        "task_schedules",
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("cron", sa.String(length=100), nullable=False),
        sa.Column("timezone", sa.String(length=64), nullable=False),
        sa.Column("task_type", sa.String(length=100), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("priority", sa.SmallInteger(), nullable=False),
        sa.Column("queue", sa.String(length=100), nullable=False),
        sa.Column("max_retries", sa.Integer(), nullable=False),
        sa.Column("timeout_seconds", sa.Integer(), nullable=False),
        sa.Column("next_run_ms", sa.BigInteger(), nullable=False),
        sa.Column("last_run_ms", sa.BigInteger(), nullable=True),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("created_at_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_task_schedules")),
    )
    op.create_table(
        "task_workers",
        sa.Column("worker_id", sa.String(length=200), nullable=False),
        sa.Column("pool_id", sa.String(length=100), nullable=False),
        sa.Column("queues", sa.Text(), nullable=False),
        sa.Column("task_types", sa.Text(), nullable=False),
        sa.Column("resources", sa.Text(), nullable=False),
        sa.Column("status", sa.String(length=12), nullable=False),
        sa.Column("current_task", sa.String(length=36), nullable=True),
        sa.Column("concurrency", sa.Integer(), nullable=False),
        sa.Column("hostname", sa.String(length=200), nullable=True),
        sa.Column("pid", sa.Integer(), nullable=True),
        sa.Column("started_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("last_heartbeat_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("worker_id", name=op.f("pk_task_workers")),
    )
    op.create_table(
        "tasks",
        sa.Column("task_id", sa.String(length=36), nullable=False),
        sa.Column("queue", sa.String(length=100), nullable=False),
        sa.Column("task_type", sa.String(length=100), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("priority", sa.SmallInteger(), nullable=False),
        sa.Column("status", sa.String(length=12), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("max_retries", sa.Integer(), nullable=False),
        sa.Column("timeout_seconds", sa.Integer(), nullable=False),
        sa.Column("run_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("scheduled_at_ms", sa.BigInteger(), nullable=True),
        sa.Column("created_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("started_at_ms", sa.BigInteger(), nullable=True),
        sa.Column("completed_at_ms", sa.BigInteger(), nullable=True),
        sa.Column("failed_at_ms", sa.BigInteger(), nullable=True),
        sa.Column("worker_id", sa.String(length=200), nullable=True),
        sa.Column("lease_token", sa.String(length=40), nullable=True),
        sa.Column("lease_expires_ms", sa.BigInteger(), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("traceback", sa.Text(), nullable=True),
        sa.Column("result", sa.Text(), nullable=True),
        sa.Column("idempotency_key", sa.String(length=200), nullable=True),
        sa.Column("on_dependency_failure", sa.String(length=10), nullable=False),
        sa.Column("resources", sa.String(length=200), nullable=False),
        sa.Column("pending_deps", sa.Integer(), nullable=False),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("has_dependants", sa.Boolean(), nullable=False),
        sa.Column("created_by", sa.String(length=200), nullable=True),
        sa.PrimaryKeyConstraint("task_id", name=op.f("pk_tasks")),
        sa.UniqueConstraint("idempotency_key", name=op.f("uq_tasks_idempotency_key")),
    )
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.create_index(
            "ix_tasks_ready",
            ["queue", "priority", "run_at_ms", "task_id"],
            unique=False,
            postgresql_where=sa.text("status IN ('pending', 'scheduled')"),
            sqlite_where=sa.text("status IN ('pending', 'scheduled')"),
        )
        batch_op.create_index("ix_tasks_lease", ["status", "lease_expires_ms"], unique=False)
        batch_op.create_index("ix_tasks_type_status", ["task_type", "status"], unique=False)

    op.create_table(
        "worker_pools",
        sa.Column("pool_id", sa.String(length=100), nullable=False),
        sa.Column("task_types", sa.Text(), nullable=False),
        sa.Column("min_workers", sa.Integer(), nullable=False),
        sa.Column("max_workers", sa.Integer(), nullable=False),
        sa.Column("worker_config", sa.Text(), nullable=False),
        sa.Column("is_active", sa.Boolean(), nullable=False),
        sa.Column("created_at_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("pool_id", name=op.f("pk_worker_pools")),
    )


def downgrade() -> None:
    op.drop_table("worker_pools")
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.drop_index("ix_tasks_type_status")
        batch_op.drop_index("ix_tasks_lease")
        batch_op.drop_index("ix_tasks_ready")

    op.drop_table("tasks")
    op.drop_table("task_workers")
    op.drop_table("task_schedules")
    op.drop_table("task_queues")
    with op.batch_alter_table("task_execution_history", schema=None) as batch_op:
        batch_op.drop_index("ix_task_execution_history_task")
        batch_op.drop_index("ix_task_execution_history_completed")

    op.drop_table("task_execution_history")
    with op.batch_alter_table("task_dependencies", schema=None) as batch_op:
        batch_op.drop_index("ix_task_dependencies_depends_on")

    op.drop_table("task_dependencies")
