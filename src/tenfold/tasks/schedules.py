"""Cron schedules: a named cron expression in an IANA time zone that submits a task each tick.

Every worker supervisor runs a `Scheduler`. Each due tick fires once however many run: the
schedule's `next_run_ms` is advanced with a compare-and-set in the same transaction that
submits the task, and the task carries the idempotency key `schedule:<name>:<tick ms>` as a
second guard.

Time zones follow the wall clock, as cron does:

- a tick in the hour skipped when clocks go forward runs once, shifted by the gap
  (`30 2 * * *` in Europe/Paris runs at 03:30 on the last Sunday of March);
- a tick in the hour repeated when clocks go back runs once, at its first occurrence, unless
  the schedule runs every hour (hour field `*`): that one runs in both passes, so it keeps
  firing once per real hour.

Ticks missed while no scheduler ran are coalesced: one task for the oldest missed tick, then
the schedule moves on to the next tick in the future.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson
import sqlalchemy as sa
import structlog
from croniter import CroniterError, croniter  # type: ignore[import-untyped]
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from tenfold.kernel.clock import SYSTEM_CLOCK, Clock
from tenfold.tasks.models import (
    MAX_RETRIES_DEFAULT,
    PRIORITY_DEFAULT,
    TIMEOUT_DEFAULT,
    TaskError,
    TaskSpec,
    validate,
)
from tenfold.tasks.service import TaskService
from tenfold.tasks.tables import task_schedules

log = structlog.get_logger(__name__)

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,99}")
MAX_OFFSET_CHANGE = timedelta(hours=3)  # more than any UTC offset has ever jumped at once
ALIASES = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")


class ScheduleError(TaskError):
    """A schedule is invalid; `field` names the offending input."""


@dataclass(frozen=True, slots=True)
class TaskSchedule:
    name: str
    cron: str
    timezone: str
    task_type: str
    payload: Any = field(default_factory=dict)
    priority: int = PRIORITY_DEFAULT
    queue: str = "default"
    max_retries: int = MAX_RETRIES_DEFAULT
    timeout_seconds: int = TIMEOUT_DEFAULT
    next_run_ms: int = 0
    last_run_ms: int | None = None
    enabled: bool = True
    created_at_ms: int = 0

    @property
    def next_run_at(self) -> datetime:
        return datetime.fromtimestamp(self.next_run_ms / 1000, UTC)

    def task(self, tick_ms: int) -> TaskSpec:
        """The task this schedule submits for one tick."""
        return validate(
            {
                "task_type": self.task_type,
                "payload": self.payload,
                "priority": self.priority,
                "queue": self.queue,
                "max_retries": self.max_retries,
                "timeout_seconds": self.timeout_seconds,
                "idempotency_key": f"schedule:{self.name}:{tick_ms}",
            }
        )


# -- cron arithmetic ---------------------------------------------------------------------


def zone(name: str) -> ZoneInfo:
    """The IANA time zone `name`, or ScheduleError."""
    if not isinstance(name, str) or not name or len(name) > 64:
        raise ScheduleError("timezone", "must be an IANA time zone name such as Europe/Paris")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ScheduleError(
            "timezone", f"unknown time zone {name!r}; expected an IANA name such as Europe/Paris"
        ) from None


def check_cron(expression: str) -> str:
    """A five-field cron expression (or an alias such as @daily), normalised; or ScheduleError."""
    if not isinstance(expression, str):
        raise ScheduleError("cron", "must be a string such as '*/5 * * * *'")
    text = " ".join(expression.split())
    if text.startswith("@"):
        if text.lower() not in ALIASES:
            raise ScheduleError("cron", f"unknown alias {text!r}; expected one of {ALIASES}")
        return text.lower()
    fields = text.split(" ")
    if len(fields) != 5:
        raise ScheduleError(
            "cron",
            f"{expression!r} has {len(fields)} fields; expected 5 "
            "(minute hour day-of-month month day-of-week), e.g. '0 9 * * 1-5'",
        )
    try:
        croniter(text)
    except (CroniterError, ValueError, KeyError) as exc:
        raise ScheduleError(
            "cron", f"{expression!r} is not a valid cron expression: {exc}"
        ) from None
    return text


def _every_hour(expression: str) -> bool:
    hours = croniter(expression).expanded[1]
    return bool(hours == ["*"] or len(set(hours)) == 24)


def _instants(wall: datetime, tz: ZoneInfo, every_hour: bool) -> list[datetime]:
    """The real instants a local wall time names: one; none of its own in a skipped hour
    (then the gap-shifted one); two in a repeated hour (the second only if `every_hour`)."""
    first = wall.replace(tzinfo=tz, fold=0)
    second = wall.replace(tzinfo=tz, fold=1)
    if first.utcoffset() == second.utcoffset():
        return [first.astimezone(UTC)]
    exists = first.astimezone(UTC).astimezone(tz).replace(tzinfo=None) == wall
    if not exists:  # skipped: fold=0 reads it with the offset before the jump, i.e. shifted
        return [first.astimezone(UTC)]
    return (
        [first.astimezone(UTC), second.astimezone(UTC)] if every_hour else [first.astimezone(UTC)]
    )


def _offset_change(instant: datetime, tz: ZoneInfo) -> timedelta:
    """How far the zone's UTC offset moves within a few hours of `instant` (zero mostly)."""
    before = (instant - MAX_OFFSET_CHANGE).astimezone(tz).utcoffset() or timedelta()
    after = (instant + MAX_OFFSET_CHANGE).astimezone(tz).utcoffset() or timedelta()
    return abs(after - before)


def next_fire(cron: str, timezone: str, after_ms: int) -> int:
    """The first tick of `cron` in `timezone` strictly after `after_ms` (epoch milliseconds)."""
    expression = check_cron(cron)
    tz = zone(timezone)
    after = datetime.fromtimestamp(after_ms / 1000, UTC)
    every_hour = _every_hour(expression)
    local = after.astimezone(tz).replace(tzinfo=None)
    # Wall time and real time run in step except within one offset change of a transition:
    # there a later wall time can be an earlier instant, so look that much either side.
    walk = croniter(expression, local - _offset_change(after, tz))
    best: datetime | None = None
    best_wall, slack = local, timedelta()
    while True:
        wall: datetime = walk.get_next(datetime)
        if best is not None and wall > best_wall + slack:
            break
        for instant in _instants(wall, tz, every_hour):
            if instant > after and (best is None or instant < best):
                best, best_wall, slack = instant, wall, _offset_change(instant, tz)
    return round(best.timestamp() * 1000)


# -- storage -----------------------------------------------------------------------------


def _row_to_schedule(row: Any) -> TaskSchedule:
    return TaskSchedule(
        name=row["name"],
        cron=row["cron"],
        timezone=row["timezone"],
        task_type=row["task_type"],
        payload=orjson.loads(row["payload"]),
        priority=row["priority"],
        queue=row["queue"],
        max_retries=row["max_retries"],
        timeout_seconds=row["timeout_seconds"],
        next_run_ms=row["next_run_ms"],
        last_run_ms=row["last_run_ms"],
        enabled=bool(row["enabled"]),
        created_at_ms=row["created_at_ms"],
    )


async def add_schedule(
    engine: AsyncEngine,
    name: str,
    cron: str,
    task_type: str,
    *,
    timezone: str = "UTC",
    payload: Any = None,
    priority: int = PRIORITY_DEFAULT,
    queue: str = "default",
    max_retries: int = MAX_RETRIES_DEFAULT,
    timeout_seconds: int = TIMEOUT_DEFAULT,
    enabled: bool = True,
    replace: bool = False,
    clock: Clock = SYSTEM_CLOCK,
) -> TaskSchedule:
    """Create a schedule (or, with `replace`, overwrite one of that name). Its first tick is
    the next one after now. Raises ScheduleError naming the invalid field."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise ScheduleError(
            "name", "must be 1 to 100 letters, digits or . _ : - (starting with a letter or digit)"
        )
    expression = check_cron(cron)
    zone(timezone)
    now = clock.now_ms()
    schedule = TaskSchedule(
        name=name,
        cron=expression,
        timezone=timezone,
        task_type=task_type,
        payload={} if payload is None else payload,
        priority=priority,
        queue=queue,
        max_retries=max_retries,
        timeout_seconds=timeout_seconds,
        next_run_ms=next_fire(expression, timezone, now),
        enabled=enabled,
        created_at_ms=now,
    )
    try:
        spec = schedule.task(now)
    except TaskError as exc:
        raise ScheduleError(exc.field, exc.message) from None
    values = {
        "name": name,
        "cron": expression,
        "timezone": timezone,
        "task_type": spec.task_type,
        "payload": spec.payload_json.decode(),
        "priority": spec.priority,
        "queue": spec.queue,
        "max_retries": spec.max_retries,
        "timeout_seconds": spec.timeout_seconds,
        "next_run_ms": schedule.next_run_ms,
        "last_run_ms": None,
        "enabled": enabled,
        "created_at_ms": now,
    }
    async with engine.begin() as conn:
        exists = (
            await conn.execute(
                sa.select(task_schedules.c.name).where(task_schedules.c.name == name)
            )
        ).first()
        if exists is not None and not replace:
            raise ScheduleError("name", f"a schedule named {name!r} exists; remove it first")
        if exists is not None:
            await conn.execute(task_schedules.delete().where(task_schedules.c.name == name))
        await conn.execute(task_schedules.insert().values(**values))
    return schedule


async def get_schedule(engine: AsyncEngine, name: str) -> TaskSchedule | None:
    async with engine.connect() as conn:
        row = (
            (await conn.execute(sa.select(task_schedules).where(task_schedules.c.name == name)))
            .mappings()
            .first()
        )
    return None if row is None else _row_to_schedule(row)


async def list_schedules(engine: AsyncEngine) -> list[TaskSchedule]:
    async with engine.connect() as conn:
        rows = (
            (await conn.execute(sa.select(task_schedules).order_by(task_schedules.c.name)))
            .mappings()
            .all()
        )
    return [_row_to_schedule(r) for r in rows]


async def remove_schedule(engine: AsyncEngine, name: str) -> bool:
    """Delete a schedule; False if there was none of that name. Tasks it submitted stay."""
    async with engine.begin() as conn:
        result = await conn.execute(task_schedules.delete().where(task_schedules.c.name == name))
    return bool(result.rowcount)


async def set_enabled(engine: AsyncEngine, name: str, enabled: bool) -> bool:
    """Pause or resume a schedule; False if there is none of that name."""
    async with engine.begin() as conn:
        result = await conn.execute(
            task_schedules.update().where(task_schedules.c.name == name).values(enabled=enabled)
        )
    return bool(result.rowcount)


# -- firing ------------------------------------------------------------------------------


class Scheduler:
    """Fires due schedules. Safe to run in any number of processes at once."""

    def __init__(self, service: TaskService, *, clock: Clock | None = None, batch: int = 100):
        self.service = service
        self.engine = service.store.engine
        self.clock = clock or service.clock
        self.batch = batch

    async def tick(self) -> int:
        """Fire every schedule that is due now; the number this scheduler fired."""
        now = self.clock.now_ms()
        async with self.engine.connect() as conn:
            due = (
                await conn.execute(
                    sa.select(task_schedules.c.name, task_schedules.c.next_run_ms)
                    .where(task_schedules.c.enabled.is_(True))
                    .where(task_schedules.c.next_run_ms <= now)
                    .order_by(task_schedules.c.next_run_ms)
                    .limit(self.batch)
                )
            ).all()
        fired = 0
        for name, tick_ms in due:
            if await self._fire(name, tick_ms, now):
                fired += 1
        return fired

    async def _fire(self, name: str, tick_ms: int, now_ms: int) -> bool:
        async with self.engine.begin() as conn:
            row = (
                (
                    await conn.execute(
                        sa.select(task_schedules).where(
                            task_schedules.c.name == name, task_schedules.c.next_run_ms == tick_ms
                        )
                    )
                )
                .mappings()
                .first()
            )
            if row is None:  # another scheduler fired this tick already
                return False
            schedule = _row_to_schedule(row)
            try:
                upcoming = next_fire(schedule.cron, schedule.timezone, max(tick_ms, now_ms))
                spec = schedule.task(tick_ms)
            except TaskError as exc:
                log.error("tasks.schedule_broken", schedule=name, error=str(exc))
                await self._disable(conn, name, tick_ms)
                return False
            claimed = await conn.execute(
                task_schedules.update()
                .where(task_schedules.c.name == name, task_schedules.c.next_run_ms == tick_ms)
                .values(next_run_ms=upcoming, last_run_ms=tick_ms)
            )
            if claimed.rowcount != 1:
                return False
            [submitted] = await self.service.submit(
                [spec], created_by=f"schedule:{name}", conn=conn
            )
        log.info(
            "tasks.schedule_fired",
            schedule=name,
            tick_ms=tick_ms,
            task_id=submitted.task_id,
            created=submitted.created,
            next_run_ms=upcoming,
        )
        return True

    @staticmethod
    async def _disable(conn: AsyncConnection, name: str, tick_ms: int) -> None:
        await conn.execute(
            task_schedules.update()
            .where(task_schedules.c.name == name, task_schedules.c.next_run_ms == tick_ms)
            .values(enabled=False)
        )

    async def run(self, stopping: asyncio.Event, interval: float = 1.0) -> None:
        """Tick every `interval` seconds until `stopping` is set; errors are logged, not fatal
        (the database may be restarting)."""
        while not stopping.is_set():
            try:
                await self.tick()
            except Exception as exc:
                log.warning("tasks.scheduler_failed", error=f"{type(exc).__name__}: {exc}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), interval)
