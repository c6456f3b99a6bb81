"""The columnar event store: append-only event tables and small roll-up tables.

One narrow contract, `AnalyticsStore`, and two backends chosen by URL:

- `DuckDBStore` (`duckdb:///path`, `duckdb:` in memory): the embedded default, a file
  `<data_dir>/analytics.duckdb`, driven from one dedicated thread so the event loop never waits.
- `PostgresAnalyticsStore` (`postgresql://...`): scale-out runs, where many processes cannot
  share one DuckDB file; tables live in the same database as the rest of tenfold.

The contract is what ClickHouse can also do, so it can be added later without touching callers:

- tables are declared with portable column types and a key (`EventTable`); every column is
  NOT NULL, as ClickHouse columns are by default;
- `insert` appends a batch (ClickHouse: MergeTree ORDER BY key);
- `upsert` merges rows into a roll-up by primary key, adding the table's `sums` columns to what
  is there and replacing the others (ClickHouse: SummingMergeTree; queries use sum());
- `insert_missing` adds rows whose key is absent and returns those keys (a set that answers
  "first time?"; ClickHouse would do it with a read then an insert);
- `fetch`/`execute` run portable SQL with `:name` parameters, translated per backend;
- `transaction()` groups writes so a failed batch leaves nothing behind (ClickHouse: best effort).

Every table name starts with `analytics_`, so in the shared PostgreSQL database they never
collide with relational tables, and the same SQL text runs on every backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import re
import tempfile
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import orjson

from tenfold.kernel.errors import BackendUnavailable, StorageError

ColumnType = Literal["string", "int", "float", "bool", "timestamp", "date"]
Row = tuple[Any, ...]
Params = Mapping[str, Any] | None
T = TypeVar("T")

TABLE_PREFIX = "analytics_"
_IDENT = re.compile(r"^[a-z_][a-z0-9_]*$")


@dataclass(frozen=True, slots=True)
class EventTable:
    """A table: columns with portable types, in insert order, and its key.

    `primary=False`: an append-only event table; `key` is its sort order (an index in
    PostgreSQL, ORDER BY in ClickHouse). `primary=True`: a roll-up or set keyed by `key`;
    `upsert` adds the `sums` columns and replaces the other non-key columns.
    Timestamps are naive UTC datetimes.
    """

    name: str
    columns: tuple[tuple[str, ColumnType], ...]
    key: tuple[str, ...]
    primary: bool = False
    sums: tuple[str, ...] = ()
    _names: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.name.startswith(TABLE_PREFIX) or not _IDENT.match(self.name):
            raise ValueError(f"analytics table names are lower_snake and start {TABLE_PREFIX!r}")
        names = tuple(name for name, _ in self.columns)
        for name in names:
            if not _IDENT.match(name):
                raise ValueError(f"{self.name}: bad column name {name!r}")
        unknown = (set(self.key) | set(self.sums)) - set(names)
        if unknown:
            raise ValueError(f"{self.name}: key/sums name unknown columns {sorted(unknown)}")
        if self.sums and not self.primary:
            raise ValueError(f"{self.name}: sums need a primary key")
        object.__setattr__(self, "_names", names)

    @property
    def names(self) -> tuple[str, ...]:
        return self._names

    def key_indexes(self) -> list[int]:
        return [self._names.index(k) for k in self.key]


class AnalyticsWriter(Protocol):
    """What can be done inside a transaction (and on the store itself)."""

    async def insert(self, table: EventTable, rows: Sequence[Row]) -> None: ...
    async def upsert(self, table: EventTable, rows: Sequence[Row]) -> None: ...
    async def insert_missing(self, table: EventTable, rows: Sequence[Row]) -> list[Row]: ...
    async def fetch(self, sql: str, params: Params = None) -> list[Row]: ...
    async def execute(self, sql: str, params: Params = None) -> None: ...


class AnalyticsStore(AnalyticsWriter, Protocol):
    """The contract every analytics backend meets (tests/kernel/test_analytics.py)."""

    async def ensure(self, tables: Sequence[EventTable]) -> None: ...
    def transaction(self) -> contextlib.AbstractAsyncContextManager[AnalyticsWriter]: ...
    async def ping(self) -> None: ...
    async def close(self) -> None: ...


# --- shared pieces ---------------------------------------------------------------------------

_PARAM = re.compile(r"'(?:[^']|'')*'|::|:([A-Za-z_][A-Za-z0-9_]*)")


def positional(sql: str, params: Params) -> tuple[str, list[Any]]:
    """`:name` parameters -> `$1, $2, ...` (both DuckDB and PostgreSQL read those)."""
    order: dict[str, int] = {}

    def number(match: re.Match[str]) -> str:
        name = match.group(1)
        if name is None:
            return match.group(0)  # a string literal or a `::` cast
        if name not in order:
            order[name] = len(order) + 1
        return f"${order[name]}"

    text = _PARAM.sub(number, sql)
    values = params or {}
    missing = set(order) - set(values)
    if missing:
        raise ValueError(f"missing SQL parameters {sorted(missing)}")
    return text, [values[name] for name in order]


def merge_by_key(table: EventTable, rows: Sequence[Row]) -> list[Row]:
    """Rows with one key each: sums added, other columns from the last row."""
    keys = table.key_indexes()
    sums = [table.names.index(s) for s in table.sums]
    merged: dict[Row, list[Any]] = {}
    for row in rows:
        k = tuple(row[i] for i in keys)
        seen = merged.get(k)
        if seen is None:
            merged[k] = list(row)
            continue
        total = {i: seen[i] + row[i] for i in sums}
        seen[:] = row
        for i, value in total.items():
            seen[i] = value
    return [tuple(r) for r in merged.values()]


def _unique_keys(table: EventTable, rows: Sequence[Row]) -> list[Row]:
    keys = table.key_indexes()
    first: dict[Row, Row] = {}
    for row in rows:
        first.setdefault(tuple(row[i] for i in keys), row)
    return list(first.values())


# --- DuckDB ------------------------------------------------------------------------------------

_DUCK_TYPES: dict[str, str] = {
    "string": "VARCHAR",
    "int": "BIGINT",
    "float": "DOUBLE",
    "bool": "BOOLEAN",
    "timestamp": "TIMESTAMP",
    "date": "DATE",
}
_BULK_ABOVE = 200  # rows: bigger batches go through a JSON file, much faster than bound lists


def _duck_ddl(table: EventTable) -> str:
    cols = [f"{name} {_DUCK_TYPES[kind]} NOT NULL" for name, kind in table.columns]
    if table.primary:
        cols.append(f"PRIMARY KEY ({', '.join(table.key)})")
    return f"CREATE TABLE IF NOT EXISTS {table.name} ({', '.join(cols)})"


def _duck_select_lists(table: EventTable) -> str:
    return ", ".join(f"unnest(${i + 1}) AS {n}" for i, n in enumerate(table.names))


def _json_columns(table: EventTable, rows: Sequence[Row]) -> bytes | None:
    """A batch as one JSON object of columns ({"name": [values...]}), for DuckDB's read_json:
    orjson writes it in C, timestamps included, about 3x faster than formatting CSV. None
    when a float column holds NaN or an infinity, which JSON cannot carry."""
    columns = _columns(table, rows)
    for (_, kind), values in zip(table.columns, columns, strict=True):
        if kind == "float" and not all(map(math.isfinite, values)):
            return None
    return orjson.dumps(dict(zip(table.names, columns, strict=True)))


def _columns(table: EventTable, rows: Sequence[Row]) -> list[list[Any]]:
    return [list(col) for col in zip(*rows, strict=True)] if rows else [[] for _ in table.names]


class _DuckOps:
    """The sync operations, run on the store's one thread with a given connection."""

    @staticmethod
    def insert(con: Any, table: EventTable, rows: Sequence[Row]) -> None:
        document = _json_columns(table, rows) if len(rows) > _BULK_ABOVE else None
        if document is None:
            con.execute(
                f"INSERT INTO {table.name} SELECT {_duck_select_lists(table)}",
                _columns(table, rows),
            )
            return
        fd, path = tempfile.mkstemp(prefix="tenfold-analytics-", suffix=".json")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(document)
            spec = ", ".join(f"'{n}': '{_DUCK_TYPES[k]}[]'" for n, k in table.columns)
            values = ", ".join(f"unnest({n})" for n in table.names)
            con.execute(
                f"INSERT INTO {table.name} SELECT {values} FROM read_json($1, "  # noqa: S608
                f"format = 'unstructured', columns = {{{spec}}}, "
                f"maximum_object_size = {len(document) + 1})",
                [path],
            )
        finally:
            os.unlink(path)

    @staticmethod
    def upsert(con: Any, table: EventTable, rows: Sequence[Row]) -> None:
        rest = [n for n in table.names if n not in table.key]
        sets = ", ".join(
            f"{n} = {n} + excluded.{n}" if n in table.sums else f"{n} = excluded.{n}" for n in rest
        )
        action = f"DO UPDATE SET {sets}" if rest else "DO NOTHING"
        con.execute(
            f"INSERT INTO {table.name} SELECT {_duck_select_lists(table)} "
            f"ON CONFLICT ({', '.join(table.key)}) {action}",
            _columns(table, merge_by_key(table, rows)),
        )

    @staticmethod
    def insert_missing(con: Any, table: EventTable, rows: Sequence[Row]) -> list[Row]:
        found = con.execute(
            f"INSERT INTO {table.name} SELECT {_duck_select_lists(table)} "
            f"ON CONFLICT DO NOTHING RETURNING {', '.join(table.key)}",
            _columns(table, _unique_keys(table, rows)),
        ).fetchall()
        return [tuple(r) for r in found]

    @staticmethod
    def fetch(con: Any, sql: str, params: Params) -> list[Row]:
        text, values = positional(sql, params)
        return [tuple(r) for r in con.execute(text, values).fetchall()]

    @staticmethod
    def execute(con: Any, sql: str, params: Params) -> None:
        text, values = positional(sql, params)
        con.execute(text, values)


class _DuckWriter:
    def __init__(self, store: DuckDBStore, connection: Callable[[], Any]) -> None:
        self._store, self._connection = store, connection

    async def insert(self, table: EventTable, rows: Sequence[Row]) -> None:
        if rows:
            await self._store._run(lambda: _DuckOps.insert(self._connection(), table, rows))

    async def upsert(self, table: EventTable, rows: Sequence[Row]) -> None:
        if rows:
            await self._store._run(lambda: _DuckOps.upsert(self._connection(), table, rows))

    async def insert_missing(self, table: EventTable, rows: Sequence[Row]) -> list[Row]:
        if not rows:
            return []
        return await self._store._run(
            lambda: _DuckOps.insert_missing(self._connection(), table, rows)
        )

    async def fetch(self, sql: str, params: Params = None) -> list[Row]:
        return await self._store._run(lambda: _DuckOps.fetch(self._connection(), sql, params))

    async def execute(self, sql: str, params: Params = None) -> None:
        await self._store._run(lambda: _DuckOps.execute(self._connection(), sql, params))


class DuckDBStore:
    """DuckDB, embedded. Every call runs on one dedicated thread (DuckDB is synchronous)."""

    def __init__(self, path: str | Path | None = None, *, threads: int = 1) -> None:
        self.path = None if path in (None, "", ":memory:") else Path(path)  # None: in memory
        # DuckDB would run a batch on every core; here it shares the machine with the server
        # whose clicks it stores, so it gets one thread unless told otherwise.
        self.threads = threads
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="tenfold-duckdb")
        self._con: Any = None
        self._closed = False

    def _connection(self) -> Any:  # on the store's thread
        if self._con is None:
            if self._closed:
                raise BackendUnavailable("analytics store is closed")
            try:
                import duckdb
            except ImportError as exc:
                raise BackendUnavailable("DuckDB is missing: run `pip install duckdb`") from exc
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                self._con = duckdb.connect(
                    str(self.path) if self.path else ":memory:",
                    config={"threads": self.threads},
                )
            except duckdb.Error as exc:  # e.g. the file is locked by another process
                raise BackendUnavailable(f"cannot open DuckDB {self.path}: {exc}") from exc
        return self._con

    async def _run(self, fn: Callable[[], T]) -> T:
        def call() -> T:
            self._connection()
            return fn()

        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, call)
        except StorageError:
            raise
        except Exception as exc:
            raise _duck_error(exc) from exc

    def _writer(self) -> _DuckWriter:
        return _DuckWriter(self, self._connection)

    async def ensure(self, tables: Sequence[EventTable]) -> None:
        def create() -> None:
            con = self._connection()
            for table in tables:
                con.execute(_duck_ddl(table))

        await self._run(create)

    async def insert(self, table: EventTable, rows: Sequence[Row]) -> None:
        await self._writer().insert(table, rows)

    async def upsert(self, table: EventTable, rows: Sequence[Row]) -> None:
        await self._writer().upsert(table, rows)

    async def insert_missing(self, table: EventTable, rows: Sequence[Row]) -> list[Row]:
        return await self._writer().insert_missing(table, rows)

    async def fetch(self, sql: str, params: Params = None) -> list[Row]:
        return await self._writer().fetch(sql, params)

    async def execute(self, sql: str, params: Params = None) -> None:
        await self._writer().execute(sql, params)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[AnalyticsWriter]:
        cursor = await self._run(lambda: self._connection().cursor())
        await self._run(lambda: cursor.begin())
        try:
            yield _DuckWriter(self, lambda: cursor)
        except BaseException:
            with contextlib.suppress(Exception):
                await self._run(lambda: cursor.rollback())
            raise
        else:
            await self._run(lambda: cursor.commit())
        finally:
            with contextlib.suppress(Exception):
                await self._run(lambda: cursor.close())

    async def ping(self) -> None:
        await self._run(lambda: self._connection().execute("SELECT 1").fetchall())

    async def close(self) -> None:
        def shut() -> None:
            self._closed = True
            if self._con is not None:
                self._con.close()
                self._con = None

        if not self._closed:
            await asyncio.get_running_loop().run_in_executor(self._pool, shut)
        self._pool.shutdown(wait=False)


def _duck_error(exc: Exception) -> StorageError:
    import duckdb

    if isinstance(exc, duckdb.IOException | duckdb.ConnectionException | duckdb.FatalException):
        return BackendUnavailable(f"DuckDB unavailable: {type(exc).__name__}: {exc}")
    return StorageError(f"DuckDB failed: {type(exc).__name__}: {exc}")


# --- PostgreSQL --------------------------------------------------------------------------------

_PG_TYPES: dict[str, str] = {
    "string": "text",
    "int": "bigint",
    "float": "double precision",
    "bool": "boolean",
    "timestamp": "timestamp",
    "date": "date",
}


def _pg_ddl(table: EventTable) -> list[str]:
    cols = [f"{name} {_PG_TYPES[kind]} NOT NULL" for name, kind in table.columns]
    if table.primary:
        cols.append(f"PRIMARY KEY ({', '.join(table.key)})")
    statements = [f"CREATE TABLE IF NOT EXISTS {table.name} ({', '.join(cols)})"]
    if not table.primary:
        statements.append(
            f"CREATE INDEX IF NOT EXISTS {table.name}_key ON {table.name} ({', '.join(table.key)})"
        )
    return statements


def _pg_unnest(table: EventTable) -> str:
    arrays = ", ".join(f"${i + 1}::{_PG_TYPES[k]}[]" for i, (_, k) in enumerate(table.columns))
    names = ", ".join(table.names)
    return f"INSERT INTO {table.name} ({names}) SELECT * FROM unnest({arrays})"  # noqa: S608


class _PgWriter:
    def __init__(self, conn: Any) -> None:
        self._conn = conn

    async def insert(self, table: EventTable, rows: Sequence[Row]) -> None:
        if rows:
            await self._conn.copy_records_to_table(
                table.name, records=rows, columns=list(table.names)
            )

    async def upsert(self, table: EventTable, rows: Sequence[Row]) -> None:
        if not rows:
            return
        rest = [n for n in table.names if n not in table.key]
        sets = ", ".join(
            f"{n} = {table.name}.{n} + EXCLUDED.{n}" if n in table.sums else f"{n} = EXCLUDED.{n}"
            for n in rest
        )
        action = f"DO UPDATE SET {sets}" if rest else "DO NOTHING"
        await self._conn.execute(
            f"{_pg_unnest(table)} ON CONFLICT ({', '.join(table.key)}) {action}",
            *_columns(table, merge_by_key(table, rows)),
        )

    async def insert_missing(self, table: EventTable, rows: Sequence[Row]) -> list[Row]:
        if not rows:
            return []
        found = await self._conn.fetch(
            f"{_pg_unnest(table)} ON CONFLICT DO NOTHING RETURNING {', '.join(table.key)}",
            *_columns(table, _unique_keys(table, rows)),
        )
        return [tuple(r) for r in found]

    async def fetch(self, sql: str, params: Params = None) -> list[Row]:
        text, values = positional(sql, params)
        return [tuple(r) for r in await self._conn.fetch(text, *values)]

    async def execute(self, sql: str, params: Params = None) -> None:
        text, values = positional(sql, params)
        await self._conn.execute(text, *values)


@contextlib.contextmanager
def _pg_errors() -> Any:
    import asyncpg

    try:
        yield
    except StorageError:
        raise
    except (
        OSError,
        TimeoutError,
        asyncpg.PostgresConnectionError,
        asyncpg.InterfaceError,
        asyncpg.InvalidCatalogNameError,
        asyncpg.exceptions.OperatorInterventionError,
    ) as exc:
        raise BackendUnavailable(f"PostgreSQL unavailable: {type(exc).__name__}: {exc}") from exc
    except asyncpg.PostgresError as exc:
        raise StorageError(f"PostgreSQL failed: {type(exc).__name__}: {exc}") from exc


class PostgresAnalyticsStore:
    """Analytics tables in tenfold's PostgreSQL database; batches go in with COPY."""

    def __init__(self, url: str, *, pool_size: int = 4) -> None:
        try:
            import asyncpg  # noqa: F401
        except ImportError as exc:
            raise BackendUnavailable(
                "asyncpg is missing: run `pip install tenfold[postgres]`"
            ) from exc
        self.dsn = re.sub(r"^postgres(ql)?(\+\w+)?://", "postgresql://", url)
        self._pool_size = pool_size
        self._pool: Any = None
        self._lock = asyncio.Lock()

    async def _get_pool(self) -> Any:
        if self._pool is None:
            async with self._lock:
                if self._pool is None:
                    import asyncpg

                    with _pg_errors():
                        self._pool = await asyncpg.create_pool(
                            self.dsn, min_size=0, max_size=self._pool_size, timeout=5
                        )
        return self._pool

    @contextlib.asynccontextmanager
    async def _conn(self) -> AsyncIterator[Any]:
        pool = await self._get_pool()
        with _pg_errors():
            async with pool.acquire(timeout=10) as conn:
                yield conn

    async def ensure(self, tables: Sequence[EventTable]) -> None:
        async with self._conn() as conn, conn.transaction():
            # concurrent `CREATE ... IF NOT EXISTS` can still collide: one process at a time
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext('tenfold_analytics'))")
            for table in tables:
                for statement in _pg_ddl(table):
                    await conn.execute(statement)

    async def insert(self, table: EventTable, rows: Sequence[Row]) -> None:
        async with self._conn() as conn:
            await _PgWriter(conn).insert(table, rows)

    async def upsert(self, table: EventTable, rows: Sequence[Row]) -> None:
        async with self._conn() as conn:
            await _PgWriter(conn).upsert(table, rows)

    async def insert_missing(self, table: EventTable, rows: Sequence[Row]) -> list[Row]:
        async with self._conn() as conn:
            return await _PgWriter(conn).insert_missing(table, rows)

    async def fetch(self, sql: str, params: Params = None) -> list[Row]:
        async with self._conn() as conn:
            return await _PgWriter(conn).fetch(sql, params)

    async def execute(self, sql: str, params: Params = None) -> None:
        async with self._conn() as conn:
            await _PgWriter(conn).execute(sql, params)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[AnalyticsWriter]:
        async with self._conn() as conn:
            with _pg_errors():
                async with conn.transaction():
                    yield _PgWriter(conn)

    async def ping(self) -> None:
        async with self._conn() as conn:
            await conn.fetchval("SELECT 1")

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pool.close(), 5)


# --- choosing a backend ------------------------------------------------------------------------


def analytics_from_url(url: str, data_dir: str | Path) -> AnalyticsStore:
    """`""` -> `<data_dir>/analytics.duckdb`; `duckdb:` -> in memory; `duckdb:///abs/path`,
    `duckdb://relative/path` (under data_dir); `postgresql://...` -> PostgreSQL."""
    if not url:
        return DuckDBStore(Path(data_dir) / "analytics.duckdb")
    scheme, _, rest = url.partition(":")
    scheme = scheme.lower()
    if scheme == "duckdb":
        path = rest[2:] if rest.startswith("//") else rest
        if path in ("", ":memory:", "/:memory:"):
            return DuckDBStore(None)
        return DuckDBStore(Path(data_dir) / path)  # an absolute path stays absolute
    if scheme.split("+")[0] in ("postgresql", "postgres"):
        return PostgresAnalyticsStore(url)
    raise ValueError(f"unsupported analytics URL scheme {scheme!r} (duckdb:, postgresql:)")
