"""tenfold's side of the task-queue benchmark: PostgreSQL store, LISTEN/NOTIFY wake-ups.

Workers are `benchmarks/_tenfold_worker.py` processes; this process submits with `TaskClient`
(and a `PgNotifier`, so every submit sends a NOTIFY in its transaction).
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from typing import Any

from benchmarks._runner import log
from benchmarks._tasks_common import (
    BATCH,
    POLL_S,
    TIMEOUT_S,
    TOKEN,
    WORKERS,
    Figures,
    Sizes,
    WorkerGroup,
    create_database,
    drop_database,
    one_line,
    phase,
    spacing,
)

CONCURRENCY = 4  # per worker process (its thread pool runs the synchronous handlers)
DATABASE = f"bench_tasks_tenfold_{TOKEN}"


class _Client:
    """The submitting side, on one event loop kept across phases."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine: Any = None
        self.client: Any = None

    async def open(self) -> None:
        from tenfold.kernel.sql import create_engine
        from tenfold.tasks import TaskClient
        from tenfold.tasks.stores.notify import PgNotifier

        self.engine = create_engine(self.url)
        self.client = TaskClient.from_engine(self.engine, notifier=PgNotifier(self.url))

    async def close(self) -> None:
        if self.engine is not None:
            await self.engine.dispose()

    async def scalar(self, sql: str) -> int:
        import sqlalchemy as sa

        async with self.engine.connect() as conn:
            return int((await conn.execute(sa.text(sql))).scalar() or 0)

    async def succeeded(self) -> int:
        return await self.scalar("SELECT count(*) FROM tasks WHERE status = 'succeeded'")

    async def submit(self, figures: Figures, sizes: Sizes) -> None:
        import sqlalchemy as sa

        submit = self.client.submit
        started = time.perf_counter()
        for _ in range(sizes.single):
            await submit({"task_type": "noop"})
        figures.submit_single_per_s = sizes.single / (time.perf_counter() - started)

        batch = [{"task_type": "noop"}] * BATCH
        started = time.perf_counter()
        for _ in range(sizes.batch // BATCH):
            await self.client.submit_many(batch)
        figures.submit_batch_per_s = sizes.batch // BATCH * BATCH / (time.perf_counter() - started)
        figures.batch_api = f"submit_many x{BATCH}"
        # No worker runs yet: clear what was submitted so the later phases start empty.
        async with self.engine.begin() as conn:
            await conn.execute(
                sa.text("TRUNCATE tasks, task_dependencies, task_execution_history CASCADE")
            )

    async def latency(self, figures: Figures, sizes: Sizes, workers: WorkerGroup) -> None:
        rng = random.Random(4)
        for i in range(sizes.warmup + sizes.latency):
            called = time.time()
            task_id = await self.client.submit({"task_type": "stamp"})
            returned = time.time()
            started = await self.client.result(task_id, wait=30, poll=0.005)
            if i >= sizes.warmup:
                figures.latency_ms.append((float(started) - returned) * 1000)
                figures.submit_call_ms.append((returned - called) * 1000)
            workers.check()
            await asyncio.sleep(spacing(rng))

    async def e2e(self, figures: Figures, sizes: Sizes, workers: WorkerGroup) -> None:
        base = await self.succeeded()
        batch = [{"task_type": "noop"}] * BATCH
        total = sizes.e2e // BATCH * BATCH
        started = time.perf_counter()
        for _ in range(total // BATCH):
            await self.client.submit_many(batch)
        deadline = time.monotonic() + TIMEOUT_S
        while (done := await self.succeeded() - base) < total:
            workers.check()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{done} of {total} tasks done after {TIMEOUT_S:.0f}s")
            await asyncio.sleep(POLL_S)
        elapsed = time.perf_counter() - started
        figures.e2e_seconds, figures.e2e_tasks = elapsed, total
        figures.e2e_per_s = total / elapsed


def measure(sizes: Sizes) -> Figures:
    figures = Figures(
        "tenfold",
        f"PostgreSQL, {WORKERS} worker processes x concurrency {CONCURRENCY}, "
        "sync handlers, LISTEN/NOTIFY",
    )
    workers = WorkerGroup("tenfold", {})
    try:
        url = create_database(DATABASE)
        from tenfold.kernel.sql import upgrade

        upgrade(url)
        with asyncio.Runner() as runner:
            client = _Client(url)
            runner.run(client.open())
            try:
                log("tasks: tenfold submit")
                phase(figures, "submit", lambda: runner.run(client.submit(figures, sizes)))
                command = [
                    sys.executable,
                    "-m",
                    "benchmarks._tenfold_worker",
                    url,
                    "--concurrency",
                    str(CONCURRENCY),
                ]
                workers.start([command] * WORKERS)
                count_workers = "SELECT count(*) FROM task_workers"
                if phase(
                    figures,
                    "start",
                    lambda: workers.wait_until(
                        lambda: runner.run(client.scalar(count_workers)) >= WORKERS,
                        timeout=60,
                        what=f"{WORKERS} registered workers",
                    ),
                ):
                    log("tasks: tenfold pick-up latency")
                    phase(
                        figures,
                        "latency",
                        lambda: runner.run(client.latency(figures, sizes, workers)),
                    )
                    log("tasks: tenfold end to end")
                    phase(figures, "e2e", lambda: runner.run(client.e2e(figures, sizes, workers)))
            finally:
                workers.stop()
                runner.run(client.close())
    except Exception as exc:
        figures.errors["setup"] = one_line(exc)
        log(f"tasks: tenfold setup failed: {figures.errors['setup']}")
    finally:
        workers.stop()
        drop_database(DATABASE)
    return figures
