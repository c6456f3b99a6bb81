from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tenfold.kernel.clock import ManualClock
from tenfold.kernel.kv import KV, MemoryKV, RedisKV
from tenfold.kernel.runtime import Runtime
from tenfold.settings import Settings
from tests.backends import (
    REDIS_URL,
    PostgresTemplate,
    SqliteTemplate,
    delete_prefix,
    new_prefix,
    redis_available,
)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture(scope="session")
def pg_template() -> Iterator[PostgresTemplate]:
    template = PostgresTemplate()
    yield template
    template.close()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> SqliteTemplate:
    return SqliteTemplate(tmp_path_factory.mktemp("sqlite-template"))


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    redis_available()
    prefix = new_prefix()
    yield prefix
    delete_prefix(prefix)


def _database(
    kind: str, tmp_path: Path, pg_template: PostgresTemplate, sqlite_template: SqliteTemplate
) -> Iterator[str]:
    if kind == "sqlite":
        yield sqlite_template.clone(tmp_path / "db" / "tenfold.db")
        return
    name = pg_template.clone()
    try:
        from tests.backends import pg_url

        yield pg_url(name)
    finally:
        pg_template.drop(name)


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    pg_template: PostgresTemplate,
    sqlite_template: SqliteTemplate,
) -> Iterator[str]:
    """A migrated database of each SQL backend."""
    yield from _database(request.param, tmp_path, pg_template, sqlite_template)


@pytest.fixture(params=["memory", "redis"])
async def kv(request: pytest.FixtureRequest, clock: ManualClock) -> AsyncIterator[KV]:
    """An empty KV of each backend, on the manual clock."""
    if request.param == "memory":
        store: KV = MemoryKV("tftest", clock)
        yield store
        await store.close()
        return
    redis_available()
    prefix = new_prefix()
    store = RedisKV(REDIS_URL, prefix, clock)
    try:
        yield store
    finally:
        await store.close()
        delete_prefix(prefix)


StackFactory = Callable[..., Any]


@pytest.fixture(params=["embedded", "scale"])
def stack(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    pg_template: PostgresTemplate,
    sqlite_template: SqliteTemplate,
) -> Iterator[dict[str, str]]:
    """Settings overrides for each way to run: SQLite + memory, PostgreSQL + Redis."""
    data_dir = tmp_path / "data"
    if request.param == "embedded":
        url = next(_database("sqlite", tmp_path, pg_template, sqlite_template))
        yield {"data_dir": str(data_dir), "database_url": url, "redis_url": ""}
        return
    redis_available()
    prefix = new_prefix()
    gen = _database("postgres", tmp_path, pg_template, sqlite_template)
    url = next(gen)
    try:
        yield {
            "data_dir": str(data_dir),
            "database_url": url,
            "redis_url": REDIS_URL,
            "redis_prefix": prefix,
            "secret_key": TEST_SECRET_KEY,  # scale-out: every process shares the master key
        }
    finally:
        delete_prefix(prefix)
        next(gen, None)


TEST_SECRET_KEY = base64.urlsafe_b64encode(bytes(range(32))).decode()


def make_settings(**overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "log_format": "json",
        "ratelimit_events_sample": 0.0,
        "gc_freeze": False,  # many apps share one test process
        # Analytics work in the server's own process: a child per app would cost a second of
        # start-up to every test; tests/shortener/test_analytics_api.py runs the child.
        "shortener_analytics_process": False,
    }
    base.update(overrides)
    return Settings(**base)


@asynccontextmanager
async def serve_app(
    settings: Settings, clock: ManualClock | None = None
) -> AsyncIterator[tuple[Any, httpx.AsyncClient]]:
    """Build the app, run its lifespan, and hand out an HTTP client bound to it."""
    from tenfold.app import build_app

    runtime = Runtime.from_settings(settings, clock) if clock else None
    app = build_app(settings, runtime=runtime) if runtime else build_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, client=("203.0.113.7", 5000))
        async with httpx.AsyncClient(transport=transport, base_url="http://tenfold.test") as client:
            yield app, client


@pytest.fixture
def admin_key_of() -> Callable[[Settings], str]:
    def read(settings: Settings) -> str:
        return (Path(settings.data_dir) / "admin.key").read_text().strip()

    return read
