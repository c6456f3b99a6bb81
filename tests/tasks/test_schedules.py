"""Cron schedules: time-zone-correct ticks across DST, clear errors, storage over SQLite and
PostgreSQL, and one firing per tick however many schedulers run."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st

from tenfold.kernel.clock import ManualClock
from tenfold.kernel.sql import create_engine
from tenfold.tasks.schedules import (
    ScheduleError,
    Scheduler,
    add_schedule,
    check_cron,
    get_schedule,
    list_schedules,
    next_fire,
    remove_schedule,
    set_enabled,
    zone,
)
from tenfold.tasks.service import TaskService
from tenfold.tasks.stores.sql import SqlTaskStore
from tenfold.tasks.tables import tasks

PARIS = ZoneInfo("Europe/Paris")


def ms(text: str) -> int:
    return int(datetime.fromisoformat(text).timestamp() * 1000)


def utc(value: int) -> str:
    return datetime.fromtimestamp(value / 1000, UTC).strftime("%Y-%m-%d %H:%M")


def ticks(cron: str, start: str, n: int, tz: str = "Europe/Paris") -> list[str]:
    """The next `n` ticks after `start`, as UTC wall times."""
    out, at = [], ms(start)
    for _ in range(n):
        at = next_fire(cron, tz, at)
        out.append(utc(at))
    return out


# -- time zones and DST ----------------------------------------------------------------


def test_a_daily_wall_clock_time_holds_across_both_dst_changes() -> None:
    # 09:00 in Paris is 08:00 UTC in winter and 07:00 UTC in summer.
    assert ticks("0 9 * * *", "2024-03-30T00:00:00+00:00", 3) == [
        "2024-03-30 08:00",
        "2024-03-31 07:00",  # clocks went forward that night
        "2024-04-01 07:00",
    ]
    assert ticks("0 9 * * *", "2024-10-26T00:00:00+00:00", 3) == [
        "2024-10-26 07:00",
        "2024-10-27 08:00",  # clocks went back that night
        "2024-10-28 08:00",
    ]


def test_a_tick_in_the_skipped_hour_runs_once_shifted_by_the_gap() -> None:
    # 31 March 2024: 02:00 -> 03:00 in Paris; 02:30 does not exist that day.
    assert ticks("30 2 * * *", "2024-03-30T00:00:00+00:00", 3) == [
        "2024-03-30 01:30",  # 02:30 CET
        "2024-03-31 01:30",  # 03:30 CEST, the gap-shifted 02:30
        "2024-04-01 00:30",  # 02:30 CEST
    ]


def test_a_tick_in_the_repeated_hour_runs_once() -> None:
    # 27 October 2024: 03:00 -> 02:00 in Paris; 02:30 happens twice, the job runs once.
    assert ticks("30 2 * * *", "2024-10-26T12:00:00+00:00", 2) == [
        "2024-10-27 00:30",  # the first 02:30 (CEST)
        "2024-10-28 01:30",
    ]


def test_an_hourly_schedule_keeps_firing_once_per_real_hour() -> None:
    assert ticks("0 * * * *", "2024-10-26T22:30:00+00:00", 5) == [
        "2024-10-26 23:00",  # 01:00 CEST
        "2024-10-27 00:00",  # 02:00 CEST
        "2024-10-27 01:00",  # 02:00 CET, the repeated hour
        "2024-10-27 02:00",  # 03:00 CET
        "2024-10-27 03:00",
    ]
    assert ticks("0 * * * *", "2024-03-30T23:30:00+00:00", 3) == [
        "2024-03-31 00:00",  # 01:00 CET
        "2024-03-31 01:00",  # 03:00 CEST: the skipped 02:00 is the same instant, once
        "2024-03-31 02:00",
    ]


def test_from_inside_the_repeated_hour_the_second_pass_is_still_found() -> None:
    # 02:40 CEST (first pass): the next hourly tick is 02:00 CET, twenty minutes later.
    assert ticks("0 * * * *", "2024-10-27T00:40:00+00:00", 1) == ["2024-10-27 01:00"]


@settings(max_examples=60, deadline=None)
@given(st.integers(ms("2020-01-01T00:00:00+00:00"), ms("2030-12-31T00:00:00+00:00")))
def test_next_fire_is_after_and_on_the_wall_clock(after: int) -> None:
    daily = next_fire("0 9 * * *", "Europe/Paris", after)
    local = datetime.fromtimestamp(daily / 1000, PARIS)
    assert after < daily <= after + 25 * 3_600_000
    assert (local.hour, local.minute) == (9, 0)
    hourly = next_fire("0 * * * *", "Europe/Paris", after)
    assert after < hourly <= after + 3_600_000 and hourly % 3_600_000 == 0


# -- bad input -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cron", "words"),
    [
        ("61 * * * *", "not a valid cron expression"),
        ("* * * *", "has 4 fields; expected 5"),
        ("* * * * * *", "has 6 fields; expected 5"),
        ("@reboot", "unknown alias"),
        ("every day", "fields; expected 5"),
    ],
)
def test_a_bad_cron_expression_is_a_clear_error(cron: str, words: str) -> None:
    with pytest.raises(ScheduleError) as err:
        check_cron(cron)
    assert err.value.field == "cron"
    assert words in str(err.value)


def test_aliases_and_spacing_are_normalised() -> None:
    assert check_cron("@Daily") == "@daily"
    assert check_cron(" 0  9 * *   1-5 ") == "0 9 * * 1-5"


@pytest.mark.parametrize("name", ["Mars/Olympus_Mons", "", "../../etc/passwd", "Europe/"])
def test_an_unknown_time_zone_is_a_clear_error(name: str) -> None:
    with pytest.raises(ScheduleError) as err:
        zone(name)
    assert err.value.field == "timezone"
    assert "IANA" in str(err.value)


# -- storage and firing, over both SQL backends ------------------------------------------


@pytest.fixture
async def service(db_url: str, clock: ManualClock) -> AsyncIterator[TaskService]:
    engine = create_engine(db_url)
    yield TaskService(SqlTaskStore(engine), clock=clock)
    await engine.dispose()


async def test_add_list_get_remove(service: TaskService, clock: ManualClock) -> None:
    engine = service.store.engine
    added = await add_schedule(
        engine,
        "reports.daily",
        "0 9 * * *",
        "reports.build",
        timezone="Europe/Paris",
        payload={"kind": "daily"},
        priority=2,
        queue="reports",
        clock=clock,
    )
    assert added.next_run_ms > clock.now_ms()
    assert datetime.fromtimestamp(added.next_run_ms / 1000, PARIS).hour == 9
    await add_schedule(engine, "cleanup", "*/5 * * * *", "cleanup", clock=clock)
    assert [s.name for s in await list_schedules(engine)] == ["cleanup", "reports.daily"]
    stored = await get_schedule(engine, "reports.daily")
    assert stored == added
    with pytest.raises(ScheduleError) as err:
        await add_schedule(engine, "cleanup", "0 * * * *", "cleanup", clock=clock)
    assert err.value.field == "name"
    replaced = await add_schedule(
        engine, "cleanup", "0 * * * *", "cleanup", replace=True, clock=clock
    )
    assert (await get_schedule(engine, "cleanup")) == replaced
    assert await remove_schedule(engine, "cleanup") is True
    assert await remove_schedule(engine, "cleanup") is False
    assert await get_schedule(engine, "cleanup") is None


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"name": "bad name"}, "name"),
        ({"cron": "0 25 * * *"}, "cron"),
        ({"timezone": "Nowhere/City"}, "timezone"),
        ({"priority": 11}, "priority"),
        ({"timeout_seconds": 0}, "timeout_seconds"),
        ({"payload": {"x": object()}}, "payload"),
        ({"task_type": ""}, "task_type"),
    ],
)
async def test_a_bad_schedule_is_rejected_and_nothing_is_stored(
    service: TaskService, clock: ManualClock, kwargs: dict[str, object], field: str
) -> None:
    args: dict[str, object] = {"name": "n", "cron": "* * * * *", "task_type": "t"}
    args.update(kwargs)
    with pytest.raises(ScheduleError) as err:
        await add_schedule(service.store.engine, clock=clock, **args)  # type: ignore[arg-type]
    assert err.value.field == field
    assert await list_schedules(service.store.engine) == []


async def test_three_schedulers_fire_each_tick_exactly_once(
    db_url: str, clock: ManualClock
) -> None:
    engines = [create_engine(db_url) for _ in range(3)]
    schedulers = [Scheduler(TaskService(SqlTaskStore(e), clock=clock)) for e in engines]
    every = await add_schedule(
        engines[0], "every", "* * * * *", "beat", payload={"n": 1}, priority=3, clock=clock
    )
    await add_schedule(engines[0], "even", "*/2 * * * *", "beat", clock=clock)
    fired: list[int] = []
    expected_even = 0
    clock.set(every.next_run_ms / 1000)
    for _ in range(20):
        if (clock.now_ms() // 60_000) % 2 == 0:
            expected_even += 1
        counts = await asyncio.gather(*(s.tick() for s in schedulers))
        fired.append(sum(counts))
        clock.advance(60)
    assert sum(fired) == 20 + expected_even
    async with engines[0].connect() as conn:
        rows = (
            await conn.execute(
                sa.select(tasks.c.idempotency_key, tasks.c.priority, tasks.c.payload)
                .where(tasks.c.idempotency_key.like("schedule:every:%"))
                .order_by(tasks.c.idempotency_key)
            )
        ).all()
        even = (
            await conn.execute(
                sa.select(sa.func.count()).where(tasks.c.idempotency_key.like("schedule:even:%"))
            )
        ).scalar()
    assert [int(key.rsplit(":", 1)[1]) for key, _, _ in rows] == [
        every.next_run_ms + i * 60_000 for i in range(20)
    ]
    assert {(priority, payload) for _, priority, payload in rows} == {(3, '{"n":1}')}
    assert even == expected_even
    for engine in engines:
        await engine.dispose()


async def test_missed_ticks_are_coalesced(service: TaskService, clock: ManualClock) -> None:
    engine = service.store.engine
    added = await add_schedule(engine, "m", "* * * * *", "beat", clock=clock)
    clock.set(added.next_run_ms / 1000 + 5 * 60 + 30)  # five and a half minutes late
    scheduler = Scheduler(service)
    assert await scheduler.tick() == 1
    assert await scheduler.tick() == 0
    after = await get_schedule(engine, "m")
    assert after is not None
    assert after.last_run_ms == added.next_run_ms
    assert after.next_run_ms == added.next_run_ms + 6 * 60_000  # the next one in the future
    assert len(await service.store.list_tasks()) == 1


async def test_a_disabled_schedule_does_not_fire(service: TaskService, clock: ManualClock) -> None:
    engine = service.store.engine
    added = await add_schedule(engine, "off", "* * * * *", "beat", enabled=False, clock=clock)
    clock.set(added.next_run_ms / 1000)
    scheduler = Scheduler(service)
    assert await scheduler.tick() == 0
    assert await set_enabled(engine, "off", True) is True
    assert await scheduler.tick() == 1
    [task] = await service.store.list_tasks()
    assert task.task_type == "beat"
    assert task.created_by == "schedule:off"
    assert await set_enabled(engine, "nope", True) is False


async def test_run_fires_on_the_real_clock_until_stopped(db_url: str) -> None:
    engine = create_engine(db_url)
    service = TaskService(SqlTaskStore(engine))
    added = await add_schedule(engine, "soon", "* * * * *", "beat")
    # Make it due now rather than at the next minute.
    async with engine.begin() as conn:
        from tenfold.tasks.tables import task_schedules

        await conn.execute(
            task_schedules.update().values(next_run_ms=added.next_run_ms - 60_000 * 5)
        )
    stopping = asyncio.Event()
    runner = asyncio.create_task(Scheduler(service).run(stopping, interval=0.05))
    deadline = asyncio.get_running_loop().time() + 10
    while not await service.store.list_tasks():
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.02)
    stopping.set()
    await asyncio.wait_for(runner, 5)
    assert len(await service.store.list_tasks()) == 1
    await engine.dispose()


def test_every_minute_across_the_repeated_hour_is_one_real_minute_apart() -> None:
    at = ms("2024-10-27T00:30:00+00:00")  # 02:30 CEST, half-way through the first pass
    seen = []
    for _ in range(60):
        at = next_fire("* * * * *", "Europe/Paris", at)
        seen.append(at)
    assert all(b - a == 60_000 for a, b in itertools.pairwise(seen))
    assert utc(seen[-1]) == "2024-10-27 01:30"  # 02:30 CET, the second pass


def test_ticks_shifted_out_of_the_skipped_hour_keep_real_time_order() -> None:
    # 02:10 and 02:45 do not exist on 31 March 2024; shifted they are 03:10 and 03:45,
    # which the schedule also names: each instant fires once, in order.
    assert ticks("10,45 2,3 * * *", "2024-03-31T00:50:00+00:00", 3) == [
        "2024-03-31 01:10",
        "2024-03-31 01:45",
        "2024-04-01 00:10",
    ]
