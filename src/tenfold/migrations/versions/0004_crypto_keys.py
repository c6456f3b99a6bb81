"""Data keys of the kernel key ring, sealed under the master key.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "crypto_keys",
        sa.Column("key_id", sa.String(16), nullable=False),
        sa.Column("purpose", sa.String(8), nullable=False),
        sa.Column("generation", sa.Integer, nullable=False),
        sa.Column("material", sa.LargeBinary, nullable=False),
        sa.Column("public_jwk", sa.Text, nullable=True),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("activated_at", TZ, nullable=False),
        sa.Column("retired_at", TZ, nullable=True),
        sa.PrimaryKeyConstraint("key_id", name="pk_crypto_keys"),
        sa.UniqueConstraint("purpose", "generation", name="uq_crypto_keys_purpose_generation"),
        sa.CheckConstraint("purpose IN ('aead', 'hmac', 'jwt')", name="ck_crypto_keys_purpose"),
    )


def downgrade() -> None:
    op.drop_table("crypto_keys")
