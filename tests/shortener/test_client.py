"""ShortenerClient: in process and over HTTP, against the same running app, answer alike."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from tenfold.kernel.clock import ManualClock
from tenfold.shortener.client import (
    HttpShortenerClient,
    InProcessShortenerClient,
    ShortenerClient,
    ShortenerClientError,
)
from tenfold.shortener.service import ShortenerService
from tests.conftest import make_settings, serve_app

CHROME = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/120.0.0.0 Safari/537.36"
)
# what differs between two links made the same way
VARYING = {"short_code", "short_url", "created_at", "updated_at"}


@dataclass
class Both:
    service: ShortenerService
    local: InProcessShortenerClient
    remote: HttpShortenerClient
    http: httpx.AsyncClient
    clock: ManualClock

    @property
    def clients(self) -> tuple[ShortenerClient, ShortenerClient]:
        return self.local, self.remote


@pytest.fixture
async def both(stack: dict[str, str], clock: ManualClock) -> AsyncIterator[Both]:
    settings = make_settings(
        **stack, services=["shortener"], shortener_base_url="http://tenfold.test"
    )
    async with serve_app(settings, clock) as (app, http):
        key = (Path(settings.data_dir) / "admin.key").read_text().strip()
        runtime = app.state.runtime
        principal = await runtime.keys.verify(key)
        assert principal is not None
        service = runtime.services["shortener"]
        local = ShortenerClient.in_process(service, principal)
        remote = ShortenerClient.over_http("http://tenfold.test", key, client=http)
        yield Both(service, local, remote, http, clock)
        await local.aclose()
        await remote.aclose()
        assert not http.is_closed  # a client handed in stays its owner's


def same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert {k: v for k, v in a.items() if k not in VARYING} == {
        k: v for k, v in b.items() if k not in VARYING
    }


async def test_links_have_the_same_shape(both: Both) -> None:
    expires = datetime.now(UTC).replace(microsecond=0) + timedelta(days=3)
    made = [
        await client.shorten(
            "HTTPS://Example.COM:443/launch",
            description="launch",
            expires_at=expires,
            redirect_type=301,
            max_visits=10,
            password="pw",
        )
        for client in both.clients
    ]
    same(*made)
    local, remote = made
    assert local["long_url"] == "https://example.com/launch"
    assert local["expires_at"] == remote["expires_at"] == expires.isoformat().replace("+00:00", "Z")
    assert local["password_protected"] is True and local["redirect_type"] == 301
    for link in made:
        assert link["short_url"] == f"http://tenfold.test/r/{link['short_code']}"
        # each transport reads what the other made, identically
        assert await both.local.get(link["short_code"]) == await both.remote.get(link["short_code"])


async def test_errors_carry_status_type_and_fields_on_both(both: Both) -> None:
    await both.local.shorten("https://example.com/x", custom_alias="taken1")
    cases: list[tuple[dict[str, Any], int, str, str, str | None]] = [
        ({"url": "ftp://example.com"}, 422, "validation-error", "url", "scheme-not-allowed"),
        ({"url": "https://a.example", "custom_alias": "ab"}, 422, "validation-error",
         "custom_alias", "alias-length"),
        ({"url": "https://a.example", "custom_alias": "taken1"}, 409, "alias-taken",
         "custom_alias", "alias-taken"),
        ({"url": "https://a.example", "redirect_type": 303}, 422, "validation-error",
         "redirect_type", None),
        ({"url": "https://a.example", "expires_at": datetime(2001, 1, 1, tzinfo=UTC)}, 422,
         "validation-error", "expires_at", "in-the-past"),
    ]  # fmt: skip
    for args, status, kind, field, reason in cases:
        seen = []
        for client in both.clients:
            with pytest.raises(ShortenerClientError) as caught:
                await client.shorten(**args)
            error = caught.value
            assert (error.status, error.kind, error.errors[0]["field"]) == (status, kind, field)
            assert error.errors[0].get("reason") == reason
            assert error.problem_type == f"urn:tenfold:problem:{kind}"
            seen.append((error.detail, error.errors))
        assert seen[0] == seen[1]
    for client in both.clients:
        with pytest.raises(ShortenerClientError) as caught:
            await client.get("nope123")
        assert (caught.value.status, caught.value.kind) == (404, "link-not-found")
        with pytest.raises(ShortenerClientError) as caught:
            await client.update("nope123", description="x")
        assert caught.value.kind == "link-not-found"
        with pytest.raises(ShortenerClientError) as caught:
            await client.list(cursor="garbage")
        assert (caught.value.status, caught.value.errors[0]["field"]) == (422, "cursor")


async def test_update_and_delete_alike(both: Both) -> None:
    for client in both.clients:
        link = await client.shorten("https://example.com/u", password="secret")
        code = link["short_code"]
        changed = await client.update(
            code, long_url="https://example.com/v", description="moved", password=""
        )
        assert changed["long_url"] == "https://example.com/v"
        assert changed["description"] == "moved" and changed["password_protected"] is False
        off = await client.update(code, is_active=False)
        assert off["is_active"] is False and off["description"] == "moved"
        with pytest.raises(ShortenerClientError) as caught:
            await client.update(code, long_url="javascript:alert(1)")
        assert caught.value.errors[0]["field"] == "long_url"
        with pytest.raises(ShortenerClientError) as caught:
            await client.update(code, colour="red")
        assert (caught.value.status, caught.value.errors[0]["field"]) == (422, "colour")
        assert await client.delete(code) is True
        with pytest.raises(ShortenerClientError):
            await client.get(code)


async def test_bulk_answers_per_item_and_splits_into_calls(both: Both) -> None:
    await both.local.shorten("https://example.com/held", custom_alias="held-1")
    items: list[dict[str, Any]] = [
        {"url": "https://example.com/1", "description": "one"},
        {"url": "not a url"},
        {"url": "https://example.com/2", "custom_alias": "held-1"},
        {"url": "https://example.com/3", "expires_at": datetime.now(UTC) + timedelta(days=1)},
    ]
    answers = [await client.bulk(items) for client in both.clients]
    for done in answers:
        assert (done["created"], done["failed"]) == (2, 2)
        assert [r["status"] for r in done["results"]] == ["created", "failed", "failed", "created"]
        assert done["results"][2]["error"]["reason"] == "alias-taken"
    strip = [
        [{k: v for k, v in r.items() if k not in VARYING} for r in done["results"]]
        for done in answers
    ]
    assert strip[0] == strip[1]
    assert await both.remote.bulk([]) == {"created": 0, "failed": 0, "results": []}

    # more than one call's worth: the API takes 1,000 at most, the client splits
    many = [{"url": f"https://example.com/many/{i}"} for i in range(1_001)]
    done = await both.remote.bulk(many)
    assert (done["created"], done["failed"]) == (1_001, 0)
    assert [r["index"] for r in done["results"]] == list(range(1_001))
    assert done["results"][1_000]["long_url"] == "https://example.com/many/1000"


async def test_list_pages_and_iterate_alike(both: Both) -> None:
    made = [await both.local.shorten(f"https://example.com/p/{i}") for i in range(5)]
    await both.local.shorten("https://other.example/q", description="needle")
    for client in both.clients:
        first = await client.list(limit=2)
        assert len(first["items"]) == 2 and first["next_cursor"]
        second = await client.list(limit=2, cursor=first["next_cursor"])
        assert second["items"][0]["short_code"] != first["items"][-1]["short_code"]
        codes = [link["short_code"] async for link in client.iterate(page_size=2, order="asc")]
        assert codes[:5] == [m["short_code"] for m in made] and len(codes) == 6
        found = await client.list(search="needle")
        assert [link["long_url"] for link in found["items"]] == ["https://other.example/q"]
        assert found["next_cursor"] is None
    assert await both.local.list(limit=3) == await both.remote.list(limit=3)


async def test_owners_see_their_own_links(both: Both) -> None:
    admins = await both.local.shorten("https://example.com/admin")
    mine = ShortenerClient.in_process(both.service, "team:blue")
    own = await mine.shorten("https://example.com/blue")
    assert [link["short_code"] for link in (await mine.list())["items"]] == [own["short_code"]]
    with pytest.raises(ShortenerClientError) as caught:
        await mine.get(admins["short_code"])  # someone else's: as unknown as a missing one
    assert caught.value.status == 404
    with pytest.raises(ShortenerClientError) as caught:
        await mine.list(owner="someone")
    assert (caught.value.status, caught.value.kind) == (403, "forbidden")
    # an admin lists another owner's links on either transport
    for client in both.clients:
        page = await client.list(owner="team:blue")
        assert [link["short_code"] for link in page["items"]] == [own["short_code"]]


async def test_analytics_alike(both: Both) -> None:
    link = await both.remote.shorten("https://example.com/stats")
    code = link["short_code"]
    for referrer in ("https://news.example/a", ""):
        r = await both.http.get(f"/r/{code}", headers={"user-agent": CHROME, "referer": referrer})
        assert r.status_code == 302
    await both.service.flush()
    local = await both.local.analytics(code)
    remote = await both.remote.analytics(code)
    assert local == remote
    assert local["total_clicks"] == 2 and local["referrer_stats"]["news.example"] == 1
    assert local["device_breakdown"]["browsers"]["Chrome"] == 2
    today = both.clock.now_ms()
    day = datetime.fromtimestamp(today / 1000, UTC).date()
    hourly = [
        await client.analytics(code, start=day, end=day, granularity="hour")
        for client in both.clients
    ]
    assert hourly[0] == hourly[1] and hourly[0]["click_timeline"][0]["period"].endswith("Z")
    for client in both.clients:
        with pytest.raises(ShortenerClientError) as caught:
            await client.analytics(code, start=day, end=day - timedelta(days=1))
        assert (caught.value.status, caught.value.errors[0]["field"]) == (422, "end_date")


async def test_http_failures_are_client_errors(both: Both) -> None:
    anonymous = ShortenerClient.over_http("http://tenfold.test", "tf_bad_key", client=both.http)
    with pytest.raises(ShortenerClientError) as caught:
        await anonymous.list()
    assert (caught.value.status, caught.value.kind) == (401, "unauthorized")
    nowhere = ShortenerClient.over_http("http://127.0.0.1:1", "k", timeout=2)
    with pytest.raises(ShortenerClientError) as caught:
        await nowhere.get("abc")
    assert caught.value.status is None and "127.0.0.1:1" in caught.value.detail
    await nowhere.aclose()
    assert nowhere._http.is_closed  # a client it made itself is closed
