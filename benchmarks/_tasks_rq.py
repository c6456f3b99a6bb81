"""RQ's side of the task-queue benchmark: two `rq worker` processes on Redis.

RQ takes its key prefix from the RQ_KEY_PREFIX environment variable when it is first imported,
so this module sets it (to `<REDIS_PREFIX>rq`) for itself and for the workers before importing
`rq`: every key RQ writes (queues, jobs, results, registries, workers) lies under the prefix.
"""

from __future__ import annotations

import os
import random
import time
from typing import Any

from benchmarks._runner import log
from benchmarks._tasks_common import (
    BATCH,
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
    redis_client,
    spacing,
    wait_count,
)

PREFIX = f"{REDIS_PREFIX}rq"
QUEUE = f"bench-{TOKEN}"
# RQ's default worker class forks a "work horse" process per job: about 30 no-op jobs/s for two
# workers here, far too slow to be the peer to beat. SimpleWorker runs each job in the worker
# process itself (RQ's fastest stock worker), so it is the one measured; set
# BENCH_RQ_WORKER_CLASS=rq.worker.Worker to measure the forking default instead.
WORKER_CLASS = os.environ.get("BENCH_RQ_WORKER_CLASS", "rq.worker.SimpleWorker")


def _import_rq() -> Any:
    import sys

    if "rq" not in sys.modules:
        os.environ["RQ_KEY_PREFIX"] = PREFIX
    import rq.defaults

    if rq.defaults.RQ_KEY_PREFIX != PREFIX:
        raise RuntimeError(
            f"rq was imported earlier with key prefix {rq.defaults.RQ_KEY_PREFIX!r}; "
            f"refusing to write outside {PREFIX!r}"
        )
    return rq


def measure(sizes: Sizes) -> Figures:
    short = WORKER_CLASS.rsplit(".", 1)[-1]
    figures = Figures("rq", f"Redis, {WORKERS} `rq worker` processes ({short})")
    workers = WorkerGroup("rq", {"RQ_KEY_PREFIX": PREFIX})
    client: Any = None
    try:
        _import_rq()
        from rq import Queue, Worker
        from rq.registry import FinishedJobRegistry

        from benchmarks._peer_rq_jobs import noop, stamp

        client = redis_client()
        queue: Any = Queue(QUEUE, connection=client)
        finished_key = FinishedJobRegistry(QUEUE, connection=client).key
        assert finished_key.startswith(PREFIX), finished_key

        def submit() -> None:
            started = time.perf_counter()
            for _ in range(sizes.single):
                queue.enqueue(noop)
            figures.submit_single_per_s = sizes.single / (time.perf_counter() - started)
            started = time.perf_counter()
            for _ in range(sizes.batch // BATCH):
                queue.enqueue_many([Queue.prepare_data(noop) for _ in range(BATCH)])
            elapsed = time.perf_counter() - started
            figures.submit_batch_per_s = sizes.batch // BATCH * BATCH / elapsed
            figures.batch_api = f"enqueue_many x{BATCH}"
            queue.empty()  # no worker yet: drop the queued jobs (and their job hashes)

        log("tasks: rq submit")
        phase(figures, "submit", submit)
        command = [
            python_tool("rq"),
            "worker",
            "--url",
            REDIS_URL,
            "--worker-class",
            WORKER_CLASS,
            "--disable-job-desc-logging",
            "--quiet",
        ]
        workers.start([[*command, "--name", f"bench-{TOKEN}-{i}", QUEUE] for i in range(WORKERS)])
        if not phase(
            figures,
            "start",
            lambda: workers.wait_until(
                lambda: len(Worker.all(queue=queue)) >= WORKERS,
                timeout=60,
                what=f"{WORKERS} registered workers",
            ),
        ):
            return figures

        def latency() -> None:
            rng = random.Random(4)
            for i in range(sizes.warmup + sizes.latency):
                called = time.time()
                job = queue.enqueue(stamp)
                returned = time.time()
                result = job.latest_result(timeout=30)
                if result is None or result.return_value is None:
                    raise RuntimeError(f"job {job.id}: no result ({result and result.type})")
                if i >= sizes.warmup:
                    figures.latency_ms.append((float(result.return_value) - returned) * 1000)
                    figures.submit_call_ms.append((returned - called) * 1000)
                workers.check()
                time.sleep(spacing(rng))

        log("tasks: rq pick-up latency")
        phase(figures, "latency", latency)

        def e2e() -> None:
            base = int(client.zcard(finished_key))
            total = sizes.e2e // BATCH * BATCH
            started = time.perf_counter()
            for _ in range(total // BATCH):
                queue.enqueue_many([Queue.prepare_data(noop) for _ in range(BATCH)])
            finished = wait_count(
                lambda: int(client.zcard(finished_key)) - base, total, workers, timeout=240
            )
            figures.e2e_seconds, figures.e2e_tasks = finished - started, total
            figures.e2e_per_s = total / (finished - started)

        log("tasks: rq end to end")
        phase(figures, "e2e", e2e)
    except Exception as exc:
        figures.errors["setup"] = one_line(exc)
        log(f"tasks: rq setup failed: {figures.errors['setup']}")
    finally:
        workers.stop()
        if client is not None:
            client.close()
        deleted = delete_redis_prefix(PREFIX + ":")
        log(f"tasks: rq: deleted {deleted} Redis keys under {PREFIX}:")
    return figures
