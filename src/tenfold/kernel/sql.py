"""The relational store: one async engine (SQLite embedded, PostgreSQL at scale) and migrations."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import MetaData, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from tenfold.kernel.errors import BackendUnavailable, MigrationError

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)
"""Every service declares its tables on this one MetaData."""

SQLITE_BUSY_TIMEOUT_MS = 5_000
T = TypeVar("T")


def async_url(url: str) -> str:
    """Map a user-facing URL to the async driver SQLAlchemy should use."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return str(parsed.set(drivername="sqlite+aiosqlite"))
    if backend in ("postgresql", "postgres"):
        return parsed.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)
    raise ValueError(f"unsupported database URL scheme {parsed.drivername!r}")


def is_sqlite(engine: AsyncEngine) -> bool:
    return engine.dialect.name == "sqlite"


def create_engine(url: str, **kwargs: Any) -> AsyncEngine:
    """Create the async engine; SQLite gets WAL, a busy timeout and real transactions."""
    target = async_url(url)
    parsed = make_url(target)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(target, **kwargs)
        _configure_sqlite(engine)
        _unavailable_on_connection_loss(engine)
        return engine
    kwargs.setdefault("pool_size", 10)
    kwargs.setdefault("max_overflow", 10)
    # No pre-ping (a round trip per checkout on every hot path): a connection found dead
    # fails one operation, and SQLAlchemy then invalidates the whole pool, so the next
    # checkout reconnects. Callers retry (workers) or answer 503 (HTTP).
    kwargs.setdefault("pool_recycle", 1800)
    kwargs.setdefault("connect_args", {"timeout": 5, "command_timeout": 30})
    engine = create_async_engine(target, **kwargs)
    _unavailable_on_connection_loss(engine)
    return engine


def _unavailable_on_connection_loss(engine: AsyncEngine) -> None:
    """A database that cannot be reached, or a connection lost mid-statement, raises
    BackendUnavailable (an HTTP 503), the same for every service and driver."""
    sync_engine = engine.sync_engine

    @event.listens_for(sync_engine, "do_connect")
    def _connect(dialect: Any, _record: Any, cargs: Any, cparams: Any) -> Any:
        try:
            return dialect.connect(*cargs, **cparams)
        except Exception as exc:
            raise BackendUnavailable(f"database unreachable: {type(exc).__name__}: {exc}") from exc

    @event.listens_for(sync_engine, "handle_error")
    def _lost(context: Any) -> None:
        error = context.original_exception
        if isinstance(error, asyncio.CancelledError):
            return  # a cancelled call is not an outage: let the cancellation through
        if context.is_disconnect and not context.is_pre_ping:
            raise BackendUnavailable(
                f"database connection lost: {type(error).__name__}: {error}"
            ) from error


def _configure_sqlite(engine: AsyncEngine) -> None:
    sync_engine = engine.sync_engine

    @event.listens_for(sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the driver, decide where transactions begin, so DDL is
        # transactional and a failed migration rolls back whole.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


async def ping(engine: AsyncEngine) -> None:
    """Raise BackendUnavailable unless the database answers."""
    try:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
    except BackendUnavailable:
        raise
    except Exception as exc:
        raise BackendUnavailable(f"database unreachable: {type(exc).__name__}: {exc}") from exc


def migrations_dir() -> Path:
    return Path(str(resources.files("tenfold") / "migrations"))


def _alembic_config(url: str, extra_locations: list[Path] | None = None) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    locations = [str(migrations_dir() / "versions"), *(str(p) for p in extra_locations or [])]
    cfg.set_main_option("version_locations", " ".join(locations))
    cfg.set_main_option("path_separator", "space")
    cfg.attributes["database_url"] = async_url(url)
    return cfg


def _outside_loop(fn: Callable[[], T]) -> T:
    """Run blocking `fn` here, or in a worker thread when this thread runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return fn()
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(fn).result()


def upgrade(url: str, revision: str = "heads", extra_locations: list[Path] | None = None) -> None:
    """Apply migrations up to `revision` (blocking), all in one transaction."""
    from alembic import command

    try:
        _outside_loop(lambda: command.upgrade(_alembic_config(url, extra_locations), revision))
    except Exception as exc:
        raise MigrationError(f"migration failed: {type(exc).__name__}: {exc}") from exc


def current_revision(url: str) -> str | None:
    """The revision the database is at, or None when it was never migrated."""

    async def _read() -> str | None:
        engine = create_engine(url)
        try:
            async with engine.connect() as conn:

                def _get(sync_conn: Any) -> str | None:
                    from alembic.runtime.migration import MigrationContext

                    heads = MigrationContext.configure(sync_conn).get_current_heads()
                    return ",".join(sorted(heads)) or None

                return await conn.run_sync(_get)
        finally:
            await engine.dispose()

    return _outside_loop(lambda: asyncio.run(_read()))


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(_alembic_config("sqlite://"))
    return ",".join(sorted(script.get_heads()))
