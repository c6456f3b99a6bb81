"""Session management HTTP API, at the spec's paths (and what a user needs beyond them)."""

from __future__ import annotations

from dataclasses import asdict
from datetime import UTC, datetime
from typing import Annotated, Any

import orjson
import structlog
from fastapi import APIRouter, Path, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from tenfold.kernel.auth import Principal, authenticate, known_principal, require
from tenfold.kernel.clock import rfc3339_ms
from tenfold.kernel.crypto import KeyRing, master_key
from tenfold.kernel.http import (
    InvalidField,
    LeanFunction,
    LeanResult,
    LeanRoute,
    NotFound,
    Problem,
    RawHeaders,
    json_object,
    lean_response,
)
from tenfold.kernel.runtime import Mount, Runtime
from tenfold.sessions.models import (
    DEFAULT_POLICIES,
    MAX_USER_ID,
    DeviceInfo,
    InvalidGrant,
    LimitReached,
    OnLimit,
    RiskAction,
    RiskPolicy,
    SessionRecord,
    SessionType,
    TypePolicy,
    Validation,
)
from tenfold.sessions.service import Country, Issued, SessionConfig, SessionService
from tenfold.sessions.stores.sql import SqlSessionStore

log = structlog.get_logger(__name__)

MAX_FIELD = 512
MAX_BULK_USERS = 1_000
VALIDATE_PATH = "/api/v1/sessions/validate"
VALIDATE_BY_ID_PATH = "/api/v1/sessions/{session_id}/validate"
JWKS_PATH = "/.well-known/jwks.json"
FLUSH_SECONDS = 2.0  # last-seen times and validation events reach SQL within this
KEYRING_RELOAD_SECONDS = 30.0  # a key rotated by another process is picked up within this

SessionId = Annotated[str, Path(min_length=1, max_length=64)]
UserId = Annotated[str, Path(min_length=1, max_length=MAX_USER_ID)]


# --- schemas -------------------------------------------------------------------------------


class DeviceIn(BaseModel):
    model_config = ConfigDict(extra="allow")
    user_agent: str = Field(default="", max_length=MAX_FIELD)
    ip: str = Field(default="", max_length=64)
    fingerprint: str = Field(default="", max_length=MAX_FIELD)

    def device(self) -> DeviceInfo:
        extra = {
            k: str(v)[:MAX_FIELD] for k, v in (self.model_extra or {}).items() if v is not None
        }
        if len(extra) > 20:
            raise InvalidField("device_info", "at most 20 extra attributes")
        return DeviceInfo(self.user_agent, self.ip, self.fingerprint, extra)


class CreateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: str = Field(min_length=1, max_length=MAX_USER_ID)
    device_info: DeviceIn = Field(default_factory=DeviceIn)
    session_type: SessionType = SessionType.WEB
    remember_me: bool = False
    data: dict[str, Any] = Field(default_factory=dict)
    permissions: list[str] = Field(default_factory=list, max_length=100)


class IssuedOut(BaseModel):
    session_id: str
    user_id: str
    session_token: str
    refresh_token: str
    expires_at: datetime
    refresh_expires_at: datetime
    access_token: str | None = None
    evicted_sessions: list[str] = Field(default_factory=list)


class ValidateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    session_token: str = Field(max_length=2048)
    ip: str = Field(default="", max_length=64)
    fingerprint: str = Field(default="", max_length=MAX_FIELD)


class ValidationOut(BaseModel):
    valid: bool
    reason: str | None = None
    session_id: str | None = None
    user_id: str | None = None
    session_type: str | None = None
    permissions: list[str] = Field(default_factory=list)
    expires_at: datetime | None = None
    absolute_expires_at: datetime | None = None
    step_up_required: bool = False
    risk: list[str] = Field(default_factory=list)


class RefreshIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    refresh_token: str = Field(max_length=2048)


class DeviceOut(BaseModel):
    session_id: str
    session_type: str
    ip: str
    user_agent: str
    location: str | None
    created_at: datetime
    last_seen_at: datetime
    expires_at: datetime
    remember_me: bool
    active: bool
    revoke_reason: str | None = None


class DeviceList(BaseModel):
    user_id: str
    sessions: list[DeviceOut]
    next_before: str | None


class RevokeUserIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    except_session_id: str | None = Field(default=None, max_length=64)
    session_type: SessionType | None = None


class BulkRevokeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_ids: list[Annotated[str, Field(min_length=1, max_length=MAX_USER_ID)]] | None = Field(
        default=None, min_length=1, max_length=MAX_BULK_USERS
    )
    created_before: datetime | None = None
    session_type: SessionType | None = None


class RevokedOut(BaseModel):
    revoked: list[str]
    count: int


class EventOut(BaseModel):
    event_id: int
    at: datetime
    kind: str
    actor: str | None
    detail: dict[str, Any]


class TimelineOut(BaseModel):
    session_id: str
    events: list[EventOut]
    next_after: str | None


class InspectOut(BaseModel):
    session_id: str
    user_id: str
    session_type: str
    permissions: list[str]
    remember_me: bool
    created_at: datetime
    last_seen_at: datetime
    expires_at: datetime
    revoked_at: datetime | None
    revoke_reason: str | None
    refresh_generation: int
    device: dict[str, str]
    data_keys: list[str]
    origin_session_id: str | None
    key_id: str


class HandoffIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    audience: str = Field(min_length=1, max_length=255)


class HandoffOut(BaseModel):
    code: str
    expires_at: datetime


class ExchangeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    code: str = Field(max_length=256)
    audience: str | None = Field(default=None, max_length=255)
    device_info: DeviceIn = Field(default_factory=DeviceIn)


# --- helpers -------------------------------------------------------------------------------


def _at(ms: int | float | None) -> datetime | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, UTC)


def _text_at(seconds: float | None) -> str | None:
    """`_at` for the hot path: the same text orjson writes for the datetime."""
    return None if seconds is None else rfc3339_ms(round(seconds * 1000))


def _when(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def issued_out(issued: Issued) -> IssuedOut:
    return IssuedOut(
        session_id=issued.session_id,
        user_id=issued.user_id,
        session_token=issued.session_token,
        refresh_token=issued.refresh_token,
        expires_at=_when(issued.expires_at_ms),
        refresh_expires_at=_when(issued.refresh_expires_at_ms),
        access_token=issued.access_token,
        evicted_sessions=list(issued.evicted),
    )


def validation_body(v: Validation) -> dict[str, Any]:
    if not v.valid:
        body: dict[str, Any] = {"valid": False, "reason": str(v.reason) if v.reason else None}
        if v.risk:  # a risk revocation says which session and why
            body["session_id"] = v.session_id
            body["risk"] = list(v.risk)
        return body
    return {
        "valid": True,
        "session_id": v.session_id,
        "user_id": v.user_id,
        "session_type": str(v.session_type) if v.session_type else None,
        "permissions": list(v.permissions),
        "expires_at": _text_at(v.expires_at),
        "absolute_expires_at": _text_at(v.absolute_expires_at),
        "step_up_required": v.step_up_required,
        "risk": list(v.risk),
    }


def invalid_grant(description: str) -> Problem:
    """RFC 6749 section 5.2's `invalid_grant`, as a problem document carrying its fields."""
    return Problem(
        400,
        "invalid-grant",
        description,
        error="invalid_grant",
        error_description=description,
        headers={"Cache-Control": "no-store"},
    )


def _mask_ip(ip: str) -> str:
    if not ip:
        return ""
    if "." in ip and ":" not in ip:
        return ".".join(ip.split(".")[:3]) + ".0/24"
    return ":".join(ip.split(":")[:3]) + "::/48"


def _text(body: dict[str, Any], name: str, limit: int, required: bool = False) -> str:
    value = body.get(name)
    if value is None:
        if required:
            raise InvalidField(name, "is required")
        return ""
    if not isinstance(value, str) or len(value) > limit:
        raise InvalidField(name, f"must be a string of at most {limit} characters")
    return value


# --- the hot path --------------------------------------------------------------------------


MAX_TOKEN_TEXT = 2048
_VALIDATE_FIELDS = frozenset({"session_token", "ip", "fingerprint"})


def validate_handler(service: SessionService, runtime: Runtime, *, by_id: bool) -> LeanFunction:
    """POST /api/v1/sessions/validate (and .../{session_id}/validate): parsed by hand."""
    keys = runtime.keys

    async def handle(scope: Any, raw: bytes) -> LeanResult:
        known_principal(scope, "sessions:read") or await authenticate(
            scope, RawHeaders(scope), keys, "sessions:read"
        )
        body = json_object(raw)
        token = body.get("session_token")
        if len(body) == 1 and type(token) is str and len(token) <= MAX_TOKEN_TEXT:
            ip = fingerprint = ""  # the usual body: the token alone
        else:
            unknown = body.keys() - _VALIDATE_FIELDS
            if unknown:
                raise InvalidField(sorted(unknown)[0], "is not a known field")
            token = _text(body, "session_token", MAX_TOKEN_TEXT, required=True)
            ip = _text(body, "ip", 64)
            fingerprint = _text(body, "fingerprint", MAX_FIELD)
        session_id = scope["path_params"]["session_id"] if by_id else None
        v = await service.validate(token, ip=ip, fingerprint=fingerprint, session_id=session_id)
        return 200, orjson.dumps(validation_body(v), option=orjson.OPT_UTC_Z), []

    return handle


# --- router --------------------------------------------------------------------------------


def build_router(
    service: SessionService, runtime: Runtime, lean: LeanFunction, lean_by_id: LeanFunction
) -> APIRouter:
    router = APIRouter(tags=["sessions"])
    reader = require("sessions:read")
    writer = require("sessions:write")
    admin = require("sessions:admin")

    async def record_or_404(session_id: str) -> SessionRecord:
        record = await service.get(session_id)
        if record is None:
            raise NotFound("session", session_id)
        return record

    @router.post(
        "/api/v1/sessions",
        status_code=201,
        response_model=IssuedOut,
        summary="Create a session for a user the calling backend has authenticated",
        responses={409: {"description": "the user's session limit is reached (policy deny)"}},
    )
    async def create(body: CreateIn, principal: Principal = writer) -> IssuedOut:
        try:
            issued = await service.create(
                body.user_id,
                device=body.device_info.device(),
                session_type=body.session_type,
                remember_me=body.remember_me,
                data=body.data,
                permissions=body.permissions,
                actor=principal.subject,
            )
        except LimitReached as exc:
            raise Problem(409, "session-limit-reached", exc.message) from None
        return issued_out(issued)

    @router.post(
        VALIDATE_PATH,
        response_model=ValidationOut,
        summary="Validate a session token (or a signed access token)",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": ValidateIn.model_json_schema()}},
            }
        },
    )
    async def validate(request: Request, _: Principal = reader) -> Response:
        # Served by the lean route (mounted ahead of FastAPI); declared here for OpenAPI.
        return await lean_response(lean, request)

    @router.post(
        VALIDATE_BY_ID_PATH,
        response_model=ValidationOut,
        summary="Validate a session token of this session",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": ValidateIn.model_json_schema()}},
            }
        },
    )
    async def validate_by_id(
        session_id: SessionId, request: Request, _: Principal = reader
    ) -> Response:
        request.scope["path_params"] = {"session_id": session_id}
        return await lean_response(lean_by_id, request)

    @router.post(
        "/api/v1/sessions/refresh",
        response_model=IssuedOut,
        summary="Rotate a refresh token: a new session token and refresh token",
        responses={400: {"description": "invalid_grant (RFC 6749): the token cannot be used"}},
    )
    async def refresh(body: RefreshIn, principal: Principal = writer) -> IssuedOut:
        try:
            issued = await service.refresh(body.refresh_token, actor=principal.subject)
        except InvalidGrant as exc:
            raise invalid_grant(exc.description) from None
        return issued_out(issued)

    @router.delete("/api/v1/sessions/{session_id}", status_code=204, summary="End a session")
    async def end(session_id: SessionId, principal: Principal = writer) -> Response:
        await record_or_404(session_id)
        await service.revoke(session_id, reason="logout", actor=principal.subject)
        return Response(status_code=204)

    @router.get(
        "/api/v1/users/{user_id:path}/sessions",
        response_model=DeviceList,
        summary="The user's sessions and devices, newest first",
    )
    async def devices(
        user_id: UserId,
        include_ended: bool = False,
        limit: Annotated[int, Query(ge=1, le=500)] = 100,
        before: Annotated[str | None, Query(max_length=100, description="next_before")] = None,
        _: Principal = reader,
    ) -> DeviceList:
        cursor = None
        if before:
            at, _sep, sid = before.partition(":")
            if not at.isdigit() or not sid:
                raise InvalidField("before", "must be a next_before value from a previous page")
            cursor = (int(at), sid)
        records = await service.for_user(
            user_id, include_ended=include_ended, limit=limit, before=cursor
        )
        now = service.clock.now_ms()
        out = []
        for r in records:
            device = (await service.unseal(r))["device_info"]
            out.append(
                DeviceOut(
                    session_id=r.session_id,
                    session_type=str(r.session_type),
                    ip=str(device.get("ip", "")),
                    user_agent=str(device.get("user_agent", "")),
                    location=r.country or None,
                    created_at=_when(r.created_at_ms),
                    last_seen_at=_when(service.last_seen(r)),
                    expires_at=_when(r.expires_at_ms),
                    remember_me=r.remember_me,
                    active=r.active(now),
                    revoke_reason=r.revoke_reason,
                )
            )
        last = records[-1] if len(records) == limit else None
        return DeviceList(
            user_id=user_id,
            sessions=out,
            next_before=f"{last.created_at_ms}:{last.session_id}" if last else None,
        )

    @router.post(
        "/api/v1/users/{user_id:path}/sessions/revoke",
        response_model=RevokedOut,
        summary="End the user's sessions: all, all of a type, or all others",
    )
    async def revoke_user(
        user_id: UserId, body: RevokeUserIn, principal: Principal = writer
    ) -> RevokedOut:
        ended = await service.revoke_user(
            user_id,
            keep=body.except_session_id,
            session_type=body.session_type,
            actor=principal.subject,
            reason="logout_others" if body.except_session_id else "logout_all",
        )
        return RevokedOut(revoked=ended, count=len(ended))

    @router.post(
        "/api/v1/sessions/revoke",
        response_model=RevokedOut,
        summary="Bulk revocation (admin): by users, by creation time, by session type",
    )
    async def bulk(body: BulkRevokeIn, principal: Principal = admin) -> RevokedOut:
        if body.user_ids is None and body.created_before is None and body.session_type is None:
            raise InvalidField(
                "body", "give at least one of user_ids, created_before, session_type"
            )
        before = None
        if body.created_before is not None:
            moment = body.created_before
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
            before = int(moment.timestamp() * 1000)
        ended = await service.revoke_bulk(
            user_ids=body.user_ids,
            created_before_ms=before,
            session_type=body.session_type,
            actor=principal.subject,
        )
        return RevokedOut(revoked=ended, count=len(ended))

    @router.get(
        "/api/v1/sessions/{session_id}/timeline",
        response_model=TimelineOut,
        summary="The session's audit events, for support (read-only, no secrets)",
    )
    async def timeline(
        session_id: SessionId,
        after: Annotated[str | None, Query(max_length=50, description="next_after")] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 100,
        _: Principal = reader,
    ) -> TimelineOut:
        await record_or_404(session_id)
        cursor = (0, 0)
        if after:
            at, _sep, eid = after.partition(":")
            if not at.isdigit() or not eid.isdigit():
                raise InvalidField("after", "must be a next_after value from a previous page")
            cursor = (int(at), int(eid))
        events = await service.timeline(session_id, after=cursor, limit=limit)
        return TimelineOut(
            session_id=session_id,
            events=[
                EventOut(
                    event_id=e.event_id,
                    at=_when(e.at_ms),
                    kind=e.kind,
                    actor=e.actor,
                    detail=e.detail,
                )
                for e in events
            ],
            next_after=(
                f"{events[-1].at_ms}:{events[-1].event_id}" if len(events) == limit else None
            ),
        )

    @router.get(
        "/api/v1/sessions/{session_id}",
        response_model=InspectOut,
        summary="Inspect a session for support (admin; redacted: no tokens, no data values)",
    )
    async def inspect(session_id: SessionId, _: Principal = admin) -> InspectOut:
        r = await record_or_404(session_id)
        sealed = await service.unseal(r)
        device = sealed["device_info"]
        return InspectOut(
            session_id=r.session_id,
            user_id=r.user_id,
            session_type=str(r.session_type),
            permissions=list(r.permissions),
            remember_me=r.remember_me,
            created_at=_when(r.created_at_ms),
            last_seen_at=_when(service.last_seen(r)),
            expires_at=_when(r.expires_at_ms),
            revoked_at=_at(r.revoked_at_ms),
            revoke_reason=r.revoke_reason,
            refresh_generation=r.refresh_generation,
            device={
                "ip": _mask_ip(str(device.get("ip", ""))),
                "user_agent": str(device.get("user_agent", "")),
                "fingerprint": "present" if device.get("fingerprint") else "",
                "country": r.country,
            },
            data_keys=sorted(sealed.get("data", {})),
            origin_session_id=r.origin_session_id,
            key_id=r.key_id,
        )

    @router.post(
        "/api/v1/sessions/{session_id}/handoff",
        response_model=HandoffOut,
        summary="A one-time code (60 s) to mint a session for the same user on another domain",
    )
    async def handoff(
        session_id: SessionId, body: HandoffIn, principal: Principal = writer
    ) -> HandoffOut:
        await record_or_404(session_id)
        try:
            code, expires = await service.handoff(
                session_id, body.audience, actor=principal.subject
            )
        except InvalidGrant as exc:
            raise Problem(409, "session-not-active", exc.description) from None
        return HandoffOut(code=code, expires_at=_when(expires))

    @router.post(
        "/api/v1/sessions/exchange",
        status_code=201,
        response_model=IssuedOut,
        summary="Exchange a handoff code for a new session (once)",
        responses={400: {"description": "invalid_grant: unknown, expired or used code"}},
    )
    async def exchange(body: ExchangeIn, principal: Principal = writer) -> IssuedOut:
        try:
            issued = await service.exchange(
                body.code,
                device=body.device_info.device(),
                audience=body.audience,
                actor=principal.subject,
            )
        except InvalidGrant as exc:
            raise invalid_grant(exc.description) from None
        except LimitReached as exc:
            raise Problem(409, "session-limit-reached", exc.message) from None
        return issued_out(issued)

    @router.get(JWKS_PATH, summary="Public keys of signed access tokens (JWKS)")
    async def jwks() -> Response:
        ring: Any = service.ring
        return Response(
            orjson.dumps(ring.jwks()),
            media_type="application/json",
            headers={"Cache-Control": "public, max-age=300"},
        )

    return router


# --- wiring --------------------------------------------------------------------------------


class _NotStarted:
    """Stands in for the key ring until the service starts (it is opened asynchronously)."""

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError("the sessions service has not started (its key ring is not open)")


def config_from(settings: Any) -> SessionConfig:
    policies = dict(DEFAULT_POLICIES)
    for name, overrides in settings.sessions_policies.items():
        kind = SessionType(name)
        values = {**asdict(policies[kind]), **overrides}
        values["on_limit"] = OnLimit(values["on_limit"])
        policies[kind] = TypePolicy(**values)
    return SessionConfig(
        policies=policies,
        risk=RiskPolicy(
            network_changed=RiskAction(settings.sessions_risk_network),
            country_changed=RiskAction(settings.sessions_risk_country),
            fingerprint_changed=RiskAction(settings.sessions_risk_fingerprint),
        ),
        grace_seconds=settings.sessions_grace_seconds,
        max_data_bytes=settings.sessions_max_data_bytes,
        local_ttl_ms=1_000,  # also embedded: the CLI revokes from another process
        access_tokens=settings.sessions_access_tokens,
        access_token_ttl=settings.sessions_access_token_ttl,
    )


def geoip_country(path: str) -> Country | None:
    """ip -> ISO country code from a MaxMind-format database, when one is configured."""
    if not path:
        return None
    import maxminddb

    reader = maxminddb.open_database(path)

    def country(ip: str) -> str:
        found = reader.get(ip)
        if not isinstance(found, dict):
            return ""
        entry = found.get("country") or found.get("registered_country") or {}
        code = entry.get("iso_code", "") if isinstance(entry, dict) else ""
        return str(code)[:2]

    return country


def service_for(runtime: Runtime) -> SessionService:
    """The one SessionService of this process."""
    existing = runtime.services.get("sessions")
    if isinstance(existing, SessionService):
        return existing
    settings = runtime.settings
    service = SessionService(
        SqlSessionStore(runtime.engine),
        _NotStarted(),
        runtime.kv if settings.redis_url else None,
        config=config_from(settings),
        clock=runtime.clock,
        country=geoip_country(settings.geoip_db),
    )
    runtime.services["sessions"] = service
    return service


async def open_ring(runtime: Runtime) -> KeyRing:
    ring = runtime.services.get("keyring")
    if isinstance(ring, KeyRing):
        return ring
    ring = await KeyRing.open(runtime.engine, master_key(runtime.settings), runtime.clock)
    runtime.services["keyring"] = ring
    return ring


def start_hooks(runtime: Runtime, service: SessionService) -> tuple[Any, Any]:
    async def on_start() -> None:
        service.ring = await open_ring(runtime)
        await service.start()
        runtime.every(FLUSH_SECONDS, service.flush, "sessions-flush")
        runtime.every(1.0, service.retry_invalidations, "sessions-invalidations")
        runtime.every(KEYRING_RELOAD_SECONDS, service.ring.reload, "sessions-keyring")

    async def on_stop() -> None:
        await service.stop()

    return on_start, on_stop


def mount(runtime: Runtime) -> Mount:
    service = service_for(runtime)
    on_start, on_stop = start_hooks(runtime, service)
    lean = validate_handler(service, runtime, by_id=False)
    lean_by_id = validate_handler(service, runtime, by_id=True)
    return Mount(
        name="sessions",
        routers=[build_router(service, runtime, lean, lean_by_id)],
        on_start=[on_start],
        on_stop=[on_stop],
        public_paths=(JWKS_PATH,),
        lean_routes=[
            LeanRoute("POST", VALIDATE_PATH, lean),
            LeanRoute("POST", VALIDATE_BY_ID_PATH, lean_by_id),
        ],
    )
