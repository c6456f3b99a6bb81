"""Wake-ups for idle workers: PostgreSQL LISTEN/NOTIFY, or an in-process event."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Protocol

import structlog
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection

log = structlog.get_logger(__name__)

CHANNEL = "tenfold_tasks"


class Notifier(Protocol):
    async def notify(self, conn: AsyncConnection, queue: str) -> None:
        """Announce new work, inside the submitting transaction (delivered on commit)."""
        ...

    def after_commit(self, queue: str) -> None: ...

    async def wait(self, seconds: float) -> bool:
        """Wait up to `seconds` for new work; True if woken."""
        ...

    async def close(self) -> None: ...


class LocalNotifier:
    """Embedded mode: workers in this process wait on an event."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    async def notify(self, conn: AsyncConnection, queue: str) -> None:
        return None

    def after_commit(self, queue: str) -> None:
        self._event.set()

    async def wait(self, seconds: float) -> bool:
        try:
            await asyncio.wait_for(self._event.wait(), seconds)
            return True
        except TimeoutError:
            return False
        finally:
            self._event.clear()

    async def close(self) -> None:
        return None


class PgNotifier(LocalNotifier):
    """NOTIFY inside the submitting transaction; one LISTEN connection per process.

    LISTEN needs a session: behind PgBouncer in transaction mode it silently gets nothing, and
    workers still find work through their polling interval."""

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url
        self._conn: Any = None
        self._task: asyncio.Task[None] | None = None

    async def notify(self, conn: AsyncConnection, queue: str) -> None:
        from sqlalchemy import text

        await conn.execute(text("SELECT pg_notify(:c, :q)"), {"c": CHANNEL, "q": queue})

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._listen(), name="tasks-listen")

    async def _listen(self) -> None:
        import asyncpg

        url = make_url(self.url)
        backoff = 0.2
        while True:
            try:
                self._conn = await asyncpg.connect(
                    host=url.host,
                    port=url.port or 5432,
                    user=url.username,
                    password=url.password,
                    database=url.database,
                    timeout=5,
                )
                await self._conn.add_listener(CHANNEL, self._on_notify)
                backoff = 0.2
                while not self._conn.is_closed():
                    await asyncio.sleep(1.0)
                    with contextlib.suppress(Exception):
                        await self._conn.execute("SELECT 1")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("tasks.listen_lost", error=str(exc))
                self._event.set()  # look for work while the listener is down
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                if self._conn is not None:
                    with contextlib.suppress(Exception):
                        await self._conn.close()
                    self._conn = None

    def _on_notify(self, *_: Any) -> None:
        self._event.set()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
