"""The HTTP edge every service shares: problems, request ids, body limits, health, metrics."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tenfold.app import build_app
from tenfold.kernel.clock import ManualClock
from tenfold.kernel.http import EdgeMiddleware, client_ip, parse_networks
from tenfold.kernel.runtime import Runtime
from tenfold.settings import Settings
from tests.conftest import make_settings, serve_app

PROBLEM = "application/problem+json"
POLICY = {"name": "p1", "algorithm": "token_bucket", "rate_limit": 3, "time_window": 60}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_problem(response: httpx.Response, status: int, kind: str) -> dict[str, Any]:
    """An RFC 9457 document with tenfold's stable type for this error."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body: dict[str, Any] = response.json()
    assert body["type"] == f"urn:tenfold:problem:{kind}"
    assert body["status"] == status
    assert isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str) and body["detail"]
    assert body["request_id"] == response.headers["x-request-id"]
    return body


async def policy_names(client: httpx.AsyncClient, key: str) -> list[str]:
    listed = await client.get("/api/v1/policies", headers=auth(key))
    assert listed.status_code == 200
    return [p["name"] for p in listed.json()["policies"]]


# --- problems ------------------------------------------------------------------------------


async def test_unknown_path_is_404_not_found(embedded: Settings, clock: ManualClock) -> None:
    async with serve_app(embedded, clock) as (_, client):
        response = await client.get("/api/v1/no-such-thing")
    assert_problem(response, 404, "not-found")


async def test_wrong_method_is_405_with_allow(embedded: Settings, clock: ManualClock) -> None:
    async with serve_app(embedded, clock) as (_, client):
        response = await client.delete("/healthz")
    assert_problem(response, 405, "method-not-allowed")
    assert "GET" in response.headers["allow"]


async def test_missing_key_is_401_with_a_bearer_challenge(
    embedded: Settings, clock: ManualClock
) -> None:
    async with serve_app(embedded, clock) as (_, client):
        response = await client.get("/api/v1/policies")
    assert_problem(response, 401, "unauthorized")
    assert response.headers["www-authenticate"].startswith("Bearer")


async def test_unknown_key_is_401(embedded: Settings, clock: ManualClock) -> None:
    async with serve_app(embedded, clock) as (_, client):
        response = await client.get("/api/v1/policies", headers=auth("tf_0000_" + "x" * 40))
    body = assert_problem(response, 401, "unauthorized")
    assert "invalid" in body["detail"]


async def test_key_without_the_scope_is_403_naming_it(
    embedded: Settings, clock: ManualClock
) -> None:
    async with serve_app(embedded, clock) as (app, client):
        _, key = await app.state.runtime.keys.create("reader", ["ratelimit:read"])
        response = await client.post("/api/v1/policies", json=POLICY, headers=auth(key))
    body = assert_problem(response, 403, "forbidden")
    assert body["required_scope"] == "ratelimit:admin"


async def test_invalid_query_is_422_naming_the_field(
    embedded: Settings, clock: ManualClock, admin_key_of: Any
) -> None:
    async with serve_app(embedded, clock) as (_, client):
        response = await client.get(
            "/api/v1/policies", params={"limit": 0}, headers=auth(admin_key_of(embedded))
        )
    body = assert_problem(response, 422, "validation-error")
    assert body["errors"][0]["field"] == "limit"
    assert body["detail"].startswith("limit: ")


async def test_invalid_body_is_422_naming_every_field(
    embedded: Settings, clock: ManualClock, admin_key_of: Any
) -> None:
    async with serve_app(embedded, clock) as (_, client):
        response = await client.post(
            "/api/v1/policies",
            json={"name": "p1", "rate_limit": "lots"},
            headers=auth(admin_key_of(embedded)),
        )
    body = assert_problem(response, 422, "validation-error")
    fields = {e["field"] for e in body["errors"]}
    assert {"algorithm", "rate_limit", "time_window"} <= fields


async def test_malformed_json_is_400_and_writes_nothing(
    embedded: Settings, clock: ManualClock, admin_key_of: Any
) -> None:
    async with serve_app(embedded, clock) as (_, client):
        key = admin_key_of(embedded)
        response = await client.post(
            "/api/v1/policies",
            content=b'{"name": "p1", "algorithm": ',
            headers=auth(key) | {"Content-Type": "application/json"},
        )
        assert await policy_names(client, key) == []
    assert_problem(response, 400, "malformed-json")


async def test_wrong_content_type_is_415_and_writes_nothing(
    embedded: Settings, clock: ManualClock, admin_key_of: Any
) -> None:
    async with serve_app(embedded, clock) as (_, client):
        key = admin_key_of(embedded)
        response = await client.post(
            "/api/v1/policies",
            content=orjson.dumps(POLICY),
            headers=auth(key) | {"Content-Type": "text/plain"},
        )
        assert await policy_names(client, key) == []
    body = assert_problem(response, 415, "unsupported-media-type")
    assert "text/plain" in body["detail"]


async def test_json_with_charset_and_problem_json_are_accepted(
    embedded: Settings, clock: ManualClock, admin_key_of: Any
) -> None:
    async with serve_app(embedded, clock) as (_, client):
        key = admin_key_of(embedded)
        for n, content_type in enumerate(["application/json; charset=utf-8", "application/x+json"]):
            response = await client.post(
                "/api/v1/policies",
                content=orjson.dumps(POLICY | {"name": f"p{n}"}),
                headers=auth(key) | {"Content-Type": content_type},
            )
            assert response.status_code == 201, response.text


async def test_lean_routes_answer_the_same_problems(
    embedded: Settings, clock: ManualClock, admin_key_of: Any
) -> None:
    """Hot paths served ahead of FastAPI (kernel.http.LeanRoute) keep the problem contract."""
    path = "/api/v1/ratelimit/check"
    async with serve_app(embedded, clock) as (app, client):
        assert any(r.path == path for m in app.mounts for r in m.lean_routes)
        anonymous = await client.post(path, json={}, headers={"X-Request-ID": "lean-1"})
        malformed = await client.post(
            path,
            content=b"{",
            headers=auth(admin_key_of(embedded)) | {"Content-Type": "application/json"},
        )
    assert assert_problem(anonymous, 401, "unauthorized")["request_id"] == "lean-1"
    assert_problem(malformed, 400, "malformed-json")


# --- body limit ----------------------------------------------------------------------------

LIMIT = 1024


@pytest.fixture
def small_bodies(embedded: Settings) -> Settings:
    return make_settings(
        **embedded.model_dump(include={"data_dir", "database_url"}) | {"max_body_bytes": LIMIT}
    )


def padded(size: int, name: str = "big") -> bytes:
    """A valid policy document of exactly `size` bytes (padded with JSON whitespace)."""
    raw = orjson.dumps(POLICY | {"name": name})
    assert len(raw) <= size
    return raw[:-1] + b" " * (size - len(raw)) + b"}"


async def chunks(body: bytes, size: int = 300) -> AsyncIterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start : start + size]


async def test_body_at_the_limit_is_accepted(
    small_bodies: Settings, clock: ManualClock, admin_key_of: Any
) -> None:
    async with serve_app(small_bodies, clock) as (_, client):
        key = admin_key_of(small_bodies)
        fits = await client.post(
            "/api/v1/policies",
            content=padded(LIMIT, "fits"),
            headers=auth(key) | {"Content-Type": "application/json"},
        )
        streamed = await client.post(
            "/api/v1/policies",
            content=chunks(padded(LIMIT, "streamed")),
            headers=auth(key) | {"Content-Type": "application/json"},
        )
    assert fits.status_code == 201, fits.text
    assert streamed.status_code == 201, streamed.text


async def test_body_over_the_limit_with_content_length_is_413(
    small_bodies: Settings, clock: ManualClock, admin_key_of: Any
) -> None:
    async with serve_app(small_bodies, clock) as (_, client):
        key = admin_key_of(small_bodies)
        response = await client.post(
            "/api/v1/policies",
            content=padded(LIMIT + 1),
            headers=auth(key) | {"Content-Type": "application/json"},
        )
        assert await policy_names(client, key) == []
    assert response.request.headers["content-length"] == str(LIMIT + 1)
    body = assert_problem(response, 413, "body-too-large")
    assert str(LIMIT) in body["detail"]


@pytest.mark.parametrize("path", ["/api/v1/policies", "/api/v1/ratelimit/check"])
async def test_streamed_body_over_the_limit_is_413(
    small_bodies: Settings, clock: ManualClock, admin_key_of: Any, path: str
) -> None:
    async with serve_app(small_bodies, clock) as (_, client):
        key = admin_key_of(small_bodies)
        response = await client.post(
            path,
            content=chunks(padded(LIMIT * 3)),
            headers=auth(key) | {"Content-Type": "application/json"},
        )
        assert await policy_names(client, key) == []
    assert "content-length" not in response.request.headers
    assert response.request.headers["transfer-encoding"] == "chunked"
    assert_problem(response, 413, "body-too-large")


# --- request ids ---------------------------------------------------------------------------


async def test_request_id_is_echoed(embedded: Settings, clock: ManualClock) -> None:
    async with serve_app(embedded, clock) as (_, client):
        ok = await client.get("/healthz", headers={"X-Request-ID": "req-42.a:b"})
        problem = await client.get("/nope", headers={"X-Request-ID": "req-43"})
    assert ok.headers["x-request-id"] == "req-42.a:b"
    assert problem.headers["x-request-id"] == "req-43"
    assert problem.json()["request_id"] == "req-43"


@pytest.mark.parametrize("sent", [None, "has spaces", "x" * 129, "semi;colon"])
async def test_request_id_is_generated_when_missing_or_unsafe(
    embedded: Settings, clock: ManualClock, sent: str | None
) -> None:
    headers = {} if sent is None else {"X-Request-ID": sent}
    async with serve_app(embedded, clock) as (_, client):
        first = await client.get("/healthz", headers=headers)
        second = await client.get("/healthz", headers=headers)
    ids = [first.headers["x-request-id"], second.headers["x-request-id"]]
    assert all(re.fullmatch(r"[0-9a-f]{16,}", i) for i in ids)  # at least 64 random bits
    assert ids[0] != ids[1]


# --- health --------------------------------------------------------------------------------


async def test_healthz_answers(embedded: Settings, clock: ManualClock) -> None:
    async with serve_app(embedded, clock) as (_, client):
        response = await client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_readyz_is_200_when_every_backend_answers(
    stack: dict[str, Any], clock: ManualClock
) -> None:
    async with serve_app(make_settings(**stack), clock) as (_, client):
        response = await client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "checks": {"database": "ok", "kv": "ok"}}


@pytest.fixture
async def database_down(tmp_path: Any, clock: ManualClock) -> AsyncIterator[httpx.AsyncClient]:
    """The app of a runtime whose database is a closed port (no lifespan: it could not start)."""
    settings = make_settings(
        data_dir=str(tmp_path),
        database_url="postgresql://postgres@127.0.0.1:1/nowhere",
        create_admin_key=False,
    )
    runtime = Runtime.from_settings(settings, clock)
    app = build_app(settings, runtime=runtime)
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            yield client
    finally:
        await runtime.close()


async def test_readyz_is_503_problem_when_the_database_is_unreachable(
    database_down: httpx.AsyncClient,
) -> None:
    health = await database_down.get("/healthz")
    response = await database_down.get("/readyz")
    assert health.status_code == 200  # the process is up, it just is not ready
    body = assert_problem(response, 503, "not-ready")
    assert "database" in body["detail"]
    assert body["checks"]["database"] != "ok"
    assert body["checks"]["kv"] == "ok"


@pytest.mark.parametrize(
    ("method", "path"), [("GET", "/api/v1/policies"), ("POST", "/api/v1/ratelimit/check")]
)
async def test_unreachable_database_is_503_on_every_layer(
    database_down: httpx.AsyncClient, method: str, path: str
) -> None:
    """The key check runs in the rate-limit guard, outside FastAPI's handlers: still a 503."""
    response = await database_down.request(
        method, path, json={}, headers={"X-API-Key": "tf_0123456789ab_" + "s" * 43}
    )
    body = assert_problem(response, 503, "backend-unavailable")
    assert body["detail"] == "database unreachable; retry shortly"  # no driver text, no host
    assert response.headers["retry-after"] == "1"


async def _boom(scope: Any, receive: Any, send: Any) -> None:
    raise RuntimeError("a bug outside FastAPI")


async def _half_then_boom(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    raise RuntimeError("a bug mid-response")


async def test_edge_turns_a_crash_outside_fastapi_into_a_500_problem() -> None:
    edge = EdgeMiddleware(_boom, max_body_bytes=1024)
    transport = httpx.ASGITransport(app=edge)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.get("/x", headers={"X-Request-ID": "crash-1"})
    body = assert_problem(response, 500, "internal-error")
    assert body["request_id"] == "crash-1"
    assert "a bug outside FastAPI" not in response.text  # internals stay in the log


async def test_edge_leaves_a_started_response_to_the_server() -> None:
    edge = EdgeMiddleware(_half_then_boom, max_body_bytes=1024)
    transport = httpx.ASGITransport(app=edge)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        with pytest.raises(RuntimeError, match="mid-response"):
            await client.get("/x")


# --- metrics -------------------------------------------------------------------------------


def sample(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


async def test_metrics_count_requests_and_latency_by_route_template(
    embedded: Settings, clock: ManualClock
) -> None:
    route = "/api/v1/policies/{policy_id}"
    async with serve_app(embedded, clock) as (_, client):
        before = (await client.get("/metrics")).text
        await client.get("/api/v1/policies/17")
        await client.get("/api/v1/policies/18")
        await client.get("/no-such-page-9f1c")
        response = await client.get("/metrics")
    after = response.text
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    counted = {"method": "GET", "route": route, "status": "401"}
    total = "tenfold_http_requests_total"
    assert sample(after, total, **counted) - sample(before, total, **counted) == 2
    hist = "tenfold_http_request_duration_seconds_count"
    assert (
        sample(after, hist, method="GET", route=route)
        - sample(before, hist, method="GET", route=route)
        == 2
    )
    assert 'le="0.005"' in after  # the histogram's buckets are exposed
    assert "/api/v1/policies/17" not in after  # raw paths never become labels
    assert "no-such-page-9f1c" not in after
    unmatched = {"method": "GET", "route": "unmatched", "status": "404"}
    assert sample(after, total, **unmatched) - sample(before, total, **unmatched) == 1


# --- docs ----------------------------------------------------------------------------------


async def test_openapi_and_docs_are_served(embedded: Settings, clock: ManualClock) -> None:
    async with serve_app(embedded, clock) as (_, client):
        schema = await client.get("/openapi.json")
        docs = await client.get("/docs")
    assert schema.status_code == 200
    doc = schema.json()
    assert doc["openapi"].startswith("3.")
    assert {"/healthz", "/readyz", "/metrics", "/api/v1/policies"} <= set(doc["paths"])
    assert docs.status_code == 200
    assert docs.headers["content-type"].startswith("text/html")
    assert "/openapi.json" in docs.text


async def test_fast_lane_routes_exact_and_one_parameter_paths() -> None:
    from tenfold.kernel.http import FastLane, LeanRoute

    async def echo(scope: Any, raw: bytes) -> Any:
        return 200, orjson.dumps(scope.get("path_params", {})), []

    async def framework(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 599, "headers": []})
        await send({"type": "http.response.body", "body": b"framework"})

    lane = FastLane(
        framework,
        [LeanRoute("POST", "/s/validate", echo), LeanRoute("POST", "/s/{sid}/validate", echo)],
    )
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=lane), base_url="http://t")
    async with client:
        exact = await client.post("/s/validate")
        assert exact.status_code == 200 and exact.json() == {}
        one = await client.post("/s/abc/validate")
        assert one.status_code == 200 and one.json() == {"sid": "abc"}
        for path in ("/s//validate", "/s/a/b/validate", "/s/abc/validate/x", "/s/abc"):
            assert (await client.post(path)).status_code == 599, path
        assert (await client.get("/s/abc/validate")).status_code == 599
    with pytest.raises(ValueError, match="one parameter"):
        FastLane(framework, [LeanRoute("POST", "/s/{a}/{b}", echo)])


@pytest.mark.parametrize(
    ("peer", "forwarded", "expected"),
    [
        ("198.51.100.9", "203.0.113.5", "198.51.100.9"),  # an untrusted peer speaks for itself
        ("10.1.2.3", "203.0.113.5", "203.0.113.5"),
        ("10.1.2.3", "203.0.113.5, 10.9.9.9", "203.0.113.5"),  # the right-most untrusted hop
        ("10.1.2.3", "not-an-address, 10.9.9.9", "not-an-address"),
        ("10.1.2.3", "10.0.0.1, 10.0.0.2", "10.0.0.1"),  # all trusted: the first one
        ("10.1.2.3", None, "10.1.2.3"),
        ("::1", "2001:db8::7", "2001:db8::7"),
    ],
)
def test_client_ip_through_trusted_proxies(peer: str, forwarded: str | None, expected: str) -> None:
    trusted = parse_networks(["10.0.0.0/8", "::1"])
    headers = [(b"x-forwarded-for", forwarded.encode())] if forwarded else []
    scope = {"client": (peer, 5000), "headers": headers}
    for _ in range(2):  # the second time from what the networks remember
        assert client_ip(scope, trusted) == expected
    assert client_ip(scope, parse_networks([])) == peer


def test_trusted_proxies_remember_a_bounded_number_of_addresses() -> None:
    trusted = parse_networks(["10.0.0.0/8"])
    for i in range(5000):
        assert (f"10.0.{i // 256}.{i % 256}" in trusted) is True
        assert (f"192.0.{i // 256}.{i % 256}" in trusted) is False
    assert len(trusted._known) <= 4096
    assert "999.1.1.1" not in trusted and 42 not in trusted
