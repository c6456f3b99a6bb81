"""Task queue use cases: submit, inspect, cancel, re-drive, sweep expired leases, statistics."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import structlog
from prometheus_client import Counter, Gauge, Histogram
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from tenfold.kernel.clock import SYSTEM_CLOCK, Clock
from tenfold.kernel.telemetry import REGISTRY
from tenfold.tasks.models import (
    MAX_BATCH,
    Status,
    Task,
    TaskError,
    TaskSpec,
    find_cycle,
    validate,
)
from tenfold.tasks.stores.notify import LocalNotifier, Notifier
from tenfold.tasks.stores.sql import NotRedrivable, SqlTaskStore, UnknownDependency

log = structlog.get_logger(__name__)

SUBMITTED = Counter(
    "tenfold_tasks_submitted_total", "Tasks submitted.", ("queue",), registry=REGISTRY
)
FINISHED_TOTAL = Counter(
    "tenfold_tasks_finished_total",
    "Task attempts finished, by outcome (succeeded, failed, retried, dead, lost, timeout).",
    ("queue", "outcome"),
    registry=REGISTRY,
)
DEPTH = Gauge(
    "tenfold_tasks_depth",
    "Tasks not finished, by queue, priority and status (refreshed by the stats call).",
    ("queue", "priority", "status"),
    registry=REGISTRY,
)
DEAD = Gauge("tenfold_tasks_dead", "Tasks in the dead letter state.", registry=REGISTRY)
WAIT_SECONDS = Histogram(
    "tenfold_tasks_wait_seconds",
    "Time from due to started.",
    ("queue",),
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
    registry=REGISTRY,
)
RUN_SECONDS = Histogram(
    "tenfold_tasks_run_seconds",
    "Time a task's attempt ran.",
    ("queue",),
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 60, 300, 1800, 3600, 86400),
    registry=REGISTRY,
)

WORKER_ALIVE_MS = 30_000  # a worker silent for this long is not listed as active


class TaskConflict(Exception):
    """The task is in a state that does not allow this action."""

    def __init__(self, task_id: str, status: Status, action: str) -> None:
        super().__init__(f"task {task_id} is {status.value}; it cannot be {action}")
        self.status = status


@dataclass(frozen=True, slots=True)
class Submitted:
    task_id: str
    created: bool  # False: the idempotency key matched an earlier task
    status: Status | None = None


class TaskService:
    def __init__(
        self,
        store: SqlTaskStore,
        *,
        clock: Clock = SYSTEM_CLOCK,
        notifier: Notifier | None = None,
    ) -> None:
        self.store = store
        self.clock = clock
        self.notifier: Notifier = notifier or LocalNotifier()

    async def submit(
        self,
        raw: Sequence[Mapping[str, Any] | TaskSpec],
        *,
        created_by: str | None = None,
        conn: AsyncConnection | None = None,
    ) -> list[Submitted]:
        """Validate and insert a batch (a DAG may reference its own members by `ref`)."""
        if not raw:
            return []
        if len(raw) > MAX_BATCH:
            raise TaskError("tasks", f"at most {MAX_BATCH} per call")
        specs = []
        for i, item in enumerate(raw):
            try:
                specs.append(item if isinstance(item, TaskSpec) else validate(item))
            except TaskError as exc:
                field = exc.field if len(raw) == 1 else f"tasks[{i}].{exc.field}"
                raise TaskError(field, exc.message) from None
        refs = [s.ref for s in specs if s.ref]
        if len(refs) != len(set(refs)):
            raise TaskError("ref", "each ref must be unique within a batch")
        edges = {s.ref or f"#{i}": list(s.dependencies) for i, s in enumerate(specs)}
        cycle = find_cycle(edges)
        if cycle is not None:
            raise TaskError("dependencies", "cycle: " + " -> ".join(cycle))
        now = self.clock.now_ms()
        try:
            result = await self._insert(specs, now, created_by, conn)
        except IntegrityError:
            # Two submits raced with one idempotency key: the loser's insert broke the unique
            # index; a second try finds the winner's task. (In a caller's transaction the
            # caller must retry: that transaction is now aborted.)
            if conn is not None or not any(s.idempotency_key for s in specs):
                raise
            result = await self._insert(specs, now, created_by, None)
        for queue in {s.queue for s in specs}:
            self.notifier.after_commit(queue)
        for spec, (_, created) in zip(specs, result, strict=True):
            if created:
                SUBMITTED.labels(spec.queue).inc()
        return [Submitted(task_id, created) for task_id, created in result]

    async def _insert(
        self,
        specs: Sequence[TaskSpec],
        now: int,
        created_by: str | None,
        conn: AsyncConnection | None,
    ) -> list[tuple[str, bool]]:
        try:
            if conn is not None:
                result = await self.store.submit(specs, now, created_by=created_by, conn=conn)
                for queue in {s.queue for s in specs}:
                    await self.notifier.notify(conn, queue)
            else:
                async with self.store.engine.begin() as own:
                    result = await self.store.submit(specs, now, created_by=created_by, conn=own)
                    for queue in {s.queue for s in specs}:
                        await self.notifier.notify(own, queue)
        except UnknownDependency as exc:
            raise TaskError("dependencies", f"unknown task {exc.task_id}") from None
        return result

    async def get(self, task_id: str) -> Task | None:
        return await self.store.get(task_id)

    async def cancel(self, task_id: str) -> Status | None:
        status = await self.store.cancel(task_id, self.clock.now_ms())
        if status is not None and status in (Status.SUCCEEDED, Status.DEAD):
            raise TaskConflict(task_id, status, "cancelled")
        return status

    async def retry(self, task_id: str) -> Status | None:
        """Re-drive a dead or cancelled task; TaskConflict if it cannot be, None if unknown."""
        try:
            status = await self.store.retry(task_id, self.clock.now_ms())
        except NotRedrivable as exc:
            raise TaskConflict(task_id, exc.status, f"re-driven: {exc}") from None
        if status is not None:
            self.notifier.after_commit("*")
        return status

    async def sweep(self) -> int:
        """Re-queue (or kill) tasks whose lease expired."""
        expired = await self.store.expire_leases(self.clock.now_ms())
        for task_id, status in expired:
            log.warning("tasks.lease_expired", task_id=task_id, now=status.value)
        if expired:
            self.notifier.after_commit("*")
        return len(expired)

    async def stats(self) -> dict[str, Any]:
        now = self.clock.now_ms()
        raw = await self.store.stats(now)
        workers = await self.store.workers(now - WORKER_ALIVE_MS)
        queues: dict[tuple[str, int], dict[str, Any]] = {}

        def entry(queue: str, priority: int) -> dict[str, Any]:
            return queues.setdefault(
                (queue, priority),
                {
                    "queue": queue,
                    "priority": priority,
                    "pending_tasks": 0,
                    "scheduled_tasks": 0,
                    "waiting_tasks": 0,
                    "processing_tasks": 0,
                    "average_wait_time": 0.0,
                    "tasks_per_minute": 0,
                },
            )

        DEPTH.clear()
        for queue, priority, status, count in raw["depth"]:
            key = {
                "pending": "pending_tasks",
                "scheduled": "scheduled_tasks",
                "waiting": "waiting_tasks",
                "running": "processing_tasks",
            }[status]
            entry(queue, priority)[key] += count
            DEPTH.labels(queue, str(priority), status).set(count)
        for queue, priority, _count, avg_wait, succeeded in raw["recent"]:
            e = entry(queue, priority)
            e["average_wait_time"] = round(float(avg_wait or 0) / 1000, 3)
            e["tasks_per_minute"] = int(succeeded or 0)
        DEAD.set(raw["dead"])
        served: set[str] = set()
        for w in workers:
            types = orjson.loads(w["task_types"])
            served.update(types if types else ["*"])
        unroutable = (
            {}
            if "*" in served
            else {t: n for t, n in raw["ready_by_type"].items() if t not in served}
        )
        paused = await self.store.paused()
        return {
            "queues": sorted(queues.values(), key=lambda e: (e["queue"], e["priority"])),
            "total_workers": len(workers),
            "dead_letter_tasks": raw["dead"],
            "unroutable": [{"task_type": t, "tasks": n} for t, n in sorted(unroutable.items())],
            "paused_queues": sorted(paused),
        }

    async def workers(self) -> list[dict[str, Any]]:
        return await self.store.workers(self.clock.now_ms() - WORKER_ALIVE_MS)
