"""Links, accounts and domains in SQL: the source of truth (SQLite embedded, PostgreSQL)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from tenfold.kernel.sql import is_sqlite
from tenfold.shortener.models import Account, Link, QuotaExceeded
from tenfold.shortener.tables import accounts, counters, domains, links

_LINK_COLUMNS = [f.name for f in fields(Link)]
_ACCOUNT_COLUMNS = [f.name for f in fields(Account)]
Sort = Literal["created", "clicks"]
# What a search looks in; PostgreSQL has a trigram index on exactly this (migration 0008).
_SPACE: sa.ColumnElement[str] = sa.literal_column("' '")
SEARCHED = links.c.long_url + _SPACE + links.c.description + _SPACE + links.c.short_code
# Links a search filters in order, window after window, before it asks the trigram index: a
# term in 1 link of 100 fills a page of 50 from 5,000. At 10M links, reading 50,000 more in
# order took longer (168 ms) than the fenced index query for a term in 1 of 1,000 (~105 ms).
SEARCH_WINDOWS = (5_000,)
INSERT_CHUNK = 1_000  # rows per INSERT (15 columns: under every driver's parameter limit)


def _matching(
    window: sa.Subquery, column: str, descending: bool, pattern: str, limit: int
) -> sa.Select[Any]:
    """The first `limit` links of `window` whose searched text matches, in its order."""
    order = _ordered(window.c[column], window.c.link_id, descending)
    text = window.c.long_url + _SPACE + window.c.description + _SPACE + window.c.short_code
    return sa.select(window).where(text.ilike(pattern, escape="\\")).order_by(*order).limit(limit)


def _ordered(column: Any, link_id: Any, descending: bool) -> tuple[Any, Any]:
    """Keyset order: the sort column, then the link id to break ties."""
    return (column.desc(), link_id.desc()) if descending else (column, link_id)


def _link(row: Any) -> Link:
    return Link(**{name: row[name] for name in _LINK_COLUMNS})


def _account(row: Any) -> Account:
    return Account(**{name: row[name] for name in _ACCOUNT_COLUMNS})


@dataclass(slots=True)
class NewLink:
    domain: str
    short_code: str
    long_url: str
    owner: str
    description: str
    created_at_ms: int
    expires_at_ms: int | None
    is_custom: bool
    redirect_status: int
    max_visits: int | None
    password_hash: str | None

    def row(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "short_code": self.short_code,
            "long_url": self.long_url,
            "owner": self.owner,
            "description": self.description,
            "created_at_ms": self.created_at_ms,
            "updated_at_ms": self.created_at_ms,
            "expires_at_ms": self.expires_at_ms,
            "is_active": True,
            "is_custom": self.is_custom,
            "redirect_status": self.redirect_status,
            "max_visits": self.max_visits,
            "click_count": 0,
            "password_hash": self.password_hash,
            "blocked_reason": None,
        }


@dataclass(slots=True)
class Batch:
    """One creation request: its links, and the account whose quota they use (if any)."""

    items: list[NewLink]
    account_id: str | None
    month: str


class SqlLinkStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.sqlite = is_sqlite(engine)
        self._insert = sqlite.insert if self.sqlite else postgresql.insert

    # --- counters --------------------------------------------------------------------------

    async def reserve(self, domain: str, count: int) -> int:
        """The first of `count` counter values of `domain`, now owned by the caller."""
        stmt = (
            self._insert(counters)
            .values(domain=domain, next_value=count)
            .on_conflict_do_update(
                index_elements=[counters.c.domain],
                set_={"next_value": counters.c.next_value + count},
            )
            .returning(counters.c.next_value)
        )
        async with self.engine.begin() as conn:
            end = (await conn.execute(stmt)).scalar_one()
        return int(end) - count

    # --- creation --------------------------------------------------------------------------

    async def create(self, batches: Sequence[Batch]) -> list[list[Link | Exception]]:
        """Create every batch in one transaction; each item answers its Link or why not.

        A batch over its account's quota creates nothing (QuotaExceeded for each item). An item
        whose code is taken (a custom alias; rarely, a generated code equal to someone's alias)
        answers LookupError, and the quota it took is given back. The links of all batches go
        in together, a thousand rows per statement.
        """
        results: list[list[Link | Exception | None]] = [[None] * len(b.items) for b in batches]
        async with self.engine.begin() as conn:
            places: list[tuple[int, int]] = []  # (batch, item) of each row to insert
            rows: list[dict[str, Any]] = []
            claimed: set[tuple[str, str]] = set()
            for b, batch in enumerate(batches):
                if batch.account_id is not None:
                    problem = await self._take_quota(
                        conn, batch.account_id, batch.month, len(batch.items)
                    )
                    if problem is not None:
                        results[b] = [problem] * len(batch.items)
                        continue
                for i, item in enumerate(batch.items):
                    row = item.row()
                    key = (row["domain"], row["short_code"])
                    if key in claimed:  # asked twice in one transaction: the first one wins
                        results[b][i] = LookupError(row["short_code"])
                        continue
                    claimed.add(key)
                    places.append((b, i))
                    rows.append(row)
            created: dict[tuple[str, str], Any] = {}
            for start in range(0, len(rows), INSERT_CHUNK):
                stmt = (
                    self._insert(links)
                    .values(rows[start : start + INSERT_CHUNK])
                    .on_conflict_do_nothing(index_elements=[links.c.domain, links.c.short_code])
                    .returning(*links.c)
                )
                for r in (await conn.execute(stmt)).mappings():
                    created[(r["domain"], r["short_code"])] = r
            for (b, i), row in zip(places, rows, strict=True):
                found = created.get((row["domain"], row["short_code"]))
                results[b][i] = (
                    _link(found) if found is not None else LookupError(row["short_code"])
                )
            for b, batch in enumerate(batches):
                failed = sum(1 for r in results[b] if not isinstance(r, Link))
                taken = not any(isinstance(r, QuotaExceeded) for r in results[b])
                if failed and taken and batch.account_id is not None:
                    await conn.execute(
                        sa.update(accounts)
                        .where(accounts.c.account_id == batch.account_id)
                        .values(current_usage=accounts.c.current_usage - failed)
                    )
        return [[r if r is not None else LookupError("") for r in rs] for rs in results]

    async def _take_quota(
        self, conn: AsyncConnection, account_id: str, month: str, n: int
    ) -> Exception | None:
        """Count `n` links against the account's quota for `month`, atomically; or why not."""
        used = sa.case((accounts.c.usage_month == month, accounts.c.current_usage), else_=0)
        stmt = (
            sa.update(accounts)
            .where(
                accounts.c.account_id == account_id,
                sa.or_(accounts.c.monthly_quota == 0, used + n <= accounts.c.monthly_quota),
            )
            .values(current_usage=used + n, usage_month=month)
            .returning(accounts.c.current_usage)
        )
        if (await conn.execute(stmt)).first() is not None:
            return None
        row = (
            await conn.execute(
                sa.select(accounts.c.monthly_quota, used.label("used")).where(
                    accounts.c.account_id == account_id
                )
            )
        ).first()
        if row is None:
            return LookupError(f"no account {account_id}")
        return QuotaExceeded(row.monthly_quota, row.used, n)

    # --- reading ---------------------------------------------------------------------------

    async def get(self, domain: str, code: str) -> Link | None:
        async with self.engine.connect() as conn:
            row = (
                (
                    await conn.execute(
                        sa.select(links).where(links.c.domain == domain, links.c.short_code == code)
                    )
                )
                .mappings()
                .first()
            )
        return _link(row) if row else None

    async def page(
        self,
        owner: str | None,
        *,
        limit: int,
        sort: Sort = "created",
        descending: bool = True,
        after: tuple[int, int] | None = None,
        search: str = "",
        domain: str | None = None,
    ) -> list[Link]:
        """One page of links by keyset (`after` is the last row's (sort value, link_id)).

        A search first reads the next links in order, SEARCH_WINDOWS at a time, and filters
        them: a common term fills the page there at once, at a cost bounded by the window.
        Only when that is not enough does it ask the trigram index (PostgreSQL) for every
        match and sort them: quick for a rare term. That last query is fenced (a subquery with
        an OFFSET is planned on its own), so the planner cannot turn it back into a walk of
        the owner's links in order, filtering millions for a rare term.
        """
        column = links.c.created_at_ms if sort == "created" else links.c.click_count
        order = _ordered(column, links.c.link_id, descending)
        scope = []
        if owner is not None:
            scope.append(links.c.owner == owner)
        if domain is not None:
            scope.append(links.c.domain == domain)
        if after is not None:
            key = sa.tuple_(column, links.c.link_id)
            scope.append(key < sa.tuple_(*after) if descending else key > sa.tuple_(*after))
        if not search:
            query = sa.select(links).where(*scope).order_by(*order).limit(limit)
            async with self.engine.connect() as conn:
                rows = (await conn.execute(query)).mappings().all()
            return [_link(r) for r in rows]
        pattern = "%" + search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        async with self.engine.connect() as conn:
            for size in SEARCH_WINDOWS:
                window = sa.select(links).where(*scope).order_by(*order).limit(size).subquery()
                rows = (
                    (await conn.execute(_matching(window, column.name, descending, pattern, limit)))
                    .mappings()
                    .all()
                )
                if len(rows) >= limit:
                    return [_link(r) for r in rows]
                seen = sa.select(sa.func.count()).select_from(
                    sa.select(links.c.link_id).where(*scope).limit(size).subquery()
                )
                if (await conn.execute(seen)).scalar_one() < size:
                    return [_link(r) for r in rows]  # every link was looked at
            matches = (
                sa.select(links.c.link_id, column)
                .where(*scope, SEARCHED.ilike(pattern, escape="\\"))
                .offset(0)  # the fence: every match found by the index, then ordered
                .subquery()
            )
            top = (
                sa.select(matches.c.link_id)
                .order_by(*_ordered(matches.c[column.name], matches.c.link_id, descending))
                .limit(limit)
                .subquery()
            )
            query = sa.select(links).join(top, links.c.link_id == top.c.link_id).order_by(*order)
            rows = (await conn.execute(query)).mappings().all()
        return [_link(r) for r in rows]

    async def links_after(self, after_id: int, limit: int) -> list[Link]:
        """Every link in id order (the blocklist sweep walks them in pages)."""
        query = sa.select(links).where(links.c.link_id > after_id).order_by(links.c.link_id)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query.limit(limit))).mappings().all()
        return [_link(r) for r in rows]

    # --- changes ---------------------------------------------------------------------------

    async def update(self, link_id: int, values: dict[str, Any]) -> Link | None:
        async with self.engine.begin() as conn:
            row = (
                (
                    await conn.execute(
                        sa.update(links)
                        .where(links.c.link_id == link_id)
                        .values(**values)
                        .returning(*links.c)
                    )
                )
                .mappings()
                .first()
            )
        return _link(row) if row else None

    async def delete(self, link_id: int) -> bool:
        async with self.engine.begin() as conn:
            result = await conn.execute(sa.delete(links).where(links.c.link_id == link_id))
        return bool(result.rowcount)

    async def block(self, reasons: dict[int, str | None]) -> None:
        async with self.engine.begin() as conn:
            for link_id, reason in reasons.items():
                await conn.execute(
                    sa.update(links).where(links.c.link_id == link_id).values(blocked_reason=reason)
                )

    async def add_clicks(self, counts: dict[int, int]) -> None:
        """Add flushed click counts (capped links count their visits themselves)."""
        if not counts:
            return
        stmt = (
            sa.update(links)
            .where(links.c.link_id == sa.bindparam("b_id"), links.c.max_visits.is_(None))
            .values(click_count=links.c.click_count + sa.bindparam("b_n"))
        )
        async with self.engine.begin() as conn:
            await conn.execute(stmt, [{"b_id": k, "b_n": v} for k, v in sorted(counts.items())])

    async def take_visit(self, link_id: int) -> bool:
        """Count one visit of a capped link, unless the cap is reached (exact, durable)."""
        stmt = (
            sa.update(links)
            .where(links.c.link_id == link_id, links.c.click_count < links.c.max_visits)
            .values(click_count=links.c.click_count + 1)
        )
        async with self.engine.begin() as conn:
            result = await conn.execute(stmt)
        return bool(result.rowcount)

    async def purge_created_before(
        self, cutoff_ms: int, limit: int = 1_000
    ) -> list[tuple[str, str]]:
        """Delete up to `limit` links created before `cutoff_ms`; their (domain, code)s."""
        async with self.engine.begin() as conn:
            rows = (
                await conn.execute(
                    sa.select(links.c.link_id, links.c.domain, links.c.short_code)
                    .where(links.c.created_at_ms < cutoff_ms)
                    .limit(limit)
                )
            ).all()
            if rows:
                await conn.execute(
                    sa.delete(links).where(links.c.link_id.in_([r.link_id for r in rows]))
                )
        return [(r.domain, r.short_code) for r in rows]

    # --- accounts --------------------------------------------------------------------------

    async def add_account(self, account: Account) -> bool:
        stmt = self._insert(accounts).values(
            {name: getattr(account, name) for name in _ACCOUNT_COLUMNS}
        )
        async with self.engine.begin() as conn:
            result = await conn.execute(
                stmt.on_conflict_do_nothing(index_elements=[accounts.c.email])
            )
        return bool(result.rowcount)

    async def account(self, account_id: str) -> Account | None:
        async with self.engine.connect() as conn:
            row = (
                (await conn.execute(sa.select(accounts).where(accounts.c.account_id == account_id)))
                .mappings()
                .first()
            )
        return _account(row) if row else None

    async def set_plan(self, account_id: str, plan: str, quota: int) -> Account | None:
        async with self.engine.begin() as conn:
            row = (
                (
                    await conn.execute(
                        sa.update(accounts)
                        .where(accounts.c.account_id == account_id)
                        .values(plan=plan, monthly_quota=quota)
                        .returning(*accounts.c)
                    )
                )
                .mappings()
                .first()
            )
        return _account(row) if row else None

    # --- branded domains -------------------------------------------------------------------

    async def add_domain(self, domain: str, owner: str, token: str, now_ms: int) -> bool:
        stmt = self._insert(domains).values(
            domain=domain, owner=owner, token=token, verified_at_ms=None, created_at_ms=now_ms
        )
        async with self.engine.begin() as conn:
            result = await conn.execute(
                stmt.on_conflict_do_nothing(index_elements=[domains.c.domain])
            )
        return bool(result.rowcount)

    async def domain(self, domain: str) -> dict[str, Any] | None:
        async with self.engine.connect() as conn:
            row = (
                (await conn.execute(sa.select(domains).where(domains.c.domain == domain)))
                .mappings()
                .first()
            )
        return dict(row) if row else None

    async def domains(
        self, owner: str | None = None, *, verified: bool | None = None
    ) -> list[dict[str, Any]]:
        query = sa.select(domains).order_by(domains.c.domain)
        if owner is not None:
            query = query.where(domains.c.owner == owner)
        if verified is True:
            query = query.where(domains.c.verified_at_ms.is_not(None))
        async with self.engine.connect() as conn:
            return [dict(r) for r in (await conn.execute(query)).mappings().all()]

    async def verify_domain(self, domain: str, now_ms: int) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                sa.update(domains).where(domains.c.domain == domain).values(verified_at_ms=now_ms)
            )

    async def delete_domain(self, domain: str) -> bool:
        async with self.engine.begin() as conn:
            result = await conn.execute(sa.delete(domains).where(domains.c.domain == domain))
        return bool(result.rowcount)
