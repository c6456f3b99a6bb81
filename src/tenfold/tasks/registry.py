"""Task registration: `@tasks.task(...)` turns a function into a task type."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tenfold.tasks.models import (
    MAX_RETRIES_DEFAULT,
    PRIORITY_DEFAULT,
    TIMEOUT_DEFAULT,
    RetryPolicy,
)

if TYPE_CHECKING:
    from tenfold.tasks.client import TaskClient


class NonRetryable(Exception):
    """Raise (or subclass) to fail a task at once, skipping its remaining retries."""


@dataclass
class TaskDef:
    """A registered task type and its defaults."""

    name: str
    fn: Callable[..., Any]
    queue: str = "default"
    priority: int = PRIORITY_DEFAULT
    max_retries: int = MAX_RETRIES_DEFAULT
    timeout_seconds: int = TIMEOUT_DEFAULT
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    resources: tuple[str, ...] = ()
    registry: TaskRegistry | None = None

    def __post_init__(self) -> None:
        self.is_async = inspect.iscoroutinefunction(self.fn)
        params = inspect.signature(self.fn).parameters
        self.wants_context = "ctx" in params

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Calling the function directly runs it here, now (handy in tests)."""
        return self.fn(*args, **kwargs)

    def options(self, **overrides: Any) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "task_type": self.name,
            "queue": self.queue,
            "priority": self.priority,
            "max_retries": self.max_retries,
            "timeout_seconds": self.timeout_seconds,
            "resources": list(self.resources),
        }
        spec.update({k: v for k, v in overrides.items() if v is not None})
        return spec

    def _client(self) -> TaskClient:
        if self.registry is None or self.registry.client is None:
            raise RuntimeError(
                f"task {self.name!r} has no client; call registry.bind(client) or submit "
                "through a TaskClient"
            )
        return self.registry.client

    async def submit(self, payload: Any = None, /, **options: Any) -> str:
        """Submit with this task's defaults; `options` override them (priority, queue, ...)."""
        return await self._client().submit(self.options(payload=payload or {}, **options))


class TaskRegistry:
    """The task types this program can run. Workers claim only these."""

    def __init__(self) -> None:
        self.tasks: dict[str, TaskDef] = {}
        self.client: TaskClient | None = None

    def task(
        self,
        name: str | None = None,
        *,
        queue: str = "default",
        priority: int = PRIORITY_DEFAULT,
        max_retries: int = MAX_RETRIES_DEFAULT,
        timeout: int = TIMEOUT_DEFAULT,
        retry: RetryPolicy | None = None,
        non_retryable: tuple[type[BaseException], ...] = (),
        resources: tuple[str, ...] = (),
    ) -> Callable[[Callable[..., Any]], TaskDef]:
        def register(fn: Callable[..., Any]) -> TaskDef:
            task_name = name or f"{fn.__module__}.{fn.__qualname__}"
            policy = retry or RetryPolicy()
            if non_retryable:
                policy = RetryPolicy(
                    policy.base,
                    policy.factor,
                    policy.max_delay,
                    policy.jitter,
                    tuple(t.__name__ for t in non_retryable) + policy.non_retryable,
                )
            definition = TaskDef(
                task_name, fn, queue, priority, max_retries, timeout, policy, resources, self
            )
            if task_name in self.tasks:
                raise ValueError(f"task type {task_name!r} is registered twice")
            self.tasks[task_name] = definition
            return definition

        return register

    def bind(self, client: TaskClient) -> None:
        self.client = client

    def __contains__(self, name: str) -> bool:
        return name in self.tasks

    def __getitem__(self, name: str) -> TaskDef:
        return self.tasks[name]

    def names(self) -> list[str]:
        return sorted(self.tasks)
