"""URL shortener HTTP API at the spec's paths; the redirects are lean routes ahead of FastAPI."""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import Callable
from datetime import UTC, date, datetime
from typing import Annotated, Any, Literal
from urllib.parse import parse_qs, urlsplit

import orjson
import structlog
from fastapi import APIRouter, Depends, Path, Query, Request, Response, Security
from fastapi.responses import RedirectResponse
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import BaseModel, ConfigDict, Field

from tenfold.kernel.auth import (
    API_KEY_HEADER,
    BEARER,
    Principal,
    authenticate,
    key_from_headers,
    require,
)
from tenfold.kernel.crypto import master_key
from tenfold.kernel.errors import BackendUnavailable
from tenfold.kernel.http import (
    LeanResult,
    LeanRoute,
    NotFound,
    Problem,
    client_ip,
    lean_response,
    parse_networks,
)
from tenfold.kernel.runtime import Mount, Runtime
from tenfold.shortener.models import (
    DEFAULT_PLANS,
    MAX_BULK,
    AliasTaken,
    Blocklist,
    Link,
    LinkError,
    NotOwner,
    Plan,
    QuotaExceeded,
    Target,
    check_password,
    target_of,
)
from tenfold.shortener.service import (
    _MISSING,
    REDIRECTS,
    CreateItem,
    ShortenerConfig,
    ShortenerService,
)
from tenfold.shortener.stores.sql import SqlLinkStore
from tenfold.shortener.verification import txt_name, txt_value, verifier_from

log = structlog.get_logger(__name__)

REDIRECT_PATH = "/r/{short_code}"
BRANDED_PATH = "/{short_code}"
QR_PATH = "/r/{short_code}/qr"
FLUSH_SECONDS = 1.0
DOMAINS_RELOAD_SECONDS = 10.0
ANONYMOUS = "anonymous"
MAX_PAGE = 200
UNLOCK_WINDOW = 900.0  # seconds
UNLOCK_PER_CLIENT = 10  # password attempts per link and client address in a window
UNLOCK_PER_LINK = 100  # ... and per link, from anyone
Code = Annotated[str, Path(min_length=1, max_length=20, pattern=r"^[A-Za-z0-9_-]+$")]
Domain = Annotated[str | None, Query(max_length=253, description="a branded domain's code space")]


# --- schemas -------------------------------------------------------------------------------


class CreateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str = Field(max_length=8_192, description="http(s) target, at most 2,048 characters")
    custom_alias: str | None = Field(default=None, max_length=100)
    expires_at: datetime | None = None
    description: str = Field(default="", max_length=500)
    domain: str | None = Field(default=None, max_length=253)
    redirect_type: Literal[301, 302, 307, 308] | None = None
    max_visits: int | None = Field(default=None, ge=1, le=2**31 - 1)
    password: str | None = Field(default=None, min_length=1, max_length=200)

    def item(self) -> CreateItem:
        return CreateItem(
            url=self.url,
            custom_alias=self.custom_alias,
            expires_at_ms=_ms(self.expires_at),
            description=self.description,
            domain=(self.domain or "").lower(),
            redirect_status=self.redirect_type or 0,
            max_visits=self.max_visits,
            password=self.password,
        )


class LinkOut(BaseModel):
    short_code: str
    short_url: str
    long_url: str
    domain: str | None
    description: str
    created_at: datetime
    updated_at: datetime
    expires_at: datetime | None
    click_count: int
    is_active: bool
    is_custom: bool
    redirect_type: int
    max_visits: int | None
    password_protected: bool
    blocked_reason: str | None


class UpdateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    expires_at: datetime | None = None
    is_active: bool | None = None
    long_url: str | None = Field(default=None, max_length=8_192)
    description: str | None = Field(default=None, max_length=500)
    redirect_type: Literal[301, 302, 307, 308] | None = None
    max_visits: int | None = Field(default=None, ge=1, le=2**31 - 1)
    password: str | None = Field(default=None, max_length=200, description="empty removes it")


class UpdatedOut(LinkOut):
    pass


class BulkIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    urls: list[CreateIn] = Field(min_length=1)


class ItemError(BaseModel):
    field: str
    reason: str
    detail: str


class BulkResult(BaseModel):
    index: int
    status: Literal["created", "failed"]
    short_code: str | None = None
    short_url: str | None = None
    long_url: str | None = None
    error: ItemError | None = None


class BulkOut(BaseModel):
    created: int
    failed: int
    results: list[BulkResult]


class PageOut(BaseModel):
    items: list[LinkOut]
    next_cursor: str | None


class DeletedOut(BaseModel):
    deleted: bool


class AccountIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    email: str = Field(max_length=254)
    plan: str = Field(default="free", max_length=50)


class AccountOut(BaseModel):
    account_id: str
    email: str
    plan: str
    monthly_quota: int
    current_usage: int
    usage_month: str
    custom_aliases: bool
    created_at: datetime
    api_key: str | None = Field(default=None, description="shown once, at creation")


class DomainIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    domain: str = Field(max_length=253)


class HttpProof(BaseModel):
    url: str = Field(description="GET here must answer 200 with `body`")
    body: str


class DnsProof(BaseModel):
    name: str
    type: Literal["TXT"] = "TXT"
    value: str


class Verification(BaseModel):
    """What to publish, for each configured method; any one of them verifies the domain."""

    http: HttpProof | None = None
    dns: DnsProof | None = None


class DomainOut(BaseModel):
    domain: str
    verified: bool
    verified_at: datetime | None = None
    created_at: datetime
    verification_url: str | None = None
    verification_token: str | None = None
    verification: Verification | None = None


# --- helpers -------------------------------------------------------------------------------


def _ms(when: datetime | None) -> int | None:
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1000)


def _when(ms: int | None) -> datetime | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, UTC)


def link_error(exc: LinkError) -> Problem:
    return Problem(
        422,
        "validation-error",
        f"{exc.field}: {exc.message}",
        errors=[{"field": exc.field, "message": exc.message, "reason": exc.reason}],
    )


def alias_taken(exc: AliasTaken) -> Problem:
    return Problem(
        409,
        "alias-taken",
        str(exc),
        errors=[{"field": "custom_alias", "message": str(exc), "reason": "alias-taken"}],
    )


def quota_exceeded(exc: QuotaExceeded) -> Problem:
    return Problem(
        403,
        "quota-exceeded",
        str(exc),
        monthly_quota=exc.quota,
        current_usage=exc.used,
        errors=[{"field": "url", "message": str(exc), "reason": "quota-exceeded"}],
    )


def as_problem(exc: Exception) -> Problem:
    if isinstance(exc, LinkError):
        return link_error(exc)
    if isinstance(exc, AliasTaken):
        return alias_taken(exc)
    if isinstance(exc, QuotaExceeded):
        return quota_exceeded(exc)
    log.error("shortener.create_failed", error=f"{type(exc).__name__}: {exc}")
    return Problem(500, "internal-error", "the link could not be created; see the server log")


def bulk_out(outcomes: list[Link | Exception], short_url: Callable[[Link], str]) -> BulkOut:
    """A status per item of a bulk creation, in order."""
    results = []
    for i, outcome in enumerate(outcomes):
        if isinstance(outcome, Link):
            results.append(
                BulkResult(
                    index=i,
                    status="created",
                    short_code=outcome.short_code,
                    short_url=short_url(outcome),
                    long_url=outcome.long_url,
                )
            )
            continue
        problem = as_problem(outcome)
        errors = problem.extra.get("errors") or [
            {"field": "url", "reason": problem.kind, "message": problem.detail}
        ]
        first = errors[0]
        error = ItemError(
            field=first["field"], reason=first.get("reason", problem.kind), detail=problem.detail
        )
        results.append(BulkResult(index=i, status="failed", error=error))
    created = sum(1 for r in results if r.status == "created")
    return BulkOut(created=created, failed=len(results) - created, results=results)


def changes_of(body: UpdateIn) -> dict[str, Any]:
    """The service's changes for the fields an update gave (and only those)."""
    changes: dict[str, Any] = {}
    for name, key in (
        ("expires_at", "expires_at_ms"),
        ("is_active", "is_active"),
        ("long_url", "long_url"),
        ("description", "description"),
        ("redirect_type", "redirect_status"),
        ("max_visits", "max_visits"),
        ("password", "password"),
    ):
        if name in body.model_fields_set:
            value = getattr(body, name)
            changes[key] = _ms(value) if name == "expires_at" else value
    if "is_active" in changes and changes["is_active"] is None:
        raise Problem(422, "validation-error", "is_active: true or false")
    return changes


class Origins:
    """Builds short URLs: the configured base URL, else the request's own origin."""

    def __init__(self, config: ShortenerConfig) -> None:
        self.base = config.base_url.rstrip("/")
        base_host = urlsplit(self.base).hostname if self.base else None
        self.bare = bool(base_host and base_host in config.short_hosts)
        self.scheme = urlsplit(self.base).scheme if self.base else ""

    def short_url(self, link: Link, request: Request | None) -> str:
        origin = self.base or (
            f"{request.url.scheme}://{request.url.netloc}" if request else "http://localhost"
        )
        scheme = self.scheme or (request.url.scheme if request else "https")
        if link.domain:
            return f"{scheme}://{link.domain}/{link.short_code}"
        return f"{origin}/{link.short_code}" if self.bare else f"{origin}/r/{link.short_code}"


def link_out(link: Link, url: str) -> LinkOut:
    return LinkOut(
        short_code=link.short_code,
        short_url=url,
        long_url=link.long_url,
        domain=link.domain or None,
        description=link.description,
        created_at=_when(link.created_at_ms),
        updated_at=_when(link.updated_at_ms),
        expires_at=_when(link.expires_at_ms),
        click_count=link.click_count,
        is_active=link.is_active,
        is_custom=link.is_custom,
        redirect_type=link.redirect_status,
        max_visits=link.max_visits,
        password_protected=link.password_hash is not None,
        blocked_reason=link.blocked_reason,
    )


def encode_cursor(sort: str, descending: bool, link: Link) -> str:
    value = link.created_at_ms if sort == "created" else link.click_count
    raw = orjson.dumps([sort, descending, value, link.link_id])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str, sort: str, descending: bool) -> tuple[int, int]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        c_sort, c_desc, value, link_id = orjson.loads(raw)
        if c_sort != sort or c_desc != descending:
            raise ValueError("cursor of another ordering")
        return int(value), int(link_id)
    except (ValueError, TypeError, binascii.Error, orjson.JSONDecodeError):
        raise Problem(
            422,
            "validation-error",
            "cursor: not a cursor of this listing (use next_cursor as given, same sort/order)",
            errors=[{"field": "cursor", "message": "invalid cursor"}],
        ) from None


UNLOCK_PAGE = """<!doctype html><html><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width,initial-scale=1"><title>Password required</title>
</head><body><form method="post"><p>This link is protected by a password.</p>
<input type="password" name="password" autofocus required maxlength="200">
<button type="submit">Continue</button></form></body></html>"""


# --- the redirect (lean) -------------------------------------------------------------------


def redirect_handler(service: ShortenerService, runtime: Runtime) -> Any:
    trusted = parse_networks(runtime.settings.ratelimit_trusted_proxies)
    clock = runtime.clock
    redirected = REDIRECTS.labels("redirected")

    async def redirect(scope: Any, _body: bytes) -> LeanResult:
        code: str = scope["path_params"]["short_code"]
        host = ua = referrer = accept = b""
        for name, value in scope["headers"]:
            if name == b"host":
                host = value
            elif name == b"user-agent":
                ua = value
            elif name == b"referer":
                referrer = value
            elif name == b"accept":
                accept = value
        found = service.domain_of_raw_host(host)
        domain = found if found is not None else ""
        target = service.cached(domain, code)
        if target is _MISSING:
            target = await service.resolve(domain, code)
        now = clock.now_ms()
        status, problem = check_target(target, now)
        if problem is not None:
            REDIRECTS.labels(status).inc()
            raise problem
        assert isinstance(target, Target)
        if target.protected:
            REDIRECTS.labels("password_required").inc()
            if b"text/html" in accept:
                body = UNLOCK_PAGE.encode()
                return 401, body, [(b"content-type", b"text/html; charset=utf-8")]
            raise Problem(
                401,
                "password-required",
                "this link is protected: POST its password to this URL (form field `password`)",
            )
        if target.max_visits and not await service.take_visit(target):
            REDIRECTS.labels("exhausted").inc()
            raise Problem(410, "link-exhausted", "this link has reached its visit limit")
        ip = client_ip(scope, trusted) or ""
        service.visit(
            domain, code, target, ip, ua.decode("latin-1"), referrer.decode("latin-1"), now
        )
        redirected.inc()
        return (
            target.status,
            b"",
            [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"location", target.location),
                (b"cache-control", b"private, max-age=0"),
            ],
        )

    return redirect


def check_target(target: Any, now_ms: int) -> tuple[str, Problem | None]:
    if target is None:
        return "not_found", Problem(404, "link-not-found", "no such short link")
    if not target.active:
        return "disabled", Problem(404, "link-not-found", "no such short link")
    if target.expires_at_ms and now_ms >= target.expires_at_ms:
        return "expired", Problem(410, "link-expired", "this link has expired")
    return "ok", None


# --- the router ----------------------------------------------------------------------------


def build_router(service: ShortenerService, runtime: Runtime, lean: Any) -> APIRouter:
    router = APIRouter(tags=["shortener"])
    reader = require("shortener:read")
    admin = require("shortener:admin")
    origins = Origins(service.config)
    config = service.config

    async def creator(
        request: Request,
        _bearer: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)],
        _header: Annotated[str | None, Security(API_KEY_HEADER)],
    ) -> Principal | None:
        """shortener:write, or no key at all where anonymous creation is turned on."""
        if key_from_headers(request.headers) is None and config.anonymous:
            return None
        return await authenticate(request.scope, request.headers, runtime.keys, "shortener:write")

    creator.required_scope = "shortener:write"  # type: ignore[attr-defined]
    writer = require("shortener:write")
    maybe_writer = Depends(creator)

    trusted = parse_networks(runtime.settings.ratelimit_trusted_proxies)

    async def limit_unlocks(domain: str, code: str, ip: str) -> None:
        """Password guesses: UNLOCK_PER_CLIENT per client and UNLOCK_PER_LINK per link in each
        UNLOCK_WINDOW seconds, whatever the rate-limit guard says of public paths."""
        kv = runtime.kv
        for key, most in (
            (kv.key("unlock", domain, code, ip), UNLOCK_PER_CLIENT),
            (kv.key("unlock", domain, code), UNLOCK_PER_LINK),
        ):
            tries = await kv.incr(key, ttl=UNLOCK_WINDOW)
            if tries > most:
                wait = await kv.ttl(key) or UNLOCK_WINDOW
                raise Problem(
                    429,
                    "too-many-attempts",
                    f"too many password attempts for this link; retry in {wait:.0f} s",
                    headers={"Retry-After": str(max(1, round(wait)))},
                )

    def owner_of(principal: Principal | None) -> str:
        return principal.subject if principal is not None else ANONYMOUS

    async def owned(code: str, domain: str | None, principal: Principal) -> Link:
        try:
            return await service.owned(
                (domain or "").lower(),
                code,
                principal.subject,
                admin=principal.can("shortener:admin"),
            )
        except (LookupError, NotOwner):
            # Someone else's link is as unknown as a missing one: no probing for codes.
            raise NotFound("link", code) from None

    async def create_many(
        principal: Principal | None, items: list[CreateItem]
    ) -> list[Link | Exception]:
        can_alias = None if principal is not None else False
        if principal is not None and principal.can("shortener:admin"):
            can_alias = True
        try:
            return await service.create(owner_of(principal), items, can_alias=can_alias)
        except LookupError as exc:
            raise Problem(403, "no-account", str(exc)) from None

    @router.post(
        "/api/v1/urls",
        status_code=201,
        response_model=LinkOut,
        summary="Shorten a URL",
        responses={
            403: {"description": "monthly quota used up"},
            409: {"description": "the alias is taken"},
        },
    )
    async def create(
        body: CreateIn, request: Request, principal: Principal | None = maybe_writer
    ) -> LinkOut:
        [outcome] = await create_many(principal, [body.item()])
        if not isinstance(outcome, Link):
            raise as_problem(outcome)
        return link_out(outcome, origins.short_url(outcome, request))

    @router.post(
        "/api/v1/urls/bulk",
        response_model=BulkOut,
        summary=f"Shorten up to {MAX_BULK} URLs; a status per item",
        responses={403: {"description": "not a shortener account's key"}},
    )
    async def bulk(body: BulkIn, request: Request, principal: Principal = writer) -> BulkOut:
        if len(body.urls) > MAX_BULK:
            raise Problem(
                422,
                "validation-error",
                f"urls: at most {MAX_BULK} per call, got {len(body.urls)}",
                errors=[{"field": "urls", "message": f"at most {MAX_BULK} items"}],
            )
        outcomes = await create_many(principal, [u.item() for u in body.urls])
        return bulk_out(outcomes, lambda link: origins.short_url(link, request))

    @router.get("/api/v1/urls", response_model=PageOut, summary="Your links, a page at a time")
    async def list_links(
        request: Request,
        principal: Principal = reader,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
        cursor: Annotated[str | None, Query(max_length=200)] = None,
        sort: Literal["created", "clicks"] = "created",
        order: Literal["asc", "desc"] = "desc",
        search: Annotated[str, Query(max_length=200)] = "",
        domain: Domain = None,
        owner: Annotated[str | None, Query(max_length=200, description="admins only")] = None,
    ) -> PageOut:
        descending = order == "desc"
        who: str | None = principal.subject
        if owner is not None:
            if not principal.can("shortener:admin"):
                raise Problem(
                    403, "forbidden", "listing another owner's links needs shortener:admin"
                )
            who = owner
        after = decode_cursor(cursor, sort, descending) if cursor else None
        page = await service.page(
            who,
            limit=limit + 1,
            sort=sort,
            descending=descending,
            after=after,
            search=search,
            domain=domain.lower() if domain is not None else None,
        )
        more = len(page) > limit
        page = page[:limit]
        return PageOut(
            items=[link_out(link, origins.short_url(link, request)) for link in page],
            next_cursor=encode_cursor(sort, descending, page[-1]) if more and page else None,
        )

    @router.get("/api/v1/urls/{short_code}", response_model=LinkOut, summary="One of your links")
    async def get_link(
        short_code: Code, request: Request, domain: Domain = None, principal: Principal = reader
    ) -> LinkOut:
        link = await owned(short_code, domain, principal)
        fresh = await service.get(link.domain, link.short_code)
        return link_out(fresh or link, origins.short_url(link, request))

    @router.put("/api/v1/urls/{short_code}", response_model=UpdatedOut, summary="Change a link")
    async def update_link(
        short_code: Code,
        body: UpdateIn,
        request: Request,
        domain: Domain = None,
        principal: Principal = writer,
    ) -> UpdatedOut:
        link = await owned(short_code, domain, principal)
        changes = changes_of(body)
        try:
            updated = await service.update(link, changes)
        except LinkError as exc:
            raise link_error(exc) from None
        except LookupError:
            raise NotFound("link", short_code) from None
        return UpdatedOut(**link_out(updated, origins.short_url(updated, request)).model_dump())

    @router.delete("/api/v1/urls/{short_code}", response_model=DeletedOut, summary="Delete a link")
    async def delete_link(
        short_code: Code, domain: Domain = None, principal: Principal = writer
    ) -> DeletedOut:
        link = await owned(short_code, domain, principal)
        return DeletedOut(deleted=await service.delete(link))

    @router.get("/api/v1/analytics/{short_code}", summary="Click analytics of one of your links")
    async def analytics(
        short_code: Code,
        domain: Domain = None,
        start_date: date | None = None,
        end_date: date | None = None,
        granularity: Literal["hour", "day", "week"] = "day",
        include_bots: bool = False,
        principal: Principal = reader,
    ) -> dict[str, Any]:
        link = await owned(short_code, domain, principal)
        if service.recorder is None:
            raise Problem(404, "analytics-disabled", "click analytics are turned off here")
        if start_date and end_date and end_date < start_date:
            raise Problem(
                422,
                "validation-error",
                "end_date: before start_date",
                errors=[{"field": "end_date", "message": "before start_date"}],
            )
        report = await service.recorder.report(
            link.domain,
            link.short_code,
            start=start_date,
            end=end_date,
            granularity=granularity,
            include_bots=include_bots,
        )
        return {**report, "short_code": link.short_code, "domain": link.domain or None}

    @router.get(
        REDIRECT_PATH,
        summary="Redirect to the link's URL (302, or the link's own type)",
        status_code=302,
        responses={
            301: {"description": "a permanent link"},
            401: {"description": "the link needs its password"},
            404: {"description": "unknown code"},
            410: {"description": "expired, or visit limit reached"},
        },
        response_class=Response,
    )
    async def redirect(short_code: Code, request: Request) -> Response:
        return await lean_response(lean, request)

    @router.post(
        REDIRECT_PATH,
        summary="Open a password-protected link (form field or JSON `password`)",
        status_code=302,
        response_class=Response,
        responses={
            403: {"description": "wrong password"},
            404: {"description": "unknown code"},
            429: {"description": "too many password attempts"},
        },
    )
    async def unlock(short_code: Code, request: Request) -> Response:
        raw = await request.body()
        if len(raw) > 4_096:
            raise Problem(413, "body-too-large", "the password form is at most 4,096 bytes")
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        password = ""
        if media == "application/json":
            try:
                password = str(orjson.loads(raw).get("password", ""))
            except (orjson.JSONDecodeError, AttributeError):
                raise Problem(400, "malformed-json", "the body is not a JSON object") from None
        else:
            password = (parse_qs(raw.decode("utf-8", "replace")).get("password") or [""])[0]
        host = request.headers.get("host", "").lower()
        found = service.domain_of_host(host)
        domain = found if found is not None else ""
        link = await service.get(domain, short_code)
        target = target_of(link) if link is not None else None
        _, problem = check_target(target, runtime.clock.now_ms())
        if problem is not None:
            raise problem
        assert link is not None and target is not None
        if link.password_hash is not None:
            await limit_unlocks(domain, short_code, client_ip(request.scope, trusted) or "")
            # scrypt takes tens of milliseconds of CPU: not on the event loop.
            if not await asyncio.to_thread(check_password, password, link.password_hash):
                REDIRECTS.labels("wrong_password").inc()
                raise Problem(403, "wrong-password", "the password is not right")
        if target.max_visits and not await service.take_visit(target):
            raise Problem(410, "link-exhausted", "this link has reached its visit limit")
        service.visit(
            domain,
            short_code,
            target,
            request.client.host if request.client else "",
            request.headers.get("user-agent", ""),
            request.headers.get("referer", ""),
        )
        return RedirectResponse(link.long_url, status_code=303)

    @router.get(
        QR_PATH,
        summary="The short link as a QR code (SVG or PNG)",
        response_class=Response,
        responses={200: {"content": {"image/svg+xml": {}, "image/png": {}}}},
    )
    async def qr(
        short_code: Code,
        request: Request,
        format: Literal["svg", "png"] = "svg",
        scale: Annotated[int, Query(ge=1, le=40)] = 8,
        border: Annotated[int, Query(ge=0, le=10)] = 2,
    ) -> Response:
        import io

        import segno

        host = request.headers.get("host", "").lower()
        found = service.domain_of_host(host)
        domain = found if found is not None else ""
        link = await service.get(domain, short_code)
        if link is None or not link.is_active:
            raise NotFound("link", short_code)
        code = segno.make(origins.short_url(link, request), error="m")
        out = io.BytesIO()
        if format == "png":
            code.save(out, kind="png", scale=scale, border=border)
            media = "image/png"
        else:
            code.save(out, kind="svg", scale=scale, border=border, xmldecl=False)
            media = "image/svg+xml"
        return Response(
            out.getvalue(), media_type=media, headers={"Cache-Control": "public, max-age=3600"}
        )

    # --- accounts --------------------------------------------------------------------------

    def account_out(account: Any, api_key: str | None = None) -> AccountOut:
        plan = config.plans.get(account.plan)
        return AccountOut(
            account_id=account.account_id,
            email=account.email,
            plan=account.plan,
            monthly_quota=account.monthly_quota,
            current_usage=account.current_usage,
            usage_month=account.usage_month,
            custom_aliases=bool(plan and plan.custom_aliases),
            created_at=_when(account.created_at_ms),
            api_key=api_key,
        )

    @router.post(
        "/api/v1/accounts",
        status_code=201,
        response_model=AccountOut,
        summary="Create a shortener account and its API key (shown once)",
        responses={409: {"description": "an account with this email exists"}},
    )
    async def create_account(body: AccountIn, _: Principal = admin) -> AccountOut:
        async def make_key(name: str, owner: str) -> tuple[str, str]:
            record, plaintext = await runtime.keys.create(name, ["shortener:write"], owner=owner)
            return record.key_id, plaintext

        try:
            account, plaintext = await service.create_account(body.email, body.plan, make_key)
        except LinkError as exc:
            if exc.reason == "taken":
                raise Problem(409, "account-exists", exc.message) from None
            raise link_error(exc) from None
        return account_out(account, plaintext)

    @router.get(
        "/api/v1/accounts/{account_id}",
        response_model=AccountOut,
        summary="An account's plan and usage (its own key, or an admin)",
    )
    async def get_account(
        account_id: Annotated[str, Path(max_length=32)], principal: Principal = reader
    ) -> AccountOut:
        if principal.subject != f"account:{account_id}" and not principal.can("shortener:admin"):
            raise NotFound("account", account_id)
        account = await service.store.account(account_id)
        if account is None:
            raise NotFound("account", account_id)
        return account_out(account)

    # --- branded domains -------------------------------------------------------------------

    methods = verify_methods(runtime.settings)

    def verify_url(domain: str) -> str | None:
        if "http" not in methods:
            return None
        return str(runtime.settings.shortener_domain_verify_url.format(domain=domain))

    def domain_out(row: dict[str, Any], show_token: bool) -> DomainOut:
        verified = row["verified_at_ms"] is not None
        domain, token = row["domain"], row["token"]
        url = None if verified else verify_url(domain)
        proof = None
        if show_token and not verified:
            proof = Verification(
                http=HttpProof(url=url, body=token) if url else None,
                dns=DnsProof(name=txt_name(domain), value=txt_value(token))
                if "dns" in methods
                else None,
            )
        return DomainOut(
            domain=domain,
            verified=verified,
            verified_at=_when(row["verified_at_ms"]),
            created_at=_when(row["created_at_ms"]),
            verification_url=url,
            verification_token=token if show_token and not verified else None,
            verification=proof,
        )

    @router.post(
        "/api/v1/domains",
        status_code=201,
        response_model=DomainOut,
        summary="Register a branded domain; serve the token at the verification URL, then verify",
        responses={409: {"description": "the domain is registered already"}},
    )
    async def add_domain(body: DomainIn, principal: Principal = writer) -> DomainOut:
        try:
            await service.add_domain(principal.subject, body.domain)
        except LinkError as exc:
            if exc.reason == "taken":
                raise Problem(409, "domain-taken", exc.message) from None
            raise link_error(exc) from None
        row = await service.store.domain(body.domain.strip().lower().rstrip("."))
        assert row is not None
        return domain_out(row, True)

    @router.get("/api/v1/domains", response_model=list[DomainOut], summary="Your domains")
    async def list_domains(principal: Principal = reader) -> list[DomainOut]:
        return [domain_out(r, True) for r in await service.store.domains(principal.subject)]

    @router.post(
        "/api/v1/domains/{domain}/verify",
        response_model=DomainOut,
        summary="Check the verification token; the domain serves links once verified",
        responses={409: {"description": "the token was not found at the verification URL"}},
    )
    async def verify_domain(
        domain: Annotated[str, Path(max_length=253)], principal: Principal = writer
    ) -> DomainOut:
        try:
            ok = await service.verify_domain(
                domain.lower(), principal.subject, admin=principal.can("shortener:admin")
            )
        except LookupError:
            raise NotFound("domain", domain) from None
        if not ok:
            where = [f"{url} (HTTP)"] if (url := verify_url(domain.lower())) else []
            if "dns" in methods:
                where.append(f"the TXT record {txt_name(domain.lower())}")
            raise Problem(
                409,
                "domain-not-verified",
                f"the verification token was not found at {' or '.join(where) or 'any method'}; "
                "publish it there and retry",
            )
        row = await service.store.domain(domain.lower())
        assert row is not None
        return domain_out(row, False)

    @router.delete("/api/v1/domains/{domain}", response_model=DeletedOut, summary="Remove a domain")
    async def delete_domain(
        domain: Annotated[str, Path(max_length=253)], principal: Principal = writer
    ) -> DeletedOut:
        row = await service.store.domain(domain.lower())
        if row is None or (
            row["owner"] != principal.subject and not principal.can("shortener:admin")
        ):
            raise NotFound("domain", domain)
        deleted = await service.store.delete_domain(domain.lower())
        await service.load_domains()
        return DeletedOut(deleted=deleted)

    @router.post(
        "/api/v1/shortener/blocklist/recheck",
        summary="Check every link against the blocklist now",
    )
    async def recheck(_: Principal = admin) -> dict[str, int]:
        return await service.recheck_blocklist()

    return router


# --- wiring --------------------------------------------------------------------------------


def plans_from(settings: Any) -> dict[str, Plan]:
    plans = dict(DEFAULT_PLANS)
    for name, overrides in settings.shortener_plans.items():
        base = plans.get(name, Plan(name, 1_000, False, 0))
        values = {
            "name": name,
            "monthly_quota": base.monthly_quota,
            "custom_aliases": base.custom_aliases,
            "branded_domains": base.branded_domains,
            **overrides,
        }
        plans[name] = Plan(**values)
    return plans


def config_from(settings: Any) -> ShortenerConfig:
    return ShortenerConfig(
        code_length=settings.shortener_code_length,
        base_url=settings.shortener_base_url,
        short_hosts=frozenset(h.lower() for h in settings.shortener_hosts),
        plans=plans_from(settings),
        anonymous=settings.shortener_anonymous,
        blocklist=Blocklist.of(settings.shortener_blocklist),
        cache_size=settings.shortener_cache_size,
        cache_seconds=60.0 if settings.redis_url else 5.0,
        retention_days=settings.shortener_retention_days,
    )


def verify_methods(settings: Any) -> list[str]:
    """The configured domain verification methods (`http`, `dns`), in order."""
    methods = settings.shortener_domain_verify_methods
    return [m.strip().lower() for m in methods if m.strip()]


def verifier_for(settings: Any) -> Any:
    """Branded-domain ownership by the configured methods; any one of them proves it."""
    return verifier_from(
        verify_methods(settings),
        settings.shortener_domain_verify_url,
        settings.shortener_dns_nameservers or None,
    )


def recorder_for(runtime: Runtime, *, in_process: bool | None = None) -> Any:
    """The click recorder: in a process of its own by default (see click_process.py)."""
    settings = runtime.settings
    if not settings.shortener_analytics:
        return None
    url = settings.analytics_store_url
    separate = settings.shortener_analytics_process if in_process is None else not in_process
    if separate:
        from tenfold.shortener.click_process import ChildConfig, ClickProcess

        config = ChildConfig(
            analytics_url=url,
            data_dir=str(settings.data_dir),
            salt_key=master_key(settings).hex(),
            capacity=settings.shortener_click_buffer,
            geoip_db=settings.geoip_db,
            count_bots=settings.shortener_count_bots,
            raw_clicks=settings.shortener_raw_clicks,
            redis_url=settings.redis_url,
            redis_prefix=settings.redis_prefix,
        )
        return ClickProcess(config, capacity=settings.shortener_click_buffer)
    from tenfold.kernel.analytics import analytics_from_url
    from tenfold.shortener.clicks import ClickRecorder

    return ClickRecorder(
        analytics_from_url(url, settings.data_dir),
        clock=runtime.clock,
        salt_key=master_key(settings),
        capacity=settings.shortener_click_buffer,
        geoip_db=settings.geoip_db,
        count_bots=settings.shortener_count_bots,
        kv=runtime.kv,
        raw_clicks=settings.shortener_raw_clicks,
    )


def service_for(runtime: Runtime) -> ShortenerService:
    existing = runtime.services.get("shortener")
    if isinstance(existing, ShortenerService):
        return existing
    settings = runtime.settings
    service = ShortenerService(
        SqlLinkStore(runtime.engine),
        master=lambda: master_key(settings),  # at start: scale-out may lack it until then
        kv=runtime.kv if settings.redis_url else None,
        recorder=None,  # opened at start
        clock=runtime.clock,
        config=config_from(settings),
        verifier=verifier_for(settings),
    )
    runtime.services["shortener"] = service
    return service


def declare_tasks(runtime: Runtime, service: ShortenerService) -> None:
    """The shortener's background work, on the task queue: the periodic blocklist re-check and
    the purge of links past their retention."""
    from tenfold.tasks import service_tasks

    tasks = service_tasks(runtime)

    @tasks.task("shortener.recheck_blocklist", timeout=3_600, max_retries=2)
    async def recheck_blocklist() -> dict[str, int]:
        return await service.recheck_blocklist()

    @tasks.task("shortener.purge", timeout=3_600, max_retries=2)
    async def purge() -> int:
        total = 0
        while (gone := await service.purge()) > 0:
            total += gone
        return total

    tasks.schedule(
        "shortener.recheck_blocklist", runtime.settings.shortener_blocklist_cron, recheck_blocklist
    )
    tasks.schedule("shortener.purge", "43 3 * * *", purge)


def mount(runtime: Runtime) -> Mount:
    service = service_for(runtime)
    lean = redirect_handler(service, runtime)

    reserved = service.config.reserved

    def on_short_host(scope: Any) -> bool:
        if scope["path"][1:].lower() in reserved:  # /healthz, /metrics, ... stay the app's
            return False
        for name, value in scope["headers"]:
            if name == b"host":
                return service.domain_of_raw_host(value) is not None
        return False

    declare_tasks(runtime, service)

    async def on_start() -> None:
        service.codes  # noqa: B018 - the master key is required: fail at start, not at a creation
        service.recorder = recorder_for(runtime)
        if service.recorder is not None:
            try:
                await service.recorder.start()
            except BackendUnavailable as exc:  # redirects go on; clicks wait in the buffer
                log.warning("shortener.analytics_unavailable", error=str(exc))
        await service.start()
        runtime.every(FLUSH_SECONDS, service.flush, "shortener-flush")
        runtime.every(DOMAINS_RELOAD_SECONDS, service.load_domains, "shortener-domains")

    async def on_stop() -> None:
        await service.stop()
        if service.recorder is not None:
            await service.recorder.close()
            service.recorder = None

    return Mount(
        name="shortener",
        routers=[build_router(service, runtime, lean)],
        on_start=[on_start],
        on_stop=[on_stop],
        raw_body_prefixes=("/r/",),
        public_paths=(REDIRECT_PATH, QR_PATH),
        lean_routes=[
            LeanRoute("GET", REDIRECT_PATH, lean, public=True),
            LeanRoute("GET", BRANDED_PATH, lean, when=on_short_host, public=True),
        ],
    )
