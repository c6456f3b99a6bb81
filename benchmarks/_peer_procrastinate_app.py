"""Procrastinate app for `python -m benchmarks tasks` (PostgreSQL).

Workers run `procrastinate --app benchmarks._peer_procrastinate_app.app worker ...` with the
database in BENCH_PROCRASTINATE_DSN. Procrastinate keeps no task results, so `stamp` pushes
`time.time()`, taken as the handler starts, onto the Redis list BENCH_STAMP_KEY.
"""

from __future__ import annotations

import os
import time
from typing import Any

import procrastinate

_redis: Any = None


def noop() -> None:
    return None


def stamp() -> None:
    started = time.time()
    global _redis
    if _redis is None:
        import redis

        _redis = redis.Redis.from_url(os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"))
    _redis.rpush(os.environ["BENCH_STAMP_KEY"], repr(started))


def make_app(dsn: str) -> procrastinate.App:
    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=dsn))
    app.task(name="noop")(noop)
    app.task(name="stamp")(stamp)
    return app


app = make_app(os.environ.get("BENCH_PROCRASTINATE_DSN", ""))
