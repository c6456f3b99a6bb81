"""Shared pieces of the task-queue benchmark: sizes, figures, worker processes, databases."""

from __future__ import annotations

import asyncio
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks._runner import delete_prefix, log, tail

REPO = Path(__file__).resolve().parent.parent
PG_HOST = "127.0.0.1"
PG_PORT = 5432
PG_ADMIN_DSN = f"postgresql://postgres@{PG_HOST}:{PG_PORT}/postgres"
REDIS_URL = "redis://127.0.0.1:6379/0"
TOKEN = secrets.token_hex(4)  # one per benchmark process: databases and Redis prefixes
REDIS_PREFIX = f"bench:{TOKEN}:"  # every Redis key this benchmark creates lies under it
BATCH = 500  # submit_many / enqueue_many / batch_defer batch size
WORKERS = 2  # worker processes per system
POLL_S = 0.02  # how often completion is checked while waiting for the last result
TIMEOUT_S = 120.0  # per wait; a system that needs longer is recorded as an error


@dataclass(frozen=True, slots=True)
class Sizes:
    e2e: int  # no-op tasks run end to end
    single: int  # tasks submitted one call each
    batch: int  # tasks submitted in batches of BATCH
    latency: int  # pick-up latency samples
    warmup: int  # tasks run before the latency samples


def sizes(quick: bool) -> Sizes:
    if quick:
        return Sizes(e2e=2_000, single=200, batch=1_000, latency=50, warmup=10)
    return Sizes(e2e=5_000, single=500, batch=5_000, latency=200, warmup=20)


@dataclass
class Figures:
    """What one system scored; a phase that failed leaves its figure None and an error."""

    system: str
    config: str
    e2e_per_s: float | None = None
    e2e_seconds: float | None = None
    e2e_tasks: int | None = None
    submit_single_per_s: float | None = None
    submit_batch_per_s: float | None = None
    batch_api: str | None = None
    latency_ms: list[float] = field(default_factory=list)
    submit_call_ms: list[float] = field(default_factory=list)  # how long each latency submit took
    errors: dict[str, str] = field(default_factory=dict)

    def error(self, *phases: str) -> str | None:
        found = [f"{p}: {self.errors[p]}" for p in phases if p in self.errors]
        return "; ".join(found) if found else None


def one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text.splitlines()[0][:500] if text else type(exc).__name__


def phase(figures: Figures, name: str, fn: Callable[[], Any]) -> bool:
    """Run one phase; an exception is recorded against it (and logged) instead of raised."""
    try:
        fn()
        return True
    except Exception as exc:
        figures.errors[name] = one_line(exc)
        log(f"tasks: {figures.system} {name} failed: {figures.errors[name]}")
        return False


def spacing(rng: random.Random) -> float:
    """Idle time between latency samples: 5-25 ms, random so no poller stays in phase."""
    return rng.uniform(0.005, 0.025)


# --- worker processes ----------------------------------------------------------------------


class WorkerGroup:
    """Worker subprocesses, each in its own session; stopped by process group on exit."""

    def __init__(self, name: str, env: dict[str, str]) -> None:
        self.name = name
        self.env = {**os.environ, **env, "PYTHONPATH": str(REPO)}
        self.logdir = Path(tempfile.mkdtemp(prefix=f"tenfold-bench-{name}-"))
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []

    def start(self, commands: Sequence[Sequence[str]]) -> None:
        for i, command in enumerate(commands):
            path = self.logdir / f"worker-{i}.log"
            with path.open("wb") as out:
                proc = subprocess.Popen(
                    list(command),
                    cwd=REPO,
                    env=self.env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            self.procs.append(proc)
            self.logs.append(path)

    def check(self) -> None:
        """Raise if a worker exited."""
        for proc, path in zip(self.procs, self.logs, strict=True):
            code = proc.poll()
            if code is not None:
                raise RuntimeError(
                    f"{self.name} worker pid {proc.pid} exited with {code}\n{tail(path, 15)}"
                )

    def wait_until(self, check: Callable[[], bool], *, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            self.check()
            if time.monotonic() > deadline:
                detail = "\n".join(tail(p, 10) for p in self.logs)
                raise TimeoutError(
                    f"{self.name}: {what} not reached after {timeout:.0f}s\n{detail}"
                )
            time.sleep(0.02)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM each worker's process group (a Celery pool's children too), then SIGKILL."""
        for proc in self.procs:
            if proc.poll() is None:
                _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log(f"tasks: {self.name} worker pid {proc.pid} ignored SIGTERM; killing it")
            # Children (a prefork pool, an RQ work horse) may outlive their parent: kill the group.
            _signal_group(proc, signal.SIGKILL)
            if proc.poll() is None:
                proc.wait(5)
        self.procs.clear()
        if not os.environ.get("BENCH_KEEP_LOGS"):
            shutil.rmtree(self.logdir, ignore_errors=True)


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the group we created (start_new_session): this worker's only
    except (ProcessLookupError, PermissionError):
        pass


def python_tool(name: str) -> str:
    """A console script installed beside this interpreter (celery, rq, procrastinate)."""
    path = Path(sys.executable).with_name(name)
    if not path.exists():
        raise RuntimeError(f"`{name}` is not installed in this venv (pip install {name})")
    return str(path)


# --- PostgreSQL and Redis ------------------------------------------------------------------


def database_dsn(name: str) -> str:
    return f"postgresql://postgres@{PG_HOST}:{PG_PORT}/{name}"


async def _admin(sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn=PG_ADMIN_DSN, timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def create_database(name: str) -> str:
    assert name.startswith("bench_") and name.replace("_", "").isalnum()
    asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
    return database_dsn(name)


def drop_database(name: str) -> None:
    assert name.startswith("bench_")
    try:
        asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    except Exception as exc:
        log(f"tasks: could not drop database {name}: {one_line(exc)}")


def redis_client() -> Any:
    import redis

    return redis.Redis.from_url(REDIS_URL, socket_timeout=10)


def delete_redis_prefix(prefix: str = REDIS_PREFIX) -> int:
    """Delete the keys under our own prefix, and only those."""
    assert prefix.startswith("bench:") and len(prefix) > len("bench:")
    try:
        client = redis_client()
    except Exception:
        return 0
    deleted = 0
    try:
        deleted = delete_prefix(client, prefix)
    except Exception as exc:
        log(f"tasks: could not delete Redis keys under {prefix}: {one_line(exc)}")
    finally:
        client.close()
    return deleted


def wait_count(
    count: Callable[[], int], target: int, workers: WorkerGroup, *, timeout: float = TIMEOUT_S
) -> float:
    """Poll `count()` every POLL_S until it reaches `target`; perf_counter() when it did."""
    deadline = time.monotonic() + timeout
    while True:
        seen = count()
        if seen >= target:
            return time.perf_counter()
        workers.check()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{seen} of {target} tasks done after {timeout:.0f}s")
        time.sleep(POLL_S)
