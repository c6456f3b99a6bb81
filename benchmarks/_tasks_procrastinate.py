"""Procrastinate's side of the task-queue benchmark: PostgreSQL, two worker processes.

Its own database (`bench_tasks_procrastinate_<token>`), its schema applied by the app, workers
started as `procrastinate --app benchmarks._peer_procrastinate_app.app worker`. Procrastinate keeps
no results: a job is done when its status is `succeeded`, and `stamp` pushes its start time onto
a Redis list under our prefix.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

from benchmarks._runner import log
from benchmarks._tasks_common import (
    BATCH,
    POLL_S,
    REDIS_PREFIX,
    REDIS_URL,
    TIMEOUT_S,
    TOKEN,
    WORKERS,
    Figures,
    Sizes,
    WorkerGroup,
    create_database,
    delete_redis_prefix,
    drop_database,
    one_line,
    phase,
    python_tool,
    redis_client,
    spacing,
)

CONCURRENCY = 4  # asynchronous jobs per worker process (sync tasks run in threads)
DATABASE = f"bench_tasks_procrastinate_{TOKEN}"
STAMP_KEY = f"{REDIS_PREFIX}procrastinate:stamps"


class _Client:
    def __init__(self, dsn: str) -> None:
        from benchmarks._peer_procrastinate_app import make_app

        self.app = make_app(dsn)
        self.redis = redis_client()

    async def open(self) -> None:
        await self.app.open_async()
        await self.app.schema_manager.apply_schema_async()

    async def close(self) -> None:
        await self.app.close_async()
        self.redis.close()

    async def scalar(self, sql: Any, **args: Any) -> Any:
        row = await self.app.connector.execute_query_one_async(sql, **args)
        return next(iter(row.values()))

    async def succeeded(self) -> int:
        return int(
            await self.scalar("SELECT count(*) FROM procrastinate_jobs WHERE status = 'succeeded'")
        )

    async def submit(self, figures: Figures, sizes: Sizes) -> None:
        noop = self.app.tasks["noop"]
        started = time.perf_counter()
        for _ in range(sizes.single):
            await noop.defer_async()
        figures.submit_single_per_s = sizes.single / (time.perf_counter() - started)
        started = time.perf_counter()
        for _ in range(sizes.batch // BATCH):
            await noop.batch_defer_async(*([{}] * BATCH))
        figures.submit_batch_per_s = sizes.batch // BATCH * BATCH / (time.perf_counter() - started)
        figures.batch_api = f"batch_defer x{BATCH}"
        await self.app.connector.execute_query_async("TRUNCATE procrastinate_jobs CASCADE")

    async def latency(self, figures: Figures, sizes: Sizes, workers: WorkerGroup) -> None:
        stamp = self.app.tasks["stamp"]
        rng = random.Random(4)
        for i in range(sizes.warmup + sizes.latency):
            called = time.time()
            job_id = await stamp.defer_async()
            returned = time.time()
            popped = await asyncio.to_thread(self.redis.blpop, [STAMP_KEY], 30)
            if popped is None:
                raise TimeoutError(f"job {job_id} did not start within 30 s")
            started = float(popped[1])
            deadline = time.monotonic() + 30
            while (
                await self.scalar(
                    "SELECT status::text FROM procrastinate_jobs WHERE id = %(id)s", id=job_id
                )
                != "succeeded"
            ):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"job {job_id} did not finish within 30 s")
                await asyncio.sleep(0.005)
            if i >= sizes.warmup:
                figures.latency_ms.append((started - returned) * 1000)
                figures.submit_call_ms.append((returned - called) * 1000)
            workers.check()
            await asyncio.sleep(spacing(rng))

    async def e2e(self, figures: Figures, sizes: Sizes, workers: WorkerGroup) -> None:
        noop = self.app.tasks["noop"]
        base = await self.succeeded()
        total = sizes.e2e // BATCH * BATCH
        started = time.perf_counter()
        for _ in range(total // BATCH):
            await noop.batch_defer_async(*([{}] * BATCH))
        deadline = time.monotonic() + TIMEOUT_S
        while (done := await self.succeeded() - base) < total:
            workers.check()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{done} of {total} jobs done after {TIMEOUT_S:.0f}s")
            await asyncio.sleep(POLL_S)
        elapsed = time.perf_counter() - started
        figures.e2e_seconds, figures.e2e_tasks = elapsed, total
        figures.e2e_per_s = total / elapsed


def measure(sizes: Sizes) -> Figures:
    figures = Figures(
        "procrastinate",
        f"PostgreSQL, {WORKERS} worker processes x concurrency {CONCURRENCY}, sync tasks",
    )
    workers: WorkerGroup | None = None
    try:
        dsn = create_database(DATABASE)
        workers = WorkerGroup(
            "procrastinate",
            {
                "BENCH_PROCRASTINATE_DSN": dsn,
                "BENCH_REDIS_URL": REDIS_URL,
                "BENCH_STAMP_KEY": STAMP_KEY,
            },
        )
        with asyncio.Runner() as runner:
            client = _Client(dsn)
            runner.run(client.open())
            try:
                log("tasks: procrastinate submit")
                phase(figures, "submit", lambda: runner.run(client.submit(figures, sizes)))
                command = [
                    python_tool("procrastinate"),
                    "--app",
                    "benchmarks._peer_procrastinate_app.app",
                    "worker",
                    "--concurrency",
                    str(CONCURRENCY),
                ]
                workers.start([command] * WORKERS)
                group = workers
                count_workers = "SELECT count(*) FROM procrastinate_workers"
                if phase(
                    figures,
                    "start",
                    lambda: group.wait_until(
                        lambda: runner.run(client.scalar(count_workers)) >= WORKERS,
                        timeout=60,
                        what=f"{WORKERS} registered workers",
                    ),
                ):
                    log("tasks: procrastinate pick-up latency")
                    phase(
                        figures,
                        "latency",
                        lambda: runner.run(client.latency(figures, sizes, group)),
                    )
                    log("tasks: procrastinate end to end")
                    phase(figures, "e2e", lambda: runner.run(client.e2e(figures, sizes, group)))
            finally:
                workers.stop()
                runner.run(client.close())
    except Exception as exc:
        figures.errors["setup"] = one_line(exc)
        log(f"tasks: procrastinate setup failed: {figures.errors['setup']}")
    finally:
        if workers is not None:
            workers.stop()
        drop_database(DATABASE)
        delete_redis_prefix(f"{REDIS_PREFIX}procrastinate:")
    return figures
