"""Milliseconds since the epoch <-> aware UTC datetimes."""

from __future__ import annotations

from datetime import UTC, datetime


def from_ms(value: int | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value / 1000, UTC)


def to_ms(value: datetime) -> int:
    return int(value.timestamp() * 1000)
