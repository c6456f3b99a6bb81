"""The analytics store contract, run against DuckDB and PostgreSQL."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from datetime import date, datetime
from pathlib import Path

import pytest

from tenfold.kernel.analytics import (
    AnalyticsStore,
    DuckDBStore,
    EventTable,
    PostgresAnalyticsStore,
    analytics_from_url,
    positional,
)
from tenfold.kernel.errors import BackendUnavailable, StorageError
from tests.backends import PostgresTemplate, pg_url

EVENTS = EventTable(
    "analytics_test_events",
    (
        ("name", "string"),
        ("n", "int"),
        ("x", "float"),
        ("flag", "bool"),
        ("ts", "timestamp"),
        ("day", "date"),
    ),
    key=("name", "ts"),
)
TOTALS = EventTable(
    "analytics_test_totals",
    (("name", "string"), ("day", "date"), ("hits", "int"), ("label", "string")),
    key=("name", "day"),
    primary=True,
    sums=("hits",),
)
SEEN = EventTable(
    "analytics_test_seen",
    (("name", "string"), ("visitor", "int")),
    key=("name", "visitor"),
    primary=True,
)
T0 = datetime(2024, 3, 1, 12, 30, 15, 250_000)
D0 = date(2024, 3, 1)


async def open_store(
    kind: str, tmp_path: Path, pg_template: PostgresTemplate
) -> AsyncIterator[AnalyticsStore]:
    if kind == "duckdb":
        store: AnalyticsStore = DuckDBStore(tmp_path / "analytics.duckdb")
        yield store
        await store.close()
        return
    name = await asyncio.to_thread(pg_template.clone)  # clone() runs its own event loop
    store = PostgresAnalyticsStore(pg_url(name))
    try:
        yield store
    finally:
        await store.close()
        await asyncio.to_thread(pg_template.drop, name)


@pytest.fixture(params=["duckdb", "postgres"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, pg_template: PostgresTemplate
) -> AsyncIterator[AnalyticsStore]:
    async for opened in open_store(request.param, tmp_path, pg_template):
        await opened.ensure([EVENTS, TOTALS, SEEN])
        yield opened


def event(i: int, name: str = "a") -> tuple[object, ...]:
    return (name, i, i / 4, i % 2 == 0, T0, D0)


async def test_insert_small_and_large_batches_round_trip(store: AnalyticsStore) -> None:
    tricky = ('comma, "quote"\nnewline', 1, -0.5, True, T0, D0)
    empty = ("", 0, 0.0, False, T0, D0)
    await store.insert(EVENTS, [tricky, empty])
    # big: the bulk path, with the same awkward values among the plain ones
    big_tricky = ("\"\", '', \\N\r\n", -(2**62), 1e-300, False, T0.replace(microsecond=1), D0)
    big_empty = ("", 0, 0.0, True, T0, D0)
    await store.insert(EVENTS, [event(i) for i in range(5_000)] + [big_tricky, big_empty])
    await store.insert(EVENTS, [])
    rows = await store.fetch("SELECT name, n, x, flag, ts, day FROM analytics_test_events")
    assert len(rows) == 5_004
    assert tricky in rows and empty in rows and event(4_999) in rows
    assert big_tricky in rows and big_empty in rows
    count = await store.fetch(
        "SELECT CAST(count(*) AS BIGINT), CAST(sum(n) AS BIGINT) FROM analytics_test_events"
        " WHERE name = :name AND n >= :low",
        {"name": "a", "low": 10},
    )
    assert count == [(4_990, sum(range(10, 5_000)))]


async def test_a_big_batch_keeps_floats_json_cannot_carry(store: AnalyticsStore) -> None:
    odd = [("inf", 1, math.inf, True, T0, D0), ("-inf", 2, -math.inf, True, T0, D0)]
    await store.insert(EVENTS, [event(i) for i in range(1_000)] + odd)
    rows = await store.fetch("SELECT name, x FROM analytics_test_events WHERE flag AND n < 3")
    assert ("inf", math.inf) in rows and ("-inf", -math.inf) in rows
    assert len(await store.fetch("SELECT name FROM analytics_test_events")) == 1_002


async def test_a_big_batch_with_a_missing_value_is_refused_whole(store: AnalyticsStore) -> None:
    rows = [event(i) for i in range(1_000)]
    rows[500] = (None, *rows[500][1:])
    with pytest.raises(StorageError):
        await store.insert(EVENTS, rows)
    assert await store.fetch("SELECT name FROM analytics_test_events") == []


async def test_ensure_is_idempotent(store: AnalyticsStore) -> None:
    await store.ensure([EVENTS, TOTALS, SEEN])
    assert await store.fetch("SELECT name FROM analytics_test_totals") == []


async def test_upsert_adds_sums_and_replaces_the_rest(store: AnalyticsStore) -> None:
    await store.upsert(TOTALS, [("a", D0, 2, "first"), ("b", D0, 1, "b")])
    await store.upsert(TOTALS, [("a", D0, 3, "second"), ("a", D0, 5, "third")])  # same key twice
    rows = await store.fetch(
        "SELECT name, day, hits, label FROM analytics_test_totals ORDER BY name"
    )
    assert rows == [("a", D0, 10, "third"), ("b", D0, 1, "b")]


async def test_insert_missing_returns_only_new_keys(store: AnalyticsStore) -> None:
    assert sorted(await store.insert_missing(SEEN, [("a", 1), ("a", 2), ("a", 1)])) == [
        ("a", 1),
        ("a", 2),
    ]
    assert await store.insert_missing(SEEN, [("a", 2), ("b", 2)]) == [("b", 2)]
    assert await store.insert_missing(SEEN, []) == []


async def test_transaction_commits_or_leaves_nothing(store: AnalyticsStore) -> None:
    async with store.transaction() as tx:
        await tx.insert(EVENTS, [event(1)])
        await tx.upsert(TOTALS, [("a", D0, 1, "x")])
    with pytest.raises(RuntimeError):
        async with store.transaction() as tx:
            await tx.insert(EVENTS, [event(i) for i in range(300)])
            await tx.upsert(TOTALS, [("a", D0, 1, "x")])
            assert await tx.insert_missing(SEEN, [("a", 7)]) == [("a", 7)]
            raise RuntimeError("boom")
    assert await store.fetch("SELECT CAST(count(*) AS BIGINT) FROM analytics_test_events") == [(1,)]
    assert await store.fetch("SELECT hits FROM analytics_test_totals") == [(1,)]
    assert await store.insert_missing(SEEN, [("a", 7)]) == [("a", 7)]


async def test_execute_and_portable_sql(store: AnalyticsStore) -> None:
    await store.insert(EVENTS, [event(i, "a") for i in range(10)] + [event(1, "b")])
    await store.execute("DELETE FROM analytics_test_events WHERE name = :name", {"name": "a"})
    rows = await store.fetch(
        "SELECT date_trunc('hour', ts) AS h, CAST(count(*) AS BIGINT)"
        " FROM analytics_test_events WHERE ts >= :since AND name <> 'x:y' GROUP BY h",
        {"since": datetime(2024, 3, 1)},
    )
    assert rows == [(datetime(2024, 3, 1, 12), 1)]


async def test_bad_sql_is_a_storage_error(store: AnalyticsStore) -> None:
    with pytest.raises(StorageError):
        await store.fetch("SELECT nope FROM analytics_missing_table")
    await store.ping()


def test_parameters_translate_to_positions() -> None:
    text, values = positional(
        "SELECT :a, :b::text, ':c', :a FROM t WHERE x = :b", {"a": 1, "b": 2, "c": 3}
    )
    assert text == "SELECT $1, $2::text, ':c', $1 FROM t WHERE x = $2"
    assert values == [1, 2]
    with pytest.raises(ValueError, match="missing"):
        positional("SELECT :a", {})


def test_table_names_are_checked() -> None:
    with pytest.raises(ValueError, match="analytics_"):
        EventTable("clicks", (("a", "string"),), key=("a",))
    with pytest.raises(ValueError, match="unknown"):
        EventTable("analytics_x", (("a", "string"),), key=("b",))
    with pytest.raises(ValueError, match="primary"):
        EventTable("analytics_x", (("a", "int"),), key=("a",), sums=("a",))


def test_backends_by_url(tmp_path: Path) -> None:
    default = analytics_from_url("", tmp_path)
    assert isinstance(default, DuckDBStore) and default.path == tmp_path / "analytics.duckdb"
    memory = analytics_from_url("duckdb:", tmp_path)
    assert isinstance(memory, DuckDBStore) and memory.path is None
    absolute = analytics_from_url(f"duckdb://{tmp_path}/a.duckdb", "/elsewhere")
    assert isinstance(absolute, DuckDBStore) and absolute.path == tmp_path / "a.duckdb"
    relative = analytics_from_url("duckdb://sub/b.duckdb", tmp_path)
    assert isinstance(relative, DuckDBStore) and relative.path == tmp_path / "sub" / "b.duckdb"
    assert isinstance(
        analytics_from_url("postgresql+asyncpg://u@h/db", tmp_path), PostgresAnalyticsStore
    )
    with pytest.raises(ValueError, match="scheme"):
        analytics_from_url("clickhouse://h", tmp_path)


async def test_unreachable_postgres_is_unavailable() -> None:
    store = PostgresAnalyticsStore("postgresql://postgres@127.0.0.1:1/none")
    with pytest.raises(BackendUnavailable):
        await store.ping()
    await store.close()


async def test_a_dropped_database_is_unavailable(pg_template: PostgresTemplate) -> None:
    name = await asyncio.to_thread(pg_template.clone)
    store = PostgresAnalyticsStore(pg_url(name))
    try:
        await store.ensure([EVENTS])
        await asyncio.to_thread(pg_template.drop, name)
        with pytest.raises(BackendUnavailable):
            await store.insert(EVENTS, [event(1)])
        with pytest.raises(BackendUnavailable):
            await store.ping()
    finally:
        await store.close()
        await asyncio.to_thread(pg_template.drop, name)


async def test_duckdb_file_persists(tmp_path: Path) -> None:
    first = DuckDBStore(tmp_path / "a.duckdb")
    await first.ensure([EVENTS])
    await first.insert(EVENTS, [event(1)])
    await first.close()
    second = DuckDBStore(tmp_path / "a.duckdb")
    assert await second.fetch("SELECT n FROM analytics_test_events") == [(1,)]
    await second.close()
