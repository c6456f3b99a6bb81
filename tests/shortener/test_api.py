"""The shortener over HTTP, embedded and scale-out: create, redirect, manage, accounts, domains."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from tenfold.kernel.clock import ManualClock
from tenfold.shortener.codes import ALPHABET
from tests.conftest import make_settings, serve_app


class Api:
    def __init__(self, client: httpx.AsyncClient, key: str, app: Any) -> None:
        self.client, self.key, self.app = client, key, app
        self.headers = {"Authorization": f"Bearer {key}"}

    @property
    def service(self) -> Any:
        return self.app.state.runtime.services["shortener"]

    async def create(
        self,
        url: str = "https://example.com/a",
        status: int = 201,
        key: str | None = None,
        **f: Any,
    ) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {key}"} if key else self.headers
        r = await self.client.post("/api/v1/urls", json={"url": url, **f}, headers=headers)
        assert r.status_code == status, r.text
        return dict(r.json())

    async def visit(self, code: str, **headers: str) -> httpx.Response:
        return await self.client.get(f"/r/{code}", headers=headers)


@pytest.fixture
async def api(stack: dict[str, Any], clock: ManualClock, admin_key_of: Any) -> Any:
    settings = make_settings(
        **stack,
        services=["shortener"],
        shortener_plans={"free": {"monthly_quota": 3}},
        shortener_blocklist=["evil.example", "*://*/phish*"],
        shortener_hosts=["sho.rt"],
        shortener_analytics=False,
    )
    async with serve_app(settings, clock) as (app, client):
        yield Api(client, admin_key_of(settings), app)


async def test_create_and_redirect(api: Api) -> None:
    made = await api.create("HTTPS://Example.COM:443/path?q=1", description="launch")
    code = made["short_code"]
    assert len(code) == 7 and all(c in ALPHABET for c in code)
    assert made["long_url"] == "https://example.com/path?q=1"
    assert made["short_url"] == f"http://tenfold.test/r/{code}"
    r = await api.visit(code)
    assert r.status_code == 302
    assert r.headers["location"] == "https://example.com/path?q=1"
    await api.visit(code)
    await api.service.flush()
    got = (await api.client.get(f"/api/v1/urls/{code}", headers=api.headers)).json()
    assert got["click_count"] == 2 and got["is_active"] is True
    assert got["description"] == "launch"


async def test_codes_differ_and_do_not_follow_a_sequence(api: Api) -> None:
    codes = [(await api.create(f"https://example.com/{i}"))["short_code"] for i in range(20)]
    assert len(set(codes)) == 20
    assert sorted(codes) != codes  # not handed out in order


async def test_a_generated_code_equal_to_an_alias_is_skipped(api: Api) -> None:
    first = (await api.create("https://example.com/first"))["short_code"]
    service = api.service
    assert service.codes.code_of("", 0) == first  # a fresh database: the counter starts at 0
    upcoming = service.codes.code_of("", 1)
    await api.create("https://example.com/alias", custom_alias=upcoming)
    made = await api.create("https://example.com/next")
    assert made["short_code"] not in (first, upcoming)
    assert (await api.visit(upcoming)).headers["location"] == "https://example.com/alias"


async def test_unknown_codes_are_404_and_a_new_code_is_seen_at_once(api: Api) -> None:
    r = await api.visit("nosuch1")
    assert r.status_code == 404
    assert r.headers["content-type"].startswith("application/problem+json")
    await api.create(custom_alias="nosuch1")  # the process remembered it as unknown
    assert (await api.visit("nosuch1")).status_code == 302


async def test_permanent_links_answer_301(api: Api) -> None:
    code = (await api.create(redirect_type=301))["short_code"]
    assert (await api.visit(code)).status_code == 301


async def test_aliases(api: Api) -> None:
    made = await api.create(custom_alias="Spring-sale_1")
    assert made["short_code"] == "Spring-sale_1" and made["is_custom"] is True
    r = await api.client.post(
        "/api/v1/urls",
        json={"url": "https://example.com/x", "custom_alias": "Spring-sale_1"},
        headers=api.headers,
    )
    assert r.status_code == 409 and r.json()["errors"][0]["field"] == "custom_alias"
    for alias, reason in (
        ("ab", "alias-length"),
        ("a" * 21, "alias-length"),
        ("has space", "alias-characters"),
        ("ADMIN", "alias-reserved"),
        ("healthz", "alias-reserved"),
    ):
        r = await api.client.post(
            "/api/v1/urls",
            json={"url": "https://example.com/x", "custom_alias": alias},
            headers=api.headers,
        )
        assert r.status_code == 422, alias
        error = r.json()["errors"][0]
        assert error["field"] == "custom_alias" and error["reason"] == reason


@pytest.mark.parametrize(
    ("body", "field", "reason"),
    [
        ({"url": "ftp://example.com/file"}, "url", "scheme-not-allowed"),
        ({"url": "javascript:alert(1)"}, "url", "scheme-not-allowed"),
        ({"url": "https://example.com/" + "a" * 2050}, "url", "too-long"),
        ({"url": "not a url"}, "url", "scheme-not-allowed"),
        ({"url": "https://user:pw@example.com/"}, "url", "credentials"),
        ({"url": "https://evil.example/x"}, "url", "blocked"),
        ({"url": "https://cdn.evil.example/x"}, "url", "blocked"),
        ({"url": "https://ok.example/phishing"}, "url", "blocked"),
        ({"url": "https://sho.rt/abc"}, "url", "redirect-loop"),
        ({"url": "https://example.com", "expires_at": "2001-01-01T00:00:00Z"}, "expires_at", None),
    ],
)
async def test_bad_input_names_the_field(
    api: Api, body: dict[str, Any], field: str, reason: str | None
) -> None:
    r = await api.client.post("/api/v1/urls", json=body, headers=api.headers)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    error = r.json()["errors"][0]
    assert error["field"] == field
    if reason:
        assert error["reason"] == reason


async def test_lifecycle_expiry_deactivation_and_visit_cap(api: Api, clock: ManualClock) -> None:
    soon = (await api.create(expires_at=_iso(clock.now() + 60)))["short_code"]
    assert (await api.visit(soon)).status_code == 302
    clock.advance(61)
    assert (await api.visit(soon)).status_code == 410

    code = (await api.create())["short_code"]
    r = await api.client.put(f"/api/v1/urls/{code}", json={"is_active": False}, headers=api.headers)
    assert r.status_code == 200 and r.json()["is_active"] is False
    assert (await api.visit(code)).status_code == 404
    await api.client.put(f"/api/v1/urls/{code}", json={"is_active": True}, headers=api.headers)
    assert (await api.visit(code)).status_code == 302

    capped = (await api.create(max_visits=2))["short_code"]
    assert [(await api.visit(capped)).status_code for _ in range(3)] == [302, 302, 410]


async def test_password_protected_links(api: Api) -> None:
    code = (await api.create(password="open sesame"))["short_code"]
    assert (await api.visit(code)).status_code == 401
    page = await api.visit(code, accept="text/html")
    assert page.status_code == 401 and "<form" in page.text
    wrong = await api.client.post(f"/r/{code}", data={"password": "nope"})
    assert wrong.status_code == 403
    right = await api.client.post(f"/r/{code}", data={"password": "open sesame"})
    assert right.status_code == 303 and right.headers["location"] == "https://example.com/a"
    stored = await api.service.store.get("", code)
    assert stored.password_hash and "open sesame" not in stored.password_hash


async def test_password_guesses_are_limited(
    api: Api, clock: ManualClock, stack: dict[str, Any]
) -> None:
    code = (await api.create(password="right one"))["short_code"]
    answers = [
        (await api.client.post(f"/r/{code}", data={"password": f"guess {i}"})).status_code
        for i in range(11)
    ]
    assert answers == [403] * 10 + [429]
    limited = await api.client.post(f"/r/{code}", data={"password": "right one"})
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) > 0
    if not stack["redis_url"]:  # the memory KV follows the test clock; Redis expires in real time
        clock.advance(901)
        ok = await api.client.post(f"/r/{code}", data={"password": "right one"})
        assert ok.status_code == 303


async def test_update_and_delete_are_owner_only(api: Api) -> None:
    code = (await api.create())["short_code"]
    account = await _account(api, "other@example.com", "pro")
    other = {"Authorization": f"Bearer {account['api_key']}"}
    for method in ("GET", "PUT", "DELETE"):
        r = await api.client.request(
            method, f"/api/v1/urls/{code}", headers=other, json={} if method == "PUT" else None
        )
        assert r.status_code == 404, method
    r = await api.client.put(
        f"/api/v1/urls/{code}", json={"long_url": "https://example.org/new"}, headers=api.headers
    )
    assert r.status_code == 200 and r.json()["long_url"] == "https://example.org/new"
    assert (await api.visit(code)).headers["location"] == "https://example.org/new"
    r = await api.client.delete(f"/api/v1/urls/{code}", headers=api.headers)
    assert r.json() == {"deleted": True}
    assert (await api.visit(code)).status_code == 404


async def _account(api: Api, email: str, plan: str = "free") -> dict[str, Any]:
    r = await api.client.post(
        "/api/v1/accounts", json={"email": email, "plan": plan}, headers=api.headers
    )
    assert r.status_code == 201, r.text
    return dict(r.json())


async def test_accounts_plans_and_quota(api: Api) -> None:
    account = await _account(api, "Free@Example.com")
    assert account["plan"] == "free" and account["monthly_quota"] == 3
    key = account["api_key"]
    assert key.startswith("tf_")
    dup = await api.client.post(
        "/api/v1/accounts", json={"email": "free@example.com"}, headers=api.headers
    )
    assert dup.status_code == 409
    # A free plan has no custom aliases.
    r = await api.client.post(
        "/api/v1/urls",
        json={"url": "https://example.com", "custom_alias": "mine"},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert r.status_code == 422 and r.json()["errors"][0]["reason"] == "plan-feature"
    for i in range(3):
        await api.create(f"https://example.com/{i}", key=key)
    over = await api.client.post(
        "/api/v1/urls",
        json={"url": "https://example.com/4"},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert over.status_code == 403 and over.json()["type"].endswith(":quota-exceeded")
    mine = await api.client.get(
        f"/api/v1/accounts/{account['account_id']}", headers={"Authorization": f"Bearer {key}"}
    )
    assert mine.json()["current_usage"] == 3
    # The account's key sees only its own links.
    listed = await api.client.get("/api/v1/urls", headers={"Authorization": f"Bearer {key}"})
    assert len(listed.json()["items"]) == 3
    # Creating accounts needs the admin scope.
    denied = await api.client.post(
        "/api/v1/accounts",
        json={"email": "x@example.com"},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert denied.status_code == 403


async def test_bulk_answers_per_item(api: Api) -> None:
    r = await api.client.post(
        "/api/v1/urls/bulk",
        json={
            "urls": [
                {"url": "https://example.com/1"},
                {"url": "ftp://example.com/2"},
                {"url": "https://example.com/3", "custom_alias": "bulk-one"},
                {"url": "https://example.com/4", "custom_alias": "bulk-one"},
            ]
        },
        headers=api.headers,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert [x["status"] for x in body["results"]] == ["created", "failed", "created", "failed"]
    assert body["results"][1]["error"]["reason"] == "scheme-not-allowed"
    assert body["results"][3]["error"]["reason"] == "alias-taken"
    assert body["created"] == 2 and body["failed"] == 2
    too_many = await api.client.post(
        "/api/v1/urls/bulk",
        json={"urls": [{"url": "https://example.com"}] * 1001},
        headers=api.headers,
    )
    assert too_many.status_code == 422 and too_many.json()["errors"][0]["field"] == "urls"


async def test_listing_pages_by_keyset_with_search_and_sort(api: Api, clock: ManualClock) -> None:
    codes = []
    for i in range(5):
        clock.advance(1)
        codes.append((await api.create(f"https://example.com/item{i}"))["short_code"])
    await api.create("https://other.example/zzz")
    seen, cursor = [], None
    while True:
        params: dict[str, Any] = {"limit": 2, "search": "item"}
        if cursor:
            params["cursor"] = cursor
        page = (await api.client.get("/api/v1/urls", params=params, headers=api.headers)).json()
        seen += [x["short_code"] for x in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == list(reversed(codes))
    for _ in range(3):
        await api.visit(codes[2])
    await api.service.flush()
    top = await api.client.get(
        "/api/v1/urls", params={"sort": "clicks", "limit": 1}, headers=api.headers
    )
    assert top.json()["items"][0]["short_code"] == codes[2]
    bad = await api.client.get("/api/v1/urls", params={"cursor": "junk"}, headers=api.headers)
    assert bad.status_code == 422


async def test_blocklist_recheck_blocks_existing_links(api: Api) -> None:
    from tenfold.shortener.models import Blocklist

    code = (await api.create("https://turned-bad.example/x"))["short_code"]
    assert (await api.visit(code)).status_code == 302
    api.service.config.blocklist = Blocklist.of(["turned-bad.example"])
    r = await api.client.post("/api/v1/shortener/blocklist/recheck", headers=api.headers)
    assert r.json()["blocked"] == 1
    assert (await api.visit(code)).status_code == 404
    got = (await api.client.get(f"/api/v1/urls/{code}", headers=api.headers)).json()
    assert got["blocked_reason"] == "domain turned-bad.example"


async def test_qr_codes(api: Api) -> None:
    code = (await api.create())["short_code"]
    svg = await api.client.get(f"/r/{code}/qr")
    assert svg.status_code == 200 and svg.headers["content-type"] == "image/svg+xml"
    assert svg.text.lstrip().startswith("<svg")
    png = await api.client.get(f"/r/{code}/qr", params={"format": "png", "scale": 4})
    assert png.headers["content-type"] == "image/png" and png.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert (await api.client.get("/r/nosuchc/qr")).status_code == 404


async def test_short_host_serves_codes_at_the_root(api: Api) -> None:
    code = (await api.create())["short_code"]
    r = await api.client.get(f"/{code}", headers={"host": "sho.rt"})
    assert r.status_code == 302
    # Other hosts do not; the app's own paths stay the app's on the short host too.
    assert (await api.client.get(f"/{code}")).status_code == 404
    assert (await api.client.get("/healthz", headers={"host": "sho.rt"})).status_code == 200


async def test_branded_domains(
    stack: dict[str, Any],
    clock: ManualClock,
    admin_key_of: Any,
    token_server: tuple[str, dict[str, str]],
) -> None:
    template, tokens = token_server
    settings = make_settings(
        **stack,
        services=["shortener"],
        shortener_analytics=False,
        shortener_domain_verify_url=template,
        shortener_domain_verify_methods=["http"],
    )
    async with serve_app(settings, clock) as (app, client):
        api = Api(client, admin_key_of(settings), app)
        r = await client.post(
            "/api/v1/domains", json={"domain": "Go.Brand.example"}, headers=api.headers
        )
        assert r.status_code == 201, r.text
        token = r.json()["verification_token"]
        assert r.json()["verified"] is False
        # Not verified yet: the token is not published, and links cannot use the domain.
        r = await client.post("/api/v1/domains/go.brand.example/verify", headers=api.headers)
        assert r.status_code == 409
        made = await api.create(domain="go.brand.example", status=422)
        assert made["errors"][0]["field"] == "domain"
        tokens["go.brand.example"] = token
        r = await client.post("/api/v1/domains/go.brand.example/verify", headers=api.headers)
        assert r.status_code == 200 and r.json()["verified"] is True
        link = await api.create(domain="go.brand.example", custom_alias="promo")
        assert link["short_url"] == "http://go.brand.example/promo"
        # Per-domain code spaces: the same alias on the default domain is free.
        await api.create("https://example.org/default", custom_alias="promo")
        branded = await client.get("/promo", headers={"host": "go.brand.example"})
        assert branded.status_code == 302 and branded.headers["location"] == "https://example.com/a"
        plain = await client.get("/r/promo")
        assert plain.headers["location"] == "https://example.org/default"
        # A link to the branded domain itself would loop.
        await api.create("https://go.brand.example/promo", status=422)
        taken = await client.post(
            "/api/v1/domains", json={"domain": "go.brand.example"}, headers=api.headers
        )
        assert taken.status_code == 409


async def test_anonymous_creation_is_off_by_default(api: Api) -> None:
    r = await api.client.post("/api/v1/urls", json={"url": "https://example.com"})
    assert r.status_code == 401


async def test_aliases_raced_are_owned_exactly_once(api: Api) -> None:
    """10,000 creations racing for 100 names: each name is owned once, no errors."""
    from tenfold.shortener import CreateItem
    from tenfold.shortener.models import AliasTaken, Link

    service = api.service

    async def one(i: int) -> Any:
        [outcome] = await service.create(
            f"racer-{i % 37}",
            [CreateItem(url=f"https://example.com/{i}", custom_alias=f"race-{i % 100}")],
            can_alias=True,
        )
        return outcome

    outcomes = await asyncio.gather(*(one(i) for i in range(10_000)))
    made = [o for o in outcomes if isinstance(o, Link)]
    assert all(isinstance(o, Link | AliasTaken) for o in outcomes)
    assert len(made) == 100
    assert sorted(o.short_code for o in made) == sorted(f"race-{i}" for i in range(100))


def _iso(seconds: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(seconds, UTC).isoformat()


async def test_a_change_reaches_another_process_at_once(
    stack: dict[str, Any], clock: ManualClock, admin_key_of: Any
) -> None:
    """Two processes on one database (and Redis at scale): B's cached copy goes when A edits."""
    settings = make_settings(**stack, services=["shortener"], shortener_analytics=False)
    async with serve_app(settings, clock) as (_, a), serve_app(settings, clock) as (_, b):
        headers = {"Authorization": f"Bearer {admin_key_of(settings)}"}
        code = (
            await a.post("/api/v1/urls", json={"url": "https://example.com/1"}, headers=headers)
        ).json()["short_code"]
        assert (await b.get(f"/r/{code}")).status_code == 302  # B caches it
        await a.put(f"/api/v1/urls/{code}", json={"is_active": False}, headers=headers)
        if stack["redis_url"]:  # pub/sub: B drops its copy as soon as the message lands
            for _ in range(200):
                if (await b.get(f"/r/{code}")).status_code == 404:
                    break
                await asyncio.sleep(0.01)  # waiting for delivery, not standing in for it
            assert (await b.get(f"/r/{code}")).status_code == 404
        else:  # embedded, another process: its copy is trusted for a few seconds only
            clock.advance(6)
            assert (await b.get(f"/r/{code}")).status_code == 404
