"""The task store contract over SQLite and PostgreSQL: claims, leases, fencing, retries,
dependencies, cancellation, idempotency."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa

from tenfold.kernel.sql import create_engine
from tenfold.tasks.models import Status, TaskError, validate
from tenfold.tasks.service import TaskConflict, TaskService
from tenfold.tasks.stores.sql import SqlTaskStore, release
from tenfold.tasks.tables import task_execution_history

T0 = 1_700_000_000_000


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[SqlTaskStore]:
    engine = create_engine(db_url)
    yield SqlTaskStore(engine)
    await engine.dispose()


async def submit(store: SqlTaskStore, *raw: dict[str, object], now: int = T0) -> list[str]:
    out = await store.submit([validate({"task_type": "t"} | r) for r in raw], now)
    return [task_id for task_id, _ in out]


async def claim(store: SqlTaskStore, n: int = 10, now: int = T0, **kw: object) -> list:  # type: ignore[type-arg]
    args = {"queues": ["default"], "task_types": None, "resources": [], "lease_ms": 30_000}
    args.update(kw)
    return await store.claim("w1", limit=n, now_ms=now, **args)  # type: ignore[arg-type]


async def test_priority_1_submitted_behind_10000_priority_10_starts_next(
    store: SqlTaskStore,
) -> None:
    await store.submit([validate({"task_type": "bulk", "priority": 10})] * 10_000, T0)
    [urgent] = await submit(store, {"priority": 1}, now=T0 + 5)
    first = await claim(store, 1, now=T0 + 10)
    assert [c.task_id for c in first] == [urgent]


async def test_fifo_within_a_priority_and_delayed_tasks_wait(store: SqlTaskStore) -> None:
    a, b = await submit(store, {}, {})
    later_at = datetime.fromtimestamp((T0 + 5_000) / 1000, UTC)
    [later] = await submit(store, {"scheduled_at": later_at, "priority": 1})
    assert [c.task_id for c in await claim(store, 10)] == [a, b]
    assert await claim(store, 10, now=T0 + 4_999) == []
    assert [c.task_id for c in await claim(store, 10, now=T0 + 5_000)] == [later]


async def test_a_stale_lease_cannot_complete(store: SqlTaskStore) -> None:
    [task_id] = await submit(store, {"max_retries": 2})
    [first] = await claim(store)
    # the worker vanished: its lease expires and the task is re-queued
    assert await store.expire_leases(T0 + 31_000) == [(task_id, Status.SCHEDULED)]
    [second] = await claim(store, now=T0 + 31_000)
    assert second.attempt == 2 and second.lease_token != first.lease_token
    assert await store.complete([(task_id, first.lease_token, "late")], T0 + 32_000) == [False]
    assert await store.complete([(task_id, second.lease_token, "ok")], T0 + 32_000) == [True]
    task = await store.get(task_id)
    assert task is not None and task.status is Status.SUCCEEDED and task.result == "ok"
    history = await store.history(task_id)
    assert [(h["attempt"], h["status"]) for h in history] == [(1, "lost"), (2, "succeeded")]


async def test_heartbeat_extends_the_lease(store: SqlTaskStore) -> None:
    [task_id] = await submit(store, {})
    [c] = await claim(store)
    assert await store.heartbeat(task_id, c.lease_token, 30_000, T0 + 25_000) == (True, False)
    assert await store.expire_leases(T0 + 40_000) == []
    assert await store.heartbeat(task_id, "other", 30_000, T0 + 41_000) == (False, False)


async def test_retries_back_off_then_dead_letter(store: SqlTaskStore) -> None:
    [task_id] = await submit(store, {"max_retries": 1})
    [c] = await claim(store)
    out = await store.fail(
        task_id, c.lease_token, error="E: x", traceback="tb", retry_at_ms=T0 + 1_000, now_ms=T0
    )
    assert out.status is Status.SCHEDULED and out.retry_at_ms == T0 + 1_000
    assert await claim(store, now=T0 + 999) == []
    [c2] = await claim(store, now=T0 + 1_000)
    out = await store.fail(
        task_id,
        c2.lease_token,
        error="E: y",
        traceback="tb2",
        retry_at_ms=T0 + 9_000,
        now_ms=T0 + 1_500,
    )
    assert out.status is Status.DEAD
    task = await store.get(task_id)
    assert task is not None and task.error_message == "E: y" and task.traceback == "tb2"
    assert await store.retry(task_id, T0 + 2_000) is Status.PENDING
    [c3] = await claim(store, now=T0 + 2_000)
    assert c3.attempt == 3 and c3.max_retries == 3  # attempts go on; retries restored


async def test_dependencies_release_and_doom(store: SqlTaskStore) -> None:
    out = await store.submit(
        [
            validate({"task_type": "a", "ref": "a"}),
            validate({"task_type": "b", "ref": "b", "dependencies": ["a"]}),
            validate(
                {"task_type": "c", "dependencies": ["a", "b"], "on_dependency_failure": "cancel"}
            ),
            validate({"task_type": "d", "dependencies": ["b"]}),
        ],
        T0,
    )
    a, b, c, d = (task_id for task_id, _ in out)
    assert [x.task_id for x in await claim(store)] == [a]
    statuses = {t: (await store.get(t)).status for t in (b, c, d)}  # type: ignore[union-attr]
    assert set(statuses.values()) == {Status.WAITING}


async def test_dependency_chain_runs_in_order_and_failure_propagates(
    store: SqlTaskStore,
) -> None:
    out = await store.submit(
        [
            validate({"task_type": "a", "ref": "a", "max_retries": 0}),
            validate({"task_type": "b", "ref": "b", "dependencies": ["a"]}),
            validate({"task_type": "c", "dependencies": ["b"], "on_dependency_failure": "cancel"}),
        ],
        T0,
    )
    a, b, c = (task_id for task_id, _ in out)
    [ca] = await claim(store)
    await store.fail(a, ca.lease_token, error="x", traceback=None, retry_at_ms=T0, now_ms=T0)
    got = {t: (await store.get(t)).status for t in (a, b, c)}  # type: ignore[union-attr]
    assert got == {a: Status.DEAD, b: Status.DEAD, c: Status.CANCELLED}
    # and on success the next one becomes ready
    x, y = (
        t
        for t, _ in await store.submit(
            [
                validate({"task_type": "x", "ref": "x"}),
                validate({"task_type": "y", "dependencies": ["x"]}),
            ],
            T0,
        )
    )
    [cx] = await claim(store)
    assert cx.task_id == x
    assert await store.complete([(x, cx.lease_token, None)], T0) == [True]
    assert [t.task_id for t in await claim(store)] == [y]


async def test_idempotency_key_returns_the_first_task(store: SqlTaskStore) -> None:
    first = await store.submit([validate({"task_type": "t", "idempotency_key": "k"})], T0)
    again = await store.submit([validate({"task_type": "t", "idempotency_key": "k"})], T0)
    assert again == [(first[0][0], False)]
    assert len(await store.list_tasks()) == 1


async def test_cancel_pending_running_and_finished(store: SqlTaskStore) -> None:
    service = TaskService(store)
    [p, r] = await submit(store, {}, {"priority": 1})
    [cr] = await claim(store, 1)
    assert cr.task_id == r
    assert await service.cancel(p) is Status.CANCELLED
    assert await service.cancel(r) is Status.RUNNING  # asked to stop
    ok, cancel = await store.heartbeat(r, cr.lease_token, 30_000, T0)
    assert ok and cancel
    await store.fail(
        r, cr.lease_token, error="cancelled", traceback=None, retry_at_ms=T0, now_ms=T0
    )
    assert (await store.get(r)).status is Status.CANCELLED  # type: ignore[union-attr]
    [done] = await submit(store, {})
    [cd] = await claim(store)
    await store.complete([(done, cd.lease_token, 1)], T0)
    with pytest.raises(TaskConflict):
        await service.cancel(done)


async def test_resources_and_task_types_route_work(store: SqlTaskStore) -> None:
    [gpu] = await submit(store, {"resources": ["gpu"]})
    [plain] = await submit(store, {"task_type": "other"})
    assert await claim(store, task_types=["t"]) == []  # t needs a gpu; other is not served
    got = await claim(store, task_types=["t", "other"], resources=["cpu", "gpu"])
    assert {c.task_id for c in got} == {gpu, plain}


async def test_paused_queue_is_not_claimed(store: SqlTaskStore) -> None:
    [task_id] = await submit(store, {})
    await store.set_paused("default", True, T0)
    assert await claim(store) == []
    await store.set_paused("default", False, T0)
    assert [c.task_id for c in await claim(store)] == [task_id]


async def test_release_hands_back_without_spending_an_attempt(store: SqlTaskStore) -> None:
    [task_id] = await submit(store, {})
    [c] = await claim(store)
    assert await release(store, [(task_id, c.lease_token)]) == 1
    [again] = await claim(store)
    assert again.attempt == 1


async def test_concurrent_claimers_never_share_a_task(store: SqlTaskStore) -> None:
    await store.submit([validate({"task_type": "t"})] * 300, T0)

    async def worker(name: str) -> list[str]:
        got: list[str] = []
        while batch := await store.claim(
            name,
            queues=["default"],
            task_types=None,
            resources=[],
            limit=7,
            lease_ms=30_000,
            now_ms=T0,
        ):
            got += [c.task_id for c in batch]
        return got

    results = await asyncio.gather(*(worker(f"w{i}") for i in range(4)))
    claimed = [t for r in results for t in r]
    assert len(claimed) == 300 and len(set(claimed)) == 300


async def test_batch_cycles_and_unknown_dependencies_are_rejected(store: SqlTaskStore) -> None:
    service = TaskService(store)
    with pytest.raises(TaskError) as err:
        await service.submit(
            [
                {"task_type": "a", "ref": "a", "dependencies": ["b"]},
                {"task_type": "b", "ref": "b", "dependencies": ["a"]},
            ]
        )
    assert err.value.field == "dependencies" and "cycle" in err.value.message
    with pytest.raises(TaskError) as err:
        await service.submit([{"task_type": "a", "dependencies": ["nope"]}])
    assert "unknown task nope" in err.value.message
    assert await store.list_tasks() == []  # nothing half-written
    async with store.engine.connect() as conn:
        assert (
            await conn.execute(sa.select(sa.func.count()).select_from(task_execution_history))
        ).scalar() == 0
