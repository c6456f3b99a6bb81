"""The in-process worker: handlers, retries, timeouts, cancellation, transactional completion."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import sqlalchemy as sa

from tenfold.kernel.sql import create_engine
from tenfold.tasks import NonRetryable, RetryPolicy, Status, TaskClient, TaskFailed, TaskRegistry
from tenfold.tasks.worker import TaskContext, Worker

FAST = RetryPolicy(base=0.01, max_delay=0.02)


class Harness:
    def __init__(self, client: TaskClient, registry: TaskRegistry, worker: Worker) -> None:
        self.client, self.registry, self.worker = client, registry, worker


async def until(check: Callable[[], Awaitable[bool]], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


@pytest.fixture
async def make(db_url: str) -> AsyncIterator[Callable[..., Awaitable[Harness]]]:
    engine = create_engine(db_url)
    runs: list[tuple[Worker, asyncio.Task[None]]] = []

    async def factory(registry: TaskRegistry, **options: Any) -> Harness:
        client = TaskClient.from_engine(engine)
        registry.bind(client)
        options.setdefault("poll_seconds", 0.02)
        options.setdefault("heartbeat_seconds", 0.1)
        worker = Worker(client.service.store, registry, notifier=client.service.notifier, **options)
        runs.append((worker, asyncio.create_task(worker.run())))
        return Harness(client, registry, worker)

    yield factory
    for worker, task in runs:
        worker.stop()
        await asyncio.wait_for(task, 15)
    await engine.dispose()


async def test_sync_and_async_handlers_and_results(make: Any) -> None:
    registry = TaskRegistry()

    @registry.task("add")
    async def add(a: int, b: int) -> int:
        return a + b

    @registry.task("upper")
    def upper(text: str) -> str:
        return text.upper()

    h = await make(registry, concurrency=4)
    first = await add.submit({"a": 2, "b": 3})
    second = await upper.submit({"text": "hi"})
    assert await h.client.result(first, wait=10) == 5
    assert await h.client.result(second, wait=10) == "HI"


async def test_a_poison_task_dies_after_its_retries_and_blocks_nothing(make: Any) -> None:
    registry = TaskRegistry()
    calls: list[int] = []

    @registry.task("poison", max_retries=2, retry=FAST)
    def poison(ctx: TaskContext) -> None:
        calls.append(ctx.attempt)
        raise RuntimeError("always")

    @registry.task("fine")
    def fine() -> str:
        return "ok"

    h = await make(registry, concurrency=1)
    bad = await poison.submit()
    good = [await fine.submit() for _ in range(5)]
    for task_id in good:
        assert await h.client.result(task_id, wait=10) == "ok"
    with pytest.raises(TaskFailed) as err:
        await h.client.result(bad, wait=10)
    assert err.value.task.status is Status.DEAD
    assert "RuntimeError: always" in (err.value.task.error_message or "")
    assert "Traceback" in (err.value.task.traceback or "")
    assert calls == [1, 2, 3]


async def test_non_retryable_errors_skip_retries(make: Any) -> None:
    registry = TaskRegistry()

    class BadInput(Exception):
        pass

    @registry.task("strict", max_retries=5, retry=FAST, non_retryable=(BadInput,))
    def strict() -> None:
        raise BadInput("no")

    @registry.task("explicit", max_retries=5, retry=FAST)
    def explicit() -> None:
        raise NonRetryable("give up")

    h = await make(registry)
    for definition in (strict, explicit):
        task_id = await definition.submit()
        with pytest.raises(TaskFailed):
            await h.client.result(task_id, wait=10)
        assert [r["attempt"] for r in await h.client.service.store.history(task_id)] == [1]


async def test_async_timeout_fails_the_attempt(make: Any) -> None:
    registry = TaskRegistry()
    never = asyncio.Event()

    @registry.task("slow", timeout=1, max_retries=0)
    async def slow() -> None:
        await never.wait()

    h = await make(registry)
    task_id = await slow.submit()
    with pytest.raises(TaskFailed) as err:
        await h.client.result(task_id, wait=10)
    assert err.value.task.error_message == "timed out after 1 s"
    [attempt] = await h.client.service.store.history(task_id)
    assert attempt["status"] == "timeout"


async def test_cooperative_cancel_of_a_running_task(make: Any) -> None:
    registry = TaskRegistry()
    started = asyncio.Event()

    @registry.task("loop")
    async def loop(ctx: TaskContext) -> None:
        started.set()
        while True:
            ctx.raise_if_cancelled()
            await asyncio.sleep(0.01)

    h = await make(registry)
    task_id = await loop.submit()
    await asyncio.wait_for(started.wait(), 10)
    assert await h.client.cancel(task_id) is Status.RUNNING

    async def cancelled() -> bool:
        task = await h.client.get(task_id)
        return task is not None and task.status is Status.CANCELLED

    await until(cancelled)


async def test_handler_writes_commit_with_the_completion(make: Any, db_url: str) -> None:
    registry = TaskRegistry()
    ledger = sa.table("ledger", sa.column("task_id"))
    engine = create_engine(db_url)
    async with engine.begin() as conn:
        await conn.execute(sa.text("CREATE TABLE ledger (task_id VARCHAR(36) PRIMARY KEY)"))

    @registry.task("charge")
    async def charge(ctx: TaskContext, fail_after: bool = False) -> None:
        async with ctx.transaction() as conn:
            await conn.execute(ledger.insert().values(task_id=ctx.task_id))
            if fail_after:
                raise RuntimeError("crash before commit")

    h = await make(registry)
    ok = await charge.submit({})
    assert await h.client.result(ok, wait=10) is None
    bad = await charge.submit({"fail_after": True}, max_retries=0)
    with pytest.raises(TaskFailed):
        await h.client.result(bad, wait=10)
    async with engine.connect() as conn:
        rows = (await conn.execute(sa.text("SELECT task_id FROM ledger"))).scalars().all()
    assert rows == [ok]  # the failed attempt's write rolled back with it
    await engine.dispose()


async def test_transactional_submit_exists_only_if_the_caller_commits(
    make: Any, db_url: str
) -> None:
    registry = TaskRegistry()

    @registry.task("noop")
    def noop() -> None:
        return None

    h = await make(registry)
    engine = h.client.service.store.engine

    class Abort(Exception):
        pass

    with pytest.raises(Abort):
        async with engine.begin() as conn:
            await h.client.submit({"task_type": "noop"}, conn=conn)
            raise Abort
    assert await h.client.service.store.list_tasks() == []
    async with engine.begin() as conn:
        task_id = await h.client.submit({"task_type": "noop"}, conn=conn)
    assert await h.client.result(task_id, wait=10) is None


async def test_stop_hands_back_prefetched_tasks(make: Any) -> None:
    registry = TaskRegistry()
    gate = asyncio.Event()

    @registry.task("wait")
    async def wait() -> None:
        await gate.wait()

    h = await make(registry, concurrency=1, prefetch=5)
    ids = await h.client.submit_many([{"task_type": "wait"}] * 5)

    async def prefetched() -> bool:
        return len(h.worker._backlog) + len(h.worker._running) == 5

    await until(prefetched)
    h.worker.stop()
    gate.set()

    async def settled() -> bool:
        tasks = [await h.client.get(t) for t in ids]
        return all(t is not None and t.status in (Status.SUCCEEDED, Status.PENDING) for t in tasks)

    await until(settled)
    tasks = [await h.client.get(t) for t in ids]
    pending = [t for t in tasks if t is not None and t.status is Status.PENDING]
    assert len(pending) == 4
    assert [t.attempt for t in pending] == [0, 0, 0, 0]
