"""The sessions service's Python client: in-process or over HTTP, one interface.

    client = SessionClient.in_process(service)               # inside a tenfold process
    client = SessionClient.over_http("http://sessions:8000", api_key)
    issued = await client.create("user-42", device=DeviceInfo(ip="203.0.113.9"))
    verdict = await client.validate(issued.session_token)    # Validation(valid=True, ...)
    issued = await client.refresh(issued.refresh_token)      # InvalidGrant if it cannot be used

Both transports answer with the same dataclasses (`Issued`, `Validation`, `UserSession`) and
raise the same errors: `InvalidGrant` for a refresh token that cannot be used, and
`SessionClientError` (HTTP status + RFC 9457 problem type) for everything the API refuses.

In-process, `validate` first asks the service's local cache (`validate_cached`, no await, no
I/O) and goes to the store only on a miss. `validate_sync` is that cache alone, for synchronous
code (a WSGI middleware, a template helper): warm each session with one `await validate(...)`;
the cached copy is trusted for the service's `local_ttl` (`SessionConfig.local_ttl_ms`, 1 s by
default), after which `validate_sync` raises `NotCached` until an async validation loads it
again:

    try:
        verdict = client.validate_sync(token)
    except NotCached:
        verdict = await client.validate(token)  # or hand the request to async code
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Final
from urllib.parse import quote

import httpx
import orjson

from tenfold.kernel.errors import BackendUnavailable
from tenfold.sessions.models import (
    DeviceInfo,
    InvalidGrant,
    LimitReached,
    Reason,
    SessionError,
    SessionType,
    Validation,
    check_user_id,
)
from tenfold.sessions.models import session_type as parse_session_type
from tenfold.sessions.service import Issued, SessionService
from tenfold.sessions.tokens import looks_like_jwt

__all__ = [
    "HttpSessionClient",
    "InProcessSessionClient",
    "InvalidGrant",
    "NotCached",
    "SessionClient",
    "SessionClientError",
    "UserSession",
]

PROBLEM_BASE: Final = "urn:tenfold:problem:"
PAGE = 100  # sessions per page when listing a user's sessions
DEFAULT_TIMEOUT = 10.0  # seconds, per request over HTTP
_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # the API takes ids of at most 64 chars
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class SessionClientError(Exception):
    """The sessions API refused a call; `status` and `problem_type` say how (RFC 9457).

    `status` is None when no answer came back (the server could not be reached)."""

    def __init__(
        self,
        status: int | None,
        problem_type: str,
        detail: str,
        problem: dict[str, Any] | None = None,
    ) -> None:
        where = f"HTTP {status}" if status is not None else "no response"
        super().__init__(f"{where} {problem_type}: {detail}")
        self.status = status
        self.problem_type = problem_type  # e.g. urn:tenfold:problem:validation-error
        self.detail = detail
        self.problem = problem or {}

    @property
    def kind(self) -> str:
        """The problem type without tenfold's prefix: `validation-error`, `forbidden`, ..."""
        return self.problem_type.removeprefix(PROBLEM_BASE)


class NotCached(LookupError):
    """The session is not in this process's cache: `validate_sync` cannot decide alone."""

    def __init__(self, session_id: str | None, detail: str | None = None) -> None:
        super().__init__(
            detail
            or f"session {session_id} is not in this process's cache, or its copy is older than "
            "the service's local_ttl; validate it once with `await client.validate(token)` "
            "(which loads it), then validate_sync works again"
        )
        self.session_id = session_id


@dataclass(frozen=True, slots=True)
class UserSession:
    """One of a user's sessions, as a device list shows it (no token, no session data)."""

    session_id: str
    session_type: SessionType
    ip: str
    user_agent: str
    location: str | None  # ISO country code, when a GeoIP database is configured
    created_at_ms: int
    last_seen_at_ms: int
    expires_at_ms: int  # absolute
    remember_me: bool
    active: bool
    revoke_reason: str | None = None


def _problem(status: int, kind: str, detail: str, **extra: Any) -> SessionClientError:
    body = {"type": PROBLEM_BASE + kind, "status": status, "detail": detail, **extra}
    return SessionClientError(status, PROBLEM_BASE + kind, detail, body)


def _field_problem(exc: SessionError) -> SessionClientError:
    """What the API answers for the service's input errors (a 422, or a 409 at the limit)."""
    if isinstance(exc, LimitReached):
        return _problem(409, "session-limit-reached", exc.message)
    return _problem(
        422,
        "validation-error",
        f"{exc.field}: {exc.message}",
        errors=[{"field": exc.field, "message": exc.message}],
    )


def _user_id(user_id: str) -> str:
    try:
        return check_user_id(user_id)
    except SessionError as exc:
        raise _field_problem(exc) from None


def _plausible_session_id(session_id: str) -> bool:
    return isinstance(session_id, str) and _SESSION_ID.fullmatch(session_id) is not None


class SessionClient(ABC):
    """Create, validate, refresh and end sessions; the same calls on either transport."""

    @staticmethod
    def in_process(service: SessionService, *, actor: str | None = None) -> InProcessSessionClient:
        """Call a SessionService of this process directly (`actor` is recorded in its audit
        events, as the API key's subject is over HTTP)."""
        return InProcessSessionClient(service, actor=actor)

    @staticmethod
    def over_http(
        base_url: str,
        api_key: str,
        *,
        client: httpx.AsyncClient | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> HttpSessionClient:
        """Call a tenfold server's sessions API with an API key (scopes `sessions:write` for
        creation, refresh and revocation, `sessions:read` for validation and listing).

        With `client`, its connection pool is used and it is left open by `aclose()`."""
        return HttpSessionClient(base_url, api_key, client=client, timeout=timeout)

    @abstractmethod
    async def create(
        self,
        user_id: str,
        *,
        device: DeviceInfo | None = None,
        session_type: SessionType | str = SessionType.WEB,
        remember_me: bool = False,
        data: dict[str, Any] | None = None,
        permissions: Sequence[str] = (),
    ) -> Issued:
        """A new session for a user the caller has authenticated; tokens are shown only here."""

    @abstractmethod
    async def validate(
        self,
        token: str,
        *,
        ip: str = "",
        fingerprint: str = "",
        session_id: str | None = None,
    ) -> Validation:
        """A session token (or a signed access token) -> valid, or `valid=False` + reason.

        `ip` and `fingerprint` are the presenting request's, checked against the session's
        device; with `session_id`, a token of another session is refused as malformed."""

    @abstractmethod
    async def refresh(self, refresh_token: str) -> Issued:
        """Rotate a refresh token: new session and refresh tokens; InvalidGrant if it cannot be
        used (unknown, expired, ended, or already used: a reuse ends the session)."""

    @abstractmethod
    async def revoke(self, session_id: str) -> bool:
        """End a session; False when there is no such session (ending an ended one is True)."""

    @abstractmethod
    async def revoke_user(self, user_id: str, keep: str | None = None) -> list[str]:
        """End every active session of the user but `keep`; the ids this call ended."""

    @abstractmethod
    async def sessions_of(self, user_id: str, *, include_ended: bool = False) -> list[UserSession]:
        """The user's sessions (active ones, or all with `include_ended`), newest first."""

    @abstractmethod
    async def aclose(self) -> None:
        """Release what the client holds (an HTTP connection pool it created)."""

    async def __aenter__(self) -> SessionClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


# --- in process ----------------------------------------------------------------------------


class InProcessSessionClient(SessionClient):
    def __init__(self, service: SessionService, *, actor: str | None = None) -> None:
        self.service = service
        self.actor = actor

    async def create(
        self,
        user_id: str,
        *,
        device: DeviceInfo | None = None,
        session_type: SessionType | str = SessionType.WEB,
        remember_me: bool = False,
        data: dict[str, Any] | None = None,
        permissions: Sequence[str] = (),
    ) -> Issued:
        try:
            return await self.service.create(
                user_id,
                device=device,
                session_type=parse_session_type(session_type),
                remember_me=remember_me,
                data=data,
                permissions=permissions,
                actor=self.actor,
            )
        except SessionError as exc:
            raise _field_problem(exc) from exc
        except BackendUnavailable as exc:
            raise _problem(503, "backend-unavailable", str(exc)) from exc

    async def validate(
        self,
        token: str,
        *,
        ip: str = "",
        fingerprint: str = "",
        session_id: str | None = None,
    ) -> Validation:
        service = self.service
        # An access token is verified by signature, without any cache: validate() does that.
        if not looks_like_jwt(token):
            cached = service.validate_cached(
                token, ip=ip, fingerprint=fingerprint, session_id=session_id
            )
            if cached is not None:
                return cached
        try:
            return await service.validate(
                token, ip=ip, fingerprint=fingerprint, session_id=session_id
            )
        except BackendUnavailable as exc:
            raise _problem(503, "backend-unavailable", str(exc)) from exc

    def validate_sync(self, token: str, *, ip: str = "", fingerprint: str = "") -> Validation:
        """`validate` from this process's cache alone (no I/O, no event loop needed).

        Raises NotCached when the session was not validated here within the service's
        `local_ttl`, or when the request's ip or fingerprint differ from the session's device
        (a risk decision may have to write): then `await validate(...)` once. Access tokens
        (JWTs) go through `validate` too (a key rotated elsewhere may need a reload)."""
        if looks_like_jwt(token):
            raise NotCached(
                None,
                "an access token (JWT) is verified with `await client.validate(token)`; "
                "validate_sync takes session tokens",
            )
        verdict = self.service.validate_cached(token, ip=ip, fingerprint=fingerprint)
        if verdict is None:
            raise NotCached(token.partition(".")[0])
        return verdict

    async def refresh(self, refresh_token: str) -> Issued:
        try:
            return await self.service.refresh(refresh_token, actor=self.actor)
        except BackendUnavailable as exc:
            raise _problem(503, "backend-unavailable", str(exc)) from exc

    async def revoke(self, session_id: str) -> bool:
        if not _plausible_session_id(session_id):
            return False
        try:
            if await self.service.get(session_id) is None:
                return False
            await self.service.revoke(session_id, reason="logout", actor=self.actor)
        except BackendUnavailable as exc:
            raise _problem(503, "backend-unavailable", str(exc)) from exc
        return True

    async def revoke_user(self, user_id: str, keep: str | None = None) -> list[str]:
        user_id = _user_id(user_id)
        try:
            return await self.service.revoke_user(
                user_id,
                keep=keep,
                actor=self.actor,
                reason="logout_others" if keep else "logout_all",
            )
        except BackendUnavailable as exc:
            raise _problem(503, "backend-unavailable", str(exc)) from exc

    async def sessions_of(self, user_id: str, *, include_ended: bool = False) -> list[UserSession]:
        user_id = _user_id(user_id)
        service = self.service
        found: list[UserSession] = []
        before: tuple[int, str] | None = None
        try:
            while True:
                records = await service.for_user(
                    user_id, include_ended=include_ended, limit=PAGE, before=before
                )
                now = service.clock.now_ms()
                for r in records:
                    device = (await service.unseal(r))["device_info"]
                    found.append(
                        UserSession(
                            session_id=r.session_id,
                            session_type=r.session_type,
                            ip=str(device.get("ip", "")),
                            user_agent=str(device.get("user_agent", "")),
                            location=r.country or None,
                            created_at_ms=r.created_at_ms,
                            last_seen_at_ms=service.last_seen(r),
                            expires_at_ms=r.expires_at_ms,
                            remember_me=r.remember_me,
                            active=r.active(now),
                            revoke_reason=r.revoke_reason,
                        )
                    )
                if len(records) < PAGE:
                    return found
                before = (records[-1].created_at_ms, records[-1].session_id)
        except BackendUnavailable as exc:
            raise _problem(503, "backend-unavailable", str(exc)) from exc

    async def aclose(self) -> None:
        return None  # the service belongs to its runtime


# --- over HTTP -----------------------------------------------------------------------------


def _ms(value: object) -> int:
    """Milliseconds since the epoch of an RFC 3339 time the API wrote."""
    if not isinstance(value, str):
        raise _unexpected(f"expected a timestamp, got {value!r}")
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise _unexpected(f"expected a timestamp, got {value!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    micros = (moment - _EPOCH) // timedelta(microseconds=1)
    return (micros + 500) // 1000


def _seconds(value: object) -> float | None:
    return None if value is None else _ms(value) / 1000


def _unexpected(detail: str) -> SessionClientError:
    return SessionClientError(200, "about:blank", f"unexpected response: {detail}")


def _issued(body: Any) -> Issued:
    try:
        return Issued(
            session_id=str(body["session_id"]),
            user_id=str(body["user_id"]),
            session_token=str(body["session_token"]),
            refresh_token=str(body["refresh_token"]),
            expires_at_ms=_ms(body["expires_at"]),
            refresh_expires_at_ms=_ms(body["refresh_expires_at"]),
            access_token=body.get("access_token"),
            evicted=tuple(body.get("evicted_sessions") or ()),
        )
    except (KeyError, TypeError) as exc:
        raise _unexpected(f"not a session: {exc}") from None


def _validation(body: Any) -> Validation:
    if not isinstance(body, dict) or not isinstance(body.get("valid"), bool):
        raise _unexpected("not a validation")
    try:
        reason = Reason(body["reason"]) if body.get("reason") else None
        kind = body.get("session_type")
        return Validation(
            valid=body["valid"],
            reason=reason,
            session_id=body.get("session_id"),
            user_id=body.get("user_id"),
            session_type=SessionType(kind) if kind else None,
            permissions=tuple(body.get("permissions") or ()),
            expires_at=_seconds(body.get("expires_at")),
            absolute_expires_at=_seconds(body.get("absolute_expires_at")),
            step_up_required=bool(body.get("step_up_required", False)),
            risk=tuple(body.get("risk") or ()),
        )
    except ValueError as exc:
        raise _unexpected(str(exc)) from None


def _user_session(item: Any) -> UserSession:
    try:
        return UserSession(
            session_id=str(item["session_id"]),
            session_type=SessionType(item["session_type"]),
            ip=str(item["ip"]),
            user_agent=str(item["user_agent"]),
            location=item.get("location"),
            created_at_ms=_ms(item["created_at"]),
            last_seen_at_ms=_ms(item["last_seen_at"]),
            expires_at_ms=_ms(item["expires_at"]),
            remember_me=bool(item["remember_me"]),
            active=bool(item["active"]),
            revoke_reason=item.get("revoke_reason"),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise _unexpected(f"not a session of the list: {exc}") from None


def _error(response: httpx.Response) -> Exception:
    """The exception an error response stands for."""
    status = response.status_code
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        body = None
    if not isinstance(body, dict):
        text = response.text.strip().replace("\n", " ")[:200]
        return SessionClientError(status, "about:blank", text or response.reason_phrase)
    if status == 400 and body.get("error") == "invalid_grant":
        return InvalidGrant(str(body.get("error_description") or body.get("detail") or ""))
    detail = body.get("detail") or body.get("title") or response.reason_phrase
    return SessionClientError(status, str(body.get("type") or "about:blank"), str(detail), body)


class HttpSessionClient(SessionClient):
    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        client: httpx.AsyncClient | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._owned = client is None
        self._http = client or httpx.AsyncClient(timeout=timeout)
        self._headers = {
            "Authorization": f"Bearer {api_key}",
            "Accept": "application/json",
        }
        self._json_headers = {**self._headers, "Content-Type": "application/json"}

    async def _call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
    ) -> httpx.Response:
        try:
            response = await self._http.request(
                method,
                self.base_url + path,
                content=orjson.dumps(body) if body is not None else None,
                params=params,
                headers=self._json_headers if body is not None else self._headers,
            )
        except httpx.TransportError as exc:
            raise SessionClientError(
                None, "about:blank", f"{type(exc).__name__}: {exc} ({self.base_url})"
            ) from exc
        return response

    async def _json(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
    ) -> Any:
        response = await self._call(method, path, body, params)
        if response.status_code >= 400:
            raise _error(response)
        try:
            return orjson.loads(response.content)
        except orjson.JSONDecodeError:
            raise _unexpected(f"not JSON (HTTP {response.status_code})") from None

    async def create(
        self,
        user_id: str,
        *,
        device: DeviceInfo | None = None,
        session_type: SessionType | str = SessionType.WEB,
        remember_me: bool = False,
        data: dict[str, Any] | None = None,
        permissions: Sequence[str] = (),
    ) -> Issued:
        body: dict[str, Any] = {
            "user_id": user_id,
            "session_type": str(session_type),
            "remember_me": remember_me,
            "data": data or {},
            "permissions": list(permissions),
        }
        if device is not None:
            body["device_info"] = {
                **device.extra,
                "user_agent": device.user_agent,
                "ip": device.ip,
                "fingerprint": device.fingerprint,
            }
        return _issued(await self._json("POST", "/api/v1/sessions", body))

    async def validate(
        self,
        token: str,
        *,
        ip: str = "",
        fingerprint: str = "",
        session_id: str | None = None,
    ) -> Validation:
        body: dict[str, Any] = {"session_token": token}
        if ip:
            body["ip"] = ip
        if fingerprint:
            body["fingerprint"] = fingerprint
        if session_id is None:
            path = "/api/v1/sessions/validate"
        else:
            path = f"/api/v1/sessions/{quote(session_id, safe='')}/validate"
        return _validation(await self._json("POST", path, body))

    async def refresh(self, refresh_token: str) -> Issued:
        body = {"refresh_token": refresh_token}
        return _issued(await self._json("POST", "/api/v1/sessions/refresh", body))

    async def revoke(self, session_id: str) -> bool:
        if not _plausible_session_id(session_id):
            return False
        response = await self._call("DELETE", f"/api/v1/sessions/{session_id}")
        if response.status_code < 400:
            return True
        error = _error(response)
        if isinstance(error, SessionClientError) and error.kind == "session-not-found":
            return False
        raise error  # a 404 without that type: the sessions API is not served there

    async def revoke_user(self, user_id: str, keep: str | None = None) -> list[str]:
        user_id = _user_id(user_id)
        body = {"except_session_id": keep} if keep is not None else {}
        path = f"/api/v1/users/{quote(user_id, safe='')}/sessions/revoke"
        out = await self._json("POST", path, body)
        return [str(sid) for sid in out["revoked"]]

    async def sessions_of(self, user_id: str, *, include_ended: bool = False) -> list[UserSession]:
        user_id = _user_id(user_id)
        path = f"/api/v1/users/{quote(user_id, safe='')}/sessions"
        params = {"limit": str(PAGE), "include_ended": "true" if include_ended else "false"}
        found: list[UserSession] = []
        while True:
            page = await self._json("GET", path, params=params)
            found += [_user_session(item) for item in page["sessions"]]
            cursor = page.get("next_before")
            if not cursor:
                return found
            params["before"] = str(cursor)

    async def aclose(self) -> None:
        if self._owned:
            await self._http.aclose()
