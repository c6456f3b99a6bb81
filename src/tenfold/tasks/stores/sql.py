"""The task store on SQL: atomic claims under leases, completions fenced by lease tokens.

PostgreSQL claims with `FOR UPDATE SKIP LOCKED` so many workers never block each other;
SQLite serialises writers (BEGIN IMMEDIATE), which makes the same statements safe there.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from tenfold.kernel.sql import is_sqlite
from tenfold.tasks.models import (
    FINISHED,
    TASK_IDS,
    Claimed,
    OnDependencyFailure,
    Status,
    Task,
    TaskSpec,
)
from tenfold.tasks.tables import (
    task_dependencies,
    task_execution_history,
    task_queues,
    task_workers,
    tasks,
)

READY = (Status.PENDING.value, Status.SCHEDULED.value)


class NotRedrivable(Exception):
    """The task cannot be re-driven now; the message says why."""

    def __init__(self, status: Status, reason: str) -> None:
        super().__init__(reason)
        self.status = status


class UnknownDependency(LookupError):
    def __init__(self, task_id: str) -> None:
        super().__init__(task_id)
        self.task_id = task_id


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of a task after a completion or failure report."""

    accepted: bool  # False: the lease was stale (another attempt owns the task now)
    status: Status | None = None
    retry_at_ms: int | None = None


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


def resources_text(resources: Iterable[str]) -> str:
    return ",".join(sorted(set(resources)))


def resource_subsets(offered: Iterable[str]) -> list[str]:
    """Every resource set a worker offering `offered` can serve, in stored form."""
    items = sorted(set(offered))
    out = [""]
    for n in range(1, len(items) + 1):
        out.extend(",".join(c) for c in itertools.combinations(items, n))
    return out


def row_to_task(row: Any, dependencies: Sequence[str] = ()) -> Task:
    from tenfold.tasks.timeutil import from_ms

    return Task(
        task_id=row["task_id"],
        task_type=row["task_type"],
        queue=row["queue"],
        payload=orjson.loads(row["payload"]),
        priority=row["priority"],
        status=Status(row["status"]),
        attempt=row["attempt"],
        max_retries=row["max_retries"],
        timeout_seconds=row["timeout_seconds"],
        created_at=from_ms(row["created_at_ms"]),  # type: ignore[arg-type]
        run_at=from_ms(row["run_at_ms"]),
        scheduled_at=from_ms(row["scheduled_at_ms"]),
        started_at=from_ms(row["started_at_ms"]),
        completed_at=from_ms(row["completed_at_ms"]),
        failed_at=from_ms(row["failed_at_ms"]),
        worker_id=row["worker_id"],
        lease_token=row["lease_token"],
        lease_expires_at=from_ms(row["lease_expires_ms"]),
        error_message=row["error_message"],
        traceback=row["traceback"],
        result=None if row["result"] is None else orjson.loads(row["result"]),
        idempotency_key=row["idempotency_key"],
        on_dependency_failure=OnDependencyFailure(row["on_dependency_failure"]),
        resources=tuple(r for r in row["resources"].split(",") if r),
        dependencies=tuple(dependencies),
        cancel_requested=bool(row["cancel_requested"]),
        created_by=row["created_by"],
    )


class SqlTaskStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.sqlite = is_sqlite(engine)

    # -- submit ---------------------------------------------------------------------------

    async def submit(
        self,
        specs: Sequence[TaskSpec],
        now_ms: int,
        *,
        created_by: str | None = None,
        conn: AsyncConnection | None = None,
        ids: Sequence[str] | None = None,
    ) -> list[tuple[str, bool]]:
        """Insert tasks (one transaction; the caller's when `conn` is given).

        Dependencies may name existing tasks or, by `ref`, tasks of the same batch. Returns
        (task_id, created) per spec; a repeated idempotency key returns the first task.
        """
        if conn is not None:
            return await self._submit(conn, specs, now_ms, created_by, ids)
        async with self.engine.begin() as own:
            return await self._submit(own, specs, now_ms, created_by, ids)

    async def _submit(
        self,
        conn: AsyncConnection,
        specs: Sequence[TaskSpec],
        now_ms: int,
        created_by: str | None,
        ids: Sequence[str] | None,
    ) -> list[tuple[str, bool]]:
        keys = [s.idempotency_key for s in specs if s.idempotency_key]
        existing: dict[str, str] = {}
        if keys:
            rows = await conn.execute(
                sa.select(tasks.c.idempotency_key, tasks.c.task_id).where(
                    tasks.c.idempotency_key.in_(keys)
                )
            )
            existing = {k: t for k, t in rows.all()}
        new_ids = list(ids) if ids is not None else [TASK_IDS.new(now_ms) for _ in specs]
        by_ref = {s.ref: new_ids[i] for i, s in enumerate(specs) if s.ref}
        out: list[tuple[str, bool]] = []
        rows_out: list[dict[str, Any]] = []
        dep_rows: list[dict[str, str]] = []
        batch_ids: set[str] = set()
        resolved_deps: list[list[str]] = []
        for i, spec in enumerate(specs):
            if spec.idempotency_key and spec.idempotency_key in existing:
                out.append((existing[spec.idempotency_key], False))
                resolved_deps.append([])
                continue
            task_id = new_ids[i]
            if spec.idempotency_key:
                existing[spec.idempotency_key] = task_id
            batch_ids.add(task_id)
            deps = [by_ref.get(d, d) for d in spec.dependencies]
            resolved_deps.append(deps)
            out.append((task_id, True))
        outside = {d for deps in resolved_deps for d in deps if d not in batch_ids}
        states: dict[str, str] = {}
        if outside:
            rows = await conn.execute(
                sa.select(tasks.c.task_id, tasks.c.status).where(tasks.c.task_id.in_(outside))
            )
            states = dict(rows.all())
            for dep in outside:
                if dep not in states:
                    raise UnknownDependency(dep)
        for (task_id, created), spec, deps in zip(out, specs, resolved_deps, strict=True):
            if not created:
                continue
            open_deps = [
                d for d in deps if d in batch_ids or states.get(d) != Status.SUCCEEDED.value
            ]
            doomed = [
                d for d in deps if states.get(d) in (Status.DEAD.value, Status.CANCELLED.value)
            ]
            run_at = now_ms
            if spec.scheduled_at is not None:
                run_at = max(now_ms, int(spec.scheduled_at.timestamp() * 1000))
            if doomed:
                status = (
                    Status.CANCELLED
                    if spec.on_dependency_failure is OnDependencyFailure.CANCEL
                    else Status.DEAD
                )
            elif open_deps:
                status = Status.WAITING
            elif run_at > now_ms:
                status = Status.SCHEDULED
            else:
                status = Status.PENDING
            rows_out.append(
                {
                    "task_id": task_id,
                    "queue": spec.queue,
                    "task_type": spec.task_type,
                    "payload": spec.payload_json.decode(),
                    "priority": spec.priority,
                    "status": status.value,
                    "attempt": 0,
                    "max_retries": spec.max_retries,
                    "timeout_seconds": spec.timeout_seconds,
                    "run_at_ms": run_at,
                    "scheduled_at_ms": run_at if spec.scheduled_at is not None else None,
                    "created_at_ms": now_ms,
                    "idempotency_key": spec.idempotency_key,
                    "on_dependency_failure": spec.on_dependency_failure.value,
                    "resources": resources_text(spec.resources),
                    "pending_deps": len(open_deps),
                    "cancel_requested": False,
                    "has_dependants": False,
                    "created_by": created_by,
                    "error_message": (
                        f"dependency {doomed[0]} did not succeed" if doomed else None
                    ),
                    "failed_at_ms": now_ms if doomed else None,
                }
            )
            dep_rows.extend({"task_id": task_id, "depends_on": d} for d in deps)
        if dep_rows:
            upstream = {r["depends_on"] for r in dep_rows}
            for row in rows_out:
                if row["task_id"] in upstream:
                    row["has_dependants"] = True
            outside_up = upstream - batch_ids
            if outside_up:
                await conn.execute(
                    tasks.update()
                    .where(tasks.c.task_id.in_(outside_up))
                    .values(has_dependants=True)
                )
        if rows_out:
            await conn.execute(tasks.insert(), rows_out)
        if dep_rows:
            await conn.execute(task_dependencies.insert(), dep_rows)
        return out

    async def _announce(self, conn: AsyncConnection) -> None:
        """Wake idle workers in every process (PostgreSQL; delivered on commit)."""
        if not self.sqlite:
            await conn.execute(sa.text("SELECT pg_notify('tenfold_tasks', '*')"))

    # -- reading --------------------------------------------------------------------------

    async def get(self, task_id: str) -> Task | None:
        async with self.engine.connect() as conn:
            row = (
                (await conn.execute(sa.select(tasks).where(tasks.c.task_id == task_id)))
                .mappings()
                .first()
            )
            if row is None:
                return None
            deps = (
                await conn.execute(
                    sa.select(task_dependencies.c.depends_on).where(
                        task_dependencies.c.task_id == task_id
                    )
                )
            ).scalars()
            return row_to_task(row, list(deps))

    async def list_tasks(
        self,
        *,
        status: str | None = None,
        queue: str | None = None,
        task_type: str | None = None,
        before: tuple[int, str] | None = None,
        limit: int = 100,
    ) -> list[Task]:
        """Newest first; keyset pagination on (created_at_ms, task_id)."""
        query = sa.select(tasks)
        if status:
            query = query.where(tasks.c.status == status)
        if queue:
            query = query.where(tasks.c.queue == queue)
        if task_type:
            query = query.where(tasks.c.task_type == task_type)
        if before is not None:
            query = query.where(
                sa.tuple_(tasks.c.created_at_ms, tasks.c.task_id) < sa.tuple_(*before)
            )
        query = query.order_by(tasks.c.created_at_ms.desc(), tasks.c.task_id.desc()).limit(limit)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).mappings().all()
        return [row_to_task(r) for r in rows]

    async def graph(
        self, task_id: str, limit: int = 5_000
    ) -> tuple[list[Task], list[tuple[str, str]]]:
        """The task's connected dependency graph (upstream and downstream), bounded."""
        seen: set[str] = {task_id}
        frontier = {task_id}
        edges: set[tuple[str, str]] = set()
        async with self.engine.connect() as conn:
            while frontier and len(seen) < limit:
                rows = (
                    await conn.execute(
                        sa.select(
                            task_dependencies.c.task_id, task_dependencies.c.depends_on
                        ).where(
                            sa.or_(
                                task_dependencies.c.task_id.in_(frontier),
                                task_dependencies.c.depends_on.in_(frontier),
                            )
                        )
                    )
                ).all()
                nxt: set[str] = set()
                for a, b in rows:
                    edges.add((a, b))
                    for node in (a, b):
                        if node not in seen:
                            seen.add(node)
                            nxt.add(node)
                frontier = nxt
            found = (
                (await conn.execute(sa.select(tasks).where(tasks.c.task_id.in_(seen))))
                .mappings()
                .all()
            )
        return [row_to_task(r) for r in found], sorted(edges)

    async def history(self, task_id: str) -> list[dict[str, Any]]:
        query = (
            sa.select(task_execution_history)
            .where(task_execution_history.c.task_id == task_id)
            .order_by(task_execution_history.c.attempt, task_execution_history.c.completed_at_ms)
        )
        async with self.engine.connect() as conn:
            return [dict(r) for r in (await conn.execute(query)).mappings().all()]

    # -- claiming -------------------------------------------------------------------------

    def _token_sql(self) -> str:
        if self.sqlite:
            return "lower(hex(randomblob(16)))"
        return "md5(random()::text || clock_timestamp()::text || task_id)"

    async def claim(
        self,
        worker_id: str,
        *,
        queues: Sequence[str],
        task_types: Sequence[str] | None,
        resources: Sequence[str],
        limit: int,
        lease_ms: int,
        now_ms: int,
    ) -> list[Claimed]:
        """Atomically move up to `limit` ready tasks to running under a new lease each:
        the most urgent priority first, then the earliest due, then the oldest."""
        params: dict[str, Any] = {
            "worker": worker_id,
            "now": now_ms,
            "expires": now_ms + lease_ms,
            "limit": limit,
        }
        where = ["t.status IN ('pending', 'scheduled')", "t.run_at_ms <= :now"]
        where.append(
            "NOT EXISTS (SELECT 1 FROM task_queues q WHERE q.queue = t.queue AND q.paused)"
            if not self.sqlite
            else "t.queue NOT IN (SELECT queue FROM task_queues WHERE paused = 1)"
        )
        where.append(self._in("t.queue", "q", queues, params))
        if task_types is not None:
            where.append(self._in("t.task_type", "tt", task_types, params))
        where.append(self._in("t.resources", "r", resource_subsets(resources), params))
        lock = "" if self.sqlite else " FOR UPDATE SKIP LOCKED"
        sql = f"""
            UPDATE tasks SET status = 'running', attempt = attempt + 1, worker_id = :worker,
                lease_token = {self._token_sql()}, lease_expires_ms = :expires,
                started_at_ms = :now, cancel_requested = :false
            WHERE task_id IN (
                SELECT t.task_id FROM tasks t WHERE {" AND ".join(where)}
                ORDER BY t.priority, t.run_at_ms, t.task_id
                LIMIT :limit{lock})
            RETURNING task_id, task_type, payload, attempt, lease_token, lease_expires_ms,
                timeout_seconds, max_retries, queue, priority, run_at_ms
        """  # noqa: S608 - fixed fragments; every value is a bound parameter
        params["false"] = False
        async with self.engine.begin() as conn:
            rows = (await conn.execute(sa.text(sql), params)).mappings().all()
        from tenfold.tasks.timeutil import from_ms

        claimed = [
            Claimed(
                task_id=r["task_id"],
                task_type=r["task_type"],
                payload=orjson.loads(r["payload"]),
                attempt=r["attempt"],
                lease_token=r["lease_token"],
                lease_expires_at=from_ms(r["lease_expires_ms"]),  # type: ignore[arg-type]
                timeout_seconds=r["timeout_seconds"],
                max_retries=r["max_retries"],
                queue=r["queue"],
                wait_ms=max(0, now_ms - r["run_at_ms"]),
            )
            for r in rows
        ]
        # RETURNING has no order: put them back in claim order
        rank = {r["task_id"]: (r["priority"], r["run_at_ms"], r["task_id"]) for r in rows}
        claimed.sort(key=lambda c: rank[c.task_id])
        return claimed

    @staticmethod
    def _in(column: str, name: str, values: Sequence[str], params: dict[str, Any]) -> str:
        if not values:
            return "1 = 0"
        names = []
        for i, value in enumerate(values):
            params[f"{name}{i}"] = value
            names.append(f":{name}{i}")
        return f"{column} IN ({', '.join(names)})"

    async def heartbeat(
        self, task_id: str, lease_token: str, lease_ms: int, now_ms: int
    ) -> tuple[bool, bool]:
        """Extend a lease. Returns (still held, cancel requested)."""
        async with self.engine.begin() as conn:
            row = (
                await conn.execute(
                    tasks.update()
                    .where(
                        tasks.c.task_id == task_id,
                        tasks.c.lease_token == lease_token,
                        tasks.c.status == Status.RUNNING.value,
                    )
                    .values(lease_expires_ms=now_ms + lease_ms)
                    .returning(tasks.c.cancel_requested)
                )
            ).first()
        return (row is not None, bool(row[0]) if row is not None else False)

    async def heartbeat_many(
        self, leases: Sequence[tuple[str, str]], lease_ms: int, now_ms: int
    ) -> dict[str, tuple[bool, bool]]:
        """Extend many leases in one statement per 200. Returns task id -> (held, cancel)."""
        out = {task_id: (False, False) for task_id, _ in leases}
        async with self.engine.begin() as conn:
            for start in range(0, len(leases), 200):
                chunk = leases[start : start + 200]
                params: dict[str, Any] = {"expires": now_ms + lease_ms}
                values = []
                for i, (task_id, token) in enumerate(chunk):
                    params[f"i{i}"], params[f"k{i}"] = task_id, token
                    values.append(f"(:i{i}, :k{i})")
                sql = f"""
                    WITH v(task_id, token) AS (VALUES {", ".join(values)})
                    UPDATE tasks SET lease_expires_ms = :expires FROM v
                    WHERE tasks.task_id = v.task_id AND tasks.lease_token = v.token
                        AND tasks.status = 'running'
                    RETURNING tasks.task_id, tasks.cancel_requested
                """  # noqa: S608 - placeholders only; every value is a bound parameter
                for task_id, cancel in (await conn.execute(sa.text(sql), params)).all():
                    out[task_id] = (True, bool(cancel))
        return out

    # -- finishing ------------------------------------------------------------------------

    async def complete(
        self,
        items: Sequence[tuple[str, str, Any]],
        now_ms: int,
        *,
        conn: AsyncConnection | None = None,
    ) -> list[bool]:
        """Mark (task_id, lease_token, result) items succeeded; False for a stale lease.
        With `conn`, inside the caller's transaction (the handler's own writes commit with it)."""
        if conn is not None:
            return await self._complete(conn, items, now_ms)
        async with self.engine.begin() as own:
            return await self._complete(own, items, now_ms)

    async def _complete(
        self, conn: AsyncConnection, items: Sequence[tuple[str, str, Any]], now_ms: int
    ) -> list[bool]:
        done: dict[str, Any] = {}
        for chunk_start in range(0, len(items), 200):
            chunk = items[chunk_start : chunk_start + 200]
            params: dict[str, Any] = {"now": now_ms, "succeeded": Status.SUCCEEDED.value}
            values = []
            for i, (task_id, token, result) in enumerate(chunk):
                params[f"i{i}"], params[f"k{i}"], params[f"r{i}"] = task_id, token, _json(result)
                values.append(f"(:i{i}, :k{i}, :r{i})")
            # One statement per chunk: every item whose lease is still current succeeds.
            sql = f"""
                WITH v(task_id, token, result) AS (VALUES {", ".join(values)})
                UPDATE tasks SET status = :succeeded, result = v.result,
                    completed_at_ms = :now, lease_token = NULL, lease_expires_ms = NULL
                FROM v
                WHERE tasks.task_id = v.task_id AND tasks.lease_token = v.token
                    AND tasks.status = 'running'
                RETURNING tasks.task_id, tasks.attempt, tasks.worker_id, tasks.started_at_ms,
                    tasks.run_at_ms, tasks.queue, tasks.priority, tasks.has_dependants
            """  # noqa: S608 - placeholders only; every value is a bound parameter
            for row in (await conn.execute(sa.text(sql), params)).mappings():
                done[row["task_id"]] = row
        if done:
            await conn.execute(
                task_execution_history.insert(),
                [
                    _history(task_id, row, now_ms, "succeeded", None)
                    for task_id, row in done.items()
                ],
            )
            upstream = [task_id for task_id, row in done.items() if row["has_dependants"]]
            if upstream:
                await self._release_dependants(conn, upstream, now_ms)
        return [task_id in done for task_id, _, _ in items]

    async def fail(
        self,
        task_id: str,
        lease_token: str,
        *,
        error: str,
        traceback: str | None,
        retry_at_ms: int | None,
        now_ms: int,
        outcome: str = "failed",
    ) -> Outcome:
        """Record a failed attempt: back off and retry at `retry_at_ms` if attempts remain
        (None: never retry), else the dead letter state."""
        async with self.engine.begin() as conn:
            return await self._fail(
                conn, task_id, lease_token, error, traceback, retry_at_ms, now_ms, outcome
            )

    async def _fail(
        self,
        conn: AsyncConnection,
        task_id: str,
        lease_token: str | None,
        error: str,
        traceback: str | None,
        retry_at_ms: int | None,
        now_ms: int,
        outcome: str,
    ) -> Outcome:
        cond = [tasks.c.task_id == task_id, tasks.c.status == Status.RUNNING.value]
        if lease_token is not None:
            cond.append(tasks.c.lease_token == lease_token)
        row = (
            (
                await conn.execute(
                    sa.select(
                        tasks.c.attempt,
                        tasks.c.max_retries,
                        tasks.c.worker_id,
                        tasks.c.started_at_ms,
                        tasks.c.run_at_ms,
                        tasks.c.queue,
                        tasks.c.priority,
                        tasks.c.cancel_requested,
                    ).where(*cond)
                )
            )
            .mappings()
            .first()
        )
        if row is None:
            return Outcome(False)
        retry = retry_at_ms is not None and row["attempt"] <= row["max_retries"]
        if row["cancel_requested"]:
            status, retry = Status.CANCELLED, False
        elif retry:
            status = Status.SCHEDULED
        else:
            status = Status.DEAD
        values: dict[str, Any] = {
            "status": status.value,
            "lease_token": None,
            "lease_expires_ms": None,
            "error_message": error[:10_000],
            "traceback": (traceback or "")[:50_000] or None,
            "failed_at_ms": now_ms,
        }
        if retry:
            values["run_at_ms"] = retry_at_ms
        await conn.execute(tasks.update().where(*cond).values(**values))
        await conn.execute(
            task_execution_history.insert().values(
                **_history(task_id, row, now_ms, outcome, error[:10_000])
            )
        )
        if status in (Status.DEAD, Status.CANCELLED):
            await self._doom_dependants(conn, [task_id], status, now_ms)
        return Outcome(True, status, values.get("run_at_ms"))

    async def expire_leases(self, now_ms: int, limit: int = 500) -> list[tuple[str, Status]]:
        """Tasks whose lease ran out (their worker died): retry now, or dead if out of retries."""
        query = (
            sa.select(tasks.c.task_id, tasks.c.lease_token)
            .where(tasks.c.status == Status.RUNNING.value, tasks.c.lease_expires_ms < now_ms)
            .order_by(tasks.c.lease_expires_ms)
            .limit(limit)
        )
        if not self.sqlite:
            query = query.with_for_update(skip_locked=True)
        async with self.engine.begin() as conn:
            rows = (await conn.execute(query)).all()
            out = []
            for task_id, token in rows:
                result = await self._fail(
                    conn,
                    task_id,
                    token,
                    "lease expired: the worker stopped heart-beating",
                    None,
                    now_ms,
                    now_ms,
                    "lost",
                )
                if result.status is not None:
                    out.append((task_id, result.status))
            if out:
                await self._announce(conn)
        return out

    async def _release_dependants(
        self, conn: AsyncConnection, finished: Sequence[str], now_ms: int
    ) -> None:
        dependants = task_dependencies.c.task_id
        for chunk in _chunks(finished, 500):
            rows = (
                await conn.execute(
                    sa.select(dependants, sa.func.count())
                    .where(task_dependencies.c.depends_on.in_(chunk))
                    .group_by(dependants)
                )
            ).all()
            for task_id, count in rows:
                await conn.execute(
                    tasks.update()
                    .where(tasks.c.task_id == task_id, tasks.c.status == Status.WAITING.value)
                    .values(pending_deps=tasks.c.pending_deps - count)
                )
            if rows:
                ids = [r[0] for r in rows]
                await conn.execute(
                    tasks.update()
                    .where(
                        tasks.c.task_id.in_(ids),
                        tasks.c.status == Status.WAITING.value,
                        tasks.c.pending_deps <= 0,
                    )
                    .values(
                        status=sa.case(
                            (tasks.c.run_at_ms > now_ms, Status.SCHEDULED.value),
                            else_=Status.PENDING.value,
                        )
                    )
                )
                await self._announce(conn)

    async def _doom_dependants(
        self, conn: AsyncConnection, failed: Sequence[str], why: Status, now_ms: int
    ) -> None:
        """Fail or cancel (per each dependant's choice) everything downstream of `failed`."""
        frontier = list(failed)
        while frontier:
            rows = (
                await conn.execute(
                    sa.select(tasks.c.task_id, tasks.c.on_dependency_failure, tasks.c.status)
                    .join(task_dependencies, task_dependencies.c.task_id == tasks.c.task_id)
                    .where(
                        task_dependencies.c.depends_on.in_(frontier),
                        tasks.c.status == Status.WAITING.value,
                    )
                )
            ).all()
            frontier = []
            for task_id, on_failure, _ in rows:
                cancel = on_failure == OnDependencyFailure.CANCEL.value
                status = Status.CANCELLED if cancel else Status.DEAD
                result = await conn.execute(
                    tasks.update()
                    .where(tasks.c.task_id == task_id, tasks.c.status == Status.WAITING.value)
                    .values(
                        status=status.value,
                        error_message="a dependency did not succeed",
                        failed_at_ms=now_ms,
                    )
                )
                if result.rowcount:
                    frontier.append(task_id)

    # -- operator actions -----------------------------------------------------------------

    async def cancel(self, task_id: str, now_ms: int) -> Status | None:
        """Cancel a task not yet running; ask a running one to stop. Returns its status then
        (None if it does not exist)."""
        async with self.engine.begin() as conn:
            row = (
                await conn.execute(sa.select(tasks.c.status).where(tasks.c.task_id == task_id))
            ).first()
            if row is None:
                return None
            status = Status(row[0])
            if status in FINISHED:
                return status
            if status is Status.RUNNING:
                await conn.execute(
                    tasks.update().where(tasks.c.task_id == task_id).values(cancel_requested=True)
                )
                return status
            await conn.execute(
                tasks.update()
                .where(tasks.c.task_id == task_id)
                .values(status=Status.CANCELLED.value, failed_at_ms=now_ms)
            )
            await self._doom_dependants(conn, [task_id], Status.CANCELLED, now_ms)
            return Status.CANCELLED

    async def retry(self, task_id: str, now_ms: int) -> Status | None:
        """Re-drive a dead or cancelled task with its retries restored (attempt numbers go on).
        It waits again for dependencies that have not finished; None if it does not exist."""
        async with self.engine.begin() as conn:
            row = (
                await conn.execute(
                    sa.select(tasks.c.status, tasks.c.attempt, tasks.c.max_retries).where(
                        tasks.c.task_id == task_id
                    )
                )
            ).first()
            if row is None:
                return None
            status = Status(row[0])
            if status not in (Status.DEAD, Status.CANCELLED):
                raise NotRedrivable(status, "only dead or cancelled tasks can be re-driven")
            deps = (
                await conn.execute(
                    sa.select(tasks.c.task_id, tasks.c.status)
                    .join(task_dependencies, task_dependencies.c.depends_on == tasks.c.task_id)
                    .where(task_dependencies.c.task_id == task_id)
                )
            ).all()
            blocked = [d for d, st in deps if st in (Status.DEAD.value, Status.CANCELLED.value)]
            if blocked:
                raise NotRedrivable(
                    status, f"its dependency {blocked[0]} did not succeed; re-drive that first"
                )
            open_deps = sum(1 for _, st in deps if st != Status.SUCCEEDED.value)
            new = Status.WAITING if open_deps else Status.PENDING
            await conn.execute(
                tasks.update()
                .where(tasks.c.task_id == task_id)
                .values(
                    status=new.value,
                    max_retries=row[1] + row[2],
                    run_at_ms=now_ms,
                    cancel_requested=False,
                    pending_deps=open_deps,
                    error_message=None,
                    failed_at_ms=None,
                )
            )
            if new is Status.PENDING:
                await self._announce(conn)
            return new

    async def set_paused(self, queue: str, paused: bool, now_ms: int) -> None:
        async with self.engine.begin() as conn:
            updated = await conn.execute(
                task_queues.update()
                .where(task_queues.c.queue == queue)
                .values(paused=paused, updated_at_ms=now_ms)
            )
            if not updated.rowcount:
                await conn.execute(
                    task_queues.insert().values(queue=queue, paused=paused, updated_at_ms=now_ms)
                )

    async def paused(self) -> set[str]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                sa.select(task_queues.c.queue).where(task_queues.c.paused.is_(True))
            )
            return set(rows.scalars())

    # -- workers and statistics -----------------------------------------------------------

    async def register_worker(self, row: dict[str, Any]) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                task_workers.delete().where(task_workers.c.worker_id == row["worker_id"])
            )
            await conn.execute(task_workers.insert().values(**row))

    async def worker_heartbeat(
        self, worker_id: str, now_ms: int, status: str, current_task: str | None
    ) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                task_workers.update()
                .where(task_workers.c.worker_id == worker_id)
                .values(last_heartbeat_ms=now_ms, status=status, current_task=current_task)
            )

    async def remove_worker(self, worker_id: str) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(task_workers.delete().where(task_workers.c.worker_id == worker_id))

    async def workers(self, alive_after_ms: int) -> list[dict[str, Any]]:
        async with self.engine.connect() as conn:
            rows = (
                await conn.execute(
                    sa.select(task_workers)
                    .where(task_workers.c.last_heartbeat_ms >= alive_after_ms)
                    .order_by(task_workers.c.worker_id)
                )
            ).mappings()
            return [dict(r) for r in rows]

    async def stats(self, now_ms: int, window_ms: int = 60_000) -> dict[str, Any]:
        async with self.engine.connect() as conn:
            depth = (
                await conn.execute(
                    sa.select(tasks.c.queue, tasks.c.priority, tasks.c.status, sa.func.count())
                    .where(tasks.c.status.in_([s.value for s in Status if s not in FINISHED]))
                    .group_by(tasks.c.queue, tasks.c.priority, tasks.c.status)
                )
            ).all()
            recent = (
                await conn.execute(
                    sa.select(
                        task_execution_history.c.queue,
                        task_execution_history.c.priority,
                        sa.func.count(),
                        sa.func.avg(task_execution_history.c.wait_ms),
                        sa.func.sum(
                            sa.case((task_execution_history.c.status == "succeeded", 1), else_=0)
                        ),
                    )
                    .where(task_execution_history.c.completed_at_ms >= now_ms - window_ms)
                    .group_by(task_execution_history.c.queue, task_execution_history.c.priority)
                )
            ).all()
            types = (
                await conn.execute(
                    sa.select(tasks.c.task_type, sa.func.count())
                    .where(tasks.c.status.in_(READY), tasks.c.run_at_ms <= now_ms)
                    .group_by(tasks.c.task_type)
                )
            ).all()
            dead = (
                await conn.execute(
                    sa.select(sa.func.count()).where(tasks.c.status == Status.DEAD.value)
                )
            ).scalar()
        return {
            "depth": [tuple(r) for r in depth],
            "recent": [tuple(r) for r in recent],
            "ready_by_type": dict(types),
            "dead": int(dead or 0),
        }


def _history(task_id: str, row: Any, now_ms: int, status: str, error: str | None) -> dict[str, Any]:
    started = row["started_at_ms"]
    return {
        "execution_id": str(uuid.uuid4()),
        "task_id": task_id,
        "attempt": row["attempt"],
        "worker_id": row["worker_id"],
        "queue": row["queue"],
        "priority": row["priority"],
        "started_at_ms": started,
        "completed_at_ms": now_ms,
        "wait_ms": None if started is None else max(0, started - row["run_at_ms"]),
        "execution_time_ms": None if started is None else max(0, now_ms - started),
        "status": status,
        "error_message": error,
    }


def _chunks(items: Sequence[str], size: int) -> Iterable[Sequence[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


async def release(store: SqlTaskStore, items: Sequence[tuple[str, str]]) -> int:
    """Hand back claimed tasks that never started (a worker shutting down): pending again,
    the attempt not counted."""
    released = 0
    async with store.engine.begin() as conn:
        for task_id, token in items:
            result = await conn.execute(
                tasks.update()
                .where(
                    tasks.c.task_id == task_id,
                    tasks.c.lease_token == token,
                    tasks.c.status == Status.RUNNING.value,
                )
                .values(
                    status=Status.PENDING.value,
                    attempt=tasks.c.attempt - 1,
                    lease_token=None,
                    lease_expires_ms=None,
                    worker_id=None,
                )
            )
            released += result.rowcount
    return released
