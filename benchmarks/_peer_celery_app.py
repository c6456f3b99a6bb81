"""Celery app for `python -m benchmarks tasks`: Redis broker and Redis result backend.

The worker is started as `celery -A benchmarks._peer_celery_app worker ...` with its settings in
environment variables (BENCH_REDIS_URL, BENCH_CELERY_PREFIX, BENCH_CELERY_QUEUE,
BENCH_READY_DIR); the benchmark builds its own client app with `make_app(...)`. Every Redis key
(broker queues, bindings, unacked sets, results) lies under the prefix.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from celery import Celery  # type: ignore[import-untyped]
from celery.signals import worker_ready  # type: ignore[import-untyped]


def noop() -> None:
    return None


def stamp() -> float:
    return time.time()


def make_app(redis_url: str, prefix: str, queue: str) -> Celery:
    app = Celery("bench", broker=redis_url, backend=redis_url, set_as_current=False)
    app.conf.update(
        broker_transport_options={"global_keyprefix": prefix},
        result_backend_transport_options={"global_keyprefix": prefix},
        broker_connection_retry_on_startup=True,
        task_default_queue=queue,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
    )
    app.task(name="noop")(noop)
    app.task(name="stamp")(stamp)
    return app


app = make_app(
    os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"),
    os.environ.get("BENCH_CELERY_PREFIX", "bench:celery:"),
    os.environ.get("BENCH_CELERY_QUEUE", "bench"),
)


def _ready(**_: Any) -> None:
    """Tell the benchmark this worker (and its pool) is up: one file per worker process."""
    folder = os.environ.get("BENCH_READY_DIR")
    if folder:
        (Path(folder) / f"celery-{os.getpid()}").touch()


worker_ready.connect(_ready, weak=False)
