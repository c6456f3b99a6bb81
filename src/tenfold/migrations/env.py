"""Alembic environment: runs the migrations over the async engine of the kernel."""

from __future__ import annotations

import asyncio
from typing import Any

from alembic import context

from tenfold.kernel.sql import create_engine, metadata


def _run(sync_conn: Any) -> None:
    context.configure(
        connection=sync_conn,
        target_metadata=metadata,
        render_as_batch=sync_conn.dialect.name == "sqlite",
        transaction_per_migration=False,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _main() -> None:
    url = context.config.attributes["database_url"]
    engine = create_engine(url.replace("+aiosqlite", "").replace("+asyncpg", ""))
    try:
        async with engine.connect() as conn:
            await conn.run_sync(_run)
            await conn.commit()
    finally:
        await engine.dispose()


asyncio.run(_main())
