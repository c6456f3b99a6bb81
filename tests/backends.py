"""Every backend, listed once. Contract tests run over all of them.

A test that needs PostgreSQL or Redis skips on a laptop without it and fails in CI (CI=true).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

KV_BACKENDS = ["memory", "redis"]
SQL_BACKENDS = ["sqlite", "postgres"]
# Embedded and scale-out, the two ways tenfold runs.
STACKS = [("sqlite", "memory"), ("postgres", "redis")]

REDIS_URL = os.environ.get("TENFOLD_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get(
    "TENFOLD_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing(what: str, error: Exception) -> None:
    message = f"{what} is not reachable ({error}); run scripts/backends.sh"
    if IN_CI:
        pytest.fail(f"CI requires {message}", pytrace=False)
    pytest.skip(message)


def redis_available() -> None:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping()
    except Exception as exc:
        missing("Redis", exc)


def delete_prefix(prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


def new_prefix() -> str:
    return f"tftest{uuid.uuid4().hex[:10]}"


def free_port() -> int:
    """A TCP port nothing listens on now, for a server a test starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_ready(url: str, proc: subprocess.Popen[bytes], seconds: float = 30.0) -> None:
    """Poll a server the test started until /healthz answers (or the process exits)."""
    import httpx

    async with httpx.AsyncClient() as client:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}")
            try:
                if (await client.get(url + "/healthz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.05)  # polls the child's readiness
    raise RuntimeError("server did not start")


def _pg_admin_url() -> str:
    return POSTGRES_URL


async def _pg_exec(sql: str, database: str | None = None) -> None:
    import asyncpg
    from sqlalchemy.engine import make_url

    url = make_url(POSTGRES_URL)
    conn = await asyncpg.connect(
        host=url.host,
        port=url.port or 5432,
        user=url.username or "postgres",
        password=url.password,
        database=database or url.database or "postgres",
        timeout=3,
    )
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def pg_exec(sql: str, database: str | None = None) -> None:
    asyncio.run(_pg_exec(sql, database))


def pg_url(database: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(POSTGRES_URL).set(database=database).render_as_string(hide_password=False)


class PostgresTemplate:
    """A migrated template database; each test gets `CREATE DATABASE x TEMPLATE tpl`."""

    def __init__(self) -> None:
        self.name = f"tftpl_{uuid.uuid4().hex[:10]}"
        self.ready = False

    def ensure(self) -> None:
        if self.ready:
            return
        try:
            pg_exec("SELECT 1")
        except Exception as exc:
            missing("PostgreSQL", exc)
        from tenfold.kernel import sql

        pg_exec(f'CREATE DATABASE "{self.name}"')
        sql.upgrade(pg_url(self.name))
        self.ready = True

    def clone(self) -> str:
        self.ensure()
        name = f"tft_{uuid.uuid4().hex[:12]}"
        pg_exec(f'CREATE DATABASE "{name}" TEMPLATE "{self.name}"')
        return name

    def drop(self, name: str) -> None:
        pg_exec(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def close(self) -> None:
        if self.ready:
            self.drop(self.name)


class SqliteTemplate:
    """A migrated SQLite file, copied for each test."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "template.db"
        self.ready = False

    def clone(self, target: Path) -> str:
        if not self.ready:
            from tenfold.kernel import sql

            sql.upgrade(f"sqlite:///{self.path}")
            self.ready = True
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.path, target)
        return f"sqlite:///{target}"
