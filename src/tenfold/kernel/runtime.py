"""The running process's shared resources, built once from Settings and handed to services."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from tenfold.kernel.auth import KeyStore
from tenfold.kernel.clock import SYSTEM_CLOCK, Clock
from tenfold.kernel.kv import KV, kv_from_url
from tenfold.kernel.sql import create_engine, ping
from tenfold.settings import Settings

if TYPE_CHECKING:
    from fastapi import APIRouter
    from starlette.types import ASGIApp

    from tenfold.kernel.http import Gate, LeanRoute

log = structlog.get_logger(__name__)

Hook = Callable[[], Awaitable[None]]


@dataclass
class Mount:
    """What one service contributes to a process."""

    name: str
    routers: list[APIRouter] = field(default_factory=list)
    on_start: list[Hook] = field(default_factory=list)
    on_stop: list[Hook] = field(default_factory=list)
    public_paths: tuple[str, ...] = ()  # paths open without an API key
    raw_body_prefixes: tuple[str, ...] = ()  # paths whose bodies are not JSON
    wrap: Callable[[ASGIApp], ASGIApp] | None = None  # an ASGI middleware around the app
    lean_routes: list[LeanRoute] = field(default_factory=list)  # hot paths, ahead of FastAPI
    gate: Gate | None = None  # what `wrap` decides, for the lean routes (which it does not see)


@dataclass
class Runtime:
    settings: Settings
    engine: AsyncEngine
    kv: KV
    keys: KeyStore
    clock: Clock = SYSTEM_CLOCK
    services: dict[str, Any] = field(default_factory=dict)
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)

    @classmethod
    def from_settings(cls, settings: Settings, clock: Clock = SYSTEM_CLOCK) -> Runtime:
        engine = create_engine(settings.database_url)
        kv = kv_from_url(settings.redis_url, settings.redis_prefix, clock)
        return cls(settings, engine, kv, KeyStore(engine, clock), clock)

    def every(
        self, seconds: float, job: Callable[[], Awaitable[object]], name: str
    ) -> asyncio.Task[Any]:
        """Run `job` every `seconds` until the runtime closes. A job is never cut off in the
        middle (a cancelled database call can leave its connection behind)."""

        async def loop() -> None:
            while not self._stopping.is_set():
                try:
                    await asyncio.wait_for(self._stopping.wait(), seconds)
                    return
                except TimeoutError:
                    pass
                try:
                    await job()
                except Exception as exc:
                    log.warning(
                        "runtime.job_failed", job=name, error=f"{type(exc).__name__}: {exc}"
                    )

        return self.spawn(loop(), name)

    def spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        """Run a background coroutine tied to this runtime's life."""
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def check(self) -> dict[str, str]:
        """Ask every configured backend to answer; name the ones that do not."""
        results: dict[str, str] = {}
        for name, probe in (("database", ping(self.engine)), ("kv", self.kv.ping())):
            try:
                await asyncio.wait_for(probe, timeout=3)
                results[name] = "ok"
            except Exception as exc:
                results[name] = f"{type(exc).__name__}: {exc}"
        return results

    async def close(self) -> None:
        self._stopping.set()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.keys.close()
        await self.kv.close()
        await self.engine.dispose()


async def ensure_admin_key(runtime: Runtime) -> str | None:
    """On first start, create an admin key holding every scope; write it to <data dir>/admin.key."""
    if await runtime.keys.count_active() > 0:
        return None
    _, plaintext = await runtime.keys.create("admin (first start)", ["*"])
    path = Path(runtime.settings.data_dir) / "admin.key"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(plaintext + "\n")
    tmp.replace(path)
    log.info("auth.admin_key_created", path=str(path))
    return plaintext
