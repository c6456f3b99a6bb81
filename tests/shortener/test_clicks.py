"""Click analytics: the buffer, enrichment, roll-ups and reports, over DuckDB and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tenfold.kernel.analytics import (
    AnalyticsStore,
    AnalyticsWriter,
    DuckDBStore,
    PostgresAnalyticsStore,
)
from tenfold.kernel.clock import ManualClock
from tenfold.kernel.errors import BackendUnavailable
from tenfold.shortener.clicks import ClickRecorder, ClickRow, classify, referrer_host
from tests.backends import PostgresTemplate, pg_url

CHROME = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/120.0.0.0 Safari/537.36"
)
IPHONE = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 16_0 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/16.0 Mobile/15E148 Safari/604.1"
)
SLACK = "Slackbot-LinkExpanding 1.0 (+https://api.slack.com/robots)"
DAY1 = datetime(2024, 5, 6, 9, 15)  # a Monday
KEY = b"k" * 32


def ms(at: datetime) -> int:
    return int((at - datetime(1970, 1, 1)).total_seconds() * 1000)


@pytest.fixture(params=["duckdb", "postgres"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, pg_template: PostgresTemplate
) -> AsyncIterator[AnalyticsStore]:
    if request.param == "duckdb":
        duck = DuckDBStore(tmp_path / "analytics.duckdb")
        yield duck
        await duck.close()
        return
    name = await asyncio.to_thread(pg_template.clone)  # clone() runs its own event loop
    pg = PostgresAnalyticsStore(pg_url(name))
    try:
        yield pg
    finally:
        await pg.close()
        await asyncio.to_thread(pg_template.drop, name)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(ms(DAY1) / 1000)


async def recorder_for(store: AnalyticsStore, clock: ManualClock, **kw: Any) -> ClickRecorder:
    recorder = ClickRecorder(store, clock=clock, salt_key=KEY, **kw)
    await recorder.start()
    return recorder


async def test_counts_uniques_devices_and_referrers(
    store: AnalyticsStore, clock: ManualClock
) -> None:
    rec = await recorder_for(store, clock)
    day2 = DAY1 + timedelta(days=1)
    rec.record(ms(DAY1), "s.io", "abc", "198.51.100.1", CHROME, "https://t.co/xyz")
    rec.record(ms(DAY1) + 60_000, "s.io", "abc", "198.51.100.1", CHROME, "")
    rec.record(ms(DAY1) + 120_000, "s.io", "abc", "198.51.100.2", IPHONE, "https://www.x.com/a")
    rec.record(ms(DAY1) + 180_000, "s.io", "abc", "198.51.100.3", SLACK, "")
    rec.record(ms(day2), "s.io", "abc", "198.51.100.1", CHROME, "t.co")
    rec.record(ms(day2), "s.io", "other", "198.51.100.1", CHROME, "")
    assert rec.buffered == 6
    assert await rec.flush() == 6
    assert rec.buffered == 0

    report = await rec.report("s.io", "abc", start=None, end=None)
    assert report["total_clicks"] == 4
    assert report["unique_clicks"] == 3  # the same visitor on two days counts twice
    assert report["bot_clicks"] == 1
    assert report["click_timeline"] == [
        {"period": "2024-05-06", "clicks": 3, "unique_clicks": 2},
        {"period": "2024-05-07", "clicks": 1, "unique_clicks": 1},
    ]
    assert report["device_breakdown"] == {
        "devices": {"Desktop": 3, "iPhone": 1},
        "os": {"Windows": 3, "iOS": 1},
        "browsers": {"Chrome": 3, "Mobile Safari": 1},
    }
    assert report["referrer_stats"] == {"t.co": 2, "direct": 1, "www.x.com": 1}
    assert report["geographic_distribution"] == {
        "countries": {"unknown": 4},
        "cities": {"unknown": 4},
    }

    with_bots = await rec.report("s.io", "abc", start=None, end=None, include_bots=True)
    assert (with_bots["total_clicks"], with_bots["unique_clicks"]) == (5, 4)
    assert with_bots["bot_clicks"] == 1
    assert with_bots["device_breakdown"]["devices"]["Bot"] == 1

    other = await rec.report("s.io", "other", start=None, end=None)
    assert (other["total_clicks"], other["unique_clicks"]) == (1, 1)
    nothing = await rec.report("s.io", "nope", start=None, end=None)
    assert nothing["total_clicks"] == 0 and nothing["click_timeline"] == []


async def test_uniques_across_flushes(store: AnalyticsStore, clock: ManualClock) -> None:
    rec = await recorder_for(store, clock, batch=2)
    for i in range(5):  # one visitor, five clicks, flushed in batches of two
        rec.record(ms(DAY1) + i, "s.io", "abc", "198.51.100.1", CHROME, "")
    assert await rec.flush() == 5
    rec.record(ms(DAY1) + 9, "s.io", "abc", "198.51.100.1", CHROME, "")
    rec.record(ms(DAY1) + 9, "s.io", "abc", "198.51.100.1", IPHONE, "")  # another device
    await rec.flush()
    report = await rec.report("s.io", "abc", start=None, end=None)
    assert (report["total_clicks"], report["unique_clicks"]) == (7, 2)


async def test_geoip_country_and_city(
    store: AnalyticsStore, clock: ManualClock, tmp_path: Path
) -> None:
    from mmdb_writer import MMDBWriter
    from netaddr import IPSet

    writer = MMDBWriter(ip_version=6, ipv4_compatible=True, database_type="GeoIP2-City")
    writer.insert_network(
        IPSet(["198.51.100.0/24"]),
        {"country": {"iso_code": "DE"}, "city": {"names": {"en": "Berlin"}}},
    )
    writer.insert_network(IPSet(["203.0.113.0/24"]), {"country": {"iso_code": "FR"}})
    path = tmp_path / "cities.mmdb"
    writer.to_db_file(str(path))
    rec = await recorder_for(store, clock, geoip_db=str(path))
    rec.record(ms(DAY1), "s.io", "abc", "198.51.100.7", CHROME, "")
    rec.record(ms(DAY1), "s.io", "abc", "198.51.100.8", CHROME, "")
    rec.record(ms(DAY1), "s.io", "abc", "203.0.113.9", CHROME, "")
    rec.record(ms(DAY1), "s.io", "abc", "192.0.2.1", CHROME, "")
    rec.record(ms(DAY1), "s.io", "abc", "not an ip", CHROME, "")
    await rec.flush()
    report = await rec.report("s.io", "abc", start=None, end=None)
    assert report["geographic_distribution"] == {
        "countries": {"DE": 2, "unknown": 2, "FR": 1},
        "cities": {"Berlin, DE": 2, "unknown": 3},
    }


async def test_granularity_and_date_range(store: AnalyticsStore, clock: ManualClock) -> None:
    rec = await recorder_for(store, clock)
    # Monday 09:15 x2, Monday 10:05, Wednesday, next Monday (another week)
    times = [
        DAY1,
        DAY1 + timedelta(minutes=20),
        DAY1 + timedelta(minutes=50),
        DAY1 + timedelta(days=2),
        DAY1 + timedelta(days=7),
    ]
    for i, at in enumerate(times):
        rec.record(ms(at), "s.io", "abc", f"198.51.100.{i}", CHROME, "")
    await rec.flush()

    hourly = await rec.report("s.io", "abc", start=None, end=None, granularity="hour")
    assert [(p["period"], p["clicks"]) for p in hourly["click_timeline"]] == [
        ("2024-05-06T09:00:00Z", 2),
        ("2024-05-06T10:00:00Z", 1),
        ("2024-05-08T09:00:00Z", 1),
        ("2024-05-13T09:00:00Z", 1),
    ]
    weekly = await rec.report("s.io", "abc", start=None, end=None, granularity="week")
    assert weekly["click_timeline"] == [
        {"period": "2024-05-06", "clicks": 4, "unique_clicks": 4},
        {"period": "2024-05-13", "clicks": 1, "unique_clicks": 1},
    ]
    ranged = await rec.report("s.io", "abc", start=date(2024, 5, 7), end=date(2024, 5, 8))
    assert ranged["total_clicks"] == 1
    assert ranged["device_breakdown"]["devices"] == {"Desktop": 1}
    assert ranged["click_timeline"] == [{"period": "2024-05-08", "clicks": 1, "unique_clicks": 1}]
    from_day = await rec.report("s.io", "abc", start=date(2024, 5, 8), end=None)
    assert from_day["total_clicks"] == 2
    until = await rec.report("s.io", "abc", start=None, end=date(2024, 5, 6))
    assert until["total_clicks"] == 3 and until["device_breakdown"]["os"] == {"Windows": 3}
    from tenfold.kernel.errors import FieldError

    with pytest.raises(FieldError):
        await rec.report("s.io", "abc", start=date(2024, 5, 8), end=date(2024, 5, 7))
    with pytest.raises(FieldError):
        await rec.report("s.io", "abc", start=None, end=None, granularity="month")  # type: ignore[arg-type]


async def test_full_buffer_drops_and_keeps_answering(clock: ManualClock) -> None:
    rec = ClickRecorder(DuckDBStore(None), clock=clock, salt_key=KEY, capacity=3)
    results = [rec.record(ms(DAY1), "s.io", "abc", "198.51.100.1", CHROME, "") for _ in range(5)]
    assert results == [True, True, True, False, False]
    assert (rec.buffered, rec.dropped) == (3, 2)
    await rec.store.close()


async def test_counted_entries_fill_the_bound_in_clicks(clock: ManualClock) -> None:
    rec = ClickRecorder(DuckDBStore(None), clock=clock, salt_key=KEY, capacity=10)
    click = (ms(DAY1), "s.io", "abc", "198.51.100.1", CHROME, "")
    assert rec.add((*click, 6)) == 6
    assert rec.record(*click)
    assert rec.add((*click, 5)) == 3  # three fit, two are dropped
    assert (rec.buffered, rec.dropped) == (10, 2)
    assert rec.add((*click, 1)) == 0 and rec.dropped == 3
    await rec.store.close()


async def test_clicks_from_the_serving_process_are_taken_within_the_bound(
    clock: ManualClock,
) -> None:
    rec = ClickRecorder(DuckDBStore(None), clock=clock, salt_key=KEY, capacity=10)
    keys = [[ms(DAY1), "s.io", "abc", f"198.51.100.{i}", CHROME, ""] for i in range(3)]
    assert rec.add_many(keys, [2, 3, 1]) == 6  # all fit: taken at once
    assert rec.add_many(keys, [1, 4, 2]) == 4  # 1, then 3 of 4, then none
    assert (rec.buffered, rec.dropped) == (10, 3)
    assert [c[6] for c in rec._buffer] == [2, 3, 1, 1, 3]
    await rec.store.close()


class FlakyStore:
    """A real store whose writes fail while `down`; can record clicks mid-flush."""

    def __init__(self, inner: AnalyticsStore) -> None:
        self.inner = inner
        self.down = False
        self.during_write: list[Any] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[AnalyticsWriter]:
        for call in self.during_write:
            call()
        self.during_write = []
        if self.down:
            raise BackendUnavailable("down for the test")
        async with self.inner.transaction() as tx:
            yield tx


async def test_store_down_keeps_clicks_up_to_the_bound(
    store: AnalyticsStore, clock: ManualClock
) -> None:
    flaky = FlakyStore(store)
    rec = await recorder_for(flaky, clock, capacity=10, batch=4)  # type: ignore[arg-type]
    for i in range(6):
        rec.record(ms(DAY1) + i, "s.io", "abc", f"198.51.100.{i}", CHROME, "")
    flaky.down = True
    # while the failing batch of 4 is out of the buffer, 7 more clicks arrive: 11 > 10
    flaky.during_write = [
        lambda: [
            rec.record(ms(DAY1) + 100 + i, "s.io", "abc", "198.51.100.99", CHROME, "")
            for i in range(7)
        ]
    ]
    with pytest.raises(BackendUnavailable):
        await rec.flush()
    # the bound holds: of the failed four, only the newest fits back in
    assert (rec.buffered, rec.dropped) == (10, 3)
    assert not rec.record(ms(DAY1), "s.io", "abc", "198.51.100.1", CHROME, "")
    assert rec.dropped == 4
    with pytest.raises(BackendUnavailable):
        await rec.flush()
    assert rec.buffered == 10

    flaky.down = False
    assert await rec.flush() == 10
    report = await rec.report("s.io", "abc", start=None, end=None)
    assert report["total_clicks"] == 10
    assert report["unique_clicks"] == 4  # .3 (kept from the failed batch), .4, .5 and .99
    assert rec.buffered == 0


async def test_forget_removes_stored_and_buffered_clicks(
    store: AnalyticsStore, clock: ManualClock
) -> None:
    rec = await recorder_for(store, clock)
    rec.record(ms(DAY1), "s.io", "abc", "198.51.100.1", CHROME, "")
    rec.record(ms(DAY1), "s.io", "keep", "198.51.100.1", CHROME, "")
    await rec.flush()
    rec.record(ms(DAY1), "s.io", "abc", "198.51.100.2", CHROME, "")
    await rec.forget("s.io", "abc")
    assert rec.buffered == 0
    await rec.flush()
    gone = await rec.report("s.io", "abc", start=None, end=None)
    assert gone["total_clicks"] == 0 and gone["referrer_stats"] == {}
    assert await store.fetch("SELECT code FROM analytics_link_clicks") == [("keep",)]
    kept = await rec.report("s.io", "keep", start=None, end=None)
    assert kept["total_clicks"] == 1


async def test_raw_ips_are_never_stored(store: AnalyticsStore, clock: ManualClock) -> None:
    rec = await recorder_for(store, clock)
    rec.record(ms(DAY1), "s.io", "abc", "198.51.100.77", CHROME, "https://198.51.100.5/")
    await rec.flush()
    stored = [
        *await store.fetch("SELECT * FROM analytics_link_clicks"),
        *await store.fetch("SELECT * FROM analytics_link_visitors"),
    ]
    assert stored and "198.51.100.77" not in repr(stored)


async def test_old_visitor_ids_are_pruned(store: AnalyticsStore, clock: ManualClock) -> None:
    rec = await recorder_for(store, clock)
    for days in (0, 1, 2):
        rec.record(ms(DAY1 + timedelta(days=days)), "s.io", "abc", "198.51.100.1", CHROME, "")
    await rec.flush()
    clock.advance(2 * 86_400)  # now is DAY1 + 2 days: DAY1's visitors cannot matter any more
    await rec.flush()
    days = await store.fetch("SELECT day FROM analytics_link_visitors ORDER BY day")
    assert days == [(date(2024, 5, 7),), (date(2024, 5, 8),)]
    report = await rec.report("s.io", "abc", start=None, end=None)
    assert report["unique_clicks"] == 3


def test_user_agents_are_classified() -> None:
    assert classify(CHROME) == ("Desktop", "Windows", "Chrome", False)
    assert classify(IPHONE) == ("iPhone", "iOS", "Mobile Safari", False)
    for bot in (
        SLACK,
        "Googlebot/2.1 (+http://www.google.com/bot.html)",
        "facebookexternalhit/1.1",
        "curl/8.4.0",
        "python-requests/2.31",
        "Go-http-client/1.1",
        "",
    ):
        assert classify(bot)[3], bot
        assert classify(bot)[0] == "Bot"
    assert referrer_host("https://News.Example.com:8443/a?b") == "news.example.com"
    assert referrer_host("t.co/x") == "t.co"
    assert referrer_host("http://[::1") == ""
    assert referrer_host("") == ""


async def test_a_viral_link(tmp_path: Path, clock: ManualClock) -> None:
    """200k clicks on one link, loaded through the write path in big batches (record() is for
    one click at a time); benchmarks/_analytics_query.py measures report() at 1M."""
    store = DuckDBStore(tmp_path / "analytics.duckdb")
    rec = await recorder_for(store, clock)
    total, batch = 200_000, 50_000
    rnd = random.Random(7)
    devices = [("iPhone", "iOS", "Mobile Safari"), ("Desktop", "Windows", "Chrome")]
    countries = ["US", "DE", "FR", "JP"]
    hours = [DAY1 + timedelta(hours=h) for h in range(72)]
    for start in range(0, total, batch):
        rows: list[ClickRow] = []
        for i in range(start, start + batch):
            device, os_name, browser = devices[i % 2]
            country = countries[i % 4]
            rows.append(
                (
                    "s.io",
                    "viral",
                    hours[i % 72],
                    rnd.getrandbits(62) if i % 4 else i % 1000,  # returning visitors
                    i % 100 == 0,
                    country,
                    f"City {i % 7}, {country}",
                    device,
                    os_name,
                    browser,
                    "t.co" if i % 3 else "",
                )
            )
        await rec.write(rows)
    report = await rec.report("s.io", "viral", start=None, end=None, granularity="hour")
    assert report["bot_clicks"] == total // 100
    assert report["total_clicks"] == total - total // 100
    assert len(report["click_timeline"]) == 72
    assert sum(p["clicks"] for p in report["click_timeline"]) == report["total_clicks"]
    assert sum(report["geographic_distribution"]["countries"].values()) == report["total_clicks"]
    assert report["device_breakdown"]["devices"]["iPhone"] == total // 2 - total // 100
    assert report["unique_clicks"] < report["total_clicks"]
    await store.close()


# --- visitor sets in the KV (memory embedded, Redis at scale) ---------------------------------


async def test_uniques_from_the_kv_visitor_sets(
    store: AnalyticsStore, clock: ManualClock, kv: Any
) -> None:
    rec = await recorder_for(store, clock, kv=kv, batch=2)
    day2 = DAY1 + timedelta(days=1)
    for i in range(5):  # one visitor, five clicks, flushed in batches of two
        rec.record(ms(DAY1) + i * 1000, "s.io", "abc", "198.51.100.1", CHROME, "")
    rec.record(ms(DAY1) + 9000, "s.io", "abc", "198.51.100.1", IPHONE, "")  # another device
    rec.record(ms(day2), "s.io", "abc", "198.51.100.1", CHROME, "")  # the next day: again
    assert await rec.flush() == 7
    # A second process (its own recorder, the same KV) knows these visitors already.
    other = await recorder_for(store, clock, kv=kv)
    other.record(ms(DAY1) + 20_000, "s.io", "abc", "198.51.100.1", IPHONE, "")
    await other.flush()
    report = await rec.report("s.io", "abc", start=None, end=None)
    assert (report["total_clicks"], report["unique_clicks"]) == (8, 3)
    assert await store.fetch("SELECT count(*) FROM analytics_link_visitors") == [(0,)]


async def test_a_failed_write_keeps_its_unique_clicks(
    store: AnalyticsStore, clock: ManualClock, kv: Any
) -> None:
    """The KV saw the visitors before the store refused the batch: the retry still counts them."""
    flaky = FlakyStore(store)
    rec = await recorder_for(flaky, clock, kv=kv)  # type: ignore[arg-type]
    rec.record(ms(DAY1), "s.io", "abc", "198.51.100.1", CHROME, "")
    rec.record(ms(DAY1), "s.io", "abc", "198.51.100.2", CHROME, "")
    flaky.down = True
    with pytest.raises(BackendUnavailable):
        await rec.flush()
    flaky.down = False
    assert await rec.flush() == 2
    report = await rec.report("s.io", "abc", start=None, end=None)
    assert (report["total_clicks"], report["unique_clicks"]) == (2, 2)


async def test_identical_clicks_are_stored_once_with_their_count(
    store: AnalyticsStore, clock: ManualClock
) -> None:
    rec = await recorder_for(store, clock)
    for _ in range(3):  # a reload within the same second
        rec.record(ms(DAY1) + 250, "s.io", "abc", "198.51.100.1", CHROME, "https://t.co/x")
    rec.record(ms(DAY1) + 1250, "s.io", "abc", "198.51.100.1", CHROME, "https://t.co/x")
    await rec.flush()
    rows = await store.fetch("SELECT clicks FROM analytics_link_clicks ORDER BY clicked_at")
    assert rows == [(3,), (1,)]
    report = await rec.report("s.io", "abc", start=None, end=None)
    assert (report["total_clicks"], report["unique_clicks"]) == (4, 1)


async def test_raw_clicks_can_be_left_out(store: AnalyticsStore, clock: ManualClock) -> None:
    rec = await recorder_for(store, clock, raw_clicks=False)
    rec.record(ms(DAY1), "s.io", "abc", "198.51.100.1", CHROME, "")
    await rec.flush()
    assert await store.fetch("SELECT count(*) FROM analytics_link_clicks") == [(0,)]
    assert (await rec.report("s.io", "abc", start=None, end=None))["total_clicks"] == 1


async def test_a_failed_batch_of_counted_entries_keeps_its_newest_clicks(
    store: AnalyticsStore, clock: ManualClock
) -> None:
    flaky = FlakyStore(store)
    rec = await recorder_for(flaky, clock, capacity=10, batch=10)  # type: ignore[arg-type]
    click = (ms(DAY1), "s.io", "abc", "198.51.100.1", CHROME, "")
    rec.add((*click, 6))
    rec.record(ms(DAY1) + 1, "s.io", "abc", "198.51.100.2", CHROME, "")
    rec.record(ms(DAY1) + 2, "s.io", "abc", "198.51.100.3", CHROME, "")
    flaky.down = True
    flaky.during_write = [
        lambda: [
            rec.record(ms(DAY1) + 9, "s.io", "abc", "198.51.100.9", CHROME, "") for _ in range(5)
        ]
    ]
    with pytest.raises(BackendUnavailable):
        await rec.flush()
    # 5 arrived meanwhile; of the failed 8 the two singles fit, and 3 of the entry's 6
    assert (rec.buffered, rec.dropped) == (10, 3)
    assert [c[6] for c in rec._buffer][:3] == [3, 1, 1]
    flaky.down = False
    assert await rec.flush() == 10
