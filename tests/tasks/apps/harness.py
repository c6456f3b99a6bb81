"""Start `tenfold worker` as a real process against a test database and watch it."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from tenfold.kernel.errors import BackendUnavailable

ROOT = Path(__file__).resolve().parents[3]
APP = "tests.tasks.apps.naps:registry"


class WorkerProcess:
    """`python -m tenfold worker ARGS` with its output in a file; killed if left running."""

    def __init__(self, db_url: str, directory: Path, *args: str) -> None:
        self.args = ["--app", APP, *args]
        self.log_path = directory / "worker.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("TENFOLD_")}
        env.update(
            TENFOLD_DATABASE_URL=db_url,
            TENFOLD_DATA_DIR=str(directory / "data"),
            TENFOLD_LOG_FORMAT="json",
            TENFOLD_LOG_LEVEL="info",
        )
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def __enter__(self) -> WorkerProcess:
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tenfold", "worker", *self.args],
            cwd=ROOT,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self.proc is not None and self._log is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        if exc is not None:  # show what the worker said next to the failure
            sys.stderr.write(self.output()[-6000:])

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def stop(self, sig: signal.Signals = signal.SIGTERM, within: float = 15.0) -> int:
        """Send `sig` and wait for the exit code."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        deadline = time.monotonic() + within
        while (code := self.proc.poll()) is None:
            assert time.monotonic() < deadline, f"worker still running {within} s after {sig.name}"
            await asyncio.sleep(0.05)
        return code

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


async def until(
    check: Callable[[], Awaitable[bool]], seconds: float, what: str, every: float = 0.1
) -> None:
    """Poll `check` until it holds, failing after `seconds`; database errors (a restarting
    server) count as not yet."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            if await check():
                return
        except (OSError, sa.exc.SQLAlchemyError, BackendUnavailable):
            pass
        assert time.monotonic() < deadline, f"not reached within {seconds} s: {what}"
        await asyncio.sleep(every)


async def rows(engine: AsyncEngine, sql: str, **params: Any) -> list[Any]:
    async with engine.connect() as conn:
        return list((await conn.execute(sa.text(sql), params)).all())


async def status_counts(engine: AsyncEngine) -> dict[str, int]:
    return dict(await rows(engine, "SELECT status, count(*) FROM tasks GROUP BY status"))


async def live_workers(engine: AsyncEngine) -> list[tuple[str, int, str]]:
    """(worker_id, pid, status) of registered workers whose process is alive."""
    found = await rows(engine, "SELECT worker_id, pid, status FROM task_workers")
    return [(w, pid, s) for w, pid, s in found if _alive(pid)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
