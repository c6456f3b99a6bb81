"""The sessions service's tables. Times are whole milliseconds since the epoch (UTC).

No token is stored in clear: only SHA-256 digests of secrets. Device details and session data
are sealed with the key ring's AEAD key (`key_id` names it); the device's network and
fingerprint are kept as keyed hashes for risk checks.
"""

from __future__ import annotations

import sqlalchemy as sa

from tenfold.kernel.sql import metadata

MS = sa.BigInteger

sessions = sa.Table(
    "sessions",
    metadata,
    sa.Column("session_id", sa.String(32), primary_key=True),
    sa.Column("user_id", sa.String(255), nullable=False),
    sa.Column("session_type", sa.String(10), nullable=False),
    sa.Column("permissions", sa.Text, nullable=False),  # a JSON list
    sa.Column("remember_me", sa.Boolean, nullable=False),
    sa.Column("token_digest", sa.LargeBinary(32), nullable=False),
    sa.Column("refresh_digest", sa.LargeBinary(32), nullable=False),
    sa.Column("refresh_generation", sa.Integer, nullable=False),
    sa.Column("previous_digest", sa.LargeBinary(32)),  # of the token the last refresh presented
    sa.Column("rotated_at_ms", MS),
    sa.Column("hmac_key_id", sa.String(32), nullable=False),
    sa.Column("created_at_ms", MS, nullable=False),
    sa.Column("last_seen_at_ms", MS, nullable=False),
    sa.Column("idle_timeout_s", sa.Integer, nullable=False),
    sa.Column("expires_at_ms", MS, nullable=False),  # absolute
    sa.Column("revoked_at_ms", MS),
    sa.Column("revoke_reason", sa.String(40)),
    sa.Column("device_network", sa.String(32), nullable=False),
    sa.Column("device_fingerprint", sa.String(32), nullable=False),
    sa.Column("country", sa.String(2), nullable=False),
    sa.Column("key_id", sa.String(32), nullable=False),  # the AEAD key that sealed `sealed`
    sa.Column("sealed", sa.LargeBinary, nullable=False),  # {device_info, data} as JSON
    sa.Column("origin_session_id", sa.String(32)),  # minted by a handoff from this session
    sa.Index("ix_sessions_user", "user_id", "session_type", "created_at_ms"),
    sa.Index("ix_sessions_created", "created_at_ms"),
    sa.Index("ix_sessions_expires", "expires_at_ms"),
)

session_events = sa.Table(
    "session_events",
    metadata,
    sa.Column("event_id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
    sa.Column("session_id", sa.String(32), nullable=False),
    sa.Column("user_id", sa.String(255), nullable=False),
    sa.Column("at_ms", MS, nullable=False),
    sa.Column("kind", sa.String(40), nullable=False),
    sa.Column("actor", sa.String(100)),  # the API key (or "system") that caused it
    sa.Column("detail", sa.Text, nullable=False),  # JSON, never a secret
    sa.Index("ix_session_events_session", "session_id", "at_ms", "event_id"),
    sa.Index("ix_session_events_kind", "kind", "at_ms"),
)

session_handoffs = sa.Table(
    "session_handoffs",
    metadata,
    sa.Column("code_digest", sa.LargeBinary(32), primary_key=True),
    sa.Column("session_id", sa.String(32), nullable=False),
    sa.Column("audience", sa.String(255), nullable=False),
    sa.Column("created_at_ms", MS, nullable=False),
    sa.Column("expires_at_ms", MS, nullable=False),
    sa.Column("used_at_ms", MS),
    sa.Index("ix_session_handoffs_expires", "expires_at_ms"),
)

session_changes = sa.Table(
    "session_changes",
    metadata,
    sa.Column("change_id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
    sa.Column("session_id", sa.String(32), nullable=False),
    sa.Column("at_ms", MS, nullable=False),
    sa.Index("ix_session_changes_at", "at_ms"),
)
"""Sessions revoked or rotated recently: each process polls it about once a second to drop its
stale copies (the safety net under pub/sub, and the only signal between embedded processes)."""
