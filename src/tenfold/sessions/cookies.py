"""Session cookies for browser apps: the `__Host-session` cookie, and CSRF protection.

`SessionCookieMiddleware` wraps any ASGI app (Starlette, FastAPI, Django). It validates the
session cookie once per request, through a `Validate` function (in-process with
`from_service`, or against a remote tenfold with `over_http`), and leaves the outcome in
`scope["state"]`. Unsafe requests that carry a session cookie must pass two CSRF checks: the
request comes from an allowed origin (`Origin`, else `Referer`; or `Sec-Fetch-Site:
same-origin`), and the `X-CSRF-Token` header repeats the `__Host-csrf` cookie. The `__Host-`
prefix makes the browser refuse that cookie from anywhere but this exact origin over https,
so a sibling subdomain cannot plant a token of its choosing.
"""

from __future__ import annotations

import hmac
import re
import secrets
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

import httpx
import orjson
import structlog
from starlette.datastructures import MutableHeaders
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tenfold.kernel.clock import SYSTEM_CLOCK, Clock
from tenfold.kernel.errors import BackendUnavailable
from tenfold.kernel.http import PROBLEM_CONTENT_TYPE, Problem
from tenfold.sessions.models import Reason, SessionType, Validation

if TYPE_CHECKING:
    from tenfold.sessions.service import Issued, SessionService

log = structlog.get_logger(__name__)

SESSION_COOKIE = "__Host-session"
CSRF_COOKIE = "__Host-csrf"
CSRF_HEADER = "X-CSRF-Token"
VALIDATE_PATH = "/api/v1/sessions/validate"  # tenfold.sessions.api.VALIDATE_PATH
MAX_TOKEN = 2048  # what tenfold's validate endpoint accepts
MAX_IP = 64
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})

# tenfold could not be asked (unreachable, 5xx, misconfigured): not authenticated, but the
# cookie is kept, since the session may well be valid. A refusal always carries a reason.
UNAVAILABLE = Validation(valid=False)

Validate = Callable[[str, str], Awaitable[Validation]]  # (token, client ip) -> outcome

_COOKIE_VALUE = re.compile(r"[\x21\x23-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]+")  # RFC 6265 octets
_COOKIE_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # an RFC 9110 token
_DEFAULT_PORTS = {"http": ":80", "https": ":443", "ws": ":80", "wss": ":443"}


# --- validators ----------------------------------------------------------------------------


def from_service(service: SessionService) -> Validate:
    """Validate in-process, with the app's own SessionService."""

    async def validate(token: str, ip: str) -> Validation:
        try:
            return await service.validate(token, ip=ip)
        except BackendUnavailable as exc:
            log.warning("sessions.cookie_validation_unavailable", error=str(exc))
            return UNAVAILABLE

    return validate


class HttpValidator:
    """Validate against a remote tenfold (`POST /api/v1/sessions/validate`).

    Failures never reach the app's users as errors: an unreachable tenfold, a 5xx or an
    unreadable answer count as "not authenticated" (`UNAVAILABLE`) and are logged; a 401 or
    403 means the API key is wrong or lacks `sessions:read`, logged as an error.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        client: httpx.AsyncClient | None = None,
        *,
        timeout: float = 2.0,
    ) -> None:
        url = httpx.URL(base_url.rstrip("/") + VALIDATE_PATH)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"base_url must be an http(s) URL, got {base_url!r}")
        self.url = url
        self._headers = {
            "Authorization": f"Bearer {api_key}",
            "Content-Type": "application/json",
        }
        self._own = client is None
        self.client = client or httpx.AsyncClient(timeout=timeout)

    async def __call__(self, token: str, ip: str) -> Validation:
        if len(token) > MAX_TOKEN:
            return Validation(False, Reason.MALFORMED)
        body = {"session_token": token}
        if ip and len(ip) <= MAX_IP:
            body["ip"] = ip
        try:
            response = await self.client.post(
                self.url, content=orjson.dumps(body), headers=self._headers
            )
        except httpx.HTTPError as exc:
            log.warning(
                "sessions.cookie_validation_unreachable", url=str(self.url), error=repr(exc)
            )
            return UNAVAILABLE
        status = response.status_code
        if status == 200:
            try:
                return validation_from_json(orjson.loads(response.content))
            except (ValueError, TypeError) as exc:
                log.error(
                    "sessions.cookie_validation_bad_answer", url=str(self.url), error=str(exc)
                )
                return UNAVAILABLE
        if status in (401, 403):
            log.error(
                "sessions.cookie_validation_rejected_key",
                url=str(self.url),
                status=status,
                hint="the API key is wrong, revoked, or lacks the scope sessions:read",
            )
        elif status >= 500 or status == 429:
            log.warning("sessions.cookie_validation_unavailable", url=str(self.url), status=status)
        else:
            log.error("sessions.cookie_validation_failed", url=str(self.url), status=status)
        return UNAVAILABLE

    async def aclose(self) -> None:
        """Close the HTTP client, when this validator created it."""
        if self._own:
            await self.client.aclose()


def over_http(
    base_url: str,
    api_key: str,
    client: httpx.AsyncClient | None = None,
    *,
    timeout: float = 2.0,
) -> HttpValidator:
    """Validate against a remote tenfold; `client` is borrowed (never closed) when given."""
    return HttpValidator(base_url, api_key, client, timeout=timeout)


def _epoch(value: object) -> float | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError("a time must be an ISO 8601 string")
    return datetime.fromisoformat(value).timestamp()


def _strings(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TypeError("expected a list of strings")
    return tuple(value)


def validation_from_json(body: Any) -> Validation:
    """The Validation of a JSON answer of tenfold's validate endpoint."""
    if not isinstance(body, dict) or not isinstance(body.get("valid"), bool):
        raise TypeError("not a validation answer")
    if not body["valid"]:
        try:
            reason = Reason(str(body.get("reason")))
        except ValueError:
            reason = Reason.UNKNOWN  # a refusal all the same
        return Validation(False, reason)
    session_id, user_id = body.get("session_id"), body.get("user_id")
    if not isinstance(session_id, str) or not isinstance(user_id, str):
        raise TypeError("a valid session needs session_id and user_id")
    kind = body.get("session_type")
    return Validation(
        valid=True,
        session_id=session_id,
        user_id=user_id,
        session_type=SessionType(kind) if kind is not None else None,
        permissions=_strings(body.get("permissions", [])),
        expires_at=_epoch(body.get("expires_at")),
        absolute_expires_at=_epoch(body.get("absolute_expires_at")),
        step_up_required=body.get("step_up_required") is True,
        risk=_strings(body.get("risk", [])),
    )


# --- cookie headers ------------------------------------------------------------------------


def _name_for(name: str, secure: bool) -> str:
    """Without `__Host-`/`__Secure-` when not secure: browsers refuse those cookies then."""
    if not secure:
        for prefix in ("__Host-", "__Secure-"):
            if name.startswith(prefix):
                return name[len(prefix) :]
    return name


def _cookie(
    name: str, value: str, *, secure: bool, http_only: bool, max_age: int | None = None
) -> str:
    # Path=/ and no Domain, always: what the __Host- prefix demands.
    parts = [f"{_name_for(name, secure)}={value}", "Path=/"]
    if secure:
        parts.append("Secure")
    if http_only:
        parts.append("HttpOnly")
    parts.append("SameSite=Lax")
    if max_age is not None:
        parts.append(f"Max-Age={max(0, int(max_age))}")
    return "; ".join(parts)


def session_cookie(
    token: str, *, max_age: int | None = None, secure: bool = True, name: str = SESSION_COOKIE
) -> str:
    """The Set-Cookie value carrying a session token (`max_age` for remember-me sessions)."""
    if not _COOKIE_VALUE.fullmatch(token):
        raise ValueError("a session token must be a non-empty run of cookie-safe characters")
    return _cookie(name, token, secure=secure, http_only=True, max_age=max_age)


def cleared_session_cookie(*, secure: bool = True, name: str = SESSION_COOKIE) -> str:
    """The Set-Cookie value that makes the browser drop the session cookie."""
    return _cookie(name, "", secure=secure, http_only=True, max_age=0)


def csrf_cookie(value: str, *, secure: bool = True, name: str = CSRF_COOKIE) -> str:
    """The CSRF cookie; not HttpOnly, so the page's script can copy it into the header."""
    return _cookie(name, value, secure=secure, http_only=False)


def new_csrf_token() -> str:
    return secrets.token_urlsafe(32)


class _HasHeaders(Protocol):
    @property
    def headers(self) -> MutableHeaders: ...


HeaderTarget = list[tuple[bytes, bytes]] | MutableHeaders | _HasHeaders


def _append_set_cookie(target: HeaderTarget, value: str) -> None:
    if isinstance(target, list):
        target.append((b"set-cookie", value.encode("latin-1")))
    elif isinstance(target, MutableHeaders):
        target.append("set-cookie", value)
    else:
        target.headers.append("set-cookie", value)


def set_session_cookie(
    headers_or_response: HeaderTarget,
    token: str,
    *,
    max_age: int | None = None,
    secure: bool = True,
    name: str = SESSION_COOKIE,
) -> None:
    """Add the session cookie to a response (Starlette/FastAPI), its MutableHeaders, or a list
    of raw ASGI header pairs."""
    value = session_cookie(token, max_age=max_age, secure=secure, name=name)
    _append_set_cookie(headers_or_response, value)


def clear_session_cookie(
    headers_or_response: HeaderTarget, *, secure: bool = True, name: str = SESSION_COOKIE
) -> None:
    """Add the Set-Cookie that removes the session cookie (at logout)."""
    _append_set_cookie(headers_or_response, cleared_session_cookie(secure=secure, name=name))


def _local_path(target: str) -> bool:
    return target.startswith("/") and not target.startswith(("//", "/\\"))


def session_login_response(
    issued: Issued,
    *,
    remember_me: bool = False,
    redirect_to: str | None = None,
    secure: bool = True,
    name: str = SESSION_COOKIE,
    clock: Clock = SYSTEM_CLOCK,
) -> Response:
    """The response to a successful login: the session cookie, and a 303 to `redirect_to` (a
    local path) or a small JSON body. The tokens never appear in the body.

    A remember-me cookie lives until the session's absolute expiry; otherwise it is a
    browser-session cookie. The refresh token is not needed by a cookie session (validation
    keeps it alive up to its absolute lifetime) and is dropped here.
    """
    response: Response
    if redirect_to is not None:
        if not _local_path(redirect_to):
            raise ValueError("redirect_to must be a local path such as /home")
        response = RedirectResponse(redirect_to, status_code=303)
    else:
        expires = datetime.fromtimestamp(issued.expires_at_ms / 1000, UTC)
        response = JSONResponse(
            {
                "user_id": issued.user_id,
                "session_id": issued.session_id,
                "expires_at": expires.isoformat().replace("+00:00", "Z"),
            }
        )
    max_age = None
    if remember_me:
        max_age = (issued.refresh_expires_at_ms - clock.now_ms()) // 1000
    set_session_cookie(response, issued.session_token, max_age=max_age, secure=secure, name=name)
    response.headers["Cache-Control"] = "no-store"
    return response


# --- the middleware ------------------------------------------------------------------------


def _cookies(header: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for item in header.split(";"):
        key, sep, value = item.partition("=")
        key = key.strip()
        if sep and key and key not in found:  # the first is the most specific (RFC 6265 5.4)
            found[key] = value.strip()
    return found


def _origin(scheme: str, netloc: str) -> str:
    scheme, netloc = scheme.lower(), netloc.lower()
    default = _DEFAULT_PORTS.get(scheme)
    if default and netloc.endswith(default):
        netloc = netloc[: -len(default)]
    return f"{scheme}://{netloc}"


def _origin_of(url: str) -> str | None:
    """scheme://host[:port] of an Origin or Referer value; None for `null` or junk."""
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        return None
    if not parts.scheme or not parts.netloc or "@" in parts.netloc:
        return None
    return _origin(parts.scheme, parts.netloc)


def _trusted_origin(origin: str) -> str:
    parts = urlsplit(origin.strip())
    if not parts.scheme or not parts.netloc or parts.path not in ("", "/") or parts.query:
        raise ValueError(f"a trusted origin is scheme://host[:port], got {origin!r}")
    return _origin(parts.scheme, parts.netloc)


def _peer(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else ""


class SessionCookieMiddleware:
    """Validates the session cookie and guards unsafe requests against CSRF.

    After it, `scope["state"]` holds `session` (the Validation of a valid session cookie, else
    None), `session_refused` (the Validation that refused a presented cookie, else None; its
    `reason` is None when tenfold could not be asked) and `csrf_token` (the token the page must
    send back in the CSRF header).
    """

    def __init__(
        self,
        app: ASGIApp,
        validate: Validate,
        *,
        cookie_name: str = SESSION_COOKIE,
        csrf_cookie: str = CSRF_COOKIE,
        csrf_header: str = CSRF_HEADER,
        trusted_origins: Iterable[str] = (),
        exempt_paths: Iterable[str] = (),  # exact, or a prefix when ending in "/"
        secure: bool = True,  # False: plain-http development only (names lose "__Host-")
        client_ip: Callable[[Scope], str] = _peer,  # behind a proxy: the real client's address
    ) -> None:
        for name in (cookie_name, csrf_cookie, csrf_header):
            if not _COOKIE_NAME.fullmatch(name):
                raise ValueError(f"{name!r} is not a valid cookie or header name")
        self.app = app
        self.validate = validate
        self.secure = secure
        self.cookie_name = _name_for(cookie_name, secure)
        self.csrf_cookie = _name_for(csrf_cookie, secure)
        self.csrf_header = csrf_header.lower().encode()
        self.trusted_origins = frozenset(_trusted_origin(o) for o in trusted_origins)
        exempt = tuple(exempt_paths)
        self.exempt_exact = frozenset(p for p in exempt if not p.endswith("/"))
        self.exempt_prefixes = tuple(p for p in exempt if p.endswith("/"))
        self.client_ip = client_ip
        self._clear = cleared_session_cookie(secure=secure, name=self.cookie_name).encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers: dict[bytes, str] = {}
        cookie_parts: list[str] = []
        wanted = (b"host", b"origin", b"referer", b"sec-fetch-site", self.csrf_header)
        for key, value in scope["headers"]:
            if key == b"cookie":
                cookie_parts.append(value.decode("latin-1"))
            elif key in wanted and key not in headers:
                headers[key] = value.decode("latin-1")
        cookies = _cookies("; ".join(cookie_parts)) if cookie_parts else {}
        token = cookies.get(self.cookie_name, "")
        csrf = cookies.get(self.csrf_cookie, "")
        state = scope.setdefault("state", {})
        extra: list[bytes] = []  # Set-Cookie values to add to the response
        if csrf:
            state["csrf_token"] = csrf
        else:
            state["csrf_token"] = fresh = new_csrf_token()
            extra.append(csrf_cookie(fresh, secure=self.secure, name=self.csrf_cookie).encode())
        state["session"] = state["session_refused"] = None

        if token and scope["method"] not in SAFE_METHODS and not self._exempt(scope["path"]):
            failure = self._csrf_failure(scope, headers, csrf)
            if failure is not None:
                log.info("sessions.csrf_rejected", path=scope["path"], detail=failure)
                await self._reject(send, state, failure, extra)
                return

        if token:
            outcome = await self.validate(token, self.client_ip(scope))
            if outcome.valid:
                state["session"] = outcome
            else:
                state["session_refused"] = outcome
                if outcome.reason is not None:  # refused, not merely unanswered: drop it
                    extra.append(self._clear)

        if not extra:
            await self.app(scope, receive, send)
            return

        async def send_with_cookies(message: Message) -> None:
            if message["type"] == "http.response.start":
                existing = list(message.get("headers", ()))
                set_by_app = {
                    v.split(b"=", 1)[0].strip() for k, v in existing if k.lower() == b"set-cookie"
                }
                added = [(b"set-cookie", c) for c in extra if c.split(b"=", 1)[0] not in set_by_app]
                message["headers"] = existing + added
            await send(message)

        await self.app(scope, receive, send_with_cookies)

    def _exempt(self, path: str) -> bool:
        return path in self.exempt_exact or path.startswith(self.exempt_prefixes)

    def _own_origin(self, scope: Scope, host: str | None) -> str | None:
        scheme = str(scope.get("scheme", "http"))
        if host:
            return _origin(scheme, host)
        server = scope.get("server")
        if not server:
            return None
        name, port = server
        name = f"[{name}]" if ":" in str(name) else str(name)
        return _origin(scheme, f"{name}:{port}" if port else name)

    def _csrf_failure(self, scope: Scope, headers: dict[bytes, str], csrf: str) -> str | None:
        """Why an unsafe request with a session cookie fails the CSRF checks, or None."""
        if headers.get(b"sec-fetch-site", "").strip().lower() != "same-origin":
            presented = headers.get(b"origin")
            source = "Origin"
            if presented is None:
                presented, source = headers.get(b"referer"), "Referer"
            if presented is None:
                return "the request has neither an Origin nor a Referer header"
            origin = _origin_of(presented)
            if origin is None or (
                origin != self._own_origin(scope, headers.get(b"host"))
                and origin not in self.trusted_origins
            ):
                return f"the {source} {presented[:200]!r} is not an allowed origin"
        sent = headers.get(self.csrf_header)
        header_name = self.csrf_header.decode()
        if not sent:
            return f"the {header_name} header is missing"
        if not csrf:
            return f"the {self.csrf_cookie} cookie is missing; load a page first"
        if not hmac.compare_digest(sent.encode("latin-1"), csrf.encode("latin-1")):
            return f"the {header_name} header does not match the {self.csrf_cookie} cookie"
        return None

    async def _reject(
        self, send: Send, state: dict[str, Any], detail: str, extra: list[bytes]
    ) -> None:
        problem = Problem(403, "csrf-failed", detail, title="CSRF check failed")
        body = problem.body()
        request_id = state.get("request_id")
        if isinstance(request_id, str):
            body["request_id"] = request_id
        payload = orjson.dumps(body)
        await send(
            {
                "type": "http.response.start",
                "status": 403,
                "headers": [
                    (b"content-type", PROBLEM_CONTENT_TYPE.encode()),
                    (b"content-length", str(len(payload)).encode()),
                    (b"cache-control", b"no-store"),
                    *((b"set-cookie", c) for c in extra),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})
