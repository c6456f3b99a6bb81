"""URL shortener: links, accounts, branded domains, code counters.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-28 05:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "shortener_links",
        sa.Column(
            "link_id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("domain", sa.String(length=253), nullable=False),
        sa.Column("short_code", sa.String(length=20), nullable=False),
        sa.Column("long_url", sa.Text(), nullable=False),
        sa.Column("owner", sa.String(length=200), nullable=False),
        sa.Column("description", sa.String(length=500), nullable=False),
        sa.Column("created_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("updated_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("expires_at_ms", sa.BigInteger(), nullable=True),
        sa.Column("is_active", sa.Boolean(), nullable=False),
        sa.Column("is_custom", sa.Boolean(), nullable=False),
        sa.Column("redirect_status", sa.SmallInteger(), nullable=False),
        sa.Column("max_visits", sa.Integer(), nullable=True),
        sa.Column("click_count", sa.BigInteger(), nullable=False),
        sa.Column("password_hash", sa.String(length=200), nullable=True),
        sa.Column("blocked_reason", sa.String(length=200), nullable=True),
        sa.PrimaryKeyConstraint("link_id", name=op.f("pk_shortener_links")),
        sa.UniqueConstraint("domain", "short_code", name="uq_shortener_links_code"),
    )
    with op.batch_alter_table("shortener_links", schema=None) as batch_op:
        batch_op.create_index(
            "ix_shortener_links_owner_created", ["owner", "created_at_ms", "link_id"], unique=False
        )
        batch_op.create_index(
            "ix_shortener_links_owner_clicks", ["owner", "click_count", "link_id"], unique=False
        )
    op.create_table(
        "shortener_accounts",
        sa.Column("account_id", sa.String(length=32), nullable=False),
        sa.Column("email", sa.String(length=254), nullable=False),
        sa.Column("plan", sa.String(length=50), nullable=False),
        sa.Column("monthly_quota", sa.Integer(), nullable=False),
        sa.Column("usage_month", sa.String(length=7), nullable=False),
        sa.Column("current_usage", sa.Integer(), nullable=False),
        sa.Column("created_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("key_id", sa.String(length=16), nullable=False),
        sa.PrimaryKeyConstraint("account_id", name=op.f("pk_shortener_accounts")),
        sa.UniqueConstraint("email", name=op.f("uq_shortener_accounts_email")),
    )
    op.create_table(
        "shortener_domains",
        sa.Column("domain", sa.String(length=253), nullable=False),
        sa.Column("owner", sa.String(length=200), nullable=False),
        sa.Column("token", sa.String(length=64), nullable=False),
        sa.Column("verified_at_ms", sa.BigInteger(), nullable=True),
        sa.Column("created_at_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("domain", name=op.f("pk_shortener_domains")),
    )
    with op.batch_alter_table("shortener_domains", schema=None) as batch_op:
        batch_op.create_index("ix_shortener_domains_owner", ["owner"], unique=False)
    op.create_table(
        "shortener_counters",
        sa.Column("domain", sa.String(length=253), nullable=False),
        sa.Column("next_value", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("domain", name=op.f("pk_shortener_counters")),
    )


def downgrade() -> None:
    op.drop_table("shortener_counters")
    op.drop_table("shortener_domains")
    op.drop_table("shortener_accounts")
    op.drop_table("shortener_links")
