"""Session cookies and CSRF for browser apps, on a Starlette app, with a real SessionService
(in-process, and over HTTP against the tenfold app)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from tenfold.kernel.clock import ManualClock
from tenfold.kernel.errors import BackendUnavailable
from tenfold.sessions import api, cookies
from tenfold.sessions.cookies import (
    UNAVAILABLE,
    HttpValidator,
    SessionCookieMiddleware,
    Validate,
    clear_session_cookie,
    cleared_session_cookie,
    csrf_cookie,
    from_service,
    over_http,
    session_cookie,
    session_login_response,
    set_session_cookie,
)
from tenfold.sessions.models import DeviceInfo, Reason, SessionType, Validation
from tenfold.sessions.service import SessionService
from tenfold.settings import Settings
from tests.backends import SqliteTemplate
from tests.conftest import make_settings, serve_app

SITE = "https://app.test"
BROWSER_IP = "198.51.100.9"
CLEAR = "__Host-session=; Path=/; Secure; HttpOnly; SameSite=Lax; Max-Age=0"
CSRF_SET = re.compile(r"__Host-csrf=([A-Za-z0-9_-]{43}); Path=/; Secure; SameSite=Lax")
CSRF = "c" * 43
UNSAFE = ("POST", "PUT", "PATCH", "DELETE")


# --- fixtures ------------------------------------------------------------------------------


@dataclass
class Tenfold:
    app: Any
    client: httpx.AsyncClient  # bound to the tenfold app, base URL http://tenfold.test
    service: SessionService
    key: str


@pytest.fixture
def settings(tmp_path: Path, sqlite_template: SqliteTemplate) -> Settings:
    return make_settings(
        data_dir=str(tmp_path / "data"),
        database_url=sqlite_template.clone(tmp_path / "db" / "tenfold.db"),
        services=["sessions"],
    )


@pytest.fixture
async def tenfold(
    settings: Settings, clock: ManualClock, admin_key_of: Callable[[Settings], str]
) -> AsyncIterator[Tenfold]:
    async with serve_app(settings, clock) as (app, client):
        service = app.state.runtime.services["sessions"]
        assert isinstance(service, SessionService)
        yield Tenfold(app, client, service, admin_key_of(settings))


class Counting:
    """A validator that records its calls."""

    def __init__(self, inner: Validate) -> None:
        self.inner = inner
        self.calls: list[tuple[str, str]] = []

    async def __call__(self, token: str, ip: str) -> Validation:
        self.calls.append((token, ip))
        return await self.inner(token, ip)


class Logs:
    """Stands in for the module's structlog logger."""

    def __init__(self) -> None:
        self.records: list[tuple[str, str, dict[str, Any]]] = []

    def _record(self, level: str) -> Callable[..., None]:
        def log(event: str, **kw: Any) -> None:
            self.records.append((level, event, kw))

        return log

    def __getattr__(self, level: str) -> Callable[..., None]:
        return self._record(level)

    def levels(self) -> list[str]:
        return [level for level, _, _ in self.records]


@pytest.fixture
def logs(monkeypatch: pytest.MonkeyPatch) -> Logs:
    recorder = Logs()
    monkeypatch.setattr(cookies, "log", recorder)
    return recorder


async def whoami(request: Request) -> JSONResponse:
    session = request.state.session
    refused = request.state.session_refused
    return JSONResponse(
        {
            "user_id": session.user_id if session else None,
            "refused": refused is not None,
            "reason": str(refused.reason) if refused and refused.reason else None,
            "csrf": request.state.csrf_token,
        }
    )


ALL_METHODS = ["GET", "HEAD", "OPTIONS", *UNSAFE]


def site(validate: Validate, *extra: Route, **options: Any) -> SessionCookieMiddleware:
    inner = Starlette(
        routes=[
            Route("/", whoami, methods=ALL_METHODS),
            Route("/hooks/github", whoami, methods=["POST"]),
            Route("/webhook", whoami, methods=["POST"]),
            *extra,
        ]
    )
    return SessionCookieMiddleware(inner, validate, **options)


def browser(app: ASGIApp, base_url: str = SITE) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(BROWSER_IP, 50000))
    return httpx.AsyncClient(transport=transport, base_url=base_url)


def cookie(token: str | None = None, csrf: str | None = CSRF) -> dict[str, str]:
    pairs = []
    if token is not None:
        pairs.append(f"__Host-session={token}")
    if csrf is not None:
        pairs.append(f"__Host-csrf={csrf}")
    return {"Cookie": "; ".join(pairs)} if pairs else {}


def same_origin(token: str, csrf: str = CSRF) -> dict[str, str]:
    return {**cookie(token, csrf), "Origin": SITE, "X-CSRF-Token": csrf}


def set_cookies(response: httpx.Response) -> list[str]:
    return response.headers.get_list("set-cookie")


async def login(service: SessionService, user: str = "alice") -> str:
    issued = await service.create(user, device=DeviceInfo(ip=BROWSER_IP))
    return issued.session_token


# --- cookie headers ------------------------------------------------------------------------


def test_cookie_headers_are_exact() -> None:
    assert session_cookie("abc.DEF-_1") == (
        "__Host-session=abc.DEF-_1; Path=/; Secure; HttpOnly; SameSite=Lax"
    )
    assert session_cookie("t.s", max_age=2_592_000) == (
        "__Host-session=t.s; Path=/; Secure; HttpOnly; SameSite=Lax; Max-Age=2592000"
    )
    assert cleared_session_cookie() == CLEAR
    assert csrf_cookie("x1") == "__Host-csrf=x1; Path=/; Secure; SameSite=Lax"
    # Plain-http development: the __Host- prefix would make browsers drop the cookie.
    assert session_cookie("t.s", secure=False) == "session=t.s; Path=/; HttpOnly; SameSite=Lax"
    assert cleared_session_cookie(secure=False) == (
        "session=; Path=/; HttpOnly; SameSite=Lax; Max-Age=0"
    )
    assert csrf_cookie("x1", secure=False) == "csrf=x1; Path=/; SameSite=Lax"
    for value in ("a;b", "a b", "", 'a"b', "a\r\nSet-Cookie: evil=1", "a,b"):
        with pytest.raises(ValueError):
            session_cookie(value)


def test_helpers_write_to_responses_header_maps_and_raw_lists() -> None:
    response = Response("ok")
    set_session_cookie(response, "t.s", max_age=60)
    clear_session_cookie(response.headers)
    raw: list[tuple[bytes, bytes]] = []
    set_session_cookie(raw, "t.s")
    assert response.headers.getlist("set-cookie") == [
        "__Host-session=t.s; Path=/; Secure; HttpOnly; SameSite=Lax; Max-Age=60",
        CLEAR,
    ]
    assert raw == [(b"set-cookie", b"__Host-session=t.s; Path=/; Secure; HttpOnly; SameSite=Lax")]
    # Django keeps cookies in a SimpleCookie: `response.cookies.load(session_cookie(...))`.
    jar: SimpleCookie = SimpleCookie()
    jar.load(session_cookie("t.s", max_age=60))
    morsel = jar["__Host-session"]
    assert morsel.value == "t.s" and morsel["path"] == "/" and morsel["max-age"] == "60"
    assert morsel["secure"] and morsel["httponly"] and morsel["samesite"] == "Lax"
    assert not morsel["domain"]


def test_options_are_checked() -> None:
    async def never(token: str, ip: str) -> Validation:
        raise AssertionError

    with pytest.raises(ValueError, match="trusted origin"):
        site(never, trusted_origins=["app.example.com"])
    with pytest.raises(ValueError, match="trusted origin"):
        site(never, trusted_origins=["https://app.example.com/path"])
    with pytest.raises(ValueError, match="not a valid"):
        site(never, cookie_name="bad name")
    with pytest.raises(ValueError, match="http"):
        over_http("tenfold.internal", "key")


# --- validation ----------------------------------------------------------------------------


async def test_valid_cookie_puts_the_session_in_state(tenfold: Tenfold) -> None:
    token = await login(tenfold.service)
    validate = Counting(from_service(tenfold.service))
    async with browser(site(validate)) as client:
        response = await client.get("/", headers=cookie(token, csrf=None))
    assert response.status_code == 200
    body = response.json()
    assert body["user_id"] == "alice" and body["refused"] is False
    assert validate.calls == [(token, BROWSER_IP)]  # once per request, with the client's IP
    [csrf_header] = set_cookies(response)  # a fresh CSRF cookie, and no clearing
    match = CSRF_SET.fullmatch(csrf_header)
    assert match and body["csrf"] == match.group(1)


@pytest.mark.parametrize("ending", ["revoked", "idle", "expired"])
async def test_a_dead_session_cookie_is_cleared(
    tenfold: Tenfold, clock: ManualClock, ending: str
) -> None:
    token = await login(tenfold.service)
    app = site(from_service(tenfold.service))
    async with browser(app) as client:
        assert (await client.get("/", headers=cookie(token))).json()["user_id"] == "alice"
        if ending == "revoked":
            await tenfold.service.revoke(token.split(".")[0])
        elif ending == "idle":
            clock.advance(31 * 60)  # web sessions: 30 minutes idle
        else:
            for _ in range(25):  # used every 29 minutes, until the 12 h absolute lifetime
                clock.advance(29 * 60)
                await client.get("/", headers=cookie(token))
        response = await client.get("/", headers=cookie(token))
    expected = {"revoked": "revoked", "idle": "idle_timeout", "expired": "expired"}[ending]
    assert response.status_code == 200  # the app decides what an anonymous visitor gets
    assert response.json() == {
        "user_id": None,
        "refused": True,
        "reason": expected,
        "csrf": CSRF,
    }
    assert set_cookies(response) == [CLEAR]


async def test_a_forged_cookie_is_cleared(tenfold: Tenfold) -> None:
    async with browser(site(from_service(tenfold.service))) as client:
        response = await client.get("/", headers=cookie("not-a-token"))
    assert response.json()["reason"] == "malformed"
    assert set_cookies(response) == [CLEAR]


async def test_without_a_cookie_nothing_is_validated(tenfold: Tenfold) -> None:
    validate = Counting(from_service(tenfold.service))
    async with browser(site(validate)) as client:
        response = await client.get("/", headers=cookie(None))
    assert response.json() == {"user_id": None, "refused": False, "reason": None, "csrf": CSRF}
    assert validate.calls == [] and set_cookies(response) == []


async def test_the_app_setting_a_new_session_wins_over_clearing(tenfold: Tenfold) -> None:
    async def sign_in(request: Request) -> Response:
        issued = await tenfold.service.create("bob")
        return session_login_response(issued)

    old = await login(tenfold.service)
    await tenfold.service.revoke(old.split(".")[0])
    app = site(from_service(tenfold.service), Route("/login", sign_in, methods=["POST"]))
    async with browser(app) as client:
        response = await client.post("/login", headers=same_origin(old))
    assert response.status_code == 200
    [new] = set_cookies(response)
    assert new.startswith("__Host-session=") and new != CLEAR


async def test_tenfold_unavailable_in_process_keeps_the_cookie(
    tenfold: Tenfold, monkeypatch: pytest.MonkeyPatch, logs: Logs
) -> None:
    token = await login(tenfold.service)

    async def down(session_id: str) -> None:
        raise BackendUnavailable("database unreachable")

    monkeypatch.setattr(tenfold.service.store, "get", down)
    async with browser(site(from_service(tenfold.service))) as client:
        response = await client.get("/", headers=cookie(token))
    assert response.status_code == 200
    assert response.json() == {"user_id": None, "refused": True, "reason": None, "csrf": CSRF}
    assert set_cookies(response) == []  # not refused, only unanswered: the cookie stays
    assert logs.levels() == ["warning"]


# --- CSRF ----------------------------------------------------------------------------------


async def test_safe_methods_are_never_checked_and_get_the_csrf_cookie(tenfold: Tenfold) -> None:
    token = await login(tenfold.service)
    hostile = {**cookie(token, csrf=None), "Origin": "https://evil.test"}
    async with browser(site(from_service(tenfold.service))) as client:
        for method in ("GET", "HEAD", "OPTIONS"):
            response = await client.request(method, "/", headers=hostile)
            assert response.status_code == 200, method
            [header] = set_cookies(response)
            assert CSRF_SET.fullmatch(header), header
        kept = await client.get("/", headers={**hostile, **cookie(token)})
    assert set_cookies(kept) == [] and kept.json()["csrf"] == CSRF


@pytest.mark.parametrize("method", UNSAFE)
async def test_same_origin_with_the_token_passes(tenfold: Tenfold, method: str) -> None:
    token = await login(tenfold.service)
    async with browser(site(from_service(tenfold.service))) as client:
        response = await client.request(method, "/", headers=same_origin(token))
    assert response.status_code == 200
    assert response.json()["user_id"] == "alice"


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "https://app.test:443"},  # the default port is the same origin
        {"Referer": "https://app.test/settings?tab=2"},  # Referer when Origin is absent
        {"Sec-Fetch-Site": "same-origin"},  # a Fetch Metadata header stands for the origin
        {"Origin": "https://admin.example.com"},  # a trusted origin
    ],
    ids=["default-port", "referer", "sec-fetch-site", "trusted"],
)
async def test_allowed_origins(tenfold: Tenfold, headers: dict[str, str]) -> None:
    token = await login(tenfold.service)
    app = site(from_service(tenfold.service), trusted_origins=["https://Admin.example.com/"])
    async with browser(app) as client:
        response = await client.post(
            "/", headers={**cookie(token), "X-CSRF-Token": CSRF, **headers}
        )
    assert response.status_code == 200, response.text
    assert response.json()["user_id"] == "alice"


@pytest.mark.parametrize(
    ("headers", "detail"),
    [
        ({"Origin": SITE, "X-CSRF-Token": CSRF}, None),  # the control: it passes
        ({"Origin": SITE}, "header is missing"),
        ({"Origin": SITE, "X-CSRF-Token": "d" * 43}, "does not match"),
        ({"Origin": SITE, "X-CSRF-Token": ""}, "header is missing"),
        ({"Origin": "https://evil.test", "X-CSRF-Token": CSRF}, "not an allowed origin"),
        ({"Origin": "http://app.test", "X-CSRF-Token": CSRF}, "not an allowed origin"),
        ({"Origin": "https://app.test.evil.test", "X-CSRF-Token": CSRF}, "not an allowed"),
        ({"Origin": "null", "X-CSRF-Token": CSRF}, "not an allowed origin"),
        ({"Referer": "https://evil.test/x", "X-CSRF-Token": CSRF}, "Referer"),
        ({"X-CSRF-Token": CSRF}, "neither an Origin nor a Referer"),
        (
            {"Sec-Fetch-Site": "same-site", "Origin": "https://a.app.test", "X-CSRF-Token": CSRF},
            "not an allowed origin",
        ),
        ({"Sec-Fetch-Site": "same-origin"}, "header is missing"),  # replaces (a), never (b)
    ],
)
async def test_csrf_rejections(
    tenfold: Tenfold, headers: dict[str, str], detail: str | None
) -> None:
    token = await login(tenfold.service)
    validate = Counting(from_service(tenfold.service))
    async with browser(site(validate)) as client:
        response = await client.post("/", headers={**cookie(token), **headers})
    if detail is None:
        assert response.status_code == 200
        return
    assert response.status_code == 403
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["type"] == "urn:tenfold:problem:csrf-failed"
    assert problem["title"] == "CSRF check failed" and problem["status"] == 403
    assert detail in problem["detail"]
    assert validate.calls == []  # a forged request costs no validation
    assert set_cookies(response) == []


async def test_a_missing_csrf_cookie_fails_and_the_403_brings_one(tenfold: Tenfold) -> None:
    token = await login(tenfold.service)
    async with browser(site(from_service(tenfold.service))) as client:
        response = await client.post(
            "/", headers={**cookie(token, csrf=None), "Origin": SITE, "X-CSRF-Token": CSRF}
        )
    assert response.status_code == 403
    assert "__Host-csrf cookie is missing" in response.json()["detail"]
    [header] = set_cookies(response)
    assert CSRF_SET.fullmatch(header)


async def test_without_a_session_cookie_there_is_nothing_to_forge(tenfold: Tenfold) -> None:
    async with browser(site(from_service(tenfold.service))) as client:
        response = await client.post("/", headers={"Origin": "https://evil.test"})
    assert response.status_code == 200
    assert response.json()["user_id"] is None


async def test_exempt_paths_skip_csrf_but_still_see_the_session(tenfold: Tenfold) -> None:
    token = await login(tenfold.service)
    app = site(from_service(tenfold.service), exempt_paths=["/hooks/", "/webhook"])
    hostile = {**cookie(token, csrf=None), "Origin": "https://evil.test"}
    async with browser(app) as client:
        for path in ("/hooks/github", "/webhook"):
            response = await client.post(path, headers=hostile)
            assert response.status_code == 200, path
            assert response.json()["user_id"] == "alice"
        assert (await client.post("/", headers=hostile)).status_code == 403


async def test_own_origin_follows_the_host_header(tenfold: Tenfold) -> None:
    token = await login(tenfold.service)
    async with browser(site(from_service(tenfold.service)), "http://localhost:8000") as client:
        ok = await client.post(
            "/", headers={**same_origin(token), "Origin": "http://localhost:8000"}
        )
        wrong_port = await client.post(
            "/", headers={**same_origin(token), "Origin": "http://localhost:9000"}
        )
    assert ok.status_code == 200 and wrong_port.status_code == 403


async def test_insecure_development_mode_uses_unprefixed_names(tenfold: Tenfold) -> None:
    token = await login(tenfold.service)
    app = site(from_service(tenfold.service), secure=False)
    async with browser(app, "http://dev.test") as client:
        fresh = await client.get("/", headers={"Cookie": f"session={token}"})
        posted = await client.post(
            "/",
            headers={
                "Cookie": f"session={token}; csrf={CSRF}",
                "Origin": "http://dev.test",
                "X-CSRF-Token": CSRF,
            },
        )
        prefixed = await client.get("/", headers=cookie(token))  # not this app's cookie
        await tenfold.service.revoke(token.split(".")[0])
        dead = await client.get("/", headers={"Cookie": f"session={token}; csrf={CSRF}"})
    assert fresh.json()["user_id"] == "alice"
    [header] = set_cookies(fresh)
    assert re.fullmatch(r"csrf=[A-Za-z0-9_-]{43}; Path=/; SameSite=Lax", header)
    assert posted.status_code == 200 and posted.json()["user_id"] == "alice"
    assert prefixed.json()["user_id"] is None
    assert set_cookies(dead) == ["session=; Path=/; HttpOnly; SameSite=Lax; Max-Age=0"]


async def test_other_scopes_pass_through() -> None:
    seen: list[str] = []

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    async def never(token: str, ip: str) -> Validation:
        raise AssertionError

    app = SessionCookieMiddleware(inner, never)
    await app({"type": "lifespan"}, None, None)  # type: ignore[arg-type]
    assert seen == ["lifespan"]


# --- login ---------------------------------------------------------------------------------


async def test_session_login_response(tenfold: Tenfold, clock: ManualClock) -> None:
    issued = await tenfold.service.create("carol", remember_me=True)
    plain = session_login_response(issued)
    assert plain.status_code == 200 and plain.headers["cache-control"] == "no-store"
    assert plain.headers.getlist("set-cookie") == [session_cookie(issued.session_token)]
    body = bytes(plain.body)
    assert issued.session_token.split(".")[1].encode() not in body  # no token in the body
    assert orjson.loads(body) == {
        "user_id": "carol",
        "session_id": issued.session_id,
        "expires_at": "2023-11-21T22:13:20Z",  # remember-me: 7 days idle from the clock's start
    }

    clock.advance(100)
    remembered = session_login_response(issued, remember_me=True, redirect_to="/home", clock=clock)
    lifetime = (issued.refresh_expires_at_ms - clock.now_ms()) // 1000
    assert lifetime == 30 * 86400 - 100  # web remember-me: 30 days, 100 s later
    assert remembered.status_code == 303 and remembered.headers["location"] == "/home"
    assert remembered.headers.getlist("set-cookie") == [
        f"__Host-session={issued.session_token}; Path=/; Secure; HttpOnly; SameSite=Lax; "
        f"Max-Age={lifetime}"
    ]
    for target in ("https://evil.test/", "//evil.test/", "/\\evil.test"):
        with pytest.raises(ValueError, match="local path"):
            session_login_response(issued, redirect_to=target)


# --- over HTTP -----------------------------------------------------------------------------


def test_the_validate_path_is_tenfolds() -> None:
    assert cookies.VALIDATE_PATH == api.VALIDATE_PATH


async def test_over_http_answers_like_the_service(tenfold: Tenfold) -> None:
    issued = await tenfold.service.create(
        "alice",
        device=DeviceInfo(ip=BROWSER_IP),
        session_type=SessionType.WEB,
        permissions=["read", "write"],
    )
    remote = over_http("http://tenfold.test/", tenfold.key, tenfold.client)
    local = from_service(tenfold.service)
    for ip in (BROWSER_IP, "192.0.2.1", ""):  # the second is another network: a risk signal
        theirs = await remote(issued.session_token, ip)
        ours = await local(issued.session_token, ip)
        assert theirs == ours and theirs.valid and theirs.user_id == "alice"
    assert theirs.permissions == ("read", "write")
    assert (await remote(issued.session_token, "192.0.2.1")).risk == ("network_changed",)

    assert await remote("garbage", BROWSER_IP) == Validation(False, Reason.MALFORMED)
    await tenfold.service.revoke(issued.session_id)
    assert await remote(issued.session_token, BROWSER_IP) == Validation(False, Reason.REVOKED)
    await remote.aclose()
    assert not tenfold.client.is_closed  # a borrowed client stays open


async def test_over_http_in_the_middleware(tenfold: Tenfold) -> None:
    token = await login(tenfold.service)
    app = site(over_http("http://tenfold.test", tenfold.key, tenfold.client))
    async with browser(app) as client:
        ok = await client.post("/", headers=same_origin(token))
        await tenfold.service.revoke(token.split(".")[0])
        gone = await client.get("/", headers=cookie(token))
    assert ok.json()["user_id"] == "alice"
    assert gone.json()["reason"] == "revoked" and set_cookies(gone) == [CLEAR]


async def test_tenfold_answering_503_is_unauthenticated_not_a_crash(
    tenfold: Tenfold, monkeypatch: pytest.MonkeyPatch, logs: Logs
) -> None:
    token = await login(tenfold.service)

    async def down(session_id: str) -> None:
        raise BackendUnavailable("database unreachable")

    monkeypatch.setattr(tenfold.service.store, "get", down)
    remote = over_http("http://tenfold.test", tenfold.key, tenfold.client)
    direct = await tenfold.client.post(
        "/api/v1/sessions/validate",
        json={"session_token": token},
        headers={"Authorization": f"Bearer {tenfold.key}"},
    )
    assert direct.status_code == 503  # tenfold really answers 503
    async with browser(site(remote)) as client:
        response = await client.post("/", headers=same_origin(token))
    assert response.status_code == 200
    assert response.json() == {"user_id": None, "refused": True, "reason": None, "csrf": CSRF}
    assert set_cookies(response) == []  # the session may be fine: keep the cookie
    assert [(lvl, ev) for lvl, ev, _ in logs.records] == [
        ("warning", "sessions.cookie_validation_unavailable")
    ]
    assert logs.records[0][2]["status"] == 503


async def test_a_rejected_api_key_is_logged_as_an_error(tenfold: Tenfold, logs: Logs) -> None:
    token = await login(tenfold.service)
    _, unrelated = await tenfold.app.state.runtime.keys.create("other", ["nothing:read"])
    for key, status in (("tf_0000_" + "x" * 30, 401), (unrelated, 403)):
        remote = over_http("http://tenfold.test", key, tenfold.client)
        assert await remote(token, BROWSER_IP) is UNAVAILABLE
        level, event, fields = logs.records.pop()
        assert (level, event, fields["status"]) == (
            "error",
            "sessions.cookie_validation_rejected_key",
            status,
        )


async def test_network_failures_and_bad_answers_are_unauthenticated(logs: Logs) -> None:
    answers: list[Callable[[httpx.Request], httpx.Response]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        return answers.pop(0)(request)

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    def timeout(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        remote = HttpValidator("https://tenfold.internal", "k", client)
        answers += [
            refuse,
            timeout,
            lambda r: httpx.Response(200, content=b"<html>"),
            lambda r: httpx.Response(200, json={"valid": True}),
            lambda r: httpx.Response(502),
            lambda r: httpx.Response(422, json={}),
        ]
        for _ in range(6):
            assert await remote("a.b", "") is UNAVAILABLE
        assert logs.levels() == ["warning", "warning", "error", "error", "warning", "error"]
        # Too long for tenfold to accept: refused without a call.
        assert await remote("x" * 3000, "") == Validation(False, Reason.MALFORMED)

        seen: list[httpx.Request] = []

        def record(request: httpx.Request) -> httpx.Response:
            seen.append(request)
            return httpx.Response(200, json={"valid": False, "reason": "something_new"})

        answers.append(record)
        assert await remote("a.b", "2001:db8::1") == Validation(False, Reason.UNKNOWN)
        assert str(seen[0].url) == "https://tenfold.internal/api/v1/sessions/validate"
        assert seen[0].headers["authorization"] == "Bearer k"
        assert seen[0].read() == b'{"session_token":"a.b","ip":"2001:db8::1"}'


async def test_an_owned_client_is_closed() -> None:
    remote = over_http("https://tenfold.internal", "k")
    await remote.aclose()
    assert remote.client.is_closed
