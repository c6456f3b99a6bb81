"""Searching one owner's links: the in-order windows first, then the trigram index, fenced."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import sqlalchemy as sa

from tenfold.kernel import sql
from tenfold.shortener.stores import sql as link_sql
from tenfold.shortener.stores.sql import SqlLinkStore
from tenfold.shortener.tables import links

# 40 links of one owner, newest last: "early" in the 6 oldest, "middle" in links 20-23 (past
# the first window of 5 links but inside the second of 15 counting from the newest, 39),
# "all" in every one; and one "early" link of another owner.
WORDS = {i: "early" for i in range(6)} | {i: "middle" for i in range(20, 24)}


def row(i: int, owner: str = "acct:a", words: str = "") -> dict[str, Any]:
    return {
        "link_id": i + 1,
        "domain": "",
        "short_code": f"c{i:06d}",
        "long_url": f"https://example.com/{i}/{words or WORDS.get(i, '')}/all",
        "owner": owner,
        "created_at_ms": 1_700_000_000_000 + i,
        "updated_at_ms": 1_700_000_000_000 + i,
        "expires_at_ms": None,
        "is_active": True,
        "is_custom": False,
        "redirect_status": 302,
        "max_visits": None,
        "click_count": i % 7,
        "description": "",
    }


@pytest.fixture
async def store(db_url: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[SqlLinkStore]:
    monkeypatch.setattr(link_sql, "SEARCH_WINDOWS", (5, 15))
    engine = sql.create_engine(db_url)
    async with engine.begin() as conn:
        await conn.execute(sa.insert(links), [row(i) for i in range(40)])
        await conn.execute(sa.insert(links), [row(40, "acct:b", "early")])
    try:
        yield SqlLinkStore(engine)
    finally:
        await engine.dispose()


def ids(found: list[Any]) -> list[int]:
    return [link.link_id - 1 for link in found]


async def test_a_common_term_fills_the_page_from_the_first_window(store: SqlLinkStore) -> None:
    assert ids(await store.page("acct:a", limit=3, search="all")) == [39, 38, 37]
    assert ids(await store.page("acct:a", limit=3, search="ALL", descending=False)) == [0, 1, 2]


async def test_a_term_past_the_first_window_is_found_in_the_second(store: SqlLinkStore) -> None:
    assert ids(await store.page("acct:a", limit=3, search="middle")) == [23, 22, 21]
    after = (1_700_000_000_000 + 21, 22)  # the keyset of link 21
    assert ids(await store.page("acct:a", limit=3, search="middle", after=after)) == [20]


async def test_a_rare_old_term_comes_from_the_index_in_order(store: SqlLinkStore) -> None:
    assert ids(await store.page("acct:a", limit=4, search="early")) == [5, 4, 3, 2]
    assert ids(await store.page("acct:a", limit=4, search="early", descending=False)) == [
        0,
        1,
        2,
        3,
    ]
    by_clicks = ids(await store.page("acct:a", limit=6, search="early", sort="clicks"))
    assert by_clicks == [5, 4, 3, 2, 1, 0]  # click_count i % 7, ties by id
    assert ids(await store.page(None, limit=10, search="early")) == [40, 5, 4, 3, 2, 1, 0]
    assert await store.page("acct:a", limit=4, search="nowhere") == []


async def test_search_wildcards_are_literal(store: SqlLinkStore) -> None:
    assert await store.page("acct:a", limit=5, search="%") == []
    assert await store.page("acct:a", limit=5, search="_arly") == []
