"""Celery's side of the task-queue benchmark: Redis broker, Redis result backend.

One `celery worker --pool prefork --concurrency 2` process (two pool processes run the tasks),
app in `benchmarks/_peer_celery_app.py`. Every key lies under `<REDIS_PREFIX>celery:`.
"""

from __future__ import annotations

import random
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks._runner import log
from benchmarks._tasks_common import (
    REDIS_PREFIX,
    REDIS_URL,
    TOKEN,
    WORKERS,
    Figures,
    Sizes,
    WorkerGroup,
    delete_redis_prefix,
    one_line,
    phase,
    python_tool,
    spacing,
    wait_count,
)

PREFIX = f"{REDIS_PREFIX}celery:"
QUEUE = f"bench-{TOKEN}"
RESULT_KEY = PREFIX + "celery-task-meta-{}"


def done_in_order(client: Any, keys: Sequence[str], chunk: int = 200) -> Callable[[], int]:
    """A completion counter over result keys: how many of `keys`, in submission order, exist.

    Each call resumes where the last stopped, so the whole wait costs about one EXISTS per task
    (plus one chunk per poll): no full scan of thousands of keys every poll."""
    position = [0]

    def count() -> int:
        i = position[0]
        while i < len(keys):
            pipe = client.pipeline(transaction=False)
            part = keys[i : i + chunk]
            for key in part:
                pipe.exists(key)
            found = pipe.execute()
            for exists in found:
                if not exists:
                    position[0] = i
                    return i
                i += 1
        position[0] = i
        return i

    return count


def measure(sizes: Sizes) -> Figures:
    figures = Figures(
        "celery",
        f"Redis broker + results, 1 worker --pool prefork --concurrency {WORKERS}",
    )
    ready_dir = Path(tempfile.mkdtemp(prefix="tenfold-bench-celery-ready-"))
    workers = WorkerGroup(
        "celery",
        {
            "BENCH_REDIS_URL": REDIS_URL,
            "BENCH_CELERY_PREFIX": PREFIX,
            "BENCH_CELERY_QUEUE": QUEUE,
            "BENCH_READY_DIR": str(ready_dir),
        },
    )
    app: Any = None
    client: Any = None
    try:
        from benchmarks._peer_celery_app import make_app
        from benchmarks._tasks_common import redis_client

        app = make_app(REDIS_URL, PREFIX, QUEUE)
        client = redis_client()
        noop, stamp = app.tasks["noop"], app.tasks["stamp"]

        def submit() -> None:
            started = time.perf_counter()
            for _ in range(sizes.single):
                noop.delay()
            figures.submit_single_per_s = sizes.single / (time.perf_counter() - started)
            # Celery has no batch publish: `delay` in a loop is its fastest way in.
            started = time.perf_counter()
            for _ in range(sizes.batch):
                noop.delay()
            figures.submit_batch_per_s = sizes.batch / (time.perf_counter() - started)
            figures.batch_api = "delay (no batch API)"
            client.delete(PREFIX + QUEUE)  # no worker yet: drop what was queued

        log("tasks: celery submit")
        phase(figures, "submit", submit)
        command = [
            python_tool("celery"),
            "-A",
            "benchmarks._peer_celery_app",
            "worker",
            "--pool",
            "prefork",
            "--concurrency",
            str(WORKERS),
            "-Q",
            QUEUE,
            "-n",
            f"bench{TOKEN}@%h",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "--loglevel",
            "WARNING",
        ]
        workers.start([command])
        if not phase(
            figures,
            "start",
            lambda: workers.wait_until(
                lambda: any(ready_dir.iterdir()), timeout=60, what="worker_ready"
            ),
        ):
            return figures

        def latency() -> None:
            rng = random.Random(4)
            for i in range(sizes.warmup + sizes.latency):
                called = time.time()
                result = stamp.delay()
                returned = time.time()
                started = float(result.get(timeout=30))
                if i >= sizes.warmup:
                    figures.latency_ms.append((started - returned) * 1000)
                    figures.submit_call_ms.append((returned - called) * 1000)
                workers.check()
                time.sleep(spacing(rng))

        log("tasks: celery pick-up latency")
        phase(figures, "latency", latency)

        def e2e() -> None:
            total = sizes.e2e
            ids: list[str] = []
            started = time.perf_counter()
            for _ in range(total):
                ids.append(noop.delay().id)
            count = done_in_order(client, [RESULT_KEY.format(i) for i in ids])
            finished = wait_count(count, total, workers)
            figures.e2e_seconds, figures.e2e_tasks = finished - started, total
            figures.e2e_per_s = total / (finished - started)

        log("tasks: celery end to end")
        phase(figures, "e2e", e2e)
    except Exception as exc:
        figures.errors["setup"] = one_line(exc)
        log(f"tasks: celery setup failed: {figures.errors['setup']}")
    finally:
        workers.stop()
        if app is not None:
            try:
                app.close()
            except Exception as exc:
                log(f"tasks: celery app close: {one_line(exc)}")
        if client is not None:
            client.close()
        deleted = delete_redis_prefix(PREFIX)
        log(f"tasks: celery: deleted {deleted} Redis keys under {PREFIX}")
        shutil.rmtree(ready_dir, ignore_errors=True)
    return figures
