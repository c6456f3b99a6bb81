"""The shortener's tables. Times are whole milliseconds since the epoch (UTC)."""

from __future__ import annotations

import sqlalchemy as sa

from tenfold.kernel.sql import metadata

MS = sa.BigInteger
ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # SQLite: the rowid alias

links = sa.Table(
    "shortener_links",
    metadata,
    sa.Column("link_id", ID, primary_key=True, autoincrement=True),
    sa.Column("domain", sa.String(253), nullable=False),  # "" = the default short domain
    sa.Column("short_code", sa.String(20), nullable=False),
    sa.Column("long_url", sa.Text, nullable=False),
    sa.Column("owner", sa.String(200), nullable=False),
    sa.Column("description", sa.String(500), nullable=False),
    sa.Column("created_at_ms", MS, nullable=False),
    sa.Column("updated_at_ms", MS, nullable=False),
    sa.Column("expires_at_ms", MS),
    sa.Column("is_active", sa.Boolean, nullable=False),
    sa.Column("is_custom", sa.Boolean, nullable=False),
    sa.Column("redirect_status", sa.SmallInteger, nullable=False),
    sa.Column("max_visits", sa.Integer),
    sa.Column("click_count", sa.BigInteger, nullable=False),
    sa.Column("password_hash", sa.String(200)),
    sa.Column("blocked_reason", sa.String(200)),
    sa.UniqueConstraint("domain", "short_code", name="uq_shortener_links_code"),
    # An owner's links, newest first, most clicked first, with keyset pagination.
    sa.Index("ix_shortener_links_owner_created", "owner", "created_at_ms", "link_id"),
    sa.Index("ix_shortener_links_owner_clicks", "owner", "click_count", "link_id"),
)

accounts = sa.Table(
    "shortener_accounts",
    metadata,
    sa.Column("account_id", sa.String(32), primary_key=True),
    sa.Column("email", sa.String(254), nullable=False, unique=True),
    sa.Column("plan", sa.String(50), nullable=False),
    sa.Column("monthly_quota", sa.Integer, nullable=False),  # 0 = unlimited
    sa.Column("usage_month", sa.String(7), nullable=False),  # YYYY-MM (UTC)
    sa.Column("current_usage", sa.Integer, nullable=False),
    sa.Column("created_at_ms", MS, nullable=False),
    sa.Column("key_id", sa.String(16), nullable=False),
)

domains = sa.Table(
    "shortener_domains",
    metadata,
    sa.Column("domain", sa.String(253), primary_key=True),
    sa.Column("owner", sa.String(200), nullable=False),
    sa.Column("token", sa.String(64), nullable=False),
    sa.Column("verified_at_ms", MS),
    sa.Column("created_at_ms", MS, nullable=False),
    sa.Index("ix_shortener_domains_owner", "owner"),
)

counters = sa.Table(
    "shortener_counters",
    metadata,
    sa.Column("domain", sa.String(253), primary_key=True),
    sa.Column("next_value", sa.BigInteger, nullable=False),
)
