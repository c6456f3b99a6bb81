"""The task queue's Python client, used by applications and by other tenfold services.

client = TaskClient.from_engine(engine)
task_id = await client.submit({"task_type": "emails.send", "payload": {"to": "a@b.c"}})
result = await client.result(task_id, timeout=30)
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from tenfold.kernel.clock import SYSTEM_CLOCK, Clock
from tenfold.tasks.models import FINISHED, Status, Task, TaskSpec
from tenfold.tasks.service import TaskService
from tenfold.tasks.stores.notify import Notifier
from tenfold.tasks.stores.sql import SqlTaskStore


class TaskFailed(Exception):
    """The task ended dead or cancelled."""

    def __init__(self, task: Task) -> None:
        super().__init__(f"task {task.task_id} is {task.status.value}: {task.error_message}")
        self.task = task


class TaskClient:
    def __init__(self, service: TaskService) -> None:
        self.service = service

    @classmethod
    def from_engine(
        cls, engine: AsyncEngine, *, clock: Clock = SYSTEM_CLOCK, notifier: Notifier | None = None
    ) -> TaskClient:
        return cls(TaskService(SqlTaskStore(engine), clock=clock, notifier=notifier))

    async def submit(
        self,
        task: Mapping[str, Any] | TaskSpec,
        *,
        conn: AsyncConnection | None = None,
        created_by: str | None = None,
    ) -> str:
        """Submit one task; with `conn`, inside the caller's transaction (it exists only if
        that transaction commits). Returns the task id (the first one for a repeated
        idempotency key)."""
        return (await self.service.submit([task], conn=conn, created_by=created_by))[0].task_id

    async def submit_many(
        self,
        tasks: Sequence[Mapping[str, Any] | TaskSpec],
        *,
        conn: AsyncConnection | None = None,
        created_by: str | None = None,
    ) -> list[str]:
        """Submit many in one transaction and one round trip per table."""
        done = await self.service.submit(tasks, conn=conn, created_by=created_by)
        return [s.task_id for s in done]

    async def get(self, task_id: str) -> Task | None:
        return await self.service.get(task_id)

    async def result(self, task_id: str, *, wait: float = 30.0, poll: float = 0.05) -> Any:
        """Wait for the task to finish; its result, or TaskFailed."""
        async with asyncio.timeout(wait):
            while True:
                task = await self.service.get(task_id)
                if task is None:
                    raise LookupError(task_id)
                if task.status in FINISHED:
                    if task.status is Status.SUCCEEDED:
                        return task.result
                    raise TaskFailed(task)
                await asyncio.sleep(poll)

    async def cancel(self, task_id: str) -> Status | None:
        return await self.service.cancel(task_id)

    async def retry(self, task_id: str) -> Status | None:
        return await self.service.retry(task_id)
