"""Service tasks: the background work of tenfold's own services, run on the task queue.

A service declares its tasks at mount time, as closures over its own objects, on the
`ServiceTasks` registry of the runtime it is mounted in (`tenfold.tasks.service_tasks`):

    tasks = service_tasks(runtime)

    @tasks.task("shortener.recheck", timeout=600)
    async def recheck(batch: int = 500) -> int:
        return await service.recheck_links(batch)

    tasks.schedule("shortener.recheck", "*/15 * * * *", recheck)

Who runs them: every process that serves the tasks service runs a small built-in worker for
these task types (queue `tenfold`) and fires due cron schedules, once some service has
registered a task (`TENFOLD_TASKS_SERVICE_WORKER=false` turns that off); `tenfold worker`
mounts the configured services and runs them too (`--no-service-tasks` turns that off). Each
declared schedule is created at start if missing; an existing one keeps its next run.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
import structlog

from tenfold.tasks.models import (
    MAX_RETRIES_DEFAULT,
    PRIORITY_DEFAULT,
    TIMEOUT_DEFAULT,
    RetryPolicy,
)
from tenfold.tasks.registry import TaskDef, TaskRegistry
from tenfold.tasks.schedules import NAME_PATTERN, ScheduleError, check_cron, zone

if TYPE_CHECKING:
    from tenfold.kernel.runtime import Runtime
    from tenfold.settings import Settings
    from tenfold.tasks.worker import Worker

log = structlog.get_logger(__name__)

SERVICE_QUEUE = "tenfold"  # the queue service tasks go to unless they name another
SERVICE_POOL = "service"  # the built-in worker's pool id in GET /api/v1/workers
SCHEDULE_SECONDS = 1.0
RUNTIME_KEY = "tasks:service-tasks"


@dataclass(frozen=True, slots=True)
class ServiceSchedule:
    """A cron schedule a service declared for one of its tasks."""

    name: str
    cron: str
    task: TaskDef
    timezone: str = "UTC"
    payload: Any = field(default_factory=dict)


class ServiceTasks(TaskRegistry):
    """The task types and schedules of the tenfold services mounted in one runtime."""

    def __init__(self, runtime: Runtime) -> None:
        super().__init__()
        self.runtime = runtime
        self.schedules: dict[str, ServiceSchedule] = {}
        self._worker: Worker | None = None
        self._running: list[asyncio.Task[Any]] = []
        self._stopping = asyncio.Event()
        self._starting = asyncio.Lock()
        self.autostart = True  # False: `tenfold worker` starts them itself, not the tasks mount

    def task(
        self,
        name: str | None = None,
        *,
        queue: str = SERVICE_QUEUE,
        priority: int = PRIORITY_DEFAULT,
        max_retries: int = MAX_RETRIES_DEFAULT,
        timeout: int = TIMEOUT_DEFAULT,
        retry: RetryPolicy | None = None,
        non_retryable: tuple[type[BaseException], ...] = (),
        resources: tuple[str, ...] = (),
    ) -> Callable[[Callable[..., Any]], TaskDef]:
        """`TaskRegistry.task`, on the `tenfold` queue by default."""
        return super().task(
            name,
            queue=queue,
            priority=priority,
            max_retries=max_retries,
            timeout=timeout,
            retry=retry,
            non_retryable=non_retryable,
            resources=resources,
        )

    def schedule(
        self,
        name: str,
        cron: str,
        task: TaskDef | str,
        *,
        timezone: str = "UTC",
        payload: Any = None,
    ) -> ServiceSchedule:
        """Declare a cron schedule for one of these tasks. It is created when the service
        tasks start, unless a schedule of that name exists (its next run is then kept)."""
        definition = self.tasks.get(task) if isinstance(task, str) else task
        if definition is None or self.tasks.get(definition.name) is not definition:
            raise ScheduleError("task_type", f"{task!r} is not a task of this registry")
        if not NAME_PATTERN.fullmatch(name):
            raise ScheduleError(
                "name",
                "must be 1 to 100 letters, digits or . _ : - (starting with a letter or digit)",
            )
        if name in self.schedules:
            raise ScheduleError("name", f"schedule {name!r} is declared twice")
        zone(timezone)
        declared = ServiceSchedule(
            name, check_cron(cron), definition, timezone, {} if payload is None else payload
        )
        self.schedules[name] = declared
        return declared

    def queues(self) -> tuple[str, ...]:
        return tuple(sorted({d.queue for d in self.tasks.values()}))

    @property
    def running(self) -> bool:
        return self._worker is not None

    # -- running them -------------------------------------------------------------------

    async def start(self, *, schedules: bool = True) -> None:
        """Create missing schedules, then run the built-in worker for these tasks (and, with
        `schedules`, a scheduler firing due cron schedules). Once per runtime; nothing when no
        service registered a task."""
        async with self._starting:
            if self._worker is not None or not self.tasks:
                return
            from tenfold.tasks.api import service_for
            from tenfold.tasks.schedules import Scheduler
            from tenfold.tasks.worker import Worker

            runtime = self.runtime
            service = service_for(runtime)
            for declared in self.schedules.values():
                await self._ensure(declared)
            self._stopping.clear()
            self._worker = Worker(
                service.store,
                self,
                queues=self.queues(),
                concurrency=runtime.settings.tasks_concurrency,
                notifier=service.notifier,
                clock=runtime.clock,
                pool=SERVICE_POOL,
            )
            self._running = [runtime.spawn(self._worker.run(), "tasks-service-worker")]
            if schedules:
                scheduler = Scheduler(service, clock=runtime.clock)
                self._running.append(
                    runtime.spawn(
                        scheduler.run(self._stopping, SCHEDULE_SECONDS), "tasks-service-schedules"
                    )
                )
            log.info(
                "tasks.service_tasks_started",
                task_types=self.names(),
                schedules=sorted(self.schedules),
                fires_schedules=schedules,
            )

    async def stop(self) -> None:
        """Stop claiming, let running tasks finish (up to the worker's grace), stop firing."""
        worker, self._worker = self._worker, None
        if worker is None:
            return
        worker.stop()
        self._stopping.set()
        running, self._running = self._running, []
        for task in running:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, worker.cancel_grace + 5)

    async def _ensure(self, declared: ServiceSchedule) -> None:
        """Create the schedule if it is missing; never touch an existing one."""
        from tenfold.tasks.schedules import add_schedule, get_schedule

        engine = self.runtime.engine
        existing = await get_schedule(engine, declared.name)
        if existing is None:
            definition = declared.task
            try:
                await add_schedule(
                    engine,
                    declared.name,
                    declared.cron,
                    definition.name,
                    timezone=declared.timezone,
                    payload=declared.payload,
                    priority=definition.priority,
                    queue=definition.queue,
                    max_retries=definition.max_retries,
                    timeout_seconds=definition.timeout_seconds,
                    clock=self.runtime.clock,
                )
                log.info("tasks.service_schedule_created", schedule=declared.name)
                return
            except (ScheduleError, sa.exc.IntegrityError):
                # Another process created it first (that is fine); anything else is real.
                existing = await get_schedule(engine, declared.name)
                if existing is None:
                    raise
        if (existing.cron, existing.timezone, existing.task_type) != (
            declared.cron,
            declared.timezone,
            declared.task.name,
        ):
            log.warning(
                "tasks.service_schedule_differs",
                schedule=declared.name,
                stored=f"{existing.cron} {existing.timezone} {existing.task_type}",
                declared=f"{declared.cron} {declared.timezone} {declared.task.name}",
                hint="the stored schedule is kept; remove it to have it recreated at next start",
            )


def service_tasks(runtime: Runtime) -> ServiceTasks:
    """The service tasks of `runtime` (created on first use, bound to its task client)."""
    existing = runtime.services.get(RUNTIME_KEY)
    if isinstance(existing, ServiceTasks):
        return existing
    from tenfold.tasks.api import service_for
    from tenfold.tasks.client import TaskClient

    registry = ServiceTasks(runtime)
    registry.bind(TaskClient(service_for(runtime)))
    runtime.services[RUNTIME_KEY] = registry
    return registry


def service_worker_enabled(settings: Settings) -> bool:
    """Whether `tenfold serve` runs the service tasks itself (TENFOLD_TASKS_SERVICE_WORKER)."""
    return settings.tasks_service_worker


@contextlib.asynccontextmanager
async def hosted(settings: Settings, *, schedules: bool) -> AsyncIterator[ServiceTasks]:
    """For `tenfold worker`: mount the configured services without HTTP, start them, and run
    their service tasks until the block ends. The application registry of `tasks_app` is not
    run here (the worker runs `--app` itself)."""
    from tenfold.app import load_mounts
    from tenfold.kernel.runtime import Runtime

    runtime = Runtime.from_settings(settings.model_copy(update={"tasks_app": ""}))
    async with run_mounted(runtime, load_mounts, schedules=schedules) as registry:
        yield registry


@contextlib.asynccontextmanager
async def run_mounted(
    runtime: Runtime, mount_all: Callable[[Runtime], list[Any]], *, schedules: bool
) -> AsyncIterator[ServiceTasks]:
    """Mount with `mount_all`, run the start hooks and the service tasks; undo on exit."""
    started: list[Any] = []
    registry = service_tasks(runtime)
    registry.autostart = False
    try:
        for mount in mount_all(runtime):
            started.append(mount)
            for hook in mount.on_start:
                await hook()
        await registry.start(schedules=schedules)
        yield registry
    finally:
        await registry.stop()
        for mount in reversed(started):
            for hook in mount.on_stop:
                with contextlib.suppress(Exception):
                    await hook()
        await runtime.close()
