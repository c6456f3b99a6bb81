"""The ASGI middleware on any app, and the guard in front of tenfold's own API."""

from __future__ import annotations

from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from tenfold.kernel.clock import ManualClock
from tenfold.ratelimit import Limit, RateLimiter
from tenfold.ratelimit.middleware import RateLimitMiddleware
from tests.conftest import make_settings, serve_app


async def hello(_: Any) -> PlainTextResponse:
    return PlainTextResponse("hi")


def client_for(app: Any, ip: str = "198.51.100.1") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(ip, 1234))
    return httpx.AsyncClient(transport=transport, base_url="http://app.test")


async def test_any_asgi_app_gets_headers_and_429(clock: ManualClock) -> None:
    inner = Starlette(routes=[Route("/", hello)])
    limiter = RateLimiter(clock=clock)
    app = RateLimitMiddleware.for_limit(
        inner, Limit.of("fixed_window", 2, 60), limiter=limiter, name="site", legacy_headers=True
    )
    clock.set(1_700_000_020)  # 40 s into a minute window (minutes start at multiples of 60)
    async with client_for(app) as client:
        first = await client.get("/")
        assert first.status_code == 200 and first.text == "hi"
        assert first.headers["ratelimit-policy"] == '"site";q=2;w=60'
        assert first.headers["ratelimit"] == '"site";r=1;t=20'
        assert first.headers["x-ratelimit-remaining"] == "1"
        await client.get("/")
        denied = await client.get("/")
        assert denied.status_code == 429
        assert denied.headers["content-type"] == "application/problem+json"
        assert denied.headers["retry-after"] == "20"
        body = denied.json()
        assert body["type"] == "urn:tenfold:problem:rate-limited" and body["retry_after"] == 20
    async with client_for(app, ip="198.51.100.2") as other:
        assert (await other.get("/")).status_code == 200


async def test_trusted_proxy_forwarded_for(clock: ManualClock) -> None:
    inner = Starlette(routes=[Route("/", hello)])
    app = RateLimitMiddleware.for_limit(
        inner,
        Limit.of("fixed_window", 1, 60),
        limiter=RateLimiter(clock=clock),
        trusted_proxies=["10.0.0.0/8"],
    )
    async with client_for(app, ip="10.1.1.1") as proxy:
        a = await proxy.get("/", headers={"X-Forwarded-For": "203.0.113.5, 10.2.2.2"})
        b = await proxy.get("/", headers={"X-Forwarded-For": "203.0.113.6"})
        c = await proxy.get("/", headers={"X-Forwarded-For": "203.0.113.5"})
        assert [a.status_code, b.status_code, c.status_code] == [200, 200, 429]
    async with client_for(app, ip="192.0.2.9") as untrusted:
        # an untrusted peer cannot pick its identity by sending the header
        d = await untrusted.get("/", headers={"X-Forwarded-For": "203.0.113.77"})
        e = await untrusted.get("/", headers={"X-Forwarded-For": "203.0.113.78"})
        assert [d.status_code, e.status_code] == [200, 429]


async def test_guard_limits_anonymous_calls_per_ip_but_not_public_paths(
    tmp_path: Any, sqlite_template: Any, clock: ManualClock
) -> None:
    settings = make_settings(
        data_dir=str(tmp_path),
        database_url=sqlite_template.clone(tmp_path / "db.sqlite"),
        ratelimit_anonymous_limit=2,
    )
    async with serve_app(settings, clock) as (_, client):
        statuses = [(await client.get("/api/v1/policies")).status_code for _ in range(3)]
        assert statuses == [401, 401, 429]
        health = [(await client.get("/healthz")).status_code for _ in range(5)]
        assert health == [200] * 5


async def test_guard_limits_a_key_only_by_its_assigned_policies(
    tmp_path: Any, sqlite_template: Any, clock: ManualClock, admin_key_of: Any
) -> None:
    settings = make_settings(
        data_dir=str(tmp_path),
        database_url=sqlite_template.clone(tmp_path / "db.sqlite"),
        ratelimit_anonymous_limit=1,
    )
    async with serve_app(settings, clock) as (app, client):
        admin = {"X-API-Key": admin_key_of(settings)}
        # a global policy for checked clients does not throttle tenfold's own callers
        await client.post(
            "/api/v1/policies",
            json={
                "name": "g",
                "algorithm": "fixed_window",
                "rate_limit": 1,
                "time_window": 60,
                "applies_to_all": True,
            },
            headers=admin,
        )
        record, reader_key = await app.state.runtime.keys.create("reader", ["ratelimit:read"])
        reader = {"X-API-Key": reader_key}
        for _ in range(3):
            r = await client.get("/api/v1/policies", headers=reader)
            assert r.status_code == 200 and "ratelimit" not in r.headers
        created = await client.post(
            "/api/v1/policies",
            json={
                "name": "reader-cap",
                "algorithm": "token_bucket",
                "rate_limit": 2,
                "time_window": 60,
            },
            headers=admin,
        )
        pid = created.json()["policy_id"]
        await client.put(
            f"/api/v1/policies/{pid}/clients",
            json={"client_ids": [f"key:{record.key_id}"]},
            headers=admin,
        )
        codes = [
            (await client.get("/api/v1/policies", headers=reader)).status_code for _ in range(3)
        ]
        assert codes == [200, 200, 429]


async def test_the_guard_also_gates_lean_routes(
    tmp_path: Any, sqlite_template: Any, clock: ManualClock, admin_key_of: Any
) -> None:
    """Hot paths are served ahead of the middleware stack; the guard's decision still holds."""
    settings = make_settings(
        data_dir=str(tmp_path),
        database_url=sqlite_template.clone(tmp_path / "db.sqlite"),
        ratelimit_anonymous_limit=2,
    )
    check = "/api/v1/ratelimit/check"
    body = {"client_id": "c", "api_key": "", "resource": "/"}
    async with serve_app(settings, clock) as (app, client):
        admin = {"X-API-Key": admin_key_of(settings)}
        anonymous = [await client.post(check, json=body) for _ in range(3)]
        assert [r.status_code for r in anonymous] == [401, 401, 429]
        assert anonymous[0].headers["ratelimit"].startswith('"anonymous";r=1;t=')
        assert anonymous[2].headers["content-type"] == "application/problem+json"
        assert anonymous[2].headers["retry-after"] and anonymous[2].json()["policy"] == "anonymous"
        assert "x-request-id" in anonymous[2].headers

        record, writer_key = await app.state.runtime.keys.create("w", ["ratelimit:write"])
        created = await client.post(
            "/api/v1/policies",
            json={"name": "cap", "algorithm": "fixed_window", "rate_limit": 2, "time_window": 60},
            headers=admin,
        )
        await client.put(
            f"/api/v1/policies/{created.json()['policy_id']}/clients",
            json={"client_ids": [f"key:{record.key_id}"]},
            headers=admin,
        )
        writer = {"X-API-Key": writer_key}
        answers = [await client.post(check, json=body, headers=writer) for _ in range(3)]
        assert [r.status_code for r in answers] == [200, 200, 429]
        assert answers[0].headers["ratelimit-policy"] == '"cap";q=2;w=60'
        assert answers[2].json()["type"].endswith("rate-limited")
        unlimited = await client.post(check, json=body, headers=admin)  # no policy of its own
        assert unlimited.status_code == 200 and "ratelimit" not in unlimited.headers
