"""Click analytics, off the redirect's hot path.

The redirect calls `ClickRecorder.record(...)`: a tuple appended to a bounded deque, nothing
else. When `capacity` clicks are already waiting the click is counted as dropped and the
redirect answers anyway. `flush()` (run periodically, and at shutdown) takes the waiting clicks
in batches, enriches them and writes them to the analytics store in one transaction:

- device, OS and browser from `ua-parser` (cached per user-agent string); a desktop browser,
  for which ua-parser names no device, is reported as device "Desktop";
- bots: ua-parser's device family "Spider", an empty user agent, or one of `BOT_TOKENS`
  (link-preview fetchers and HTTP libraries). Bots are stored but left out of every count
  unless asked for (`include_bots=True`); `bot_clicks` always reports them;
- country and city from a MaxMind-format database when one is configured;
- the referrer's host ("" = direct);
- a visitor id, keyed BLAKE2b (a MAC) of day|user agent|ip under salt_key, 64 bits: salted per
  UTC day, so a visitor cannot be followed across days, and the raw IP is never stored.

Unique clicks: a visitor counts once per link per UTC day. The count for a range of days is
the sum of the daily uniques (the same person on Monday and Tuesday is two unique clicks);
an hour's uniques are the visitors whose first click of that day fell in that hour, so hours
add up to days and days to weeks.

Roll-ups keep queries fast whatever a link's volume: each flush adds its batch into
`analytics_link_hours` (clicks and uniques per hour) and `analytics_link_facets` (clicks per
day per country, city, device, OS, browser and referrer), touching only the rows of the
batch, never re-reading raw clicks. Identical clicks within a second (a reload, a retry, a
crawler) are enriched and stored once, with their count.

"Seen today?" is answered by a visitor set per link and day in the KV (in-process memory
embedded, where a restart forgets the day's visitors; Redis at scale, shared by every
process), one round trip per link per flush; without a KV, by `analytics_link_visitors` in the
store, which keeps only today's and yesterday's ids. Every distinct click also goes to
`analytics_link_clicks` for ad-hoc queries, unless `raw_clicks` is off: that table is the
costliest part of a flush (one row per distinct click), and the reports never read it.

If the store is down, a failed batch goes back to the buffer (within `capacity`, counted as
dropped beyond it) and `flush()` raises; the transaction means nothing is half-written.
"""

from __future__ import annotations

import asyncio
import struct
import weakref
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from datetime import date, datetime, timedelta
from functools import lru_cache
from hashlib import blake2b
from typing import Any, Literal
from urllib.parse import urlsplit

import structlog
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tenfold.kernel.analytics import AnalyticsStore, EventTable
from tenfold.kernel.clock import Clock
from tenfold.kernel.errors import FieldError
from tenfold.kernel.kv import KV
from tenfold.kernel.telemetry import REGISTRY, HotCounter

log = structlog.get_logger(__name__)

Granularity = Literal["hour", "day", "week"]
RawClick = tuple[int, str, str, str, str, str, int]
"""at_ms, domain, code, ip, user agent, referrer, and how many identical clicks it stands for."""
ClickRow = tuple[str, str, datetime, int, bool, str, str, str, str, str, str]
"""One enriched click, in the column order of `CLICKS` without its count."""
CountedRow = tuple[str, str, datetime, int, bool, str, str, str, str, str, str, int]
"""A row of `CLICKS`: an enriched click and how many identical clicks it stands for."""

CLICKS = EventTable(
    "analytics_link_clicks",
    (
        ("domain", "string"),
        ("code", "string"),
        ("clicked_at", "timestamp"),
        ("visitor", "int"),
        ("bot", "bool"),
        ("country", "string"),
        ("city", "string"),
        ("device", "string"),
        ("os", "string"),
        ("browser", "string"),
        ("referrer", "string"),
        ("clicks", "int"),  # identical clicks (same visitor, link, referrer) in that second
    ),
    key=("domain", "code", "clicked_at"),
)
HOURS = EventTable(
    "analytics_link_hours",
    (
        ("domain", "string"),
        ("code", "string"),
        ("hour", "timestamp"),
        ("bot", "bool"),
        ("clicks", "int"),
        ("uniques", "int"),
    ),
    key=("domain", "code", "hour", "bot"),
    primary=True,
    sums=("clicks", "uniques"),
)
FACETS = EventTable(
    "analytics_link_facets",
    (
        ("domain", "string"),
        ("code", "string"),
        ("day", "date"),
        ("bot", "bool"),
        ("facet", "string"),
        ("value", "string"),
        ("clicks", "int"),
    ),
    key=("domain", "code", "day", "bot", "facet", "value"),
    primary=True,
    sums=("clicks",),
)
VISITORS = EventTable(
    "analytics_link_visitors",
    (("domain", "string"), ("code", "string"), ("day", "date"), ("visitor", "int")),
    key=("domain", "code", "day", "visitor"),
    primary=True,
)
TABLES = (CLICKS, HOURS, FACETS, VISITORS)

# Substrings (lower case) of user agents that are not people: preview fetchers of chat and
# social apps, and HTTP libraries. ua-parser already flags most crawlers as device "Spider".
BOT_TOKENS = (
    "slackbot",
    "twitterbot",
    "facebookexternalhit",
    "facebot",
    "linkedinbot",
    "discordbot",
    "telegrambot",
    "whatsapp",
    "skypeuripreview",
    "embedly",
    "pinterestbot",
    "redditbot",
    "applebot",
    "googlebot",
    "bingbot",
    "headlesschrome",
    "curl/",
    "wget/",
    "python-requests",
    "python-urllib",
    "aiohttp",
    "httpx",
    "go-http-client",
    "okhttp",
    "java/",
    "libwww-perl",
)
_DESKTOP_OS = frozenset({"Windows", "Mac OS X", "Linux", "Ubuntu", "Fedora", "Chrome OS"})
# (facet name in the table, report section, key inside it, position in ClickRow)
_FACETS = (
    ("country", "geographic_distribution", "countries", 5),
    ("city", "geographic_distribution", "cities", 6),
    ("device", "device_breakdown", "devices", 7),
    ("os", "device_breakdown", "os", 8),
    ("browser", "device_breakdown", "browsers", 9),
    ("referrer", "referrer_stats", "", 10),
)
SEEN_CACHE = 200_000
MAC_STATES = 4_096  # keyed hash states kept for (day, user agent) pairs, at most
_VISITOR_ID = struct.Struct(">q").unpack
VISITOR_SET_SECONDS = 2 * 86_400.0  # a day's visitor set outlives its day by one more
_EPOCH = datetime(1970, 1, 1)
_EPOCH_DAY = date(1970, 1, 1)
_DAY_MS = 86_400_000
_HOUR_MS = 3_600_000

CLICK_EVENTS = HotCounter(
    "tenfold_shortener_clicks_total",
    "Clicks by outcome: recorded (buffered), dropped (buffer full), written (to analytics).",
    ("outcome",),
    registry=REGISTRY,
)
_RECORDED = CLICK_EVENTS.labels("recorded")
_DROPPED = CLICK_EVENTS.labels("dropped")
_WRITTEN = CLICK_EVENTS.labels("written")
FLUSH_FAILURES = HotCounter(
    "tenfold_shortener_click_flush_failures_total",
    "Click batches the analytics store did not take (kept for the next flush).",
    (),
    registry=REGISTRY,
)
_recorders: weakref.WeakSet[ClickRecorder] = weakref.WeakSet()


class _BufferedClicks(Collector):
    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "tenfold_shortener_clicks_buffered",
            "Clicks waiting in memory for the analytics store.",
            value=sum(r.buffered for r in list(_recorders)),
        )


REGISTRY.register(_BufferedClicks())


@lru_cache(maxsize=8192)
def classify(user_agent: str) -> tuple[str, str, str, bool]:
    """user agent -> (device, os, browser, is_bot)."""
    import ua_parser

    lowered = user_agent.lower()
    parsed = ua_parser.parse(user_agent) if user_agent else None
    device = (parsed.device.family if parsed and parsed.device else None) or "Other"
    os_name = (parsed.os.family if parsed and parsed.os else None) or "Other"
    browser = (parsed.user_agent.family if parsed and parsed.user_agent else None) or "Other"
    bot = not user_agent or device == "Spider" or any(t in lowered for t in BOT_TOKENS)
    if bot:
        device = "Bot"
    elif device == "Other" and os_name in _DESKTOP_OS:
        device = "Desktop"
    return device, os_name, browser, bot


@lru_cache(maxsize=8192)
def referrer_host(referrer: str) -> str:
    if not referrer:
        return ""
    try:
        host = urlsplit(referrer if "//" in referrer else "//" + referrer).hostname
    except ValueError:
        return ""
    return (host or "")[:255]


def geoip_locator(path: str) -> Callable[[str], tuple[str, str]] | None:
    """ip -> (ISO country, "City, CC") from a MaxMind-format database, when one is configured."""
    if not path:
        return None
    import maxminddb

    reader = maxminddb.open_database(path)

    def locate(ip: str) -> tuple[str, str]:
        try:
            found = reader.get(ip)
        except ValueError:
            return "", ""
        if not isinstance(found, dict):
            return "", ""
        entry = found.get("country") or found.get("registered_country") or {}
        country = str(entry.get("iso_code", ""))[:2] if isinstance(entry, dict) else ""
        city_entry = found.get("city")
        names = city_entry.get("names") if isinstance(city_entry, dict) else None
        city = str(names.get("en", "")) if isinstance(names, dict) else ""
        if city and country:
            city = f"{city}, {country}"
        return country, city

    return locate


Visit = tuple[str, str, date, int]  # domain, code, day, visitor
HourKey = tuple[str, str, datetime, bool]


RollUps = tuple[dict[HourKey, list[int]], Counter[tuple[Any, ...]], dict[Visit, HourKey]]


def _roll_up(rows: Sequence[CountedRow]) -> RollUps:
    """Per-hour click counts, per-day facet counts, and each visit's earliest hour (where a
    first visit of the day counts its unique click)."""
    hours: dict[HourKey, list[int]] = {}
    combos: dict[tuple[Any, ...], int] = {}
    visits: dict[Visit, HourKey] = {}
    periods: dict[datetime, tuple[datetime, date]] = {}  # a batch spans few distinct seconds
    for domain, code, at, visitor, bot, country, city, device, os_name, browser, ref, n in rows:
        period = periods.get(at)
        if period is None:
            period = periods[at] = (at.replace(minute=0, second=0, microsecond=0), at.date())
        hour, day = period
        hour_key = (domain, code, hour, bot)
        tally = hours.get(hour_key)
        if tally is None:
            hours[hour_key] = [n, 0]
        else:
            tally[0] += n
        visit = (domain, code, day, visitor)
        earlier = visits.get(visit)
        if earlier is None or hour < earlier[2]:
            visits[visit] = hour_key
        combo = (domain, code, day, bot, country, city, device, os_name, browser, ref)
        combos[combo] = combos.get(combo, 0) + n
    facets: Counter[tuple[Any, ...]] = Counter()
    for (domain, code, day, bot, *values), n in combos.items():
        for name, _, _, index in _FACETS:
            facets[(domain, code, day, bot, name, values[index - 5])] += n
    return hours, facets, visits


class ClickBuffer:
    """The bounded buffer the redirect appends to: O(1), never blocks, counts what it drops.
    The bound is in clicks, whether an entry stands for one click or several."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._buffer: deque[RawClick] = deque()
        self._clicks = 0  # in the buffer
        self._dropped = 0

    def record(
        self, at_ms: int, domain: str, code: str, ip: str, user_agent: str, referrer: str
    ) -> bool:
        """Queue one click; False (and counted as dropped) when the buffer is full."""
        if self._full():
            return False
        self._buffer.append((at_ms, domain, code, ip, user_agent, referrer, 1))
        return True

    def _full(self) -> bool:
        """Count one more click in (recorded), or as dropped when the bound is reached (True)."""
        if not self._admit(1):
            return True
        _RECORDED.value += 1
        return False

    def _admit(self, n: int) -> int:
        """Of `n` clicks, count in those the bound has room for, the rest as dropped; how
        many came in."""
        taken = min(n, max(0, self.capacity - self._clicks))
        self._clicks += taken
        if taken < n:
            self._dropped += n - taken
            _DROPPED.value += n - taken
        return taken

    def add_many(self, keys: Sequence[Sequence[Any]], counts: Sequence[int]) -> int:
        """`add` of each (key, count), key = (at_ms, domain, code, ip, agent, referrer); the
        clicks taken. In one step when they all fit."""
        total = sum(counts)
        if total <= self.capacity - self._clicks:
            self._buffer.extend(
                (k[0], k[1], k[2], k[3], k[4], k[5], n) for k, n in zip(keys, counts, strict=True)
            )
            self._clicks += total
            return total
        return sum(self.add((*k, n)) for k, n in zip(keys, counts, strict=True))

    def add(self, click: RawClick) -> int:
        """Queue an entry standing for `click[6]` identical clicks (as the serving process
        sends them); the clicks it took, the rest counted as dropped."""
        taken = self._admit(click[6])
        if taken:
            self._buffer.append(click if taken == click[6] else (*click[:6], taken))
        return taken


class ClickRecorder(ClickBuffer):
    """Buffers clicks in memory and writes them, enriched and rolled up, in batches."""

    def __init__(
        self,
        store: AnalyticsStore,
        *,
        clock: Clock,
        salt_key: bytes,
        capacity: int = 100_000,
        batch: int = 20_000,
        geoip_db: str = "",
        count_bots: bool = False,
        kv: KV | None = None,
        raw_clicks: bool = True,
    ) -> None:
        super().__init__(capacity)
        self.store = store
        self.clock = clock
        self.batch = batch
        self.count_bots = count_bots  # the default of report(include_bots=...)
        self._locate = geoip_locator(geoip_db)
        self._flush_lock = asyncio.Lock()
        self._started = False
        self._pruned_day: date | None = None
        # Visits (link, day, visitor) this process wrote lately, newer and older: a returning
        # visitor's clicks need no question to the store (the oldest are forgotten first).
        self._seen: tuple[dict[Visit, None], dict[Visit, None]] = ({}, {})
        # BLAKE2b's keyed mode (a MAC, keys up to 64 bytes), keyed once; and its state after
        # each (day, user agent) lately seen.
        self._keyed = blake2b(key=salt_key[:64], digest_size=8)
        self._macs: dict[tuple[int, str], Any] = {}
        self._owed: set[Visit] = set()
        self.kv = kv  # visitor sets; without one, the store's visitors table answers
        self.raw_clicks = raw_clicks  # also keep every (distinct) click, not only roll-ups
        _recorders.add(self)

    @property
    def buffered(self) -> int:
        return self._clicks

    @property
    def dropped(self) -> int:
        return self._dropped

    async def close(self) -> None:
        """Close the store (after a last flush, which the caller makes)."""
        await self.store.close()

    async def start(self) -> None:
        """Create the tables if missing (a flush does it too, once the store answers)."""
        await self.store.ensure(TABLES)
        self._started = True

    async def flush(self) -> int:
        """Write what is waiting now, `batch` clicks at a time; returns clicks written."""
        written = 0
        async with self._flush_lock:
            if not self._started:
                await self.start()
            remaining = len(self._buffer)
            while remaining > 0 and self._buffer:
                raw = [self._buffer.popleft() for _ in range(min(self.batch, len(self._buffer)))]
                remaining -= len(raw)
                taken = sum(r[6] for r in raw)
                self._clicks -= taken
                try:
                    rows, roll_ups = await asyncio.to_thread(self._prepare, raw)
                    await self._store(rows, roll_ups)
                except BaseException:
                    self._put_back(raw)
                    FLUSH_FAILURES.inc()
                    raise
                written += taken
                _WRITTEN.inc(taken)
            await self._prune_visitors()
        return written

    def _put_back(self, raw: list[RawClick]) -> None:
        """Return a failed batch to the front of the buffer, newest clicks first while they fit
        the bound; the rest are dropped."""
        keep: list[RawClick] = []
        for click in reversed(raw):
            fits = self._admit(click[6])
            if fits:
                keep.append(click if fits == click[6] else (*click[:6], fits))
        self._buffer.extendleft(keep)  # `keep` is newest first: extendleft restores the order

    def _prepare(self, raw: Sequence[RawClick]) -> tuple[list[CountedRow], RollUps]:
        """Enriched rows and their roll-ups: the CPU work of a flush, run off the event loop."""
        rows = self.enrich(raw)
        return rows, _roll_up(rows)

    def enrich(self, raw: Sequence[RawClick]) -> list[CountedRow]:
        """Raw clicks -> rows of `CLICKS`, each with how many clicks it stands for.

        Identical clicks (same second, link, address, user agent and referrer: a reload, a
        retry, a bot) become one row, so the work below is per distinct click.
        """
        groups: dict[tuple[int, str, str, str, str, str], int] = {}
        for r in raw:
            group = (r[0] - r[0] % 1000, r[1], r[2], r[3], r[4], r[5])
            groups[group] = groups.get(group, 0) + r[6]
        macs = self._macs
        locate = self._locate
        stamps: dict[int, datetime] = {}
        places: dict[str, tuple[str, str]] = {}
        rows: list[CountedRow] = []
        append = rows.append
        for (at_ms, domain, code, ip, user_agent, referrer), n in groups.items():
            device, os_name, browser, bot = classify(user_agent)
            day = at_ms // _DAY_MS
            # The visitor id: keyed BLAKE2b of day|agent|address. The state after the day and
            # the agent is kept per batch (a batch has few agents): one block to hash per click.
            mac = macs.get((day, user_agent))
            if mac is None:
                mac = macs[(day, user_agent)] = self._mac_of(day, user_agent)
            mac = mac.copy()
            mac.update(ip.encode())
            at = stamps.get(at_ms)
            if at is None:
                at = stamps[at_ms] = _EPOCH + timedelta(milliseconds=at_ms)
            if locate is not None:
                place = places.get(ip)
                if place is None:
                    place = places[ip] = locate(ip)
                country, city = place
            else:
                country = city = ""
            append(
                (
                    domain,
                    code,
                    at,
                    _VISITOR_ID(mac.digest())[0],
                    bot,
                    country,
                    city,
                    device,
                    os_name,
                    browser,
                    referrer_host(referrer),
                    n,
                )
            )
        if len(macs) > MAC_STATES:
            macs.clear()
        return rows

    def _mac_of(self, day: int, user_agent: str) -> Any:
        """The keyed hash state after day|length|agent| (the length keeps an agent holding a
        `|` from reading as another agent and address)."""
        mac = self._keyed.copy()
        mac.update(f"{day}|{len(user_agent)}|{user_agent}|".encode())
        return mac

    async def write(self, rows: Sequence[ClickRow], counts: Sequence[int] | None = None) -> None:
        """Store enriched clicks (`counts[i]` clicks for `rows[i]`, 1 each by default) and add
        them into the roll-ups, all or nothing."""
        weights = counts if counts is not None else [1] * len(rows)
        counted = [(*row, n) for row, n in zip(rows, weights, strict=True)]
        await self._store(counted, _roll_up(counted))

    async def _store(self, rows: list[CountedRow], roll_ups: RollUps) -> None:
        """Write a batch and its roll-ups in one transaction."""
        if not rows:
            return
        hours, facets, visits = roll_ups
        known, older = self._seen
        fresh = [v for v in visits if v not in known and v not in older]
        first: set[Visit] = set()
        if self.kv is not None and fresh:
            first = await self._first_visits(fresh)
        async with self.store.transaction() as tx:
            if self.kv is None and fresh:
                first = set(await tx.insert_missing(VISITORS, fresh))
            for visit in first:  # the visitor's first click of the day: a unique click
                hours[visits[visit]][1] += 1
            if self.raw_clicks:
                await tx.insert(CLICKS, rows)
            await tx.upsert(HOURS, [(*k, c, u) for k, (c, u) in hours.items()])
            await tx.upsert(FACETS, [(*k, n) for k, n in facets.items()])
        self._owed.difference_update(first)
        # Committed: these need no asking next time. Two generations of SEEN_CACHE / 2: when
        # the newer fills up it becomes the older, and the oldest visits are forgotten.
        known.update(dict.fromkeys(fresh))
        if len(known) > SEEN_CACHE // 2:
            self._seen = ({}, known)

    async def _first_visits(self, visits: list[Visit]) -> set[Visit]:
        """Which visits are a visitor's first of the day on that link, by the shared visitor
        sets (one per link and day, in the KV: memory embedded, Redis at scale). Visits found
        new by an earlier attempt whose write failed are still owed their unique click."""
        assert self.kv is not None
        by_set: dict[tuple[str, str, date], list[Visit]] = {}
        for visit in visits:
            by_set.setdefault(visit[:3], []).append(visit)
        first: set[Visit] = set()
        for (domain, code, day), group in by_set.items():
            key = self.kv.key("visitors", domain, code, day.isoformat())
            members = {v[3].to_bytes(8, "big", signed=True): v for v in group}
            added = await self.kv.add_members(key, list(members), ttl=VISITOR_SET_SECONDS)
            first.update(members[m] for m in added)
        if self._owed:
            first.update(v for v in visits if v in self._owed)
        self._owed.update(first)  # until the write that counts them commits
        return first

    async def _prune_visitors(self) -> None:
        """Visitor ids older than yesterday can no longer matter: drop them once a day."""
        today = _EPOCH_DAY + timedelta(days=self.clock.now_ms() // _DAY_MS)
        if self._pruned_day == today:
            return
        await self.store.execute(
            "DELETE FROM analytics_link_visitors WHERE day < :before",
            {"before": today - timedelta(days=1)},
        )
        self._pruned_day = today

    async def report(
        self,
        domain: str,
        code: str,
        *,
        start: date | None,
        end: date | None,
        granularity: Granularity = "day",
        include_bots: bool = False,
    ) -> dict[str, Any]:
        """The analytics of one link over UTC days `start`..`end` (inclusive; None: open)."""
        if granularity not in ("hour", "day", "week"):
            raise FieldError("granularity", "must be hour, day or week")
        if start and end and end < start:
            raise FieldError("end", "must not be before start")
        include_bots = include_bots or self.count_bots
        params: dict[str, Any] = {"domain": domain, "code": code}
        by_hour = by_day = "domain = :domain AND code = :code"
        if start:
            params["start_day"] = start
            params["start_at"] = datetime(start.year, start.month, start.day)
            by_hour += " AND hour >= :start_at"
            by_day += " AND day >= :start_day"
        if end:
            params["end_day"] = end
            params["end_at"] = datetime(end.year, end.month, end.day) + timedelta(days=1)
            by_hour += " AND hour < :end_at"
            by_day += " AND day <= :end_day"
        timeline_rows = await self.store.fetch(
            f"SELECT date_trunc('{granularity}', hour) AS period, bot,"  # noqa: S608
            " CAST(sum(clicks) AS BIGINT), CAST(sum(uniques) AS BIGINT)"
            f" FROM analytics_link_hours WHERE {by_hour} GROUP BY period, bot ORDER BY period",
            params,
        )
        facet_rows = await self.store.fetch(
            "SELECT facet, value, bot, CAST(sum(clicks) AS BIGINT)"  # noqa: S608
            f" FROM analytics_link_facets WHERE {by_day} GROUP BY facet, value, bot",
            {k: v for k, v in params.items() if not k.endswith("_at")},
        )
        total = uniques = bots = 0
        timeline: dict[str, list[int]] = {}
        for period, bot, clicks, unique in timeline_rows:
            if bot:
                bots += int(clicks)
                if not include_bots:
                    continue
            total += int(clicks)
            uniques += int(unique)
            slot = timeline.setdefault(_period(period, granularity), [0, 0])
            slot[0] += int(clicks)
            slot[1] += int(unique)
        sections: dict[str, dict[str, Counter[str]]] = {
            "geographic_distribution": {"countries": Counter(), "cities": Counter()},
            "device_breakdown": {"devices": Counter(), "os": Counter(), "browsers": Counter()},
            "referrer_stats": {"": Counter()},
        }
        where = {name: (section, key) for name, section, key, _ in _FACETS}
        for facet, value, bot, clicks in facet_rows:
            if (bot and not include_bots) or facet not in where:
                continue
            section, key = where[facet]
            label = value or ("direct" if facet == "referrer" else "unknown")
            sections[section][key][label] += int(clicks)
        return {
            "domain": domain,
            "short_code": code,
            "start": start.isoformat() if start else None,
            "end": end.isoformat() if end else None,
            "granularity": granularity,
            "total_clicks": total,
            "unique_clicks": uniques,
            "bot_clicks": bots,
            "click_timeline": [
                {"period": period, "clicks": c, "unique_clicks": u}
                for period, (c, u) in timeline.items()
            ],
            "geographic_distribution": {
                k: dict(v.most_common()) for k, v in sections["geographic_distribution"].items()
            },
            "device_breakdown": {
                k: dict(v.most_common()) for k, v in sections["device_breakdown"].items()
            },
            "referrer_stats": dict(sections["referrer_stats"][""].most_common()),
        }

    async def forget(self, domain: str, code: str) -> None:
        """A deleted link's analytics go too, including clicks still waiting in memory."""
        async with self._flush_lock:
            self._buffer = deque(c for c in self._buffer if c[1] != domain or c[2] != code)
            self._clicks = sum(c[6] for c in self._buffer)
            async with self.store.transaction() as tx:
                for table in TABLES:
                    await tx.execute(
                        f"DELETE FROM {table.name} WHERE domain = :domain AND code = :code",  # noqa: S608
                        {"domain": domain, "code": code},
                    )
            self._seen = tuple(  # type: ignore[assignment]
                {v: None for v in seen if v[0] != domain or v[1] != code} for seen in self._seen
            )
            if self.kv is not None:
                today = _EPOCH_DAY + timedelta(days=self.clock.now_ms() // _DAY_MS)
                await self.kv.delete(
                    *(
                        self.kv.key(
                            "visitors", domain, code, (today - timedelta(days=d)).isoformat()
                        )
                        for d in (0, 1)
                    )
                )


def _period(value: Any, granularity: Granularity) -> str:
    if granularity == "hour":
        return f"{value.isoformat(timespec='seconds')}Z"
    return (value.date() if isinstance(value, datetime) else value).isoformat()
