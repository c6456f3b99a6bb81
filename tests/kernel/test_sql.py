"""Migrations and engine set-up, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tenfold.kernel import sql
from tenfold.kernel.errors import BackendUnavailable, MigrationError
from tests.backends import PostgresTemplate, pg_exec, pg_url

TABLES_AT_HEAD = {"api_keys", "rate_limit_policies", "client_policies", "rate_limit_events"}

HALF_WAY_MIGRATION = textwrap.dedent(
    '''
    """A migration that fails half-way."""

    import sqlalchemy as sa
    from alembic import op

    revision = "9999"
    down_revision = "{head}"
    branch_labels = None
    depends_on = None


    def upgrade() -> None:
        op.create_table("half_made", sa.Column("id", sa.Integer, primary_key=True))
        op.execute("INSERT INTO half_made (id) VALUES (1)")
        op.execute("UPDATE api_keys SET name = 'changed by 0003'")
        op.execute("DELETE FROM rate_limit_meta")
        op.execute("THIS IS NOT SQL")


    def downgrade() -> None:
        op.drop_table("half_made")
    '''
)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _query(url: str, statement: str) -> list[tuple[Any, ...]]:
    engine = sql.create_engine(url)
    try:
        async with engine.connect() as conn:
            return [tuple(row) for row in await conn.execute(sa.text(statement))]
    finally:
        await engine.dispose()


async def _execute(url: str, *statements: str) -> None:
    engine = sql.create_engine(url)
    try:
        async with engine.begin() as conn:
            for statement in statements:
                await conn.execute(sa.text(statement))
    finally:
        await engine.dispose()


async def _tables(url: str) -> set[str]:
    engine = sql.create_engine(url)
    try:
        async with engine.connect() as conn:
            return set(await conn.run_sync(lambda c: sa.inspect(c).get_table_names()))
    finally:
        await engine.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def empty_db_url(
    request: pytest.FixtureRequest, tmp_path: Path, pg_template: PostgresTemplate
) -> Iterator[str]:
    """A database that was never migrated."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fresh.db'}"
        return
    pg_template.ensure()  # skips (or fails in CI) without PostgreSQL
    name = f"tft_{uuid.uuid4().hex[:12]}"
    pg_exec(f'CREATE DATABASE "{name}"')
    try:
        yield pg_url(name)
    finally:
        pg_template.drop(name)


def test_migrations_take_an_empty_database_to_head(empty_db_url: str) -> None:
    assert sql.current_revision(empty_db_url) is None
    sql.upgrade(empty_db_url)
    assert sql.current_revision(empty_db_url) == sql.head_revision()
    assert TABLES_AT_HEAD <= run(_tables(empty_db_url))


def test_the_migrated_schema_is_the_declared_one(empty_db_url: str) -> None:
    """Migrations and table definitions agree: no table, column or index of one is missing
    from the other or built differently."""
    import importlib

    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    for module in (  # every module that declares tables
        "tenfold.kernel.auth",
        "tenfold.kernel.crypto",
        "tenfold.ratelimit.stores.sql",
        "tenfold.tasks.tables",
        "tenfold.sessions.tables",
        "tenfold.shortener.tables",
        "tenfold.flags.tables",
    ):
        importlib.import_module(module)
    sql.upgrade(empty_db_url)

    def declared(name: str | None, kind: str, _parent: Any) -> bool:
        # PostgreSQL's trigram index for link search (migration 0008) is an expression
        # index with an operator class: beyond what a table definition states.
        return not (kind == "index" and name == "ix_shortener_links_search")

    async def differences() -> list[Any]:
        engine = sql.create_engine(empty_db_url)
        try:
            async with engine.connect() as conn:
                return await conn.run_sync(
                    lambda c: compare_metadata(
                        MigrationContext.configure(c, opts={"include_name": declared}),
                        sql.metadata,
                    )
                )
        finally:
            await engine.dispose()

    assert run(differences()) == []


def test_upgrading_a_database_at_head_changes_nothing(db_url: str) -> None:
    run(_execute(db_url, "INSERT INTO rate_limit_meta (id, version) VALUES (1, 41)"))
    assert sql.current_revision(db_url) == sql.head_revision()
    sql.upgrade(db_url)
    assert sql.current_revision(db_url) == sql.head_revision()
    assert run(_query(db_url, "SELECT id, version FROM rate_limit_meta")) == [(1, 41)]


def test_head_is_the_last_numbered_revision() -> None:
    newest = max(p.name.split("_", 1)[0] for p in (sql.migrations_dir() / "versions").glob("0*.py"))
    assert sql.head_revision() == newest


def test_a_migration_failing_half_way_leaves_the_database_as_it_was(
    db_url: str, tmp_path: Path
) -> None:
    head = sql.head_revision()
    assert sql.current_revision(db_url) == head
    run(
        _execute(
            db_url,
            "INSERT INTO api_keys (key_id, name, secret_hash, scopes, created_at) "
            "VALUES ('k1', 'kept', 'h', '[\"*\"]', CURRENT_TIMESTAMP)",
            "INSERT INTO rate_limit_meta (id, version) VALUES (1, 7)",
        )
    )
    versions = tmp_path / "bad-versions"
    versions.mkdir()
    (versions / "9999_half_way.py").write_text(HALF_WAY_MIGRATION.replace("{head}", head))

    with pytest.raises(MigrationError, match="THIS IS NOT SQL"):
        sql.upgrade(db_url, extra_locations=[versions])

    assert sql.current_revision(db_url) == head
    assert "half_made" not in run(_tables(db_url))
    assert run(_query(db_url, "SELECT key_id, name FROM api_keys")) == [("k1", "kept")]
    assert run(_query(db_url, "SELECT id, version FROM rate_limit_meta")) == [(1, 7)]


def test_a_lost_connection_is_backend_unavailable_and_the_next_one_works(
    pg_template: PostgresTemplate,
) -> None:
    name = pg_template.clone()
    url = pg_url(name)

    async def scenario() -> None:
        engine = sql.create_engine(url)
        try:
            async with engine.connect() as conn:
                pid = (await conn.execute(sa.text("SELECT pg_backend_pid()"))).scalar()
            await _execute(url, f"SELECT pg_terminate_backend({pid})")
            with pytest.raises(BackendUnavailable, match="database connection lost"):
                async with engine.connect() as conn:  # the pooled, now dead, connection
                    await conn.execute(sa.text("SELECT 1"))
            async with engine.connect() as conn:
                assert (await conn.execute(sa.text("SELECT 1"))).scalar() == 1
        finally:
            await engine.dispose()

    try:
        run(scenario())
    finally:
        pg_template.drop(name)


async def test_connecting_to_a_closed_port_is_backend_unavailable() -> None:
    engine = sql.create_engine("postgresql://postgres@127.0.0.1:1/nowhere")
    try:
        with pytest.raises(BackendUnavailable, match="database unreachable"):
            async with engine.connect():
                pass
    finally:
        await engine.dispose()


def test_a_migration_error_names_the_unreachable_database() -> None:
    with pytest.raises(MigrationError, match="migration failed"):
        sql.upgrade("postgresql://postgres@127.0.0.1:1/nowhere")


async def test_sqlite_engine_runs_wal_with_busy_timeout_and_foreign_keys(tmp_path: Path) -> None:
    engine = sql.create_engine(f"sqlite:///{tmp_path / 'new' / 'fresh.db'}")
    try:
        async with engine.connect() as conn:
            journal = (await conn.execute(sa.text("PRAGMA journal_mode"))).scalar()
            busy = (await conn.execute(sa.text("PRAGMA busy_timeout"))).scalar()
            foreign_keys = (await conn.execute(sa.text("PRAGMA foreign_keys"))).scalar()
    finally:
        await engine.dispose()
    assert journal == "wal"
    assert busy == sql.SQLITE_BUSY_TIMEOUT_MS
    assert foreign_keys == 1
    assert (tmp_path / "new" / "fresh.db").exists()  # the directory was created


async def test_sqlite_rolls_back_ddl_with_the_transaction(tmp_path: Path) -> None:
    engine = sql.create_engine(f"sqlite:///{tmp_path / 'tx.db'}")
    try:
        with pytest.raises(RuntimeError):
            async with engine.begin() as conn:
                await conn.execute(sa.text("CREATE TABLE t (id INTEGER PRIMARY KEY)"))
                raise RuntimeError("abort")
        async with engine.connect() as conn:
            names = await conn.run_sync(lambda c: sa.inspect(c).get_table_names())
    finally:
        await engine.dispose()
    assert "t" not in names


async def test_ping_of_an_unreachable_database_is_backend_unavailable() -> None:
    engine = sql.create_engine("postgresql://postgres@127.0.0.1:1/nowhere")
    try:
        with pytest.raises(BackendUnavailable, match="database unreachable"):
            await sql.ping(engine)
    finally:
        await engine.dispose()


@pytest.mark.parametrize(
    ("url", "driver"),
    [
        ("sqlite:///x.db", "sqlite+aiosqlite"),
        ("postgresql://u@h/db", "postgresql+asyncpg"),
        ("postgres://u@h/db", "postgresql+asyncpg"),
    ],
)
def test_async_url_picks_the_async_driver(url: str, driver: str) -> None:
    assert sql.async_url(url).startswith(driver + "://")


def test_async_url_refuses_other_databases() -> None:
    with pytest.raises(ValueError, match="mysql"):
        sql.async_url("mysql://u@h/db")
