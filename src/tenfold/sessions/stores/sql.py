"""Sessions in SQL: the source of truth (SQLite embedded, PostgreSQL at scale)."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from tenfold.kernel.sql import is_sqlite
from tenfold.sessions.models import (
    LimitReached,
    OnLimit,
    SessionEvent,
    SessionRecord,
    SessionType,
)
from tenfold.sessions.tables import session_changes, session_events, session_handoffs, sessions

_COLUMNS = [f.name for f in fields(SessionRecord)]
EventRow = tuple[str, str, str, str | None, dict[str, object]]  # session, user, kind, actor, detail


def _record(row: Any) -> SessionRecord:
    values = {name: row[name] for name in _COLUMNS}
    values["session_type"] = SessionType(values["session_type"])
    values["permissions"] = tuple(orjson.loads(values["permissions"]))
    for name in ("token_digest", "refresh_digest", "previous_digest", "sealed"):
        if values[name] is not None:
            values[name] = bytes(values[name])
    return SessionRecord(**values)


def _row(record: SessionRecord) -> dict[str, Any]:
    values = {name: getattr(record, name) for name in _COLUMNS}
    values["session_type"] = str(record.session_type)
    values["permissions"] = orjson.dumps(list(record.permissions)).decode()
    return values


def _user_lock_id(user_id: str) -> int:
    return int.from_bytes(
        hashlib.blake2b(user_id.encode(), digest_size=8).digest(), "big", signed=True
    )


_LOCK_USERS = sa.text(
    "SELECT pg_advisory_xact_lock(k) FROM unnest(CAST(:keys AS bigint[])) AS k ORDER BY k"
)


def _lock_users(user_ids: Sequence[str]) -> Any:
    """One statement (compiled once) taking the users' transaction locks in a fixed order."""
    return _LOCK_USERS.bindparams(keys=sorted({_user_lock_id(u) for u in user_ids}))


def _event(row: EventRow, at_ms: int) -> dict[str, Any]:
    sid, user, kind, actor, detail = row
    return {
        "session_id": sid,
        "user_id": user,
        "at_ms": at_ms,
        "kind": kind,
        "actor": actor,
        "detail": orjson.dumps(detail).decode(),
    }


@dataclass(slots=True)
class _Creation:
    record: SessionRecord
    max_sessions: int
    on_limit: OnLimit
    actor: str | None
    detail: dict[str, object]
    future: asyncio.Future[list[str]]


MAX_BATCH = 500  # creations per transaction
MAX_WRITERS = 4  # creation transactions in flight at once


class SqlSessionStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.sqlite = is_sqlite(engine)
        self._queue: list[_Creation] = []
        self._writers: set[asyncio.Task[None]] = set()

    # -- writes ---------------------------------------------------------------------------

    async def create(
        self,
        record: SessionRecord,
        *,
        max_sessions: int,
        on_limit: OnLimit,
        actor: str | None,
        detail: dict[str, object],
    ) -> list[str]:
        """Insert the session within the user's limit for its type; the ids evicted for it.

        Creations arriving together are written together (one transaction for all that
        queued while the previous one was in flight): a round trip per batch, not per session.
        """
        future: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
        self._queue.append(_Creation(record, max_sessions, on_limit, actor, detail, future))
        if len(self._writers) < MAX_WRITERS:
            # A few transactions in flight at once: a commit's latency does not stall the rest.
            writer = asyncio.ensure_future(self._write_creations())
            self._writers.add(writer)
            writer.add_done_callback(self._writers.discard)
        return await future

    async def _write_creations(self) -> None:
        while self._queue:
            batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
            try:
                outcomes = await self._create_batch(batch)
            except BaseException as exc:  # the batch failed as a whole: so does each creation
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
                if not isinstance(exc, Exception):
                    raise
                continue
            for item, outcome in zip(batch, outcomes, strict=True):
                if item.future.done():  # the caller gave up; the session exists regardless
                    continue
                if isinstance(outcome, LimitReached):
                    item.future.set_exception(outcome)
                else:
                    item.future.set_result(outcome)

    async def _create_batch(self, batch: list[_Creation]) -> list[list[str] | LimitReached]:
        now = max(item.record.created_at_ms for item in batch)
        limited = sorted({item.record.user_id for item in batch if item.max_sessions})
        outcomes: list[list[str] | LimitReached] = []
        rows: list[dict[str, Any]] = []
        events: list[tuple[EventRow, int]] = []
        evicted_all: list[str] = []
        async with self.engine.begin() as conn:
            active: dict[tuple[str, str], list[str]] = {}
            if limited:
                if not self.sqlite:  # SQLite's writers are serialised already (BEGIN IMMEDIATE)
                    await conn.execute(_lock_users(limited))
                users = (
                    sessions.c.user_id.in_(limited)
                    if self.sqlite  # PostgreSQL: one array parameter, the same statement each time
                    else sessions.c.user_id == sa.func.any(sa.cast(limited, ARRAY(sa.String)))
                )
                found = await conn.execute(
                    sa.select(sessions.c.session_id, sessions.c.user_id, sessions.c.session_type)
                    .where(
                        users,
                        sessions.c.revoked_at_ms.is_(None),
                        sessions.c.expires_at_ms > now,
                    )
                    .order_by(sessions.c.created_at_ms, sessions.c.session_id)
                )
                for sid, user, kind in found.all():
                    active.setdefault((user, kind), []).append(sid)
            for item in batch:
                record = item.record
                evicted: list[str] = []
                if item.max_sessions:
                    ids = active.setdefault((record.user_id, str(record.session_type)), [])
                    excess = len(ids) - item.max_sessions + 1
                    if excess > 0 and item.on_limit is OnLimit.DENY:
                        outcomes.append(
                            LimitReached(
                                "user_id",
                                f"the user has {len(ids)} {record.session_type} sessions, "
                                "the most allowed; end one first",
                            )
                        )
                        continue
                    if excess > 0:
                        evicted, ids[:excess] = ids[:excess], []
                        evicted_all += evicted
                        by: dict[str, object] = {"by": record.session_id}
                        events += [
                            ((sid, record.user_id, "evicted", item.actor, by), record.created_at_ms)
                            for sid in evicted
                        ]
                    ids.append(record.session_id)
                outcomes.append(evicted)
                rows.append(_row(record))
                events.append(
                    (
                        (record.session_id, record.user_id, "created", item.actor, item.detail),
                        record.created_at_ms,
                    )
                )
            if evicted_all:
                await self._revoke(conn, evicted_all, now, "evicted")
            if rows:
                await conn.execute(sessions.insert(), rows)
            if events:
                await conn.execute(session_events.insert(), [_event(*e) for e in events])
        return outcomes

    async def rotate(
        self,
        session_id: str,
        *,
        generation: int,
        token_digest: bytes,
        refresh_digest: bytes,
        previous_digest: bytes,
        now_ms: int,
        event: EventRow,
    ) -> bool:
        """Move the session's refresh family from `generation` to the next (compare-and-set)."""
        async with self.engine.begin() as conn:
            result = await conn.execute(
                sessions.update()
                .where(
                    sessions.c.session_id == session_id,
                    sessions.c.refresh_generation == generation,
                    sessions.c.revoked_at_ms.is_(None),
                )
                .values(
                    token_digest=token_digest,
                    refresh_digest=refresh_digest,
                    previous_digest=previous_digest,
                    refresh_generation=generation + 1,
                    rotated_at_ms=now_ms,
                    last_seen_at_ms=now_ms,
                )
            )
            if result.rowcount != 1:
                return False
            await self._changed(conn, [session_id], now_ms)
            await self._events(conn, [event], now_ms)
        return True

    async def revoke(
        self,
        session_ids: Sequence[str],
        *,
        now_ms: int,
        reason: str,
        actor: str | None,
        detail: dict[str, object] | None = None,
    ) -> list[str]:
        """End the sessions still active among `session_ids`; the ones this call ended."""
        if not session_ids:
            return []
        async with self.engine.begin() as conn:
            rows = (
                await conn.execute(
                    sa.select(sessions.c.session_id, sessions.c.user_id).where(
                        sessions.c.session_id.in_(list(session_ids)),
                        sessions.c.revoked_at_ms.is_(None),
                    )
                )
            ).all()
            ended = [r.session_id for r in rows]
            await self._revoke(conn, ended, now_ms, reason)
            await self._events(
                conn,
                [
                    (
                        r.session_id,
                        r.user_id,
                        "revoked",
                        actor,
                        {"reason": reason, **(detail or {})},
                    )
                    for r in rows
                ],
                now_ms,
            )
        return ended

    async def active_ids(
        self,
        *,
        now_ms: int,
        user_ids: Sequence[str] | None = None,
        created_before_ms: int | None = None,
        session_type: SessionType | None = None,
        limit: int = 10_000,
    ) -> list[str]:
        """Ids of active sessions matching every given filter (for revocation in bulk)."""
        query = sa.select(sessions.c.session_id).where(
            sessions.c.revoked_at_ms.is_(None), sessions.c.expires_at_ms > now_ms
        )
        if user_ids is not None:
            query = query.where(sessions.c.user_id.in_(list(user_ids)))
        if created_before_ms is not None:
            query = query.where(sessions.c.created_at_ms < created_before_ms)
        if session_type is not None:
            query = query.where(sessions.c.session_type == str(session_type))
        async with self.engine.connect() as conn:
            result = await conn.execute(query.order_by(sessions.c.session_id).limit(limit))
            return list(result.scalars().all())

    async def touch(self, seen: dict[str, int]) -> None:
        """Record last-seen times (only ever moving them forward)."""
        if not seen:
            return
        async with self.engine.begin() as conn:
            for session_id, at_ms in seen.items():
                await conn.execute(
                    sessions.update()
                    .where(sessions.c.session_id == session_id, sessions.c.last_seen_at_ms < at_ms)
                    .values(last_seen_at_ms=at_ms)
                )

    async def add_events(self, rows: Sequence[tuple[EventRow, int]]) -> None:
        """Events recorded earlier, each with its own time."""
        async with self.engine.begin() as conn:
            await conn.execute(session_events.insert(), [_event(*row) for row in rows])

    async def reseal(self, session_id: str, key_id: str, sealed: bytes, old_key_id: str) -> bool:
        async with self.engine.begin() as conn:
            result = await conn.execute(
                sessions.update()
                .where(sessions.c.session_id == session_id, sessions.c.key_id == old_key_id)
                .values(key_id=key_id, sealed=sealed)
            )
        return bool(result.rowcount)

    # -- reads ----------------------------------------------------------------------------

    async def get(self, session_id: str) -> SessionRecord | None:
        async with self.engine.connect() as conn:
            row = (
                (await conn.execute(sa.select(sessions).where(sessions.c.session_id == session_id)))
                .mappings()
                .first()
            )
        return _record(row) if row is not None else None

    async def for_user(
        self,
        user_id: str,
        *,
        now_ms: int,
        include_ended: bool = False,
        limit: int = 100,
        before: tuple[int, str] | None = None,
    ) -> list[SessionRecord]:
        """The user's sessions, newest first (keyset paging on (created_at_ms, session_id))."""
        query = sa.select(sessions).where(sessions.c.user_id == user_id)
        if not include_ended:
            query = query.where(
                sessions.c.revoked_at_ms.is_(None), sessions.c.expires_at_ms > now_ms
            )
        if before is not None:
            query = query.where(
                sa.tuple_(sessions.c.created_at_ms, sessions.c.session_id) < sa.tuple_(*before)
            )
        query = query.order_by(sessions.c.created_at_ms.desc(), sessions.c.session_id.desc())
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query.limit(limit))).mappings().all()
        return [_record(r) for r in rows]

    async def sealed_with_other_keys(self, key_id: str, limit: int) -> list[SessionRecord]:
        query = (
            sa.select(sessions)
            .where(sessions.c.key_id != key_id)
            .order_by(sessions.c.session_id)
            .limit(limit)
        )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).mappings().all()
        return [_record(r) for r in rows]

    async def count_sealed_with_other_keys(self, key_id: str) -> int:
        query = sa.select(sa.func.count()).select_from(sessions).where(sessions.c.key_id != key_id)
        async with self.engine.connect() as conn:
            return int((await conn.execute(query)).scalar_one())

    async def events(
        self, session_id: str, *, after: tuple[int, int] = (0, 0), limit: int = 100
    ) -> list[SessionEvent]:
        """The session's events in time order, after the (at_ms, event_id) cursor."""
        query = (
            sa.select(session_events)
            .where(
                session_events.c.session_id == session_id,
                sa.tuple_(session_events.c.at_ms, session_events.c.event_id) > sa.tuple_(*after),
            )
            .order_by(session_events.c.at_ms, session_events.c.event_id)
            .limit(limit)
        )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).mappings().all()
        return [
            SessionEvent(
                r["event_id"],
                r["session_id"],
                r["user_id"],
                r["at_ms"],
                r["kind"],
                r["actor"],
                orjson.loads(r["detail"]),
            )
            for r in rows
        ]

    # -- handoff codes --------------------------------------------------------------------

    async def add_handoff(
        self, code_digest: bytes, session_id: str, audience: str, now_ms: int, expires_at_ms: int
    ) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                session_handoffs.delete().where(session_handoffs.c.expires_at_ms < now_ms)
            )
            await conn.execute(
                session_handoffs.insert().values(
                    code_digest=code_digest,
                    session_id=session_id,
                    audience=audience,
                    created_at_ms=now_ms,
                    expires_at_ms=expires_at_ms,
                )
            )

    async def use_handoff(self, code_digest: bytes, now_ms: int) -> tuple[str, str] | None:
        """Consume an unexpired, unused code once: (session_id, audience), else None."""
        async with self.engine.begin() as conn:
            row = (
                await conn.execute(
                    sa.select(session_handoffs.c.session_id, session_handoffs.c.audience).where(
                        session_handoffs.c.code_digest == code_digest,
                        session_handoffs.c.used_at_ms.is_(None),
                        session_handoffs.c.expires_at_ms > now_ms,
                    )
                )
            ).first()
            if row is None:
                return None
            result = await conn.execute(
                session_handoffs.update()
                .where(
                    session_handoffs.c.code_digest == code_digest,
                    session_handoffs.c.used_at_ms.is_(None),
                )
                .values(used_at_ms=now_ms)
            )
            if result.rowcount != 1:
                return None
        return str(row.session_id), str(row.audience)

    # -- helpers --------------------------------------------------------------------------

    async def _revoke(
        self, conn: AsyncConnection, session_ids: Iterable[str], now_ms: int, reason: str
    ) -> None:
        ids = list(session_ids)
        if ids:
            await conn.execute(
                sessions.update()
                .where(sessions.c.session_id.in_(ids), sessions.c.revoked_at_ms.is_(None))
                .values(revoked_at_ms=now_ms, revoke_reason=reason)
            )
            await self._changed(conn, ids, now_ms)

    async def _changed(self, conn: AsyncConnection, session_ids: list[str], now_ms: int) -> None:
        await conn.execute(
            session_changes.insert(), [{"session_id": s, "at_ms": now_ms} for s in session_ids]
        )

    async def changed_since(self, since_ms: int, limit: int = 100_000) -> list[str]:
        """Sessions revoked or rotated at or after `since_ms` (by the writers' clocks)."""
        query = (
            sa.select(session_changes.c.session_id)
            .where(session_changes.c.at_ms >= since_ms)
            .limit(limit)
        )
        async with self.engine.connect() as conn:
            return list((await conn.execute(query)).scalars().all())

    async def forget_changes(self, before_ms: int) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(session_changes.delete().where(session_changes.c.at_ms < before_ms))

    async def _events(self, conn: AsyncConnection, rows: Sequence[EventRow], now_ms: int) -> None:
        if rows:
            await conn.execute(session_events.insert(), [_event(row, now_ms) for row in rows])
