"""report() latency for one link with 1M recorded clicks, on DuckDB and PostgreSQL.

Run: `python -m benchmarks._analytics_query [clicks]` (PostgreSQL from
TENFOLD_TEST_POSTGRES_URL, default postgresql://postgres@127.0.0.1:5432/postgres; a scratch
database is created and dropped). Prints one JSON line per backend: load time and the
median / p95 milliseconds of report() per granularity. The target is < 100 ms.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from datetime import datetime, timedelta
from pathlib import Path

from tenfold.kernel.analytics import AnalyticsStore, DuckDBStore, PostgresAnalyticsStore
from tenfold.kernel.clock import ManualClock
from tenfold.shortener.clicks import ClickRecorder, ClickRow

POSTGRES_URL = os.environ.get(
    "TENFOLD_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
DAY1 = datetime(2024, 5, 6)


def batches(total: int, size: int) -> list[list[ClickRow]]:
    """A viral link over 30 days: a quarter of the clicks from returning visitors, 1% bots."""
    rnd = random.Random(7)
    hours = [DAY1 + timedelta(hours=h) for h in range(30 * 24)]
    devices = [("iPhone", "iOS", "Mobile Safari"), ("Desktop", "Windows", "Chrome")]
    countries = ["US", "DE", "FR", "JP", "BR", "IN", "GB", "CA"]
    referrers = ["t.co", "www.facebook.com", "", "news.ycombinator.com", "www.reddit.com"]
    out: list[list[ClickRow]] = []
    for start in range(0, total, size):
        rows: list[ClickRow] = []
        for i in range(start, min(total, start + size)):
            device, os_name, browser = devices[i % 2]
            country = countries[i % 8]
            rows.append(
                (
                    "s.io",
                    "viral",
                    hours[i * len(hours) // total] + timedelta(seconds=i % 3600),
                    rnd.getrandbits(62) if i % 4 else i % 5000,
                    i % 100 == 0,
                    country,
                    f"City {i % 40}, {country}",
                    device,
                    os_name,
                    browser,
                    referrers[i % 5],
                )
            )
        out.append(rows)
    return out


async def measure(name: str, store: AnalyticsStore, total: int) -> dict[str, object]:
    rec = ClickRecorder(store, clock=ManualClock(), salt_key=b"k" * 32)
    await rec.start()
    data = batches(total, 100_000)
    began = time.perf_counter()
    for rows in data:
        await rec.write(rows)
    load_s = time.perf_counter() - began
    result: dict[str, object] = {"backend": name, "clicks": total, "load_s": round(load_s, 2)}
    for granularity in ("hour", "day", "week"):
        samples = []
        report: dict[str, object] = {}
        for _ in range(30):
            t = time.perf_counter()
            report = await rec.report(
                "s.io",
                "viral",
                start=None,
                end=None,
                granularity=granularity,  # type: ignore[arg-type]
            )
            samples.append((time.perf_counter() - t) * 1000)
        assert report["total_clicks"] == total - total // 100, report["total_clicks"]
        samples.sort()
        result[f"{granularity}_ms_p50"] = round(statistics.median(samples), 2)
        result[f"{granularity}_ms_p95"] = round(samples[int(len(samples) * 0.95) - 1], 2)
    ranged = []
    for _ in range(30):
        t = time.perf_counter()
        await rec.report(
            "s.io",
            "viral",
            start=DAY1.date() + timedelta(days=3),
            end=DAY1.date() + timedelta(days=9),
        )
        ranged.append((time.perf_counter() - t) * 1000)
    result["week_range_day_ms_p50"] = round(statistics.median(ranged), 2)
    return result


async def pg_exec(sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(POSTGRES_URL)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def main(total: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        duck = DuckDBStore(Path(tmp) / "analytics.duckdb")
        try:
            print(json.dumps(await measure("duckdb", duck, total)), flush=True)
        finally:
            await duck.close()
    name = f"tfbench_{uuid.uuid4().hex[:10]}"
    await pg_exec(f'CREATE DATABASE "{name}"')
    pg = PostgresAnalyticsStore(POSTGRES_URL.rsplit("/", 1)[0] + "/" + name)
    try:
        print(json.dumps(await measure("postgres", pg, total)), flush=True)
    finally:
        await pg.close()
        await pg_exec(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000))
