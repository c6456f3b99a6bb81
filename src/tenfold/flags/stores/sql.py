"""Flags in SQL, the source of truth (SQLite embedded, PostgreSQL at scale).

Every write that changes what an environment serves bumps that environment's revision in the
same transaction, and writes its audit entry there too.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from tenfold.flags.evaluation import FlagDoc
from tenfold.flags.models import (
    ChangeRequest,
    Conflict,
    Decision,
    Environment,
    Experiment,
    FlagDef,
    Missing,
    Segment,
    Serve,
    Targeting,
    parse_flag,
    parse_segment,
    parse_targeting,
)
from tenfold.flags.tables import (
    approvals,
    audit_log,
    change_requests,
    conversions,
    environments,
    experiments,
    exposures,
    flags,
    rules,
    sdk_keys,
    segments,
    states,
    usage,
)
from tenfold.kernel.sql import is_sqlite

CHUNK = 500  # rows per INSERT: under every driver's parameter limit


def _active_flag(key: str) -> sa.Select[Any]:
    return sa.select(flags).where(flags.c.flag_key == key, flags.c.is_active.is_(True))


def _environment_row(key: str) -> sa.Select[Any]:
    return sa.select(environments).where(environments.c.environment_key == key)


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def _loads(text: str | None) -> Any:
    return None if text is None else orjson.loads(text)


def _environment(row: Any) -> Environment:
    return Environment(
        key=row.environment_key,
        name=row.name,
        is_production=row.is_production,
        approval_required=row.approval_required,
        required_approvals=row.required_approvals,
        revision=row.revision,
        environment_id=row.environment_id,
    )


def _flag(row: Any) -> FlagDef:
    return parse_flag(
        {
            "flag_key": row.flag_key,
            "name": row.name,
            "description": row.description,
            "flag_type": row.flag_type,
            "default_value": _loads(row.default_value),
            "variations": _loads(row.variations),
            "bucket_by": row.bucket_by,
            "salt": row.salt,
            "tags": _loads(row.tags),
        }
    )


def _flag_values(flag: FlagDef) -> dict[str, Any]:
    return {
        "flag_key": flag.key,
        "name": flag.name,
        "description": flag.description,
        "flag_type": flag.flag_type,
        "default_value": _dumps(flag.default_value),
        "variations": _dumps([v.to_dict() for v in flag.variations]),
        "bucket_by": flag.bucket_by,
        "salt": flag.salt,
        "tags": _dumps(list(flag.tags)),
    }


def _targeting_doc(state: Any, rule_rows: Sequence[Any]) -> dict[str, Any]:
    out_rules = []
    for r in rule_rows:
        rule: dict[str, Any] = {"id": r.rule_key, "conditions": _loads(r.conditions)}
        rule.update(_loads(r.variation))
        if r.rollout_percentage < 100 and "split" not in rule:
            rule["rollout_percentage"] = r.rollout_percentage
        if r.description:
            rule["description"] = r.description
        out_rules.append(rule)
    return {
        "enabled": state.enabled,
        "rules": out_rules,
        "default_rule": _loads(state.default_rule),
        "off_variation": state.off_variation,
        "prerequisites": _loads(state.prerequisites),
        "guard": _loads(state.guard),
    }


class SqlFlagStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._dialect: Any = sqlite if is_sqlite(engine) else postgresql
        # SQLite's two-argument max/min are PostgreSQL's greatest/least
        self._greatest = sa.func.max if self._dialect is sqlite else sa.func.greatest
        self._least = sa.func.min if self._dialect is sqlite else sa.func.least

    def _insert(self, table: sa.Table) -> Any:
        return self._dialect.insert(table)

    async def _insert_chunks(self, stmt: Any, values: Sequence[Mapping[str, Any]]) -> None:
        async with self.engine.begin() as conn:
            for i in range(0, len(values), CHUNK):
                await conn.execute(stmt, values[i : i + CHUNK])

    # --- environments ------------------------------------------------------------------------

    async def environments(self) -> list[Environment]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                sa.select(environments).order_by(environments.c.environment_id)
            )
            return [_environment(r) for r in rows]

    async def revisions(self) -> dict[str, int]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                sa.select(environments.c.environment_key, environments.c.revision)
            )
            return {r.environment_key: r.revision for r in rows}

    async def create_environment(self, env: Environment, actor: str, now_ms: int) -> Environment:
        async with self.engine.begin() as conn:
            exists = await conn.scalar(
                sa.select(environments.c.environment_id).where(
                    environments.c.environment_key == env.key
                )
            )
            if exists is not None:
                raise Conflict(f"environment {env.key} already exists")
            result = await conn.execute(
                environments.insert().values(
                    environment_key=env.key,
                    name=env.name,
                    is_production=env.is_production,
                    approval_required=env.approval_required,
                    required_approvals=env.required_approvals,
                    revision=1,
                    created_at_ms=now_ms,
                )
            )
            env_id = result.inserted_primary_key[0]  # type: ignore[index]
            flag_ids = (await conn.execute(sa.select(flags.c.flag_id))).scalars().all()
            if flag_ids:
                await conn.execute(
                    states.insert(),
                    [_disabled_state(fid, env_id, now_ms) for fid in flag_ids],
                )
            await self._audit(
                conn,
                None,
                env_id,
                env.key,
                "environment_created",
                None,
                env.to_dict(),
                actor,
                now_ms,
            )
        return await self.environment(env.key)  # type: ignore[return-value]

    async def environment(self, key: str) -> Environment | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(_environment_row(key))).first()
            return None if row is None else _environment(row)

    async def update_environment(
        self, key: str, changes: Mapping[str, Any], actor: str, now_ms: int
    ) -> Environment | None:
        before = await self.environment(key)
        if before is None:
            return None
        async with self.engine.begin() as conn:
            await conn.execute(
                environments.update().where(environments.c.environment_key == key).values(**changes)
            )
            after = _environment((await conn.execute(_environment_row(key))).one())
            await self._audit(
                conn,
                None,
                after.environment_id,
                key,
                "environment_updated",
                before.to_dict(),
                after.to_dict(),
                actor,
                now_ms,
            )
        return after

    # --- loading what an environment serves --------------------------------------------------

    async def load_environment(self, key: str) -> tuple[Environment, list[FlagDoc], list[Segment]]:
        async with self.engine.connect() as conn:
            env_row = (await conn.execute(_environment_row(key))).first()
            if env_row is None:
                raise Missing("environment", key)
            env = _environment(env_row)
            docs = await self._docs(conn, env.environment_id, None)
            seg_rows = await conn.execute(sa.select(segments).order_by(segments.c.segment_key))
            segs = [parse_segment(_loads(r.document)) for r in seg_rows]
        return env, docs, segs

    async def _docs(
        self, conn: AsyncConnection, env_id: int, keys: Sequence[str] | None
    ) -> list[FlagDoc]:
        query = (
            sa.select(flags, states)
            .join(states, states.c.flag_id == flags.c.flag_id)
            .where(states.c.environment_id == env_id, flags.c.is_active.is_(True))
            .order_by(flags.c.flag_key)
        )
        if keys is not None:
            query = query.where(flags.c.flag_key.in_(list(keys)))
        rows = (await conn.execute(query)).all()
        rule_query = (
            sa.select(rules)
            .where(rules.c.environment_id == env_id, rules.c.is_active.is_(True))
            .order_by(rules.c.flag_id, rules.c.rule_order)
        )
        if keys is not None:
            rule_query = rule_query.where(rules.c.flag_id.in_([r.flag_id for r in rows]))
        by_flag: dict[int, list[Any]] = {}
        for r in await conn.execute(rule_query):
            by_flag.setdefault(r.flag_id, []).append(r)
        out = []
        for row in rows:
            flag = _flag(row)
            targeting = parse_targeting(_targeting_doc(row, by_flag.get(row.flag_id, [])), flag)
            out.append(FlagDoc(flag, targeting, row.version + row.version_1))
        return out

    # --- flags -------------------------------------------------------------------------------

    async def flag(self, key: str) -> tuple[int, FlagDef, int, Any] | None:
        """(flag_id, definition, version, row) of an active flag."""
        async with self.engine.connect() as conn:
            row = (await conn.execute(_active_flag(key))).first()
        return None if row is None else (row.flag_id, _flag(row), row.version, row)

    async def list_flags(
        self, *, tag: str | None, query: str | None, after: str | None, limit: int
    ) -> list[tuple[FlagDef, Any]]:
        stmt = sa.select(flags).where(flags.c.is_active.is_(True)).order_by(flags.c.flag_key)
        if after:
            stmt = stmt.where(flags.c.flag_key > after)
        if query:
            like = "%" + query.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            stmt = stmt.where(
                sa.or_(
                    flags.c.flag_key.ilike(like, escape="\\"),
                    flags.c.name.ilike(like, escape="\\"),
                )
            )
        if tag:
            stmt = stmt.where(flags.c.tags.like(f"%{_dumps(tag)}%"))
        async with self.engine.connect() as conn:
            rows = (await conn.execute(stmt.limit(limit))).all()
        return [(_flag(r), r) for r in rows]

    async def create_flag(self, flag: FlagDef, actor: str, now_ms: int) -> int:
        async with self.engine.begin() as conn:
            taken = await conn.scalar(
                sa.select(flags.c.flag_id).where(flags.c.flag_key == flag.key)
            )
            if taken is not None:
                raise Conflict(f"flag {flag.key} already exists", "flag-exists")
            result = await conn.execute(
                flags.insert().values(
                    **_flag_values(flag),
                    is_active=True,
                    version=1,
                    created_at_ms=now_ms,
                    updated_at_ms=now_ms,
                    created_by=actor,
                )
            )
            flag_id = int(result.inserted_primary_key[0])  # type: ignore[index]
            env_ids = (await conn.execute(sa.select(environments.c.environment_id))).scalars().all()
            if env_ids:
                await conn.execute(
                    states.insert(), [_disabled_state(flag_id, e, now_ms) for e in env_ids]
                )
            await self._bump(conn, None)
            await self._audit(
                conn, flag_id, None, flag.key, "flag_created", None, flag.to_dict(), actor, now_ms
            )
        return flag_id

    async def update_flag(
        self, flag: FlagDef, expected_version: int | None, actor: str, now_ms: int, action: str
    ) -> int:
        """Replace a flag's definition; the new version."""
        async with self.engine.begin() as conn:
            row = (await conn.execute(_active_flag(flag.key))).first()
            if row is None:
                raise Missing("flag", flag.key)
            if expected_version is not None and row.version != expected_version:
                raise Conflict(
                    f"flag {flag.key} changed since version {expected_version} (now {row.version})",
                    "stale-change",
                )
            await conn.execute(
                flags.update()
                .where(flags.c.flag_id == row.flag_id)
                .values(**_flag_values(flag), version=row.version + 1, updated_at_ms=now_ms)
            )
            await self._bump(conn, None)
            await self._audit(
                conn,
                row.flag_id,
                None,
                flag.key,
                action,
                _flag(row).to_dict(),
                flag.to_dict(),
                actor,
                now_ms,
            )
        return int(row.version) + 1

    async def delete_flag(self, key: str, actor: str, now_ms: int) -> bool:
        async with self.engine.begin() as conn:
            row = (await conn.execute(_active_flag(key))).first()
            if row is None:
                return False
            await conn.execute(rules.delete().where(rules.c.flag_id == row.flag_id))
            await conn.execute(states.delete().where(states.c.flag_id == row.flag_id))
            await conn.execute(flags.delete().where(flags.c.flag_id == row.flag_id))
            await self._bump(conn, None)
            await self._audit(
                conn,
                row.flag_id,
                None,
                key,
                "flag_deleted",
                _flag(row).to_dict(),
                None,
                actor,
                now_ms,
            )
        return True

    async def targeting(self, key: str, env_key: str) -> tuple[FlagDef, Targeting, int] | None:
        """A flag's targeting in one environment, and the state's version."""
        async with self.engine.connect() as conn:
            env_id = await self._env_id(conn, env_key)
            row = (
                await conn.execute(
                    sa.select(flags, states)
                    .join(states, states.c.flag_id == flags.c.flag_id)
                    .where(
                        flags.c.flag_key == key,
                        flags.c.is_active.is_(True),
                        states.c.environment_id == env_id,
                    )
                )
            ).first()
            if row is None:
                return None
            rule_rows = (
                await conn.execute(
                    sa.select(rules)
                    .where(rules.c.flag_id == row.flag_id, rules.c.environment_id == env_id)
                    .order_by(rules.c.rule_order)
                )
            ).all()
        flag = _flag(row)
        return flag, parse_targeting(_targeting_doc(row, rule_rows), flag), int(row.version_1)

    async def put_targeting(
        self,
        key: str,
        env_key: str,
        targeting: Targeting,
        expected_version: int | None,
        actor: str,
        now_ms: int,
        action: str,
    ) -> int:
        """Replace a flag's targeting in one environment; the state's new version."""
        async with self.engine.begin() as conn:
            env_id = await self._env_id(conn, env_key)
            row = (
                await conn.execute(
                    sa.select(flags.c.flag_id, flags.c.flag_key, states)
                    .join(states, states.c.flag_id == flags.c.flag_id)
                    .where(
                        flags.c.flag_key == key,
                        flags.c.is_active.is_(True),
                        states.c.environment_id == env_id,
                    )
                    .with_for_update()
                )
            ).first()
            if row is None:
                raise Missing("flag", key)
            if expected_version is not None and row.version != expected_version:
                raise Conflict(
                    f"the targeting of {key} in {env_key} changed since version "
                    f"{expected_version} (now {row.version})",
                    "stale-change",
                )
            old_rules = (
                await conn.execute(
                    sa.select(rules)
                    .where(rules.c.flag_id == row.flag_id, rules.c.environment_id == env_id)
                    .order_by(rules.c.rule_order)
                )
            ).all()
            before = _targeting_doc(row, old_rules)
            await conn.execute(
                rules.delete().where(
                    rules.c.flag_id == row.flag_id, rules.c.environment_id == env_id
                )
            )
            if targeting.rules:
                await conn.execute(
                    rules.insert(),
                    [
                        {
                            "flag_id": row.flag_id,
                            "environment_id": env_id,
                            "rule_order": i,
                            "rule_key": r.id,
                            "description": r.description,
                            "conditions": _dumps([c.to_dict() for c in r.conditions]),
                            "variation": _dumps(_serve_payload(r.serve)),
                            "rollout_percentage": r.serve.rollout_percentage,
                            "is_active": True,
                        }
                        for i, r in enumerate(targeting.rules)
                    ],
                )
            version = int(row.version) + 1
            await conn.execute(
                states.update()
                .where(states.c.flag_id == row.flag_id, states.c.environment_id == env_id)
                .values(
                    enabled=targeting.enabled,
                    default_rule=_dumps(targeting.default_rule.to_dict())
                    if targeting.default_rule
                    else None,
                    off_variation=targeting.off_variation,
                    prerequisites=_dumps([p.to_dict() for p in targeting.prerequisites]),
                    guard=_dumps(targeting.guard.to_dict()) if targeting.guard else None,
                    version=version,
                    updated_at_ms=now_ms,
                )
            )
            await self._bump(conn, env_id)
            await self._audit(
                conn, row.flag_id, env_id, key, action, before, targeting.to_dict(), actor, now_ms
            )
        return version

    async def prerequisite_graph(self, env_key: str) -> dict[str, list[str]]:
        async with self.engine.connect() as conn:
            env_id = await self._env_id(conn, env_key)
            rows = await conn.execute(
                sa.select(flags.c.flag_key, states.c.prerequisites)
                .join(states, states.c.flag_id == flags.c.flag_id)
                .where(states.c.environment_id == env_id)
            )
            return {r.flag_key: [p["flag"] for p in _loads(r.prerequisites)] for r in rows}

    async def dependants(self, flag_key: str) -> list[tuple[str, str]]:
        """(flag, environment) pairs whose prerequisites name `flag_key`."""
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                sa.select(flags.c.flag_key, environments.c.environment_key, states.c.prerequisites)
                .join(states, states.c.flag_id == flags.c.flag_id)
                .join(environments, environments.c.environment_id == states.c.environment_id)
                .where(states.c.prerequisites.like(f"%{_dumps(flag_key)}%"))
            )
            return [
                (r.flag_key, r.environment_key)
                for r in rows
                if any(p["flag"] == flag_key for p in _loads(r.prerequisites))
            ]

    # --- segments ----------------------------------------------------------------------------

    async def segments(self) -> list[Segment]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(sa.select(segments).order_by(segments.c.segment_key))
            return [parse_segment(_loads(r.document)) for r in rows]

    async def segment(self, key: str) -> Segment | None:
        async with self.engine.connect() as conn:
            text = await conn.scalar(
                sa.select(segments.c.document).where(segments.c.segment_key == key)
            )
        return None if text is None else parse_segment(_loads(text))

    async def segment_version(self, key: str) -> int | None:
        async with self.engine.connect() as conn:
            version = await conn.scalar(
                sa.select(segments.c.version).where(segments.c.segment_key == key)
            )
        return None if version is None else int(version)

    async def put_segment(self, segment: Segment, actor: str, now_ms: int) -> bool:
        """Create or replace a segment; True if it is new."""
        async with self.engine.begin() as conn:
            row = (
                await conn.execute(sa.select(segments).where(segments.c.segment_key == segment.key))
            ).first()
            doc = segment.to_dict()
            if row is None:
                await conn.execute(
                    segments.insert().values(
                        segment_key=segment.key,
                        document=_dumps(doc),
                        version=1,
                        updated_at_ms=now_ms,
                    )
                )
            else:
                await conn.execute(
                    segments.update()
                    .where(segments.c.segment_key == segment.key)
                    .values(document=_dumps(doc), version=row.version + 1, updated_at_ms=now_ms)
                )
            await self._bump(conn, None)
            await self._audit(
                conn,
                None,
                None,
                f"segment:{segment.key}",
                "segment_created" if row is None else "segment_updated",
                None if row is None else _loads(row.document),
                doc,
                actor,
                now_ms,
            )
        return row is None

    async def delete_segment(self, key: str, actor: str, now_ms: int) -> bool:
        async with self.engine.begin() as conn:
            row = (
                await conn.execute(sa.select(segments).where(segments.c.segment_key == key))
            ).first()
            if row is None:
                return False
            await conn.execute(segments.delete().where(segments.c.segment_key == key))
            await self._bump(conn, None)
            await self._audit(
                conn,
                None,
                None,
                f"segment:{key}",
                "segment_deleted",
                _loads(row.document),
                None,
                actor,
                now_ms,
            )
        return True

    # --- audit -------------------------------------------------------------------------------

    async def _audit(
        self,
        conn: AsyncConnection,
        flag_id: int | None,
        env_id: int | None,
        subject: str,
        action: str,
        old: Any,
        new: Any,
        actor: str,
        now_ms: int,
    ) -> None:
        await conn.execute(
            audit_log.insert().values(
                flag_id=flag_id,
                environment_id=env_id,
                subject=subject,
                action=action,
                old_value=None if old is None else _dumps(old),
                new_value=None if new is None else _dumps(new),
                user_id=actor,
                timestamp_ms=now_ms,
            )
        )

    async def audit(
        self,
        subject: str,
        action: str,
        old: Any,
        new: Any,
        actor: str,
        now_ms: int,
        env_key: str | None = None,
    ) -> None:
        async with self.engine.begin() as conn:
            env_id = await self._env_id(conn, env_key) if env_key else None
            await self._audit(conn, None, env_id, subject, action, old, new, actor, now_ms)

    async def history(
        self, subject: str, *, before: int | None, limit: int
    ) -> list[dict[str, Any]]:
        query = (
            sa.select(audit_log, environments.c.environment_key)
            .outerjoin(environments, environments.c.environment_id == audit_log.c.environment_id)
            .where(audit_log.c.subject == subject)
            .order_by(audit_log.c.audit_id.desc())
            .limit(limit)
        )
        if before is not None:
            query = query.where(audit_log.c.audit_id < before)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [
            {
                "audit_id": r.audit_id,
                "action": r.action,
                "environment": r.environment_key,
                "user_id": r.user_id,
                "timestamp_ms": r.timestamp_ms,
                "old_value": _loads(r.old_value),
                "new_value": _loads(r.new_value),
            }
            for r in rows
        ]

    # --- change requests ---------------------------------------------------------------------

    async def add_change_request(self, cr: ChangeRequest) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                change_requests.insert().values(
                    request_id=cr.request_id,
                    flag_key=cr.flag_key,
                    environment_key=cr.environment,
                    kind=cr.kind,
                    payload=_dumps(cr.payload),
                    base_version=cr.base_version,
                    author=cr.author,
                    comment=cr.comment,
                    status=cr.status,
                    required_approvals=cr.required_approvals,
                    created_at_ms=cr.created_at_ms,
                )
            )
            await self._audit(
                conn,
                None,
                await self._env_id(conn, cr.environment) if cr.kind == "targeting" else None,
                cr.flag_key,
                "change_requested",
                None,
                {"request_id": cr.request_id, "kind": cr.kind, "payload": cr.payload},
                cr.author,
                cr.created_at_ms,
            )

    async def change_request(self, request_id: str) -> ChangeRequest | None:
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    sa.select(change_requests).where(change_requests.c.request_id == request_id)
                )
            ).first()
            if row is None:
                return None
            decisions = await self._decisions(conn, [request_id])
        return _change_request(row, decisions.get(request_id, ()))

    async def change_requests(
        self, *, status: str | None, flag_key: str | None, limit: int
    ) -> list[ChangeRequest]:
        query = (
            sa.select(change_requests).order_by(change_requests.c.created_at_ms.desc()).limit(limit)
        )
        if status:
            query = query.where(change_requests.c.status == status)
        if flag_key:
            query = query.where(change_requests.c.flag_key == flag_key)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
            decisions = await self._decisions(conn, [r.request_id for r in rows])
        return [_change_request(r, decisions.get(r.request_id, ())) for r in rows]

    async def _decisions(
        self, conn: AsyncConnection, ids: Sequence[str]
    ) -> dict[str, tuple[Decision, ...]]:
        if not ids:
            return {}
        out: dict[str, list[Decision]] = {}
        rows = await conn.execute(
            sa.select(approvals)
            .where(approvals.c.request_id.in_(list(ids)))
            .order_by(approvals.c.decided_at_ms)
        )
        for r in rows:
            out.setdefault(r.request_id, []).append(
                Decision(r.approver, r.decision, r.comment, r.decided_at_ms)
            )
        return {k: tuple(v) for k, v in out.items()}

    async def decide(
        self, request_id: str, approver: str, decision: str, comment: str, now_ms: int
    ) -> bool:
        """Record one principal's decision; False if they already decided."""
        async with self.engine.begin() as conn:
            result = await conn.execute(
                self._insert(approvals)
                .values(
                    request_id=request_id,
                    approver=approver,
                    decision=decision,
                    comment=comment,
                    decided_at_ms=now_ms,
                )
                .on_conflict_do_nothing(
                    index_elements=[approvals.c.request_id, approvals.c.approver]
                )
            )
            return bool(result.rowcount)

    async def set_status(
        self, request_id: str, status: str, now_ms: int, *, only_from: str
    ) -> bool:
        async with self.engine.begin() as conn:
            result = await conn.execute(
                change_requests.update()
                .where(
                    change_requests.c.request_id == request_id,
                    change_requests.c.status == only_from,
                )
                .values(status=status, decided_at_ms=now_ms)
            )
            return bool(result.rowcount)

    # --- SDK keys ----------------------------------------------------------------------------

    async def bind_key(self, key_id: str, env_key: str) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(sdk_keys.insert().values(key_id=key_id, environment_key=env_key))

    async def key_environments(self) -> dict[str, str]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(sa.select(sdk_keys))
            return {r.key_id: r.environment_key for r in rows}

    # --- usage -------------------------------------------------------------------------------

    async def add_usage(self, rows: Iterable[tuple[str, str, str, str, int, int]]) -> None:
        """(flag, environment, day, variation, evaluations, last_evaluated_ms) added in."""
        values = [
            {
                "flag_key": f,
                "environment_key": e,
                "day": d,
                "variation": v,
                "evaluations": n,
                "last_evaluated_ms": t,
            }
            for f, e, d, v, n, t in rows
        ]
        if not values:
            return
        stmt = self._insert(usage)
        stmt = stmt.on_conflict_do_update(
            index_elements=[
                usage.c.flag_key,
                usage.c.environment_key,
                usage.c.day,
                usage.c.variation,
            ],
            set_={
                "evaluations": usage.c.evaluations + stmt.excluded.evaluations,
                "last_evaluated_ms": self._greatest(
                    usage.c.last_evaluated_ms, stmt.excluded.last_evaluated_ms
                ),
            },
        )
        await self._insert_chunks(stmt, values)

    async def usage_since(
        self, env_key: str, first_day: str
    ) -> list[tuple[str, str, str, int, int]]:
        """(flag, day, variation, evaluations, last_evaluated_ms) from `first_day` on."""
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                sa.select(usage).where(usage.c.environment_key == env_key, usage.c.day >= first_day)
            )
            return [
                (r.flag_key, r.day, r.variation, r.evaluations, r.last_evaluated_ms) for r in rows
            ]

    async def last_evaluated(self, env_key: str) -> dict[str, int]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                sa.select(usage.c.flag_key, sa.func.max(usage.c.last_evaluated_ms).label("last"))
                .where(usage.c.environment_key == env_key)
                .group_by(usage.c.flag_key)
            )
            return {r.flag_key: int(r.last) for r in rows}

    async def flag_ages(self) -> dict[str, int]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                sa.select(flags.c.flag_key, flags.c.created_at_ms).where(
                    flags.c.is_active.is_(True)
                )
            )
            return {r.flag_key: int(r.created_at_ms) for r in rows}

    async def targeting_changed(self, env_key: str) -> dict[str, int]:
        """When each flag's targeting in an environment last changed."""
        async with self.engine.connect() as conn:
            env_id = await self._env_id(conn, env_key)
            rows = await conn.execute(
                sa.select(flags.c.flag_key, states.c.updated_at_ms)
                .join(states, states.c.flag_id == flags.c.flag_id)
                .where(states.c.environment_id == env_id)
            )
            return {r.flag_key: int(r.updated_at_ms) for r in rows}

    # --- experiments -------------------------------------------------------------------------

    async def add_experiment(self, exp: Experiment) -> None:
        async with self.engine.begin() as conn:
            taken = await conn.scalar(
                sa.select(experiments.c.experiment_key).where(
                    experiments.c.experiment_key == exp.key
                )
            )
            if taken is not None:
                raise Conflict(f"experiment {exp.key} already exists", "experiment-exists")
            await conn.execute(
                experiments.insert().values(
                    experiment_key=exp.key,
                    flag_key=exp.flag_key,
                    environment_key=exp.environment,
                    control=exp.control,
                    metric=exp.metric,
                    sample_rate=exp.sample_rate,
                    status=exp.status,
                    started_at_ms=exp.started_at_ms,
                    created_by=exp.created_by,
                )
            )
            await self._bump(conn, await self._env_id(conn, exp.environment))

    async def experiments(self, env_key: str | None = None) -> list[Experiment]:
        query = sa.select(experiments).order_by(experiments.c.started_at_ms)
        if env_key:
            query = query.where(experiments.c.environment_key == env_key)
        async with self.engine.connect() as conn:
            return [_experiment(r) for r in await conn.execute(query)]

    async def experiment(self, key: str) -> Experiment | None:
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    sa.select(experiments).where(experiments.c.experiment_key == key)
                )
            ).first()
        return None if row is None else _experiment(row)

    async def stop_experiment(self, key: str, now_ms: int) -> bool:
        async with self.engine.begin() as conn:
            row = (
                await conn.execute(
                    sa.select(experiments).where(experiments.c.experiment_key == key)
                )
            ).first()
            if row is None or row.status != "running":
                return False
            await conn.execute(
                experiments.update()
                .where(experiments.c.experiment_key == key)
                .values(status="stopped", stopped_at_ms=now_ms)
            )
            await self._bump(conn, await self._env_id(conn, row.environment_key))
            return True

    async def add_exposures(self, rows: Sequence[tuple[str, str, str, int]]) -> None:
        """(experiment, user, variation, at_ms): a user's first exposure is the one kept."""
        if not rows:
            return
        stmt = self._insert(exposures).on_conflict_do_nothing(
            index_elements=[exposures.c.experiment_key, exposures.c.user_id]
        )
        values = [
            {"experiment_key": e, "user_id": u, "variation": v, "first_seen_ms": t}
            for e, u, v, t in rows
        ]
        await self._insert_chunks(stmt, values)

    async def add_conversions(self, rows: Sequence[tuple[str, str, str, int, int, float]]) -> None:
        """(environment, metric, user, first_ms, count, value_sum) added in."""
        if not rows:
            return
        stmt = self._insert(conversions)
        stmt = stmt.on_conflict_do_update(
            index_elements=[
                conversions.c.environment_key,
                conversions.c.metric,
                conversions.c.user_id,
            ],
            set_={
                "count": conversions.c.count + stmt.excluded["count"],
                "value_sum": conversions.c.value_sum + stmt.excluded.value_sum,
                "first_ms": self._least(conversions.c.first_ms, stmt.excluded.first_ms),
            },
        )
        values = [
            {
                "environment_key": e,
                "metric": m,
                "user_id": u,
                "first_ms": t,
                "count": n,
                "value_sum": s,
            }
            for e, m, u, t, n, s in rows
        ]
        await self._insert_chunks(stmt, values)

    async def experiment_counts(self, exp: Experiment) -> dict[str, tuple[int, int]]:
        """variation -> (users exposed, users who converted after their first exposure)."""
        converted = sa.exists().where(
            conversions.c.environment_key == exp.environment,
            conversions.c.metric == exp.metric,
            conversions.c.user_id == exposures.c.user_id,
            conversions.c.first_ms >= exposures.c.first_seen_ms,
        )
        query = (
            sa.select(
                exposures.c.variation,
                sa.func.count().label("exposed"),
                sa.func.sum(sa.case((converted, 1), else_=0)).label("converted"),
            )
            .where(exposures.c.experiment_key == exp.key)
            .group_by(exposures.c.variation)
        )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return {r.variation: (int(r.exposed), int(r.converted or 0)) for r in rows}

    # --- shared ------------------------------------------------------------------------------

    async def _env_id(self, conn: AsyncConnection, env_key: str) -> int:
        env_id = await conn.scalar(
            sa.select(environments.c.environment_id).where(
                environments.c.environment_key == env_key
            )
        )
        if env_id is None:
            raise Missing("environment", env_key)
        return int(env_id)

    async def _bump(self, conn: AsyncConnection, env_id: int | None) -> None:
        """A new revision for one environment (None: every environment)."""
        stmt = environments.update().values(revision=environments.c.revision + 1)
        if env_id is not None:
            stmt = stmt.where(environments.c.environment_id == env_id)
        await conn.execute(stmt)


def _disabled_state(flag_id: int, env_id: int, now_ms: int) -> dict[str, Any]:
    return {
        "flag_id": flag_id,
        "environment_id": env_id,
        "enabled": False,
        "default_rule": None,
        "off_variation": None,
        "prerequisites": "[]",
        "guard": None,
        "version": 1,
        "updated_at_ms": now_ms,
    }


def _serve_payload(serve: Serve) -> dict[str, Any]:
    if serve.is_split:
        return {"split": [{"variation": v, "weight": w} for v, w in serve.split]}
    return {"variation": serve.variation}


def _change_request(row: Any, decisions: tuple[Decision, ...]) -> ChangeRequest:
    return ChangeRequest(
        request_id=row.request_id,
        flag_key=row.flag_key,
        environment=row.environment_key,
        kind=row.kind,
        payload=_loads(row.payload),
        base_version=row.base_version,
        author=row.author,
        comment=row.comment,
        status=row.status,
        required_approvals=row.required_approvals,
        created_at_ms=row.created_at_ms,
        decided_at_ms=row.decided_at_ms,
        decisions=decisions,
    )


def _experiment(row: Any) -> Experiment:
    return Experiment(
        key=row.experiment_key,
        flag_key=row.flag_key,
        environment=row.environment_key,
        control=row.control,
        metric=row.metric,
        sample_rate=row.sample_rate,
        status=row.status,
        started_at_ms=row.started_at_ms,
        stopped_at_ms=row.stopped_at_ms,
        created_by=row.created_by,
    )
