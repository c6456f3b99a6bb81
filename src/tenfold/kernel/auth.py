"""API keys with scopes, and the calling principal.

A key reads `tf_<id>_<secret>`. Only SHA-256 of the secret is stored (the secret has 256 bits
of entropy, so a slow hash adds nothing); the plaintext is shown once, at creation.
Scopes are `<service>:read`, `<service>:write`, `<service>:admin`, or `*` for all;
`admin` implies `write`, which implies `read`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any

import orjson
import sqlalchemy as sa
from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.ext.asyncio import AsyncEngine

from tenfold.kernel.clock import SYSTEM_CLOCK, Clock
from tenfold.kernel.http import Problem
from tenfold.kernel.sql import metadata

LEVELS = ("read", "write", "admin")
KEY_PREFIX = "tf_"
CACHE_SECONDS = 5.0  # a revoked key stops working everywhere within this bound
REFRESH_AHEAD = 0.2  # in the last fifth of that, a use refreshes the entry in the background

api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("key_id", sa.String(16), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("secret_hash", sa.String(64), nullable=False),
    sa.Column("scopes", sa.Text, nullable=False),
    sa.Column("owner", sa.String(200), nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
    sa.Index("ix_api_keys_owner", "owner"),
)


class Unauthorized(Problem):
    def __init__(self, detail: str = "an API key is required") -> None:
        super().__init__(
            401, "unauthorized", detail, headers={"WWW-Authenticate": 'Bearer realm="tenfold"'}
        )


class Forbidden(Problem):
    def __init__(self, scope: str) -> None:
        super().__init__(
            403, "forbidden", f"this API key lacks the scope {scope}", required_scope=scope
        )


def parse_scope(scope: str) -> tuple[str, str]:
    if scope == "*":
        return "*", "admin"
    service, sep, level = scope.partition(":")
    if not sep or not service or level not in LEVELS:
        raise ValueError(f"invalid scope {scope!r}; expected <service>:read|write|admin or *")
    return service, level


def grants(held: frozenset[str], wanted: str) -> bool:
    if "*" in held or wanted in held:
        return True
    service, level = parse_scope(wanted)
    higher = LEVELS[LEVELS.index(level) + 1 :]
    return any(f"{service}:{h}" in held for h in higher)


@dataclass(frozen=True, slots=True)
class Principal:
    key_id: str
    name: str
    scopes: frozenset[str]
    owner: str | None = None

    def can(self, scope: str) -> bool:
        return grants(self.scopes, scope)

    @property
    def subject(self) -> str:
        """Who owns what this key creates."""
        return self.owner or f"key:{self.key_id}"


@dataclass(frozen=True, slots=True)
class ApiKeyRecord:
    key_id: str
    name: str
    scopes: tuple[str, ...]
    owner: str | None
    created_at: datetime
    revoked_at: datetime | None = None


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def split_key(plaintext: str) -> tuple[str, str] | None:
    if not plaintext.startswith(KEY_PREFIX):
        return None
    key_id, sep, secret = plaintext[len(KEY_PREFIX) :].partition("_")
    if not sep or not key_id or len(key_id) > 16 or len(secret) < 20:
        return None
    return key_id, secret


@dataclass
class KeyStore:
    """API keys in SQL, with a short in-process cache on the verification path."""

    engine: AsyncEngine
    clock: Clock = SYSTEM_CLOCK
    _cache: dict[str, tuple[float, str, Principal | None]] = field(default_factory=dict)
    _loading: dict[str, asyncio.Future[tuple[float, str, Principal | None]]] = field(
        default_factory=dict
    )
    # Keys presented and verified lately, each until its cache entry wants refreshing: a busy
    # key skips the parse, the hash and the comparison. Only keys that verified land here.
    _verified: dict[str, tuple[float, Principal]] = field(default_factory=dict)

    async def create(
        self, name: str, scopes: list[str], owner: str | None = None
    ) -> tuple[ApiKeyRecord, str]:
        for scope in scopes:
            parse_scope(scope)
        if not scopes:
            raise ValueError("a key needs at least one scope")
        key_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(32)
        now = datetime.fromtimestamp(self.clock.now(), UTC)
        async with self.engine.begin() as conn:
            await conn.execute(
                api_keys.insert().values(
                    key_id=key_id,
                    name=name,
                    secret_hash=_hash(secret),
                    scopes=orjson.dumps(sorted(set(scopes))).decode(),
                    owner=owner,
                    created_at=now,
                )
            )
        record = ApiKeyRecord(key_id, name, tuple(sorted(set(scopes))), owner, now)
        return record, f"{KEY_PREFIX}{key_id}_{secret}"

    async def list(self, *, include_revoked: bool = False) -> list[ApiKeyRecord]:
        query = sa.select(api_keys).order_by(api_keys.c.created_at, api_keys.c.key_id)
        if not include_revoked:
            query = query.where(api_keys.c.revoked_at.is_(None))
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).mappings().all()
        return [_record(row) for row in rows]

    async def count_active(self) -> int:
        query = sa.select(sa.func.count()).select_from(api_keys)
        async with self.engine.connect() as conn:
            result = await conn.execute(query.where(api_keys.c.revoked_at.is_(None)))
            return int(result.scalar_one())

    async def revoke(self, key_id: str) -> bool:
        now = datetime.fromtimestamp(self.clock.now(), UTC)
        async with self.engine.begin() as conn:
            result = await conn.execute(
                api_keys.update()
                .where(api_keys.c.key_id == key_id, api_keys.c.revoked_at.is_(None))
                .values(revoked_at=now)
            )
        self.forget(key_id)
        return bool(result.rowcount)

    def forget(self, key_id: str) -> None:
        self._cache.pop(key_id, None)
        self._verified.clear()

    def verified(self, plaintext: str) -> Principal | None:
        """The principal of a key verified lately, with no I/O; None means "ask `verify`"."""
        known = self._verified.get(plaintext)
        if known is not None and self.clock.now() < known[0]:
            return known[1]
        return None

    async def verify(self, plaintext: str) -> Principal | None:
        known = self.verified(plaintext)
        if known is not None:
            return known
        parts = split_key(plaintext)
        if parts is None:
            return None
        key_id, secret = parts
        now = self.clock.now()
        cached = self._cache.get(key_id)
        if cached is None or cached[0] <= now:
            cached = await self._lookup(key_id)  # expired: wait (one query for all waiters)
        elif cached[0] - now < CACHE_SECONDS * REFRESH_AHEAD and key_id not in self._loading:
            # Nearly expired: refresh in the background so busy keys never wait on SQL.
            self._loading[key_id] = asyncio.ensure_future(self._load(key_id))
        expires, stored_hash, principal = cached
        if principal is None or not hmac.compare_digest(stored_hash, _hash(secret)):
            return None
        fresh_until = expires - CACHE_SECONDS * REFRESH_AHEAD
        if fresh_until > now:
            if len(self._verified) >= 10_000:
                self._verified.clear()
            self._verified[plaintext] = (fresh_until, principal)
        return principal

    async def close(self) -> None:
        """Let background refreshes finish (before the engine is disposed)."""
        pending = list(self._loading.values())
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    async def _lookup(self, key_id: str) -> tuple[float, str, Principal | None]:
        loading = self._loading.get(key_id)
        if loading is None:
            loading = self._loading[key_id] = asyncio.ensure_future(self._load(key_id))
        return await asyncio.shield(loading)

    async def _load(self, key_id: str) -> tuple[float, str, Principal | None]:
        try:
            async with self.engine.connect() as conn:
                row = (
                    (await conn.execute(sa.select(api_keys).where(api_keys.c.key_id == key_id)))
                    .mappings()
                    .first()
                )
            now = self.clock.now()
            if row is None or row["revoked_at"] is not None:
                entry: tuple[float, str, Principal | None] = (now + CACHE_SECONDS, "", None)
            else:
                record = _record(row)
                found = Principal(key_id, record.name, frozenset(record.scopes), record.owner)
                entry = (now + CACHE_SECONDS, str(row["secret_hash"]), found)
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[key_id] = entry
            return entry
        finally:
            self._loading.pop(key_id, None)


def _record(row: Any) -> ApiKeyRecord:
    return ApiKeyRecord(
        key_id=row["key_id"],
        name=row["name"],
        scopes=tuple(orjson.loads(row["scopes"])),
        owner=row["owner"],
        created_at=row["created_at"],
        revoked_at=row["revoked_at"],
    )


def key_from_scope(scope: Any) -> str | None:
    """`key_from_headers` over a raw ASGI scope, in one pass over its headers."""
    auth = header = None
    for name, value in scope["headers"]:
        if name == b"authorization":
            auth = value if auth is None else auth
        elif name == b"x-api-key":
            header = value if header is None else header
    if auth is not None:
        scheme, _, rest = auth.partition(b" ")
        key = rest.strip()
        if key and scheme.lower() == b"bearer":
            return str(key.decode("latin-1"))
    if header is not None:
        return str(header.decode("latin-1")).strip() or None
    return None


def key_from_headers(headers: Any) -> str | None:
    """The presented key: `Authorization: Bearer <key>` or `X-API-Key: <key>`."""
    auth = headers.get("authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return str(value.strip())
    key = headers.get("x-api-key")
    return str(key).strip() if key else None


Authenticator = Callable[[Any], Awaitable[Principal | None]]

# Declared for the OpenAPI document (and the "Authorize" button of /docs); either one will do.
# The key itself is read by `key_from_headers`, the same function the rate-limit guard uses.
BEARER = HTTPBearer(
    scheme_name="bearerKey",
    description="An API key: `Authorization: Bearer <key>`",
    auto_error=False,
)
API_KEY_HEADER = APIKeyHeader(
    name="X-API-Key",
    scheme_name="apiKeyHeader",
    description="An API key: `X-API-Key: <key>`",
    auto_error=False,
)


async def authenticate(asgi_scope: Any, headers: Any, keys: KeyStore, scope: str) -> Principal:
    """The caller's principal, which must hold `scope`; cached on the ASGI scope's state."""
    state = asgi_scope.setdefault("state", {})
    principal: Principal | None = state.get("principal")
    if principal is None:
        presented = key_from_headers(headers)
        if presented is None:
            raise Unauthorized()
        principal = await keys.verify(presented)
        if principal is None:
            raise Unauthorized("the API key is invalid or revoked")
        state["principal"] = principal
    if not principal.can(scope):
        raise Forbidden(scope)
    return principal


def known_principal(asgi_scope: Any, scope: str) -> Principal | None:
    """The principal already on the request (set by the guard) if it holds `scope`; a lean
    handler's shortcut: `known_principal(s, "x:read") or await authenticate(...)`."""
    state = asgi_scope.get("state")
    principal: Principal | None = state.get("principal") if state else None
    return principal if principal is not None and principal.can(scope) else None


def require(scope: str) -> Any:
    """A FastAPI dependency: the caller's key must hold `scope` (401 without a key, 403 without
    the scope). The principal may already be on the request, set by the rate-limit guard."""
    parse_scope(scope)

    async def dependency(
        request: Request,
        _bearer: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)],
        _header: Annotated[str | None, Security(API_KEY_HEADER)],
    ) -> Principal:
        keys: KeyStore = request.app.state.runtime.keys
        return await authenticate(request.scope, request.headers, keys, scope)

    dependency.required_scope = scope  # type: ignore[attr-defined]
    return Depends(dependency)
