"""Shortener: a trigram index for searching an owner's links (PostgreSQL).

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-28 05:30:00
"""

from __future__ import annotations

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

# The expression the store's search filters on, character for character (or the planner will
# not use the index). SQLite has no trigram index: there a search scans the owner's links.
SEARCH_EXPRESSION = "(long_url || ' ' || description || ' ' || short_code)"


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
    op.execute(
        "CREATE INDEX ix_shortener_links_search ON shortener_links "
        f"USING gin ({SEARCH_EXPRESSION} gin_trgm_ops)"
    )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP INDEX IF EXISTS ix_shortener_links_search")
