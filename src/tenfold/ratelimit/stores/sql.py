"""Policies, assignments, tiers and sampled decision events in SQL."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from tenfold.kernel.sql import metadata
from tenfold.ratelimit.algorithms import Algorithm
from tenfold.ratelimit.models import Assignment, FailureMode, Policy, compile_resource

policies = sa.Table(
    "rate_limit_policies",
    metadata,
    sa.Column("policy_id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(255), nullable=False, unique=True),
    sa.Column("algorithm", sa.String(50), nullable=False),
    sa.Column("rate_limit", sa.BigInteger, nullable=False),
    sa.Column("time_window", sa.Integer, nullable=False),
    sa.Column("burst_capacity", sa.BigInteger, nullable=False),
    sa.Column("key_by", sa.String(200), nullable=False),
    sa.Column("match_resource", sa.String(200)),
    sa.Column("match_region", sa.String(100)),
    sa.Column("tier", sa.String(100)),
    sa.Column("applies_to_all", sa.Boolean, nullable=False),
    sa.Column("shadow", sa.Boolean, nullable=False),
    sa.Column("failure_mode", sa.String(20), nullable=False),
    sa.Column("is_active", sa.Boolean, nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)

client_policies = sa.Table(
    "client_policies",
    metadata,
    sa.Column("client_id", sa.String(255), primary_key=True),
    sa.Column(
        "policy_id",
        sa.Integer,
        sa.ForeignKey("rate_limit_policies.policy_id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("effective_from", sa.DateTime(timezone=True), primary_key=True),
    sa.Column("override_rate_limit", sa.BigInteger),
    sa.Column("priority", sa.Integer, nullable=False),
    sa.Column("effective_to", sa.DateTime(timezone=True)),
    sa.Index("ix_client_policies_policy_id", "policy_id"),
)

client_tiers = sa.Table(
    "rate_limit_client_tiers",
    metadata,
    sa.Column("client_id", sa.String(255), primary_key=True),
    sa.Column("tier", sa.String(100), nullable=False),
)

events = sa.Table(
    "rate_limit_events",
    metadata,
    sa.Column("event_id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
    sa.Column("client_id", sa.String(255), nullable=False),
    sa.Column("policy_id", sa.Integer, nullable=False),
    sa.Column("action", sa.String(20), nullable=False),
    sa.Column("timestamp", sa.DateTime(timezone=True), nullable=False),
    sa.Column("remaining_quota", sa.BigInteger),
    sa.Column("request_metadata", sa.JSON),
    sa.Index("idx_rate_limit_events_timestamp", "timestamp"),
    sa.Index("idx_rate_limit_events_client_policy", "client_id", "policy_id"),
)

meta = sa.Table(
    "rate_limit_meta",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("version", sa.BigInteger, nullable=False),
)

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def row_to_policy(row: Any) -> Policy:
    return Policy(
        policy_id=row["policy_id"],
        name=row["name"],
        algorithm=Algorithm(row["algorithm"]),
        rate_limit=row["rate_limit"],
        time_window=row["time_window"],
        burst_capacity=row["burst_capacity"],
        key_by=tuple(orjson.loads(row["key_by"])),
        match_resource=row["match_resource"],
        match_region=row["match_region"],
        tier=row["tier"],
        applies_to_all=row["applies_to_all"],
        shadow=row["shadow"],
        failure_mode=FailureMode(row["failure_mode"]),
        is_active=row["is_active"],
        version=row["version"],
        created_at=_utc(row["created_at"]),
        updated_at=_utc(row["updated_at"]),
        _resource_re=compile_resource(row["match_resource"]),
    )


def _policy_values(policy: Policy) -> dict[str, Any]:
    return {
        "name": policy.name,
        "algorithm": str(policy.algorithm),
        "rate_limit": policy.rate_limit,
        "time_window": policy.time_window,
        "burst_capacity": policy.burst_capacity,
        "key_by": orjson.dumps(list(policy.key_by)).decode(),
        "match_resource": policy.match_resource,
        "match_region": policy.match_region,
        "tier": policy.tier,
        "applies_to_all": policy.applies_to_all,
        "shadow": policy.shadow,
        "failure_mode": str(policy.failure_mode),
        "is_active": policy.is_active,
    }


def row_to_assignment(row: Any) -> Assignment:
    start = _utc(row["effective_from"])
    return Assignment(
        client_id=row["client_id"],
        policy_id=row["policy_id"],
        override_rate_limit=row["override_rate_limit"],
        priority=row["priority"],
        effective_from=None if start == EPOCH else start,
        effective_to=_utc(row["effective_to"]),
    )


class SqlPolicyStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def _bump(self, conn: AsyncConnection) -> None:
        updated = await conn.execute(
            meta.update().where(meta.c.id == 1).values(version=meta.c.version + 1)
        )
        if not updated.rowcount:
            await conn.execute(meta.insert().values(id=1, version=1))

    async def version(self) -> int:
        async with self.engine.connect() as conn:
            value = (await conn.execute(sa.select(meta.c.version).where(meta.c.id == 1))).scalar()
        return int(value or 0)

    async def load(self) -> tuple[list[Policy], list[Assignment], dict[str, str], int]:
        async with self.engine.connect() as conn:
            rows = (await conn.execute(sa.select(policies))).mappings().all()
            arows = (await conn.execute(sa.select(client_policies))).mappings().all()
            trows = (await conn.execute(sa.select(client_tiers))).mappings().all()
            version = (await conn.execute(sa.select(meta.c.version).where(meta.c.id == 1))).scalar()
        return (
            [row_to_policy(r) for r in rows],
            [row_to_assignment(r) for r in arows],
            {r["client_id"]: r["tier"] for r in trows},
            int(version or 0),
        )

    async def get(self, policy_id: int) -> Policy | None:
        async with self.engine.connect() as conn:
            row = (
                (await conn.execute(sa.select(policies).where(policies.c.policy_id == policy_id)))
                .mappings()
                .first()
            )
        return None if row is None else row_to_policy(row)

    async def name_taken(self, name: str, except_id: int | None = None) -> bool:
        query = sa.select(policies.c.policy_id).where(policies.c.name == name)
        if except_id is not None:
            query = query.where(policies.c.policy_id != except_id)
        async with self.engine.connect() as conn:
            return (await conn.execute(query)).first() is not None

    async def create(self, policy: Policy, now: datetime) -> Policy:
        async with self.engine.begin() as conn:
            result = await conn.execute(
                policies.insert().values(
                    **_policy_values(policy), version=1, created_at=now, updated_at=now
                )
            )
            await self._bump(conn)
            policy_id = int(result.inserted_primary_key[0])  # type: ignore[index]
        return replace(policy, policy_id=policy_id, version=1, created_at=now, updated_at=now)

    async def update(self, policy: Policy, now: datetime) -> Policy:
        async with self.engine.begin() as conn:
            await conn.execute(
                policies.update()
                .where(policies.c.policy_id == policy.policy_id)
                .values(**_policy_values(policy), version=policy.version + 1, updated_at=now)
            )
            await self._bump(conn)
        return replace(policy, version=policy.version + 1, updated_at=now)

    async def delete(self, policy_id: int) -> bool:
        async with self.engine.begin() as conn:
            await conn.execute(
                client_policies.delete().where(client_policies.c.policy_id == policy_id)
            )
            result = await conn.execute(policies.delete().where(policies.c.policy_id == policy_id))
            await self._bump(conn)
        return bool(result.rowcount)

    async def assignments(self, client_ids: Sequence[str]) -> list[Assignment]:
        query = sa.select(client_policies).where(client_policies.c.client_id.in_(list(client_ids)))
        async with self.engine.connect() as conn:
            return [row_to_assignment(r) for r in (await conn.execute(query)).mappings().all()]

    async def assign(self, rows: Sequence[Assignment]) -> None:
        """Insert or replace assignments (same client, policy and start) in one transaction."""
        async with self.engine.begin() as conn:
            for a in rows:
                start = a.effective_from or EPOCH
                await conn.execute(
                    client_policies.delete().where(
                        client_policies.c.client_id == a.client_id,
                        client_policies.c.policy_id == a.policy_id,
                        client_policies.c.effective_from == start,
                    )
                )
                await conn.execute(
                    client_policies.insert().values(
                        client_id=a.client_id,
                        policy_id=a.policy_id,
                        effective_from=start,
                        override_rate_limit=a.override_rate_limit,
                        priority=a.priority,
                        effective_to=a.effective_to,
                    )
                )
            await self._bump(conn)

    async def unassign(self, policy_id: int, client_ids: Sequence[str]) -> int:
        async with self.engine.begin() as conn:
            result = await conn.execute(
                client_policies.delete().where(
                    client_policies.c.policy_id == policy_id,
                    client_policies.c.client_id.in_(list(client_ids)),
                )
            )
            await self._bump(conn)
        return int(result.rowcount)

    async def set_tier(self, tier: str | None, client_ids: Sequence[str]) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                client_tiers.delete().where(client_tiers.c.client_id.in_(list(client_ids)))
            )
            if tier is not None:
                await conn.execute(
                    client_tiers.insert(), [{"client_id": c, "tier": tier} for c in client_ids]
                )
            await self._bump(conn)

    async def record_events(self, rows: Sequence[dict[str, Any]]) -> None:
        if rows:
            async with self.engine.begin() as conn:
                await conn.execute(events.insert(), list(rows))
