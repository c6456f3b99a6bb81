"""Service tasks: tenfold's own services declare tasks and schedules at mount time; the
server runs them without a separate worker, and `tenfold worker` can run them too."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from types import SimpleNamespace
from typing import Any

import pytest
import sqlalchemy as sa

from tenfold.kernel.clock import ManualClock
from tenfold.kernel.runtime import Mount, Runtime
from tenfold.tasks import SERVICE_QUEUE, ServiceTasks, TaskClient, service_tasks
from tenfold.tasks.api import service_for
from tenfold.tasks.registry import TaskDef
from tenfold.tasks.schedules import ScheduleError, Scheduler, get_schedule
from tenfold.tasks.service_tasks import SERVICE_POOL, run_mounted, service_worker_enabled
from tenfold.tasks.tables import task_schedules, tasks
from tests.conftest import make_settings, serve_app


class Links:
    """Stands in for a mounted service (the URL shortener's blocklist re-check)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.checked: list[int] = []
        self.changed = asyncio.Event()

    async def recheck(self, batch: int) -> str:
        self.checked.append(batch)
        self.changed.set()
        return self.name


def declare(runtime: Runtime, links: Links) -> TaskDef:
    """What a service's mount() does: a task closing over the service, and its schedule."""
    registry = service_tasks(runtime)

    @registry.task("links.recheck", timeout=60)
    async def recheck(batch: int = 100) -> str:
        return await links.recheck(batch)

    registry.schedule("links.recheck", "* * * * *", recheck, payload={"batch": 7})
    return recheck


async def until(check: Callable[[], Awaitable[bool]], seconds: float = 15.0) -> None:
    """Poll a database condition (another runtime changes it: no event to wait on here)."""
    deadline = time.monotonic() + seconds
    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


@asynccontextmanager
async def server(settings: dict[str, Any], clock: ManualClock, links: Links) -> AsyncIterator[Any]:
    """`tenfold serve` (its app and lifespan) with one service that declares a task."""
    from tenfold.app import build_app

    runtime = Runtime.from_settings(make_settings(**settings, services=["tasks"]), clock)
    declare(runtime, links)
    app = build_app(runtime.settings, runtime=runtime)
    async with app.router.lifespan_context(app):
        yield runtime


# -- declaring -------------------------------------------------------------------------


async def test_declarations_are_checked_when_made(tmp_path: Any) -> None:
    runtime = Runtime.from_settings(make_settings(data_dir=str(tmp_path)))
    try:
        registry = service_tasks(runtime)
        assert service_tasks(runtime) is registry  # one per runtime
        assert isinstance(registry, ServiceTasks)

        @registry.task("links.recheck")
        async def recheck() -> None: ...

        assert recheck.queue == SERVICE_QUEUE
        with pytest.raises(ScheduleError) as err:
            registry.schedule("s", "* * *", recheck)
        assert err.value.field == "cron"
        with pytest.raises(ScheduleError) as err:
            registry.schedule("s", "* * * * *", recheck, timezone="Mars/Olympus")
        assert err.value.field == "timezone"
        with pytest.raises(ScheduleError) as err:
            registry.schedule("s", "* * * * *", "links.unknown")
        assert err.value.field == "task_type"
        with pytest.raises(ScheduleError) as err:
            registry.schedule("bad name", "* * * * *", recheck)
        assert err.value.field == "name"
        registry.schedule("s", "@hourly", "links.recheck")
        with pytest.raises(ScheduleError, match="declared twice"):
            registry.schedule("s", "@hourly", recheck)
    finally:
        await runtime.close()


# -- the server runs them --------------------------------------------------------------


async def test_a_service_task_runs_in_the_server_with_no_worker(
    stack: dict[str, str], clock: ManualClock
) -> None:
    links = Links("server")
    async with server(stack, clock, links) as runtime:
        registry = service_tasks(runtime)
        task_id = await registry["links.recheck"].submit({"batch": 3})
        async with asyncio.timeout(15):
            await links.changed.wait()
        client = TaskClient(service_for(runtime))
        assert await client.result(task_id, wait=15) == "server"
        assert links.checked == [3]
        task = await client.get(task_id)
        assert task is not None and task.queue == SERVICE_QUEUE
        workers = await service_for(runtime).workers()
        assert [w["pool_id"] for w in workers] == [SERVICE_POOL]
    assert not registry.running


async def test_a_service_schedule_fires_once_per_tick_across_two_servers(
    stack: dict[str, str], clock: ManualClock
) -> None:
    one, two = Links("one"), Links("two")
    async with AsyncExitStack() as running:
        first = await running.enter_async_context(server(stack, clock, one))
        declared = await get_schedule(first.engine, "links.recheck")
        assert declared is not None and declared.queue == SERVICE_QUEUE
        assert declared.payload == {"batch": 7}
        second = await running.enter_async_context(server(stack, clock, two))
        assert await get_schedule(second.engine, "links.recheck") == declared  # not re-created
        services = [service_for(first), service_for(second)]
        tick = declared.next_run_ms
        for n in range(1, 4):
            clock.set(tick / 1000)
            # Beside the servers' own schedulers, two more race for the same tick.
            await asyncio.gather(*(Scheduler(s).tick() for s in services))

            async def fired(tick: int = tick) -> bool:
                async with first.engine.connect() as conn:
                    status = (
                        await conn.execute(
                            sa.select(tasks.c.status).where(
                                tasks.c.idempotency_key == f"schedule:links.recheck:{tick}"
                            )
                        )
                    ).scalar()
                return bool(status == "succeeded")

            await until(fired)
            async with first.engine.connect() as conn:
                count = (
                    await conn.execute(
                        sa.select(sa.func.count()).where(
                            tasks.c.created_by == "schedule:links.recheck"
                        )
                    )
                ).scalar()
            assert count == n
            assert one.checked + two.checked == [7] * n
            stored = await get_schedule(first.engine, "links.recheck")
            assert stored is not None and stored.next_run_ms == tick + 60_000
            tick = stored.next_run_ms


async def test_start_keeps_an_existing_schedule_and_its_next_run(
    stack: dict[str, str], clock: ManualClock
) -> None:
    settings = make_settings(**stack, services=["tasks"])
    runtime = Runtime.from_settings(settings, clock)
    try:
        declare(runtime, Links("x"))
        registry = service_tasks(runtime)
        await registry.start(schedules=False)
        created = await get_schedule(runtime.engine, "links.recheck")
        assert created is not None
        await registry.stop()
        # An operator paused it and it is overdue: a restart changes neither.
        async with runtime.engine.begin() as conn:
            await conn.execute(
                task_schedules.update().values(enabled=False, next_run_ms=created.next_run_ms)
            )
        clock.advance(3_600)
        again = Runtime.from_settings(settings, clock)
        try:
            declare(again, Links("y"))
            await service_tasks(again).start(schedules=False)
            kept = await get_schedule(again.engine, "links.recheck")
            assert kept is not None
            assert (kept.next_run_ms, kept.enabled, kept.created_at_ms) == (
                created.next_run_ms,
                False,
                created.created_at_ms,
            )
            await service_tasks(again).stop()
        finally:
            await again.close()
    finally:
        await runtime.close()


# -- `tenfold worker` runs them too ----------------------------------------------------


async def test_the_worker_host_runs_service_tasks_and_leaves_schedules_to_the_pool(
    stack: dict[str, str], clock: ManualClock
) -> None:
    from tenfold.tasks import mount as tasks_mount

    links = Links("worker")
    runtime = Runtime.from_settings(make_settings(**stack, services=["tasks"]), clock)

    def mount_all(rt: Runtime) -> list[Mount]:  # what load_mounts does with a service
        declare(rt, links)
        return [tasks_mount(rt)]

    async with run_mounted(runtime, mount_all, schedules=False) as registry:
        assert registry.running
        assert await get_schedule(runtime.engine, "links.recheck") is not None
        task_id = await registry["links.recheck"].submit({"batch": 5})
        client = TaskClient(service_for(runtime))
        assert await client.result(task_id, wait=15) == "worker"
        assert links.checked == [5]
        workers = await service_for(runtime).workers()
        assert [w["pool_id"] for w in workers] == [SERVICE_POOL]  # one, not the mount's too
    assert not registry.running


def test_the_worker_runs_service_tasks_unless_told_not_to() -> None:
    from tenfold.tasks.supervisor import WorkerOptions

    assert WorkerOptions.build("tests.tasks.apps.naps:registry").service_tasks is True
    off = WorkerOptions.build("tests.tasks.apps.naps:registry", service_tasks=False)
    assert WorkerOptions.from_json(off.to_json()) == off


async def test_a_server_with_no_service_tasks_runs_no_extra_worker(
    tmp_path: Any, sqlite_template: Any
) -> None:
    settings = make_settings(
        data_dir=str(tmp_path),
        database_url=sqlite_template.clone(tmp_path / "db.sqlite"),
        services=["tasks"],
    )
    async with serve_app(settings) as (app, _):
        runtime = app.state.runtime
        assert not service_tasks(runtime).running
        assert await service_for(runtime).workers() == []


def test_a_setting_can_turn_the_servers_built_in_worker_off() -> None:
    # TENFOLD_TASKS_SERVICE_WORKER (default true); read with a default until Settings has it.
    assert service_worker_enabled(make_settings()) is True
    off = SimpleNamespace(tasks_service_worker=False)
    assert service_worker_enabled(off) is False  # type: ignore[arg-type]
