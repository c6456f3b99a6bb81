"""Task queue (spec Problem 4): the public surface other code may import."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tenfold.tasks.client import TaskClient, TaskFailed
from tenfold.tasks.models import RetryPolicy, Status, Task, TaskError, TaskSpec
from tenfold.tasks.registry import NonRetryable, TaskRegistry
from tenfold.tasks.service_tasks import SERVICE_QUEUE, ServiceTasks, service_tasks

if TYPE_CHECKING:
    from tenfold.kernel.runtime import Mount, Runtime

__all__ = [
    "SERVICE_QUEUE",
    "NonRetryable",
    "RetryPolicy",
    "ServiceTasks",
    "Status",
    "Task",
    "TaskClient",
    "TaskError",
    "TaskFailed",
    "TaskRegistry",
    "TaskSpec",
    "mount",
    "service_tasks",
]


def mount(runtime: Runtime) -> Mount:
    from tenfold.tasks.api import mount as _mount

    return _mount(runtime)
